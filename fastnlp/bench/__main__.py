"""Command line: python -m fastnlp.bench [--op attention|crf|all] [--device cpu|cuda] [--quick]
[--out DIR] [--repeats N]."""

import argparse
import importlib
import sys

# Op name -> module providing ``cases(device, quick) -> list[harness.Case]``.
# A new op (LSTM, attention, ...) is added by writing its module and one line here.
# Modules are imported only when their op is run, so a broken or not-yet-built op
# does not stop the others.
OPS = {
    "attention": "fastnlp.bench.attention",
    "crf": "fastnlp.bench.crf",
    "lstm": "fastnlp.bench.lstm",
}

DEFAULT_REPEATS = 15
QUICK_REPEATS = 5


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m fastnlp.bench",
        description="Time fastnlp's ops against baseline implementations; print a "
                    "table, append a CSV and draw a PNG in --out.",
    )
    parser.add_argument("--op", choices=sorted(OPS) + ["all"], default="all",
                        help="op to benchmark (default: all)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="device for the tensors (default: cpu)")
    parser.add_argument("--quick", action="store_true",
                        help=f"fewer LSTM and attention-module shapes and {QUICK_REPEATS} repeats: "
                             "what `make bench` runs, under 5 minutes on a 2-core CPU (the full "
                             "run takes about 10)")
    parser.add_argument("--out", default="benchmarks/results",
                        help="directory for bench_<device>.csv/.png, relative to the "
                             "current directory (default: benchmarks/results)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed samples per implementation (default: "
                             f"{DEFAULT_REPEATS}, {QUICK_REPEATS} with --quick)")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from . import harness

    ops = sorted(OPS) if args.op == "all" else [args.op]
    cases = []
    failed = []
    for op in ops:
        try:
            module = importlib.import_module(OPS[op])
            cases.extend(module.cases(args.device, args.quick))
        except Exception as exc:
            # With a single op there is nothing else to do: show the real error.
            if len(ops) == 1:
                raise
            print(f"skipping op {op!r}: {type(exc).__name__}: {exc}", file=sys.stderr)
            failed.append(op)
    if cases:
        harness.run(cases, args.device, args.repeats, args.out)
    return 1 if failed or not cases else 0


if __name__ == "__main__":
    sys.exit(main())
