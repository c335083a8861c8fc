"""Generic benchmark machinery: timing, progress, table, CSV and plot.

Nothing here knows about a particular op. An op module (e.g. ``fastnlp.bench.crf``)
builds a list of :class:`Case` objects; :func:`run` times them and records the results.

Timing method, and why:

* Every implementation of a case is first warmed up (lazy init, allocator caches,
  one-off dispatch costs must not land in the measurements).
* Each implementation is calibrated once: the number of back-to-back calls that make
  one *sample* is doubled until a sample lasts at least ``TARGET_SAMPLE_S``, so that
  timer resolution and per-sample overhead are negligible for very fast calls.
  Reported times are per call (sample time / calls per sample).
* Samples are taken round-robin: in each repeat every implementation is sampled once,
  and the order is rotated from one repeat to the next. Slow drift of the machine
  (thermal throttling, another process waking up) then hits all implementations alike
  instead of biasing whichever ran first or last.
* Very slow implementations (seconds per call) get fewer repeats, spread evenly over
  the run, so that one of them cannot take the whole time budget (see IMPL_BUDGET_S);
  the CSV records how many samples each row is based on.
* We report the median (robust to the odd outlier) and the inter-quartile range.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gc
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

# A sample should last at least this long; see module docstring.
TARGET_SAMPLE_S = 2e-3
# Warm-up: up to this many calls, but stop early once warm-up took this long, so that
# an implementation needing seconds per call is not warmed up for ten seconds.
WARMUP_CALLS = 3
WARMUP_MAX_S = 1.0
# Wall-clock budget for the repeats of one implementation of one case. Very slow
# baselines (seconds per call) are then sampled on fewer, evenly spread repeats --
# at least MIN_REPEATS -- so one of them cannot eat the whole run. Their speed-up
# is so large that the extra noise does not matter; the CSV records the repeats used.
IMPL_BUDGET_S = 8.0
MIN_REPEATS = 3
# Upper bound on calls per sample, guards against a no-op callable looping forever.
MAX_INNER_CALLS = 1 << 16

CSV_COLUMNS = [
    "date",             # ISO 8601, UTC, same for every row of one run
    "commit",           # short git hash of the cwd repository, "-dirty" if modified
    "device",           # "cpu" or "cuda"
    "device_name",      # CPU model + thread count, or GPU name
    "torch",            # torch.__version__
    "fastnlp",          # fastnlp.__version__
    "op",               # e.g. "crf"
    "case",             # task and shape, e.g. "nll fwd+bwd B=32 T=64 K=20"
    "impl",             # implementation name
    "role",             # "ours", "baseline" or "other"
    "median_ms",        # median time of one call, milliseconds
    "q25_ms",           # 25th percentile
    "q75_ms",           # 75th percentile
    "min_ms",
    "max_ms",
    "repeats",          # number of samples behind the statistics
    "inner_calls",      # calls per sample (calibrated)
    "speedup_vs_this",  # this impl's median / ours' median: how many times faster ours is
    "check",            # "ok", "FAILED: ..." or "" when the case has no check
]


@dataclass
class Case:
    """One thing to measure, implemented several ways.

    ``impls`` maps an implementation name to a zero-argument callable that performs one
    complete measured step (e.g. forward + backward). Whatever the callable returns is
    passed, from its first call, to ``check`` (if given) which returns None when the
    implementations agree and an explanation otherwise -- so a benchmark never reports
    a speed-up for an implementation that computes something else.
    """

    op: str
    name: str
    impls: Dict[str, Callable[[], Any]]
    baselines: List[str]
    ours: str
    check: Optional[Callable[[Dict[str, Any]], Optional[str]]] = None

    def __post_init__(self):
        if self.ours not in self.impls:
            raise ValueError(f"{self.op}/{self.name}: ours={self.ours!r} is not an impl")
        for b in self.baselines:
            if b not in self.impls:
                raise ValueError(f"{self.op}/{self.name}: baseline {b!r} is not an impl")

    def role(self, impl: str) -> str:
        if impl == self.ours:
            return "ours"
        return "baseline" if impl in self.baselines else "other"


@dataclass
class Timing:
    """Per-call times (ms) of one implementation of one case."""

    times_ms: List[float] = field(default_factory=list)
    inner_calls: int = 1

    @property
    def median(self) -> float:
        return _quantile(self.times_ms, 0.5)

    @property
    def q25(self) -> float:
        return _quantile(self.times_ms, 0.25)

    @property
    def q75(self) -> float:
        return _quantile(self.times_ms, 0.75)


@dataclass
class CaseResult:
    case: Case
    timings: Dict[str, Timing]
    check: str  # "ok", "FAILED: ...", or "" when the case has no check

    def speedup(self, impl: str) -> float:
        """How many times faster ours is than ``impl`` (1.0 for ours itself)."""
        return self.timings[impl].median / self.timings[self.case.ours].median


def _quantile(values: List[float], q: float) -> float:
    """Linear-interpolation quantile (same as numpy's default); numpy is not required."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# --------------------------------------------------------------------------- timing


def _synchronizer(device: str) -> Callable[[], None]:
    # CUDA kernels run asynchronously: without a synchronize before and after, we would
    # time the launches, not the work. Never touch CUDA on a CPU run (it may not exist).
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


PRE_SAMPLE_S = 0.005
PRE_SAMPLE_CALLS = 3


def _sample(fn: Callable[[], Any], n: int, sync: Callable[[], None]) -> float:
    """Seconds taken by n back-to-back calls of fn, after untimed warm-up calls.

    Interleaving means the previous calls were another implementation's, which
    may have left this one's memory cold: on the development VM the kernel's
    DAMON "pageout" scheme drops pages of code not run for a while, and the
    first one or two calls after a torch-struct step cost 10-20x a warm one.
    In a training loop each layer runs warm, so calls are repeated untimed for
    PRE_SAMPLE_S (at most PRE_SAMPLE_CALLS, at least one) before timing.
    """
    t_start = time.perf_counter()
    for _ in range(PRE_SAMPLE_CALLS):
        fn()
        sync()
        if time.perf_counter() - t_start > PRE_SAMPLE_S:
            break
    # Like timeit, keep the cyclic garbage collector out of the measured window: a
    # collection triggered by one implementation's garbage would be charged to another.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return time.perf_counter() - t0
    finally:
        if gc_was_enabled:
            gc.enable()


def _warmup(fn: Callable[[], Any], sync: Callable[[], None]) -> tuple:
    """Warm fn up. Returns the result of its first call (for the case's check) and an
    estimate of one call's duration in seconds: the fastest warm call (the first call
    is cold and only used if it was the only one), because the minimum is the estimate
    least disturbed by whatever else the machine was doing."""
    t_start = time.perf_counter()
    sync()
    first = fn()
    sync()
    best_s = time.perf_counter() - t_start
    warm = []
    for _ in range(WARMUP_CALLS - 1):
        if time.perf_counter() - t_start > WARMUP_MAX_S:
            break
        t0 = time.perf_counter()
        fn()
        sync()
        warm.append(time.perf_counter() - t0)
    return first, min(warm) if warm else best_s


def _calibrate(fn: Callable[[], Any], sync: Callable[[], None]) -> tuple:
    """Calls per sample so that a sample lasts >= TARGET_SAMPLE_S; also seconds per call."""
    n = 1
    while True:
        dt = _sample(fn, n, sync)
        if dt >= TARGET_SAMPLE_S or n >= MAX_INNER_CALLS:
            return n, dt / n
        # Jump close to the target in one step when we can, but at most 10x at a
        # time because a first very short sample is a poor estimate.
        grow = TARGET_SAMPLE_S / dt * 1.2 if dt > 0 else 10.0
        n = min(MAX_INNER_CALLS, max(n + 1, int(n * min(grow, 10.0))))


def _spread_repeats(n_used: int, repeats: int) -> set:
    """n_used repeat indices spread evenly over range(repeats)."""
    if n_used >= repeats:
        return set(range(repeats))
    return {int(j * repeats / n_used) for j in range(n_used)}


def measure(case: Case, repeats: int, device: str, bar=None) -> CaseResult:
    """Time every implementation of one case, interleaved; see module docstring."""
    sync = _synchronizer(device)
    names = list(case.impls)
    if bar is not None:
        bar.set_description(f"{case.op} {case.name} (warm-up)")

    first_results = {}
    timings = {}
    active_repeats = {}
    for name in names:
        fn = case.impls[name]
        first_results[name], call_s = _warmup(fn, sync)
        if call_s >= TARGET_SAMPLE_S:
            # One warm call already lasts a full sample: calibrating would only spend
            # another call (seconds, for the slowest baselines) to find inner = 1.
            inner, per_call_s = 1, call_s
        else:
            inner, per_call_s = _calibrate(fn, sync)
        timings[name] = Timing(inner_calls=inner)
        sample_s = inner * per_call_s
        n_used = repeats
        if sample_s * repeats > IMPL_BUDGET_S:
            n_used = min(repeats, max(MIN_REPEATS, int(IMPL_BUDGET_S / sample_s)))
        active_repeats[name] = _spread_repeats(n_used, repeats)

    check = ""
    if case.check is not None:
        try:
            msg = case.check(first_results)
        except Exception as exc:  # a broken check must not lose the timings
            msg = f"check raised {type(exc).__name__}: {exc}"
        check = "ok" if msg is None else f"FAILED: {msg}"
    del first_results  # may hold large tensors

    if bar is not None:
        bar.set_description(f"{case.op} {case.name}")
    for r in range(repeats):
        # Rotate the order so no implementation always runs first or last.
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if r not in active_repeats[name]:
                continue
            t = timings[name]
            dt = _sample(case.impls[name], t.inner_calls, sync)
            t.times_ms.append(dt / t.inner_calls * 1e3)
        if bar is not None:
            bar.update(1)
    return CaseResult(case=case, timings=timings, check=check)


# --------------------------------------------------------------------------- environment


def git_commit(cwd: Optional[str] = None) -> str:
    """Short hash of HEAD of the repository in cwd, "-dirty" if tracked files changed.

    Where there is no repository (a copy of the tree, as on a lent GPU
    machine), FASTNLP_COMMIT names the commit, else "unknown".
    """
    fallback = os.environ.get("FASTNLP_COMMIT", "unknown")
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd,
            capture_output=True, text=True, timeout=10,
        )
        if head.returncode != 0:
            return fallback
        commit = head.stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
            capture_output=True, text=True, timeout=10,
        )
        if status.returncode == 0 and status.stdout.strip():
            commit += "-dirty"
        return commit
    except (OSError, subprocess.SubprocessError):
        return fallback


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    # On Linux platform.processor() is usually just "x86_64"; the model name is in
    # /proc/cpuinfo. The thread count matters as much as the model for CPU timings.
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "cpu"
    return f"{name} x{torch.get_num_threads()} threads"


def fastnlp_version() -> str:
    try:
        import fastnlp

        version = getattr(fastnlp, "__version__", None)
        if version:
            return str(version)
    except Exception:
        pass
    try:
        from importlib.metadata import version

        return version("fastnlp-kernels")
    except Exception:
        return "unknown"


def environment(device: str) -> Dict[str, str]:
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "commit": git_commit(),
        "device": torch.device(device).type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "fastnlp": fastnlp_version(),
    }


# --------------------------------------------------------------------------- progress bar


class _NoBar:
    """Stand-in when tqdm is not installed: same methods, does nothing."""

    def set_description(self, *args, **kwargs):
        pass

    def update(self, *args, **kwargs):
        pass

    def close(self):
        pass


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="rep", leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------- reporting


def _fmt_ms(ms: float) -> str:
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _fmt_speedup(x: float) -> str:
    return f"{x:.0f}x" if x >= 100 else f"{x:.1f}x" if x >= 10 else f"{x:.2f}x"


def format_table(results: List[CaseResult]) -> str:
    lines = []
    for res in results:
        case = res.case
        lines.append("")
        lines.append(f"{case.op} | {case.name}")
        width = max(len(n) for n in case.impls) + 2
        lines.append(
            f"  {'impl':<{width}}{'median ms':>11}  {'IQR ms (q25-q75)':>20}{'n':>4}"
            f"  ours speed-up"
        )
        for name in case.impls:
            t = res.timings[name]
            iqr = f"{_fmt_ms(t.q25)}-{_fmt_ms(t.q75)}"
            role = case.role(name)
            if role == "ours":
                speed = "(ours)"
            elif role == "baseline":
                speed = _fmt_speedup(res.speedup(name))
            else:
                speed = ""
            lines.append(
                f"  {name:<{width}}{_fmt_ms(t.median):>11}  {iqr:>20}{len(t.times_ms):>4}"
                f"  {speed}"
            )
        if res.check.startswith("FAILED"):
            lines.append(f"  WARNING: implementations disagree, {res.check}")
    return "\n".join(lines)


def csv_rows(results: List[CaseResult], env: Dict[str, str]) -> List[Dict[str, Any]]:
    rows = []
    for res in results:
        for name, t in res.timings.items():
            row = dict(env)
            row.update(
                op=res.case.op,
                case=res.case.name,
                impl=name,
                role=res.case.role(name),
                median_ms=f"{t.median:.6g}",
                q25_ms=f"{t.q25:.6g}",
                q75_ms=f"{t.q75:.6g}",
                min_ms=f"{min(t.times_ms):.6g}",
                max_ms=f"{max(t.times_ms):.6g}",
                repeats=len(t.times_ms),
                inner_calls=t.inner_calls,
                speedup_vs_this=f"{res.speedup(name):.4g}",
                check=res.check,
            )
            rows.append(row)
    return rows


def append_csv(path: str, rows: List[Dict[str, Any]]) -> str:
    """Append rows to path (header written if new); returns the path actually written.

    If path exists with a different header (written by another version of this tool),
    appending would misalign columns, so the rows go to a new file next to it instead.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header != CSV_COLUMNS:
            stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            root, ext = os.path.splitext(path)
            new_path = f"{root}.{stamp}{ext}"
            print(f"{path} has different columns; writing {new_path} instead")
            path = new_path
    is_new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if is_new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def plot(csv_path: str, png_path: str) -> Optional[str]:
    """Grouped bar chart of ours' speed-up over each baseline, drawn from the CSV.

    Uses the latest row per (op, case, impl, device_name); when the CSV holds several
    machines, only the machine of the most recent row is drawn (speed-ups from
    different machines do not belong on one axis). Returns png_path, or None when
    matplotlib is missing or there is nothing to draw.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed; must precede pyplot import
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed "
              "(pip install fastnlp-kernels[bench])")
        return None

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    machine = rows[-1]["device_name"]
    latest = {}  # later rows overwrite earlier ones: the file is in time order
    for row in rows:
        if row["device_name"] == machine:
            latest[(row["op"], row["case"], row["impl"])] = row

    # One panel per op, each with only its own baselines: a shared axis would
    # reserve a slot for every baseline of every op in every group.
    panels: Dict[str, Dict[str, List[tuple]]] = {}  # op -> case -> [(baseline, speed-up)]
    for (op, case, impl), row in latest.items():
        cases_of_op = panels.setdefault(op, {})
        cases_of_op.setdefault(case, [])
        if row["role"] == "baseline":
            cases_of_op[case].append((impl, float(row["speedup_vs_this"])))
    panels = {op: {case: bars for case, bars in cases_of_op.items() if bars}
              for op, cases_of_op in panels.items()}
    panels = {op: cases_of_op for op, cases_of_op in panels.items() if cases_of_op}
    if not panels:
        return None

    heights = [sum(len(bars) for bars in cases_of_op.values()) + 1 for cases_of_op in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 0.28 * sum(heights) + 1.2 * len(panels)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (op, cases_of_op) in zip(axes[:, 0], panels.items()):
        baselines = list(dict.fromkeys(impl for bars in cases_of_op.values() for impl, _ in bars))
        ys, labels, all_x = [], [], []
        y = 0.0
        for case, bars in cases_of_op.items():
            group_top = y
            for impl, x in bars:
                colour = colours[baselines.index(impl) % len(colours)]
                # Bars grow from 1x, so a baseline that beats us points left, visibly.
                ax.barh(y, x - 1.0, left=1.0, height=0.8, color=colour,
                        label=impl if impl not in ax.get_legend_handles_labels()[1] else None)
                ax.annotate(_fmt_speedup(x), (x, y), va="center", ha="left" if x >= 1 else "right",
                            fontsize=7, xytext=(3 if x >= 1 else -3, 0), textcoords="offset points")
                all_x.append(x)
                y += 1
            ys.append((group_top + y - 1) / 2)
            labels.append(case)
            y += 0.6  # a gap between cases
        ax.set_xscale("log")
        ax.set_xlim(min(0.3, min(all_x) / 2), max(3.0, max(all_x) * 3))
        ax.axvline(1.0, color="black", linewidth=0.8)  # left of this line fastnlp is slower
        ax.set_yticks(ys)
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(op, fontsize=9, loc="left")
        ax.legend(fontsize=7, loc="lower right")
    axes[-1, 0].set_xlabel("speed-up of fastnlp (baseline time / fastnlp time, log scale)")
    last = rows[-1]
    fig.suptitle(f"fastnlp speed-up on {machine} (latest run of each case; last: torch {last['torch']}, "
                 f"commit {last['commit']}, {last['date']})", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


# --------------------------------------------------------------------------- driver


def _warn_if_busy() -> None:
    # Interleaving protects the ratios against drift, not against a machine that is
    # saturated by other work; say so rather than let noisy numbers pass silently.
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on Windows
        return
    cpus = os.cpu_count() or 1
    if load > cpus:
        print(f"warning: the machine is busy (load average {load:.1f} on {cpus} CPUs); "
              f"timings will be noisy")


def run(cases: List[Case], device: str, repeats: int, out_dir: str) -> List[CaseResult]:
    """Time all cases, print the table, append the CSV, draw the plot."""
    env = environment(device)
    print(f"device: {env['device_name']} | torch {env['torch']} | "
          f"fastnlp {env['fastnlp']} | commit {env['commit']} | repeats {repeats}")
    _warn_if_busy()
    bar = _progress(len(cases) * repeats)
    results = []
    try:
        for case in cases:
            results.append(measure(case, repeats, device, bar))
    finally:
        bar.close()
    print(format_table(results))
    print()

    dev = env["device"]
    csv_path = append_csv(os.path.join(out_dir, f"bench_{dev}.csv"), csv_rows(results, env))
    print(f"results appended to {csv_path}")
    png = plot(csv_path, os.path.join(out_dir, f"bench_{dev}.png"))
    if png:
        print(f"plot written to {png}")
    return results
