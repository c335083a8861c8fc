"""Runs test_cuda_emulated.py with the emulated CUDA kernels built under
AddressSanitizer and UndefinedBehaviorSanitizer. `make test` runs it after the
main suite (which runs the same tests plain), in a pytest process of its own.
The bindings' tests skip here: built under the sanitizers they would take
three times as long as the kernels' tests, and they run in the plain suite.

What this adds to the emulator's own checks (cuda_emulation/emulator.h), as
compute-sanitizer's memcheck would on a GPU: a kernel that reads or writes
outside a tensor (the kernels' global memory is torch's CPU tensors here,
each its own allocation with ASan's red zones around it) or outside its
launch's dynamic shared memory (whose guards the emulator poisons) ends the
run with ASan's report. UBSan ends it at an access outside a __shared__ array
(its object-size check) and at undefined behaviour in the kernels' own
arithmetic: an index past a fixed-size array (the kernels' per-row sums in
registers), a float converted to an integer that cannot hold it, a signed
overflow, a misaligned access. test_cuda_emulated.py checks that each kind is
caught (test_sanitizers_stop_a_kernel_outside_its_bounds).

The sanitizer runtimes must be loaded before anything else in the process,
hence a process of its own (LD_PRELOAD). Its standard error stays the
terminal's (pytest's --capture=sys), so a report shows in the log. Stack
arrays are checked by UBSan's bounds check rather than ASan: the emulator
runs threads as fibers, and ASan clears a fiber stack's shadow at each switch.

    python python_tests/run_emulated_sanitized.py [pytest arguments]

Where g++ has no ASan or UBSan runtime, it says so and runs nothing.
"""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
FLAGS = "-fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all -fno-omit-frame-pointer"
# detect_leaks=0: CPython and torch keep memory until exit, which LeakSanitizer
# would report at the end of every run.
ASAN_OPTIONS = "detect_leaks=0"
UBSAN_OPTIONS = "print_stacktrace=1"


def runtime(name: str) -> str:
    """The path of g++'s sanitizer runtime `name`, or "" where it has none."""
    try:
        path = subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""
    return path if os.path.isabs(path) and os.path.exists(path) else ""


def main(arguments) -> int:
    command = [sys.executable, "-m", "pytest", str(TESTS / "test_cuda_emulated.py"), "--capture=sys", *arguments]
    runtimes = [runtime("libasan.so"), runtime("libubsan.so")]
    if not all(runtimes):
        print("run_emulated_sanitized.py: skipped, g++ has no ASan/UBSan runtime here", flush=True)
        return 0
    env = dict(os.environ)
    env["FASTNLP_EMULATION_SANITIZE"] = FLAGS
    env["LD_PRELOAD"] = " ".join(runtimes + [env.get("LD_PRELOAD", "")]).strip()
    env["ASAN_OPTIONS"] = ":".join(filter(None, [ASAN_OPTIONS, env.get("ASAN_OPTIONS", "")]))
    env["UBSAN_OPTIONS"] = ":".join(filter(None, [UBSAN_OPTIONS, env.get("UBSAN_OPTIONS", "")]))
    return subprocess.call(command, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
