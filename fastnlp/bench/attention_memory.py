"""Peak memory of one attention training step (forward + backward), fastnlp
against F.scaled_dot_product_attention, at a long sequence.

    python -m fastnlp.bench.attention_memory [--device cpu|cuda] [--seq-len 4096] [--out DIR]

Each implementation runs in a fresh subprocess, so one's allocations cannot
hide another's. On CUDA the figure is torch.cuda.max_memory_allocated; on the
CPU, where torch keeps no allocator statistics, it is the process's peak
resident set size after the step (ru_maxrss) minus its resident size just
before it, with inputs and gradients already allocated (an upper bound when
the step stays below an earlier peak, e.g. from importing torch). Rows are
appended to DIR/attention_memory_<device>.csv with provenance.
"""

import argparse
import csv
import json
import os
import subprocess
import sys

CASES = ["fastnlp no mask", "sdpa no mask", "fastnlp key padding", "sdpa key padding", "fastnlp causal",
         "sdpa causal"]


def _child(case: str, device: str, B: int, H: int, T: int, D: int) -> dict:
    """Runs in the subprocess: one step of `case`, returns its peak memory in MiB."""
    import resource

    import torch
    import torch.nn.functional as F

    import fastnlp

    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(B, H, T, D, generator=g).to(device) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    lengths[0] = T
    key_padding = (torch.arange(T)[None, :] < lengths[:, None]).to(device)
    impl, _, kind = case.partition(" ")
    # Gradients land in .grad; allocate them up front so that they are not
    # counted as the step's working memory.
    for t in (q, k, v):
        t.grad = torch.zeros_like(t)

    def step():
        if impl == "fastnlp":
            out = fastnlp.ops.attention(q, k, v, key_padding_mask=key_padding if kind == "key padding" else None,
                                        is_causal=kind == "causal")
        else:
            out = F.scaled_dot_product_attention(q, k, v,
                                                 attn_mask=key_padding[:, None, None, :]
                                                 if kind == "key padding" else None,
                                                 is_causal=kind == "causal")
        out.backward(grad)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        base_kib = resident_pages * os.sysconf("SC_PAGE_SIZE") / 1024
        step()
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kib) / 1024  # ru_maxrss: KiB
    return {"case": case, "peak_mib": round(peak_mib, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastnlp.bench.attention_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = (args.batch, args.heads, args.seq_len, args.head_dim)
    if args.child:
        print(json.dumps(_child(args.child, args.device, *shape)))
        return 0

    from fastnlp.bench import harness

    env = harness.environment(args.device)
    rows = []
    for case in CASES:
        child = subprocess.run([sys.executable, "-m", "fastnlp.bench.attention_memory", "--child", case,
                                "--device", args.device, "--seq-len", str(args.seq_len), "--batch",
                                str(args.batch), "--heads", str(args.heads), "--head-dim", str(args.head_dim)],
                               capture_output=True, text=True)
        if child.returncode != 0:
            print(f"{case}: failed\n{child.stderr[-2000:]}", file=sys.stderr)
            continue
        result = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append(result)
        print(f"{case:22s} peak {result['peak_mib']:9.1f} MiB")
    B, H, T, D = shape
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"attention_memory_{env['device']}.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["date", "commit", "device_name", "torch", "shape", "case", "peak_mib", "measure"])
        measure = "max_memory_allocated growth" if args.device == "cuda" else "ru_maxrss minus RSS before"
        for r in rows:
            writer.writerow([env["date"], env["commit"], env["device_name"], env["torch"],
                             f"B={B} H={H} T={T} D={D}", r["case"], r["peak_mib"], measure])
    print(f"appended to {path}")
    return 0 if len(rows) == len(CASES) else 1


if __name__ == "__main__":
    sys.exit(main())
