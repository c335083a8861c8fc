"""The Triton attention kernels (fastnlp/triton/attention.py).

Without a GPU the launchers run on CPU tensors through Triton's interpreter
(conftest.py sets TRITON_INTERPRET=1), so every shape here is tiny and the
tiles are 16 x 16: a few key blocks per row, partial last blocks, head dims
padded up to a power of two. The oracle is fastnlp.reference.attention in
float64 on the same (rounded) inputs. The CUDA tests at the end go through
fastnlp.ops.attention and are skipped here.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from markers import requires_cuda  # noqa: E402

import fastnlp.triton  # noqa: E402
from fastnlp import ops  # noqa: E402  (registers the CUDA kernels)
from fastnlp.ops import attention as attention_module  # noqa: E402
from fastnlp.reference import attention as reference  # noqa: E402
from fastnlp.triton import attention as tri  # noqa: E402

requires_float64_dot = pytest.mark.skipif(not tri.FLOAT64_DOT, reason="Triton < 3.9: no float64 tl.dot")
# The tests that call the launchers directly give them CPU tensors, which only
# Triton's interpreter takes. With a GPU (no interpreter: conftest.py) the
# compiled kernels are tested through fastnlp.ops.attention, at the end.
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="launchers on CPU tensors: Triton's interpreter only")


@triton.jit
def _loop_to_a_loaded_bound(OUT, BOUND):
    for i in range(0, tl.load(BOUND + tl.program_id(0))):
        tl.store(OUT + i, i)


def _interpreter_takes_loaded_loop_bounds() -> bool:
    """The kernels loop up to bounds they load at run time. Some interpreters
    (Triton 3.6 here, and 3.1; not 3.7 or 3.9) turn such a bound into an int
    with int(array) on a 1-element array, which NumPy 2.4 refuses."""
    out = torch.zeros(3, dtype=torch.int32)
    try:
        _loop_to_a_loaded_bound[(1,)](out, torch.tensor([3], dtype=torch.int32))
    except Exception as error:  # noqa: BLE001  (triton.runtime.errors.InterpreterError, or what it wraps)
        if "0-dimensional arrays" in repr(error):
            return False
        raise
    assert out.tolist() == [0, 1, 2], f"the interpreter ran the probe loop wrongly: {out.tolist()}"
    return True


if os.environ.get("TRITON_INTERPRET") == "1" and not _interpreter_takes_loaded_loop_bounds():
    # Compiled kernels are not concerned; only this interpreter is.
    pytest.skip(f"Triton {triton.__version__}'s interpreter cannot take a loop bound loaded at run time "
                "under this NumPy", allow_module_level=True)

BLOCKS = (16, 16)


def make(batch, heads, kv_heads, query_len, key_len, head_dim, value_dim, dtype=torch.float32, seed=0,
         mask=None, lengths=None):
    """q, k, v in `dtype` and the masks as the kernels take them (expanded attn_mask, bool padding)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, query_len, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, key_len, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, key_len, value_dim, generator=gen).to(dtype)
    full = (batch, heads, query_len, key_len)
    attn_mask = None
    if mask == "bool":  # broadcast over batch: stride 0 there
        attn_mask = (torch.rand(1, heads, query_len, key_len, generator=gen) < 0.7).expand(full)
    elif mask == "float":  # broadcast over heads, with some -inf
        bias = torch.randn(batch, 1, query_len, key_len, generator=gen)
        bias[torch.rand(bias.shape, generator=gen) < 0.2] = -math.inf
        attn_mask = bias.to(torch.float64 if dtype == torch.float64 else torch.float32).expand(full)
    kpm = None
    if lengths is not None:
        kpm = torch.arange(key_len)[None, :] < torch.tensor(lengths)[:, None]
    return q, k, v, attn_mask, kpm


def run_kernels(q, k, v, attn_mask, kpm, causal, scale, grad_out, dropout_p=0.0, rng_state=None):
    out, lse = tri.attention_forward(q, k, v, attn_mask, kpm, causal, dropout_p, scale, rng_state, blocks=BLOCKS)
    grads = tri.attention_backward(grad_out, q, k, v, out, lse, attn_mask, kpm, causal, dropout_p, scale, rng_state,
                                   blocks=BLOCKS)
    return out, lse, grads


def run_reference(q, k, v, attn_mask, kpm, causal, scale, grad_out, dtype=torch.float64, dropout_p=0.0,
                  dropout_mask=None):
    leaves = [x.detach().to(dtype).requires_grad_(True) for x in (q, k, v)]
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(dtype)
    out = reference.attention(*leaves, attn_mask, kpm, causal, dropout_p, scale, dropout_mask)
    out.backward(grad_out.to(dtype))
    return out.detach(), tuple(x.grad for x in leaves)


def reference_lse(q, k, attn_mask, kpm, causal, scale):
    q, k = q.double(), k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        scores = scores + attn_mask.double()
    visible = reference.visible_mask(*scores.shape, attn_mask, kpm, causal, q.device)
    return torch.logsumexp(scores.masked_fill(~visible, -math.inf), dim=-1)


def assert_close(got, expected, tol, what):
    err = (got.double() - expected.double()).abs().max().item() if got.numel() else 0.0
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


# (batch, heads, kv_heads, Lq, Lk, D, Dv, mask, lengths, causal)
CASES = {
    "odd-gqa": (2, 4, 2, 5, 37, 16, 24, None, None, False),
    "bool-causal": (1, 2, 1, 37, 37, 24, 16, "bool", None, True),
    "float-padding": (2, 2, 2, 21, 37, 16, 16, "float", [37, 13], False),
    "all-masks-more-queries": (2, 3, 1, 40, 29, 24, 8, "bool", [29, 20], True),
}


@interpreted
@pytest.mark.parametrize("case", list(CASES))
def test_float32_matches_reference(case):
    batch, heads, kv_heads, lq, lk, d, dv, mask, lengths, causal = CASES[case]
    q, k, v, attn_mask, kpm = make(batch, heads, kv_heads, lq, lk, d, dv, mask=mask, lengths=lengths, seed=1)
    scale = 1 / math.sqrt(d)
    grad_out = torch.randn(batch, heads, lq, dv, generator=torch.Generator().manual_seed(2))
    out, lse, grads = run_kernels(q, k, v, attn_mask, kpm, causal, scale, grad_out)
    exp_out, exp_grads = run_reference(q, k, v, attn_mask, kpm, causal, scale, grad_out)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert_close(out, exp_out, 1e-5, "out")
    exp_lse = reference_lse(q, k, attn_mask, kpm, causal, scale)
    finite = torch.isfinite(exp_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert_close(lse[finite], exp_lse[finite], 1e-5, "lse")
    for name, g, e in zip(("dq", "dk", "dv"), grads, exp_grads):
        assert g.shape == e.shape
        assert_close(g, e, 5e-5, name)


@interpreted
@requires_float64_dot
def test_float64_to_rounding_with_float_mask_and_custom_scale():
    q, k, v, attn_mask, kpm = make(2, 2, 1, 9, 37, 16, 24, dtype=torch.float64, mask="float", lengths=[30, 37])
    grad_out = torch.randn(2, 2, 9, 24, dtype=torch.float64)
    out, lse, grads = run_kernels(q, k, v, attn_mask, kpm, False, 0.37, grad_out)
    exp_out, exp_grads = run_reference(q, k, v, attn_mask, kpm, False, 0.37, grad_out)
    assert lse.dtype == torch.float64
    for name, got, exp in zip(("out", "dq", "dk", "dv"), (out,) + grads, (exp_out,) + exp_grads):
        assert_close(got, exp, 1e-12, name)


@interpreted
def test_float16_error_bounded_by_reference_error():
    q, k, v, attn_mask, kpm = make(2, 2, 1, 24, 37, 32, 16, dtype=torch.float16, mask="bool", lengths=[37, 19], seed=5)
    grad_out = torch.randn(2, 2, 24, 16, generator=torch.Generator().manual_seed(6)).half()
    scale = 1 / math.sqrt(32)
    out, lse, grads = run_kernels(q, k, v, attn_mask, kpm, True, scale, grad_out)
    assert out.dtype == torch.float16 and all(g.dtype == torch.float16 for g in grads)
    low_out, low_grads = run_reference(q, k, v, attn_mask, kpm, True, scale, grad_out, dtype=torch.float16)
    exact_out, exact_grads = run_reference(q, k, v, attn_mask, kpm, True, scale, grad_out)
    for name, ours, low, exact in zip(("out", "dq", "dk", "dv"), (out,) + grads, (low_out,) + low_grads,
                                      (exact_out,) + exact_grads):
        ours_err = (ours.double() - exact).abs().max().item()
        low_err = (low.double() - exact).abs().max().item()
        assert ours_err <= 2 * low_err + 1e-4, f"{name}: error {ours_err:.3g} vs reference's own {low_err:.3g}"


@interpreted
def test_fully_masked_rows_give_zero_output_minus_inf_lse_and_zero_gradient():
    # batch 1 has no key at all; row 3 of head 0 has every key hidden by attn_mask.
    q, k, v, attn_mask, kpm = make(2, 2, 2, 7, 37, 16, 16, mask="bool", lengths=[37, 0], seed=3)
    attn_mask = attn_mask.clone()
    attn_mask[:, 0, 3] = False
    grad_out = torch.randn(2, 2, 7, 16)
    out, lse, (dq, dk, dv) = run_kernels(q, k, v, attn_mask, kpm, False, 0.25, grad_out)
    for t in (out, dq, dk, dv):
        assert not torch.isnan(t).any()
    assert (out[1] == 0).all() and (out[0, 0, 3] == 0).all()
    assert (dq[1] == 0).all() and (dq[0, 0, 3] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    assert (lse[1] == -math.inf).all() and lse[0, 0, 3] == -math.inf
    exp_out, exp_grads = run_reference(q, k, v, attn_mask, kpm, False, 0.25, grad_out)
    assert_close(out, exp_out, 1e-5, "out")
    for name, g, e in zip(("dq", "dk", "dv"), (dq, dk, dv), exp_grads):
        assert_close(g, e, 5e-5, name)


@interpreted
@requires_float64_dot
@settings(max_examples=5)
@given(data=st.data())
def test_random_problems_float64(data):
    batch = data.draw(st.integers(1, 2))
    kv_heads = data.draw(st.integers(1, 2))
    heads = kv_heads * data.draw(st.integers(1, 2))
    lq, lk = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 40))
    d, dv = data.draw(st.sampled_from([8, 16, 24, 32])), data.draw(st.sampled_from([8, 16, 24]))
    mask = data.draw(st.sampled_from([None, "bool", "float"]))
    lengths = data.draw(st.one_of(st.none(), st.lists(st.integers(0, lk), min_size=batch, max_size=batch)))
    causal = data.draw(st.booleans())
    q, k, v, attn_mask, kpm = make(batch, heads, kv_heads, lq, lk, d, dv, dtype=torch.float64, mask=mask,
                                   lengths=lengths, seed=data.draw(st.integers(0, 1000)))
    grad_out = torch.randn(batch, heads, lq, dv, dtype=torch.float64)
    out, lse, grads = run_kernels(q, k, v, attn_mask, kpm, causal, 0.3, grad_out)
    exp_out, exp_grads = run_reference(q, k, v, attn_mask, kpm, causal, 0.3, grad_out)
    for name, got, exp in zip(("out", "dq", "dk", "dv"), (out,) + grads, (exp_out,) + exp_grads):
        assert_close(got, exp, 1e-11, name)


@interpreted
def test_same_lse_convention_as_the_cpu_kernel():
    q, k, v, attn_mask, kpm = make(2, 2, 1, 5, 37, 16, 16, mask="bool", lengths=[37, 0], seed=4)
    out, lse = tri.attention_forward(q, k, v, attn_mask, kpm, True, 0.0, 0.25, None, blocks=BLOCKS)
    cpu_out, cpu_lse = torch.ops.fastnlp.attention_forward(q, k, v, attn_mask, kpm, True, 0.0, 0.25, None)
    assert torch.equal(torch.isinf(lse), torch.isinf(cpu_lse))
    assert_close(lse[torch.isfinite(lse)], cpu_lse[torch.isfinite(cpu_lse)], 1e-5, "lse")
    assert_close(out, cpu_out, 1e-5, "out")


# ---------------------------------------------------------------------------
# Dropout: the kernels draw the CPU kernel's Philox stream.


@interpreted
def test_dropout_mask_is_the_cpu_kernels_mask():
    q = torch.empty(2, 3, 19, 8)
    k = torch.empty(2, 1, 45, 8)
    rng_state = torch.tensor([0x0123456789ABCDEF >> 2, 987654321])
    keep = tri.attention_dropout_mask(q, k, 0.3, rng_state)
    assert torch.equal(keep, torch.ops.fastnlp.attention_dropout_mask(q, k, 0.3, rng_state))
    assert 0.6 < keep.float().mean().item() < 0.8


@interpreted
@requires_float64_dot
def test_dropout_forward_and_backward_match_reference_with_the_same_mask():
    p = 0.4
    rng_state = torch.tensor([2**61 + 12345, 77])
    q, k, v, attn_mask, kpm = make(2, 2, 1, 21, 37, 16, 24, dtype=torch.float64, mask="bool", lengths=[37, 25],
                                   seed=8)
    grad_out = torch.randn(2, 2, 21, 24, dtype=torch.float64)
    out, lse, grads = run_kernels(q, k, v, attn_mask, kpm, True, 0.25, grad_out, p, rng_state)
    keep = torch.ops.fastnlp.attention_dropout_mask(q, k, p, rng_state)
    exp_out, exp_grads = run_reference(q, k, v, attn_mask, kpm, True, 0.25, grad_out, dropout_p=p,
                                       dropout_mask=keep)
    for name, got, exp in zip(("out", "dq", "dk", "dv"), (out,) + grads, (exp_out,) + exp_grads):
        assert_close(got, exp, 1e-12, name)
    # Deterministic for a given rng_state, different for another.
    again, _ = tri.attention_forward(q, k, v, attn_mask, kpm, True, p, 0.25, rng_state, blocks=BLOCKS)
    assert torch.equal(out, again)
    other, _ = tri.attention_forward(q, k, v, attn_mask, kpm, True, p, 0.25, rng_state + 1, blocks=BLOCKS)
    assert not torch.equal(out, other)


# ---------------------------------------------------------------------------
# Block skipping.


def count_tiles(q, k, v, attn_mask, kpm, causal):
    counter = torch.zeros(1, dtype=torch.int32)
    tri.attention_forward(q, k, v, attn_mask, kpm, causal, 0.0, 0.25, None, blocks=BLOCKS, tile_counter=counter)
    return int(counter.item())


@interpreted
def test_skipped_tiles_are_not_computed():
    # Lq = 48, Lk = 64: 3 query blocks x 4 key blocks per head, 2 heads.
    q, k, v, _, _ = make(2, 2, 2, 48, 64, 16, 16)
    assert count_tiles(q, k, v, None, None, False) == 2 * 2 * 3 * 4
    # Causal: query block i sees key blocks 0..i.
    assert count_tiles(q, k, v, None, None, True) == 2 * 2 * (1 + 2 + 3)
    # Padding: batch 0 has 64 real keys, batch 1 only 17 (two blocks, and the
    # loop stops there); a key block of padding in the middle is skipped too.
    kpm = torch.arange(64)[None, :] < torch.tensor([64, 17])[:, None]
    assert count_tiles(q, k, v, None, kpm, False) == 2 * 3 * (4 + 2)
    kpm[0, 16:32] = False
    assert count_tiles(q, k, v, None, kpm, False) == 2 * 3 * (3 + 2)
    # attn_mask: a query block x key block tile that is all False.
    attn_mask = torch.ones(2, 2, 48, 64, dtype=torch.bool)
    attn_mask[:, :, 16:32, 48:64] = False
    assert count_tiles(q, k, v, attn_mask, None, False) == 2 * 2 * (3 * 4 - 1)
    bias = torch.zeros(2, 2, 48, 64)
    bias[:, :, :, 0:16] = -math.inf
    assert count_tiles(q, k, v, bias, None, False) == 2 * 2 * 3 * 3


@interpreted
def test_nan_keys_and_values_in_hidden_blocks_do_not_leak():
    q, k, v, _, _ = make(2, 2, 1, 20, 45, 16, 16, seed=9)
    kpm = torch.arange(45)[None, :] < torch.tensor([45, 21])[:, None]  # batch 1: block 1 partly padding
    attn_mask = torch.ones(2, 2, 20, 45, dtype=torch.bool)
    attn_mask[0, :, :, 32:45] = False  # batch 0: the last key block is hidden from every query
    clean_k, clean_v = k.clone(), v.clone()
    k[1, :, 21:], v[1, :, 21:] = math.nan, math.nan
    k[0, :, 32:], v[0, :, 32:] = math.nan, math.nan
    clean_k[1, :, 21:], clean_v[1, :, 21:] = 0, 0
    clean_k[0, :, 32:], clean_v[0, :, 32:] = 0, 0
    grad_out = torch.randn(2, 2, 20, 16)
    out, lse, (dq, dk, dv) = run_kernels(q, k, v, attn_mask, kpm, False, 0.25, grad_out)
    for t in (out, lse, dq):
        assert not torch.isnan(t).any()
    assert not torch.isnan(dk[1]).any() and not torch.isnan(dv[1]).any()
    assert (dk[1, :, 21:] == 0).all() and (dv[1, :, 21:] == 0).all()
    assert (dk[0, :, 32:] == 0).all() and (dv[0, :, 32:] == 0).all()
    exp_out, exp_grads = run_reference(q, clean_k, clean_v, attn_mask, kpm, False, 0.25, grad_out)
    assert_close(out, exp_out, 1e-5, "out")
    assert_close(dq, exp_grads[0], 5e-5, "dq")
    assert_close(dk, exp_grads[1], 5e-5, "dk")
    assert_close(dv, exp_grads[2], 5e-5, "dv")


@interpreted
def test_nan_query_row_that_sees_no_key_leaves_padding_gradients_zero():
    """A NaN in a query row hidden from every key: that row's output is 0,
    nothing but dk at real keys (0 * q, as in the reference) goes NaN, and
    padding keys sharing a block with real ones get 0 gradients."""
    q, k, v, _, _ = make(1, 2, 1, 20, 45, 16, 16, seed=10)
    kpm = torch.arange(45)[None, :] < 21  # keys 21..31 are padding in a live block
    attn_mask = torch.ones(1, 2, 20, 45, dtype=torch.bool)
    attn_mask[0, 1, 3] = False
    q[0, 1, 3, 0] = math.nan
    out, lse, (dq, dk, dv) = run_kernels(q, k, v, attn_mask, kpm, False, 0.25, torch.randn(1, 2, 20, 16))
    assert (out[0, 1, 3] == 0).all()
    for t in (out, dq, dv):
        assert not torch.isnan(t).any()
    assert (dk[0, :, 21:] == 0).all() and (dv[0, :, 21:] == 0).all()


# ---------------------------------------------------------------------------
# Registration and the CUDA path.


def test_registered_as_the_cuda_kernels():
    for name in ("attention_forward", "attention_backward", "attention_dropout_mask"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastnlp::{name}", "CUDA")


# The registered functions, called by the dispatcher and autograd as on a GPU:
# in a fresh process they replace the CPU kernels, with their default (GPU) tiles.
_THROUGH_THE_DISPATCHER = """
import os, warnings
os.environ["TRITON_INTERPRET"] = "1"
import torch
from fastnlp import ops
from fastnlp.reference import attention as reference
from fastnlp.triton import attention as tri

warnings.simplefilter("ignore")  # the dispatcher warns that the CPU kernels are overridden
lib = torch.library.Library("fastnlp", "IMPL")
calls = set()


def counted(name):
    def kernel(*args):
        calls.add(name)
        return getattr(tri, name)(*args)
    return kernel


for name in ("attention_forward", "attention_backward", "attention_dropout_mask"):
    lib.impl(name, counted(name), "CPU")
gen = torch.Generator().manual_seed(0)
q = torch.randn(2, 4, 9, 16, generator=gen, dtype=torch.float64, requires_grad=True)
k = torch.randn(2, 2, 30, 16, generator=gen, dtype=torch.float64, requires_grad=True)
v = torch.randn(2, 2, 30, 24, generator=gen, dtype=torch.float64, requires_grad=True)
mask = torch.rand(9, 30, generator=gen) < 0.8
kw = dict(attn_mask=mask, key_padding_mask=torch.tensor([30, 5]), is_causal=True)
for p in (0.0, 0.3):
    torch.manual_seed(1)
    out = ops.attention(q, k, v, dropout_p=p, **kw)
    torch.manual_seed(1)
    expected = ops.attention(q, k, v, dropout_p=p, backend="reference", **kw)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    for g, e in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad)):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
assert calls == {"attention_forward", "attention_backward", "attention_dropout_mask"}, calls
print("ok")
"""


@requires_float64_dot
def test_registered_functions_through_the_dispatcher_and_autograd():
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", _THROUGH_THE_DISPATCHER], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_without_triton_the_cuda_kernel_says_why():
    kernel = fastnlp.triton._missing("attention_forward", "ModuleNotFoundError: No module named 'triton'")
    with pytest.raises(NotImplementedError, match="triton could not be imported.*No module named 'triton'"):
        kernel(torch.zeros(1))


def test_kernel_checks_its_arguments():
    q = torch.randn(1, 2, 3, 16)
    with pytest.raises(RuntimeError, match="multiple of key/value heads"):
        tri.attention_forward(q, q[:, :1].expand(1, 3, 3, 16), q, None, None, False, 0.0, 1.0, None)
    with pytest.raises(RuntimeError, match="attn_mask must be expanded"):
        tri.attention_forward(q, q, q, torch.ones(3, 3, dtype=torch.bool), None, False, 0.0, 1.0, None)
    with pytest.raises(RuntimeError, match="needs rng_state"):
        tri.attention_forward(q, q, q, None, None, False, 0.5, 1.0, None)


def test_float64_before_triton_3_9_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(tri, "FLOAT64_DOT", False)
    q = torch.randn(1, 2, 3, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64 needs Triton >= 3.9"):
        tri.attention_forward(q, q, q, None, None, False, 0.0, 1.0, None)


GPU_CASES = [  # (B, H, Hk, Lq, Lk, D, Dv, mask kind, causal)
    (2, 4, 2, 70, 123, 64, 40, "none", False),
    (2, 4, 4, 128, 300, 128, 128, "padding", False),
    (2, 4, 1, 257, 257, 128, 128, "bool+padding", True),
    (1, 2, 2, 100, 190, 256, 256, "float", False),
    (2, 2, 1, 513, 130, 96, 80, "padding", True),
]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_cuda_half_precision_error_bounded_by_reference_error(dtype, case):
    batch, heads, kv_heads, lq, lk, d, dv, mask, causal = case
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(batch, heads, lq, d, generator=gen)
    k = torch.randn(batch, kv_heads, lk, d, generator=gen)
    v = torch.randn(batch, kv_heads, lk, dv, generator=gen)
    grad_out = torch.randn(batch, heads, lq, dv, generator=gen)
    kwargs = dict(is_causal=causal)
    if "padding" in mask:
        kwargs["key_padding_mask"] = torch.randint(0, lk + 1, (batch,), generator=gen).cuda()
    if "bool" in mask:
        kwargs["attn_mask"] = (torch.rand(1, heads, lq, lk, generator=gen) < 0.8).cuda()
    if "float" in mask:
        # Rounded to dtype first, so that the float64 oracle scores the same
        # mask as the half-precision runs (its rounding would loosen the bound).
        kwargs["attn_mask"] = torch.randn(batch, 1, lq, lk, generator=gen).to(dtype).float().cuda()

    def result(dtype_, backend):
        leaves = [x.cuda().to(dtype).to(dtype_).requires_grad_(True) for x in (q, k, v)]
        kw = {n: (m.to(dtype_) if m.is_floating_point() else m) for n, m in kwargs.items()}
        out = ops.attention(*leaves, backend=backend, **kw)
        grads = torch.autograd.grad(out, leaves, grad_out.cuda().to(dtype).to(dtype_))
        return (out,) + grads

    ours = result(dtype, None)
    low = result(dtype, "reference")
    exact = result(torch.float64, "reference")
    for name, o, l, e in zip(("out", "dq", "dk", "dv"), ours, low, exact):
        assert o.dtype == dtype and not torch.isnan(o).any()
        ours_err = (o.double() - e).abs().max().item()
        low_err = (l.double() - e).abs().max().item()
        assert ours_err <= 3 * low_err + 1e-4, f"{name}: error {ours_err:.3g} vs reference's own {low_err:.3g}"


# float32 as well as float64: Triton before 3.9 (the GPU machine has 3.6)
# compiles no float64 attention, and the dropout path must be checked there too.
@requires_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4),
                                       pytest.param(torch.float64, 1e-8, marks=requires_float64_dot)], ids=str)
def test_cuda_dropout_matches_reference_with_the_kernels_mask(dtype, tol):
    p = 0.25
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, 4, 150, 64, generator=gen, dtype=dtype).cuda().requires_grad_(True)
               for _ in range(3))
    lengths = torch.tensor([150, 77]).cuda()
    torch.manual_seed(3)
    out = ops.attention(q, k, v, key_padding_mask=lengths, is_causal=True, dropout_p=p)
    # The reference in float64 from the same seed: the same dropout mask.
    exact = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    torch.manual_seed(3)
    expected = ops.attention(*exact, key_padding_mask=lengths, is_causal=True, dropout_p=p, backend="reference")
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    rng_state = torch.tensor([123456789, 42])
    assert torch.equal(attention_module.dropout_mask(q, k, p, rng_state).cpu(),
                       attention_module.dropout_mask(q.cpu(), k.cpu(), p, rng_state))
    grad_out = torch.randn_like(expected)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
    for g, e in zip(grads, torch.autograd.grad(expected, exact, grad_out)):
        torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol)
