"""The Triton attention kernels compiled for Hopper (sm_90): no GPU needed, only
Triton's own compiler and ptxas. It catches what the interpreter cannot
(types, layouts, shared memory), and runs where the interpreter cannot run
the kernels (see test_attention_triton.py), so it lives in a file of its own.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

# Slow (a minute or more), so opt-in: FASTNLP_TRITON_COMPILE=1.
_COMPILE_FOR_SM90 = """
from triton import compile
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastnlp.triton import attention as tri

FLOATS = {"qk_hi", "qk_lo", "ik_hi", "ik_lo"}
# (dtype, head dim, masks, causality and dropout?, a bool attn_mask (else an additive one, in lse's dtype)?)
CASES = [("bf16", 128, False, True), ("bf16", 128, True, True), ("bf16", 64, True, False),
         ("fp16", 64, True, True), ("fp32", 256, True, False)]
if tri.FLOAT64_DOT:  # otherwise refused before any kernel runs
    CASES += [("fp64", 64, True, True), ("fp64", 64, True, False)]
for dtype, head_dim, masks, mask_bool in CASES:
    stats = "*fp64" if dtype == "fp64" else "*fp32"  # lse and delta: float64 for float64 inputs
    pointers = dict(LSE=stats, DELTA=stats, MASK="*u8" if mask_bool else stats, KPM="*u8", KV_END="*i32",
                    COUNTER="*i32")
    for name in ("Q", "K", "V", "O", "DO", "DK", "DV_", "DQ"):
        pointers[name] = "*" + dtype
    for kernel, kind in ((tri._attn_fwd, "fwd"), (tri._attn_bwd_dkdv, "dkdv"), (tri._attn_bwd_dq, "dq")):
        block_m, block_n, warps, stages = tri._blocks(kind, head_dim, None)
        consts = dict(HAS_MASK=masks, MASK_BOOL=mask_bool, HAS_KPM=masks, IS_CAUSAL=masks, DROPOUT=masks,
                      PRECISION="ieee", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=head_dim, BLOCK_DV=head_dim)
        if kind == "fwd":
            consts["COUNT_TILES"] = False
        signature = {a: "constexpr" if a in consts else pointers.get(a, "fp32" if a in FLOATS else "i32")
                     for a in kernel.arg_names}
        compile(ASTSource(kernel, signature, consts), target=GPUTarget("cuda", 90, 32),
                options=dict(num_warps=warps, num_stages=stages))
print("ok")
"""


@pytest.mark.skipif(os.environ.get("FASTNLP_TRITON_COMPILE") != "1", reason="opt-in: FASTNLP_TRITON_COMPILE=1")
def test_kernels_compile_for_sm90():
    root = Path(__file__).resolve().parent.parent
    env = {n: v for n, v in os.environ.items() if n != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
