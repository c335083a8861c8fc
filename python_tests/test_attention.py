"""fastnlp.ops.attention against the pure-PyTorch reference and
F.scaled_dot_product_attention: outputs and gradients over random shapes,
masks and dtypes; fully-masked rows; dropout; errors; gradcheck, opcheck and
torch.compile."""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fastnlp
from fastnlp import ops
from fastnlp.reference import attention as reference
from markers import DEVICES, float64_attention_runs, skip_unless_float64_attention_runs

# The module, not the function fastnlp.ops.attention that shadows its name.
attention_module = importlib.import_module("fastnlp.ops.attention")

MASK_KINDS = ["none", "bool", "float", "padding", "lengths", "causal", "bool+padding+causal", "float+lengths",
              "padding+causal"]


def make_problem(batch, heads, kv_heads, query_len, key_len, head_dim, value_dim, mask_kind, seed,
                 dtype=torch.float64, device="cpu", mask_shape=None):
    """Inputs for ops.attention: q, k, v and the keyword arguments for the masks."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, query_len, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, key_len, head_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, key_len, value_dim, generator=gen, dtype=torch.float64)
    kwargs = {}
    if mask_shape is None:
        mask_shape = (batch, heads, query_len, key_len)
    if "bool" in mask_kind:
        kwargs["attn_mask"] = (torch.rand(mask_shape, generator=gen) < 0.75).to(device)
    if "float" in mask_kind:
        additive = torch.randn(mask_shape, generator=gen, dtype=torch.float64)
        additive[torch.rand(mask_shape, generator=gen) < 0.2] = float("-inf")
        kwargs["attn_mask"] = additive.to(dtype=dtype, device=device)
    lengths = torch.randint(0, key_len + 1, (batch,), generator=gen)
    if "padding" in mask_kind:
        kwargs["key_padding_mask"] = (torch.arange(key_len)[None, :] < lengths[:, None]).to(device)
    if "lengths" in mask_kind:
        kwargs["key_padding_mask"] = lengths.to(device)
    if "causal" in mask_kind:
        kwargs["is_causal"] = True
    q, k, v = (x.to(dtype=dtype, device=device) for x in (q, k, v))
    return q, k, v, kwargs


def reference_kwargs(kwargs, key_len):
    """The reference takes a bool key_padding_mask only."""
    kwargs = dict(kwargs)
    kpm = kwargs.get("key_padding_mask")
    if kpm is not None and kpm.dtype != torch.bool:
        kwargs["key_padding_mask"] = torch.arange(key_len, device=kpm.device)[None, :] < kpm[:, None]
    return kwargs


def sdpa_equivalent(q, k, v, kwargs):
    """F.scaled_dot_product_attention with one dense float mask, and which rows see a key."""
    batch, heads, query_len, _ = q.shape
    key_len = k.shape[2]
    kw = reference_kwargs(kwargs, key_len)
    attn_mask = kw.get("attn_mask")
    visible = reference.visible_mask(batch, heads, query_len, key_len, attn_mask, kw.get("key_padding_mask"),
                                     kw.get("is_causal", False), q.device)
    dense = torch.zeros(visible.shape, dtype=q.dtype, device=q.device)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        dense = dense + attn_mask.to(q.dtype)
        visible = visible & (dense != float("-inf"))
    dense = dense.masked_fill(~visible, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=k.shape[1] != q.shape[1])
    return out, visible.any(dim=-1)


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


# ---------------------------------------------------------------------------
# Values and gradients against the reference (float64: to rounding) and SDPA.

shapes = st.tuples(
    st.integers(1, 2),                        # batch
    st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]),  # (heads, kv heads)
    st.sampled_from([1, 5, 64, 70]),         # query length: one block, an odd size, block edges
    st.sampled_from([1, 7, 64, 123]),        # key length
    st.sampled_from([1, 8, 17, 64]),         # head dim
    st.sampled_from([None, 9, 40]),          # value head dim (None: same as head dim)
    st.sampled_from(MASK_KINDS),
    st.integers(0, 2**16),
)


@pytest.mark.parametrize("device", DEVICES)
@given(problem=shapes)
def test_matches_reference_and_sdpa_float64(device, problem):
    skip_unless_float64_attention_runs(device, torch.float64)
    batch, (heads, kv_heads), query_len, key_len, head_dim, value_dim, mask_kind, seed = problem
    q, k, v, kwargs = make_problem(batch, heads, kv_heads, query_len, key_len, head_dim, value_dim or head_dim,
                                   mask_kind, seed, device=device)
    q, k, v = leaves(q, k, v)
    out = ops.attention(q, k, v, **kwargs)
    grad_out = torch.randn_like(out)
    got = grads(out, (q, k, v), grad_out)

    rq, rk, rv = leaves(q, k, v)
    expected = reference.attention(rq, rk, rv, **reference_kwargs(kwargs, key_len))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for g, e in zip(got, grads(expected, (rq, rk, rv), grad_out)):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)

    sq, sk, sv = leaves(q, k, v)
    sdpa, seen = sdpa_equivalent(sq, sk, sv, kwargs)
    torch.testing.assert_close(out[seen], sdpa[seen], rtol=1e-10, atol=1e-10)
    if bool(seen.all()):  # SDPA gives NaN for rows with nothing visible
        for g, e in zip(got, grads(sdpa, (sq, sk, sv), grad_out)):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@given(problem=shapes)
@settings(max_examples=15)
def test_matches_reference_float32(device, problem):
    batch, (heads, kv_heads), query_len, key_len, head_dim, value_dim, mask_kind, seed = problem
    q, k, v, kwargs = make_problem(batch, heads, kv_heads, query_len, key_len, head_dim, value_dim or head_dim,
                                   mask_kind, seed, dtype=torch.float32, device=device)
    q, k, v = leaves(q, k, v)
    out = ops.attention(q, k, v, **kwargs)
    grad_out = torch.randn_like(out)
    got = grads(out, (q, k, v), grad_out)
    # The oracle in float64, so the tolerance measures the kernel's float32 error only.
    q64, k64, v64 = leaves(q.double(), k.double(), v.double())
    kw64 = {n: (m.double() if n == "attn_mask" and m.is_floating_point() else m) for n, m in kwargs.items()}
    expected = reference.attention(q64, k64, v64, **reference_kwargs(kw64, key_len))
    torch.testing.assert_close(out.double(), expected, rtol=2e-5, atol=2e-5)
    for g, e in zip(got, grads(expected, (q64, k64, v64), grad_out.double())):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_kind", ["none", "float+lengths", "bool+padding+causal"])
def test_half_precision_error_bounded_by_reference_error(device, dtype, mask_kind):
    # As flash-attention's tests: the kernel's error against a float64 oracle may
    # be at most a small multiple of the error of the reference itself run in
    # the same low precision.
    q, k, v, kwargs = make_problem(2, 4, 2, 70, 123, 64, 40, mask_kind, seed=3, dtype=dtype, device=device,
                                   mask_shape=(1, 4, 70, 123))
    key_len = k.shape[2]
    q, k, v = leaves(q, k, v)
    out = ops.attention(q, k, v, **kwargs)
    assert out.dtype == dtype
    grad_out = torch.randn_like(out)
    got = grads(out, (q, k, v), grad_out)

    lq, lk, lv = leaves(q, k, v)
    low = reference.attention(lq, lk, lv, **reference_kwargs(kwargs, key_len))
    low_grads = grads(low, (lq, lk, lv), grad_out)

    q64, k64, v64 = leaves(q.double(), k.double(), v.double())
    kw64 = {n: (m.double() if n == "attn_mask" and m.is_floating_point() else m) for n, m in kwargs.items()}
    exact = reference.attention(q64, k64, v64, **reference_kwargs(kw64, key_len))
    exact_grads = grads(exact, (q64, k64, v64), grad_out.double())
    for name, ours, ref_low, truth in zip(["out", "dq", "dk", "dv"], (out,) + got, (low,) + low_grads,
                                           (exact,) + exact_grads):
        ours_err = (ours.double() - truth).abs().max().item()
        ref_err = (ref_low.double() - truth).abs().max().item()
        assert ours_err <= 2 * ref_err + 1e-5, f"{name}: error {ours_err:.3g} vs reference's own {ref_err:.3g}"


def test_strided_inputs_and_broadcast_masks():
    # (B, L, H, D) storage seen through a transpose, and masks of every broadcast rank.
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 33, 4, 16, generator=gen, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(2, 45, 2, 16, generator=gen, dtype=torch.float64).transpose(1, 2)
    v = torch.randn(2, 45, 2, 24, generator=gen, dtype=torch.float64).transpose(1, 2)
    for shape in [(45,), (33, 45), (33, 1), (1, 45), (4, 33, 45), (2, 1, 1, 45), (2, 4, 1, 1), (1, 4, 33, 45)]:
        for dtype in (torch.bool, torch.float64, torch.float32):
            if dtype == torch.bool:
                mask = torch.rand(shape, generator=gen) < 0.7
            else:
                mask = torch.randn(shape, generator=gen).to(dtype)
            out = ops.attention(q, k, v, attn_mask=mask)
            expected = reference.attention(q, k, v, attn_mask=mask)
            torch.testing.assert_close(out, expected, rtol=1e-6 if dtype == torch.float32 else 1e-10,
                                       atol=1e-6 if dtype == torch.float32 else 1e-10, msg=f"mask {shape} {dtype}")


@pytest.mark.parametrize("head_dim", [1, 255, 256])
def test_head_dim_extremes(head_dim):
    q, k, v, kwargs = make_problem(1, 2, 1, 9, 70, head_dim, head_dim, "padding+causal", seed=head_dim)
    q, k, v = leaves(q, k, v)
    out = ops.attention(q, k, v, scale=0.3, **kwargs)
    grad_out = torch.randn_like(out)
    rq, rk, rv = leaves(q, k, v)
    expected = reference.attention(rq, rk, rv, scale=0.3, **kwargs)
    torch.testing.assert_close(out, expected)
    for g, e in zip(grads(out, (q, k, v), grad_out), grads(expected, (rq, rk, rv), grad_out)):
        torch.testing.assert_close(g, e)


# ---------------------------------------------------------------------------
# Rows that see no key at all.


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fully_masked_rows_give_zero_output_and_zero_gradient(device, dtype):
    skip_unless_float64_attention_runs(device, dtype)
    q, k, v, _ = make_problem(3, 2, 2, 20, 70, 16, 16, "none", seed=11, dtype=dtype, device=device)
    attn_mask = torch.ones(3, 2, 20, 70, dtype=torch.bool, device=device)
    attn_mask[0, 1, 4] = False              # one row hidden by attn_mask
    attn_mask[:, :, 7, :65] = False         # one row whose only visible keys are padding
    lengths = torch.tensor([70, 0, 60], device=device)  # batch 1: no key at all
    q, k, v = leaves(q, k, v)
    out = ops.attention(q, k, v, attn_mask=attn_mask, key_padding_mask=lengths)
    gq, gk, gv = grads(out, (q, k, v), torch.ones_like(out))
    for g in (out, gq, gk, gv):
        assert torch.isfinite(g.float()).all()
    assert (out[1] == 0).all() and (out[0, 1, 4] == 0).all() and (out[2, :, 7] == 0).all()
    assert (gq[1] == 0).all() and (gq[0, 1, 4] == 0).all() and (gq[2, :, 7] == 0).all()
    assert (gk[1] == 0).all() and (gv[1] == 0).all()
    assert (gk[2, :, 60:] == 0).all() and (gv[2, :, 60:] == 0).all()  # padding keys get no gradient


def test_causal_with_leading_padding_and_more_queries_than_keys():
    # Query 0 under is_causal sees key 0 only; with key 0 hidden, nothing.
    q, k, v, _ = make_problem(1, 1, 1, 100, 10, 8, 8, "none", seed=13)
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, 0] = False
    out = ops.attention(q, k, v, key_padding_mask=mask, is_causal=True)
    expected = reference.attention(q, k, v, key_padding_mask=mask, is_causal=True)
    torch.testing.assert_close(out, expected)
    assert (out[0, 0, 0] == 0).all()


# ---------------------------------------------------------------------------
# Dropout.


def test_dropout_is_deterministic_for_a_seed_and_differs_across_seeds():
    q, k, v, kwargs = make_problem(2, 2, 2, 30, 50, 16, 16, "lengths", seed=17, dtype=torch.float32)
    results = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        results.append(ops.attention(q, k, v, dropout_p=0.3, **kwargs))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    assert not torch.equal(results[0], results[2])


@pytest.mark.parametrize("mask_kind", ["none", "bool+padding+causal"])
def test_dropout_forward_and_backward_match_reference_with_the_kernels_mask(mask_kind):
    p = 0.4
    q, k, v, kwargs = make_problem(2, 4, 2, 70, 123, 17, 9, mask_kind, seed=19)
    q, k, v = leaves(q, k, v)
    torch.manual_seed(7)
    out = ops.attention(q, k, v, dropout_p=p, **kwargs)
    torch.manual_seed(7)
    rng_state = attention_module._draw_rng_state(p)  # the same draw ops.attention made
    keep = attention_module.dropout_mask(q, k, p, rng_state)
    grad_out = torch.randn_like(out)
    rq, rk, rv = leaves(q, k, v)
    expected = reference.attention(rq, rk, rv, dropout_p=p, dropout_mask=keep,
                                   **reference_kwargs(kwargs, k.shape[2]))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for g, e in zip(grads(out, (q, k, v), grad_out), grads(expected, (rq, rk, rv), grad_out)):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)
    # backend="reference" draws the same mask.
    torch.manual_seed(7)
    torch.testing.assert_close(ops.attention(q, k, v, dropout_p=p, backend="reference", **kwargs), expected)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate(p):
    q = torch.empty(4, 4, 64, 8)
    k = torch.empty(4, 4, 256, 8)
    keep = attention_module.dropout_mask(q, k, p, torch.tensor([12345, 678]))
    assert keep.shape == (4, 4, 64, 256) and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    # Rows, columns and heads are not copies of each other.
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1]) and not torch.equal(keep[0, 0], keep[0, 1])


def test_dropout_zero_is_no_dropout():
    """dropout_p=0.0 drops nothing, as the reference without dropout, and draws
    nothing from torch's generator (as SDPA: a p=0 call leaves later draws alone)."""
    q, k, v, kwargs = make_problem(1, 2, 2, 10, 20, 8, 8, "lengths", seed=23)
    before = torch.get_rng_state()
    out = ops.attention(q, k, v, dropout_p=0.0, **kwargs)
    assert torch.equal(torch.get_rng_state(), before)
    torch.testing.assert_close(out, reference.attention(q, k, v, **reference_kwargs(kwargs, k.shape[-2])))


# ---------------------------------------------------------------------------
# Errors: named argument, offending shape or dtype.


def _bad_calls():
    q = torch.randn(2, 4, 5, 8)
    k = torch.randn(2, 2, 7, 8)
    v = torch.randn(2, 2, 7, 6)
    return [
        (dict(query=q[0]), ValueError, r"query must be 4-D .* got shape \(4, 5, 8\)"),
        (dict(key=k.double()), TypeError, "query, key and value must have one dtype"),
        (dict(query=q.long(), key=k.long(), value=v.long()), TypeError, "query must be float32"),
        (dict(key=k[:1], value=v[:1]), ValueError, "same batch size"),
        (dict(key=torch.randn(2, 3, 7, 8), value=torch.randn(2, 3, 7, 6)), ValueError,
         r"heads of query \(4\) must be a multiple of the heads of key and value \(3\)"),
        (dict(value=v[:, :1]), ValueError, "key and value must have the same number of heads"),
        (dict(value=v[:, :, :3]), ValueError, "key and value must have the same length"),
        (dict(key=torch.randn(2, 2, 7, 9)), ValueError, r"query and key must have the same head dim"),
        (dict(query=torch.randn(1, 1, 2, 300), key=torch.randn(1, 1, 2, 300), value=torch.randn(1, 1, 2, 3)),
         ValueError, r"head dim of query and key must be in \[1, 256\], got 300"),
        (dict(attn_mask=torch.ones(5, 6, dtype=torch.bool)), ValueError,
         r"attn_mask of shape \(5, 6\) does not broadcast to .* \(2, 4, 5, 7\)"),
        (dict(attn_mask=torch.ones(3, 1, 5, 7, dtype=torch.bool)), ValueError, "attn_mask of shape"),
        (dict(attn_mask=torch.ones(5, 7, dtype=torch.int32)), TypeError, "attn_mask must be bool"),
        (dict(attn_mask=torch.zeros(5, 7, dtype=torch.float64)), TypeError, "attn_mask must be bool"),
        (dict(key_padding_mask=torch.ones(2, 6, dtype=torch.bool)), ValueError,
         r"key_padding_mask must have shape \(batch, key_len\) = \(2, 7\), got \(2, 6\)"),
        (dict(key_padding_mask=torch.tensor([3, 8])), ValueError, r"must be in \[0, 7\], got 8 at batch 1"),
        (dict(key_padding_mask=torch.tensor([3])), ValueError, r"must have shape \(batch,\) = \(2,\)"),
        (dict(key_padding_mask=torch.ones(2, 7)), TypeError, "key_padding_mask must be bool"),
        (dict(dropout_p=1.5), RuntimeError, r"dropout_p must be in \[0, 1\], got 1.5"),
        (dict(dropout_p=-0.1), RuntimeError, r"dropout_p must be in \[0, 1\], got -0.1"),
        (dict(dropout_p="0.1"), TypeError, "dropout_p must be a float, got str"),
        (dict(scale=float("nan")), ValueError, "scale must be a finite number"),
        (dict(is_causal=1), TypeError, "is_causal must be a bool"),
        (dict(enable_gqa=None), TypeError, "enable_gqa must be a bool"),
        (dict(query=q.to("meta")), ValueError, "query, key and value must be on one device"),
        (dict(backend="fast"), ValueError, "backend must be one of"),
    ], dict(query=q, key=k, value=v)


@pytest.mark.parametrize("index", range(len(_bad_calls()[0])))
def test_errors_name_the_argument(index):
    calls, base = _bad_calls()
    override, error, pattern = calls[index]
    kwargs = {**base, **override}
    with pytest.raises(error, match=pattern):
        ops.attention(**kwargs)


def test_positional_arguments_are_those_of_sdpa():
    # attn_mask, dropout_p, is_causal positional, scale and enable_gqa keyword
    # only: SDPA's signature, so a call to it can be renamed and nothing else.
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(5, 5, generator=gen) < 0.7
    mask.fill_diagonal_(True)
    for args, kwargs in [((mask,), {}), ((None, 0.0, True), {}), ((mask, 0.0, False), dict(scale=0.3)),
                         ((None, 0.0, True), dict(scale=0.3, enable_gqa=False))]:
        want = F.scaled_dot_product_attention(q, k, v, *args, **kwargs)
        torch.testing.assert_close(ops.attention(q, k, v, *args, **kwargs), want)
        torch.testing.assert_close(ops.attention_with_weights(q, k, v, *args, **kwargs)[0], want)
    grouped = k[:, :2], v[:, :2]  # grouped-query heads, with or without SDPA's flag
    torch.testing.assert_close(ops.attention(q, *grouped, mask, enable_gqa=True),
                               F.scaled_dot_product_attention(q, *grouped, mask, enable_gqa=True))
    torch.testing.assert_close(ops.attention(q, *grouped, mask), ops.attention(q, *grouped, mask, enable_gqa=True))
    with pytest.raises(TypeError, match="positional argument"):  # as SDPA: no positional scale
        ops.attention(q, k, v, mask, 0.0, False, 0.3)


def test_three_dimensional_inputs_are_one_head_as_in_sdpa():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 7, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    masks = [None, torch.rand(5, 7, generator=gen) < 0.7, torch.randn(2, 5, 7, generator=gen, dtype=torch.float64),
             torch.rand(1, 5, 7, generator=gen) < 0.7]
    for mask in masks:
        out = ops.attention(q, k, v, mask)
        want = F.scaled_dot_product_attention(q, k, v, mask)
        assert out.shape == (2, 5, 8)
        torch.testing.assert_close(out, want)
        for got, expected in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
            torch.testing.assert_close(got, expected)
        out, weights = ops.attention_with_weights(q, k, v, mask)
        torch.testing.assert_close(out, want)
        assert weights.shape == (2, 5, 7)
        torch.testing.assert_close(weights @ v, want)
    lengths = torch.tensor([7, 3])
    torch.testing.assert_close(ops.attention(q, k, v, key_padding_mask=lengths),
                               ops.attention(q[:, None], k[:, None], v[:, None], key_padding_mask=lengths)[:, 0])
    with pytest.raises(ValueError, match="or query, key and value all 3-D"):
        ops.attention(q, k[:, None], v[:, None])
    with pytest.raises(ValueError, match=r"\(3-D inputs run as one head: these shapes include its heads dim of 1\)"):
        ops.attention(q, k, v[:, :6])
    with pytest.raises(ValueError, match="3-D inputs run as one head"):
        ops.attention_with_weights(q, k, v, torch.ones(3, 5, 7, dtype=torch.bool))


def test_key_padding_mask_is_keyword_only():
    # Passed where SDPA takes dropout_p, it is refused, not read as a probability.
    q = torch.randn(1, 1, 3, 4)
    lengths = torch.tensor([2])
    with pytest.raises(TypeError, match="dropout_p must be a float, got Tensor"):
        ops.attention(q, q, q, None, lengths)
    with pytest.raises(TypeError, match="dropout_p must be a float, got Tensor"):
        ops.attention_with_weights(q, q, q, None, lengths)
    torch.testing.assert_close(ops.attention(q, q, q, key_padding_mask=lengths),
                               ops.attention(q, q, q, torch.tensor([True, True, False])))


def test_missing_device_kernel_is_a_clear_not_implemented_error(monkeypatch):
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda name, key: False)
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(NotImplementedError, match="has no cpu kernel in this build"):
        ops.attention(q, q, q)


def test_kernel_checks_its_arguments_itself():
    # Called directly (as torch.compile does, past the Python checks).
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(RuntimeError, match="multiple of key/value heads"):
        torch.ops.fastnlp.attention_forward(q, q[:, :1].expand(1, 3, 3, 4), q, None, None, False, 0.0, 1.0, None)
    with pytest.raises(RuntimeError, match="attn_mask must be expanded"):
        torch.ops.fastnlp.attention_forward(q, q, q, torch.ones(3, 3, dtype=torch.bool), None, False, 0.0, 1.0, None)
    with pytest.raises(RuntimeError, match="needs rng_state"):
        torch.ops.fastnlp.attention_forward(q, q, q, None, None, False, 0.5, 1.0, None)


# ---------------------------------------------------------------------------
# PyTorch integration: gradcheck, opcheck, torch.compile.


@pytest.mark.parametrize("mask_kind", ["padding+causal", "float+lengths", "bool"])
def test_gradcheck_float64(mask_kind):
    q, k, v, kwargs = make_problem(1, 2, 1, 6, 9, 5, 3, mask_kind, seed=29)
    assert torch.autograd.gradcheck(lambda q, k, v: ops.attention(q, k, v, **kwargs), leaves(q, k, v))


def test_gradcheck_float64_with_dropout():
    q, k, v, kwargs = make_problem(1, 2, 2, 6, 9, 5, 3, "lengths", seed=31)

    def fn(q, k, v):
        torch.manual_seed(0)  # the same mask on every evaluation
        return ops.attention(q, k, v, dropout_p=0.3, **kwargs)

    assert torch.autograd.gradcheck(fn, leaves(q, k, v))


def opcheck_samples(device):
    for mask_kind, dtype, dropout in [("none", torch.float32, 0.0), ("bool+padding+causal", torch.float64, 0.0),
                                      ("float+lengths", torch.float32, 0.2), ("padding", torch.bfloat16, 0.0)]:
        q, k, v, kwargs = make_problem(2, 4, 2, 9, 70, 8, 12, mask_kind, seed=37, dtype=dtype, device=device,
                                       mask_shape=(9, 70))
        attn_mask, key_padding_mask, p, scale = attention_module._prepare(
            q, k, v, kwargs.get("attn_mask"), kwargs.get("key_padding_mask"), kwargs.get("is_causal", False),
            dropout, None)
        rng_state = torch.tensor([3, 4]) if p > 0 else None
        yield q, k, v, attn_mask, key_padding_mask, kwargs.get("is_causal", False), p, scale, rng_state


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for q, k, v, attn_mask, kpm, causal, p, scale, rng in opcheck_samples(device):
        if not float64_attention_runs(device, q.dtype):
            continue  # float64 on CUDA needs Triton >= 3.9
        q, k, v = leaves(q, k, v)
        args = (q, k, v, attn_mask, kpm, causal, p, scale, rng)
        torch.library.opcheck(torch.ops.fastnlp.attention_forward.default, args)
        with torch.no_grad():
            out, lse = torch.ops.fastnlp.attention_forward(*args)
        backward_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, attn_mask, kpm, causal,
                         p, scale, rng)
        torch.library.opcheck(torch.ops.fastnlp.attention_backward.default, backward_args)
        if rng is not None:
            torch.library.opcheck(torch.ops.fastnlp.attention_dropout_mask.default, (q.detach(), k.detach(), p, rng))


@pytest.mark.parametrize("mask_shape", [(5, 7), (2, 1, 5, 7), (1, 4, 1, 7), (2, 4, 5, 7)])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_learned_float_mask_gets_the_references_gradient(mask_shape, is_causal, dropout_p):
    # A float attn_mask that requires grad (a learned position bias): its
    # gradient, and those of q, k and v, equal the reference's, with key
    # padding, grouped-query heads and the kernels' own dropout mask.
    gen = torch.Generator().manual_seed(103)
    q = torch.randn(2, 4, 5, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, 7, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 2, 7, 6, generator=gen, dtype=torch.float64)
    bias = torch.randn(*mask_shape, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(2, 4, 5, 6, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([7, 4])
    results = []
    for backend in (None, "reference"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
        torch.manual_seed(0)  # the same dropout stream for both
        out = ops.attention(*leaves[:3], attn_mask=leaves[3], key_padding_mask=lengths, is_causal=is_causal,
                            dropout_p=dropout_p, backend=backend)
        results.append(torch.autograd.grad(out, leaves, grad_out))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_learned_float_mask_gradcheck():
    gen = torch.Generator().manual_seed(107)
    q, k = (torch.randn(1, 2, 5, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    bias = torch.randn(5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, bias: ops.attention(q, k, k, attn_mask=bias, key_padding_mask=torch.tensor([4])), (q, k, bias))


@pytest.mark.parametrize("key_len", [8, 70, 300])
@pytest.mark.parametrize("kind", ["lengths", "bool", "bool with holes"])
def test_padding_keys_are_never_read(key_len, kind):
    """NaN in the key and value rows of padding keys reaches no output, weight
    or gradient, whether the padding shares a key block with real keys or
    fills whole blocks (which the kernel skips); padding keys get 0 gradients.
    The reference zeroes those rows, so both equal a run on clean inputs."""
    gen = torch.Generator().manual_seed(113)
    q = torch.randn(2, 2, 5, 4, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 1, key_len, 4, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 1, key_len, 3, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([key_len, key_len // 3 + 1])
    real = torch.arange(key_len)[None, :] < lengths[:, None]
    if kind == "bool with holes":
        real = real & (torch.rand(2, key_len, generator=gen) < 0.7)
        real[:, 0] = True
    padding = ~real[:, None, :, None]
    dirty_k, dirty_v = k.masked_fill(padding, math.nan), v.masked_fill(padding, math.nan)
    clean_k, clean_v = k.masked_fill(padding, 0), v.masked_fill(padding, 0)
    kpm = lengths if kind == "lengths" else real
    grad_out = torch.randn(2, 2, 5, 3, generator=gen, dtype=torch.float64)
    runs = []
    for backend, keys, values in [(None, dirty_k, dirty_v), ("reference", dirty_k, dirty_v),
                                  ("reference", clean_k, clean_v)]:
        inputs = leaves(q, keys, values)
        out = ops.attention(*inputs, key_padding_mask=kpm, backend=backend)
        runs.append([out, *grads(out, inputs, grad_out)])
    for got in runs[:2]:
        for a, b in zip(got, runs[2]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert (runs[0][2].masked_select(padding) == 0).all() and (runs[0][3].masked_select(padding) == 0).all()
    inputs = leaves(q, dirty_k, dirty_v)
    out, weights = ops.attention_with_weights(*inputs, key_padding_mask=kpm)
    weights_grad = torch.randn(weights.shape, generator=gen, dtype=torch.float64)
    got = grads((out, weights), inputs, (grad_out, weights_grad))
    clean = leaves(q, clean_k, clean_v)
    want_out, want_weights = ops.attention_with_weights(*clean, key_padding_mask=kpm)
    want = grads((want_out, want_weights), clean, (grad_out, weights_grad))
    for a, b in zip([out, weights, *got], [want_out, want_weights, *want]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("where", ["query_row", "key", "every_key"])
def test_nan_inputs_give_nan_where_sdpa_does(where):
    # A row whose scores are all NaN must come out NaN, not look like a row
    # with no visible key (the running max skips NaN); some NaN scores too.
    gen = torch.Generator().manual_seed(101)
    q, k, v = (torch.randn(1, 2, 70, 8, generator=gen) for _ in range(3))
    if where == "query_row":
        q[0, 1, 3, 0] = float("nan")
    elif where == "key":
        k[0, 0, 65, 2] = float("nan")  # a real key, in the second key block
    else:
        k[0, 1, :, 4] = float("nan")
    # (SDPA also turns a NaN in a padded key into NaN rows; fastnlp never
    # reads padded keys: test_padding_keys_are_never_read.)
    lengths = torch.tensor([68])
    padding = torch.arange(70) < lengths[:, None]
    got = ops.attention(q, k, v, key_padding_mask=lengths)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=padding[:, None, None, :])
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    finite = ~torch.isnan(want)
    torch.testing.assert_close(got[finite], want[finite])


@pytest.mark.parametrize("length", [2, 70])
@pytest.mark.parametrize("padded", [False, True])
def test_nan_query_row_that_sees_no_key_gives_zero_as_the_reference(length, padded):
    """A NaN in a query row that the mask hides from every key: that row's
    output is 0, and its NaN reaches dk only (through 0 * q, in the reference
    too), whatever the tile size; it once came out NaN, dv with it, when the
    row shared a tile with zero-padded columns."""
    gen = torch.Generator().manual_seed(127)
    q, k, v = (torch.randn(1, 2, length, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    q[0, 1, 0, 0] = math.nan
    mask = torch.ones(length, length, dtype=torch.bool)
    mask[0] = False
    kwargs = dict(attn_mask=mask, key_padding_mask=torch.tensor([length - 1]) if padded else None)
    grad_out = torch.randn(1, 2, length, 3, generator=gen, dtype=torch.float64)
    runs = []
    for backend in (None, "reference"):
        inputs = leaves(q, k, v)
        out = ops.attention(*inputs, backend=backend, **kwargs)
        runs.append([out, *grads(out, inputs, grad_out)])
    assert (runs[0][0][0, 1, 0] == 0).all()
    assert not any(t.isnan().any() for t in (runs[0][0], runs[0][1], runs[0][3]))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, equal_nan=True)


@pytest.mark.parametrize("mask_kind", ["padding causal", "float", "bool lengths"])
def test_gradgradcheck(mask_kind):
    # With create_graph=True the backward pass runs the reference (see
    # fastnlp/ops/_double_backward.py): second derivatives of queries, keys,
    # values (grouped) and a learned additive mask.
    q, k, v, kwargs = make_problem(1, 2, 1, 3, 4, 3, 2, mask_kind, seed=97)
    leaves = [q, k, v]
    if "float" in mask_kind:
        leaves.append(kwargs.pop("attn_mask"))
    leaves = [x.requires_grad_(True) for x in leaves]

    def function(q, k, v, *learned_mask):
        return ops.attention(q, k, v, *learned_mask, enable_gqa=True, **kwargs)

    assert torch.autograd.gradgradcheck(function, leaves)
    # gradgradcheck differentiates whatever first-order gradients the recorded
    # backward returns; that they are the kernel's is checked here.
    weights = torch.randn(function(*leaves).shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    recorded = torch.autograd.grad((function(*leaves) * weights).sum(), leaves, create_graph=True)
    plain = torch.autograd.grad((function(*leaves) * weights).sum(), leaves)
    for got, want in zip(recorded, plain):
        torch.testing.assert_close(got.detach(), want)


@given(problem=shapes, learned_mask=st.booleans())
@settings(max_examples=15)
def test_recorded_backward_equals_the_kernels_over_random_problems(problem, learned_mask):
    # With create_graph=True the gradients are the reference's, recomputed
    # (fastnlp/ops/_double_backward.py) from the masks as the op received
    # them: over random shapes, head groupings and masks they must be the
    # kernel's, a learned float mask's included.
    batch, (heads, kv_heads), query_len, key_len, head_dim, value_dim, mask_kind, seed = problem
    q, k, v, kwargs = make_problem(batch, heads, kv_heads, query_len, key_len, head_dim, value_dim or head_dim,
                                   mask_kind, seed)
    inputs = leaves(q, k, v)
    if learned_mask and "float" in mask_kind:
        inputs.append(kwargs.pop("attn_mask").requires_grad_(True))

    def gradients(create_graph):
        out = ops.attention(*inputs[:3], *inputs[3:], enable_gqa=True, **kwargs)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
        return torch.autograd.grad((out * weights).sum(), inputs, create_graph=create_graph)

    for recorded, plain in zip(gradients(True), gradients(False)):
        torch.testing.assert_close(recorded.detach(), plain, rtol=1e-9, atol=1e-9)


def test_recorded_backward_drops_what_the_kernel_dropped():
    # The recomputation reads the kernel's own dropout mask, so with
    # create_graph=True the gradients are the plain backward pass's.
    q, k, v, kwargs = make_problem(2, 2, 2, 5, 6, 4, 4, "padding causal", seed=98)
    leaves = [x.requires_grad_(True) for x in (q, k, v)]
    results = []
    for create_graph in (False, True):
        torch.manual_seed(5)
        out = ops.attention(*leaves, dropout_p=0.4, **kwargs)
        results.append(torch.autograd.grad(out.pow(2).sum(), leaves, create_graph=create_graph))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)
    assert all(grad.requires_grad for grad in results[1])


def test_torch_compile_fullgraph_forward_and_backward():
    q, k, v, _ = make_problem(2, 4, 2, 33, 70, 16, 16, "none", seed=41, dtype=torch.float32)
    lengths = torch.tensor([70, 20])
    bias = torch.randn(33, 70)

    def loss(q, k, v):
        a = ops.attention(q, k, v, key_padding_mask=lengths, is_causal=True)
        b = ops.attention(q, k, v, attn_mask=bias, dropout_p=0.25)
        return (a * a).sum() + (b * b).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    cq, ck, cv = leaves(q, k, v)
    torch.manual_seed(3)
    got = compiled(cq, ck, cv)
    eq, ek, ev = leaves(q, k, v)
    torch.manual_seed(3)
    expected = loss(eq, ek, ev)
    torch.testing.assert_close(got, expected)
    for g, e in zip(torch.autograd.grad(got, (cq, ck, cv)), torch.autograd.grad(expected, (eq, ek, ev))):
        torch.testing.assert_close(g, e)


def test_backend_reference_and_environment_variable(monkeypatch):
    q, k, v, kwargs = make_problem(2, 2, 1, 12, 30, 8, 8, "bool+padding+causal", seed=43)
    called = []
    original = reference.attention
    monkeypatch.setattr(reference, "attention", lambda *a, **kw: called.append(1) or original(*a, **kw))
    monkeypatch.setenv("FASTNLP_BACKEND", "reference")
    out = ops.attention(q, k, v, **kwargs)
    assert called
    torch.manual_seed(5)
    out_w, weights = ops.attention_with_weights(q, k, v, dropout_p=0.3, **kwargs)
    monkeypatch.delenv("FASTNLP_BACKEND")
    torch.testing.assert_close(ops.attention(q, k, v, **kwargs), out)
    torch.manual_seed(5)  # the same dropout mask from the kernel's stream
    expected_out, expected_weights = ops.attention_with_weights(q, k, v, dropout_p=0.3, **kwargs)
    torch.testing.assert_close(out_w, expected_out)
    torch.testing.assert_close(weights, expected_weights)


def test_default_scale_is_one_over_sqrt_head_dim():
    q, k, v, _ = make_problem(1, 1, 1, 4, 6, 9, 9, "none", seed=47)
    torch.testing.assert_close(ops.attention(q, k, v), ops.attention(q, k, v, scale=1 / math.sqrt(9)))


@pytest.mark.parametrize("query_len, key_len", [(0, 5), (5, 0), (0, 0)])
def test_empty_lengths(query_len, key_len):
    q, k, v = leaves(torch.randn(2, 2, query_len, 8), torch.randn(2, 1, key_len, 8), torch.randn(2, 1, key_len, 4))
    out = ops.attention(q, k, v, is_causal=True)
    assert out.shape == (2, 2, query_len, 4) and (out == 0).all()
    for g, x in zip(grads(out, (q, k, v), torch.ones_like(out)), (q, k, v)):
        assert g.shape == x.shape and (g == 0).all()


def test_backward_is_deterministic():
    # Each gradient is owned by one task and summed in a fixed order, whatever the threads do.
    q, k, v, kwargs = make_problem(3, 4, 2, 130, 200, 32, 32, "bool+padding+causal", seed=53, dtype=torch.float32)
    q, k, v = leaves(q, k, v)
    runs = []
    for _ in range(2):
        out = ops.attention(q, k, v, **kwargs)
        runs.append((out,) + grads(out, (q, k, v), torch.ones_like(out)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_gradient_with_broadcast_and_transposed_grad_out():
    # out.sum() hands the backward a stride-0 gradient; a transposed one has no unit stride.
    q, k, v, kwargs = make_problem(2, 4, 2, 37, 50, 16, 8, "causal", seed=59)
    q, k, v = leaves(q, k, v)
    for grad_out in (None, torch.randn(2, 4, 8, 37, dtype=torch.float64).transpose(-1, -2)):
        out = ops.attention(q, k, v, **kwargs)
        expected = reference.attention(q, k, v, **kwargs)
        if grad_out is None:
            got, want = torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(expected.sum(), (q, k, v))
        else:
            got, want = grads(out, (q, k, v), grad_out), grads(expected, (q, k, v), grad_out)
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e)


def test_op_refuses_a_meta_tensor_among_cpu_ones():
    # One meta argument sends the call to the fake kernel, which would
    # otherwise hand back uninitialised CPU tensors.
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(RuntimeError, match="key is on meta but query is on cpu"):
        torch.ops.fastnlp.attention_forward(q, q.to("meta"), q, None, None, False, 0.0, 0.5, None)
    with pytest.raises(RuntimeError, match="key is on cpu but query is on meta"):
        torch.ops.fastnlp.attention_forward(q.to("meta"), q, q, None, None, False, 0.0, 0.5, None)
    meta = q.to("meta")
    out, lse = torch.ops.fastnlp.attention_forward(meta, meta, meta, None, None, False, 0.0, 0.5, None)
    assert out.shape == (1, 2, 3, 8) and lse.shape == (1, 2, 3) and out.device.type == "meta"
    # The rng_state stays on the CPU beside meta tensors, but not a meta one beside CPU tensors.
    rng_state = torch.tensor([1, 0])
    out, _ = torch.ops.fastnlp.attention_forward(meta, meta, meta, None, None, False, 0.5, 0.5, rng_state)
    assert out.device.type == "meta"
    with pytest.raises(RuntimeError, match="rng_state is on meta but query is on cpu"):
        torch.ops.fastnlp.attention_forward(q, q, q, None, None, False, 0.5, 0.5, rng_state.to("meta"))


def test_functions_and_module_run_on_meta_tensors_as_torch_does():
    """Shape inference with meta tensors, as F.scaled_dot_product_attention and
    nn.MultiheadAttention allow (the kernel check once asked for a "META" key)."""
    meta = torch.randn(2, 2, 3, 8, device="meta")
    expected = F.scaled_dot_product_attention(meta, meta, meta)
    out = ops.attention(meta, meta, meta)
    assert out.shape == expected.shape and out.device.type == "meta"
    out, weights = ops.attention_with_weights(meta, meta, meta)
    assert out.shape == expected.shape and weights.shape == (2, 2, 3, 3) and weights.device.type == "meta"
    ours = fastnlp.nn.MultiheadAttention(8, 2, device="meta")
    theirs = torch.nn.MultiheadAttention(8, 2, device="meta")
    x = torch.randn(3, 2, 8, device="meta")
    for got, want in zip(ours(x, x, x), theirs(x, x, x)):
        assert got.shape == want.shape and got.device.type == "meta"


@pytest.mark.parametrize("dropout_p", [1.5, -0.1, float("nan"), "0.1", None, torch.tensor([0.1]), 1j])
def test_bad_dropout_raises_what_sdpa_raises(dropout_p):
    q = torch.randn(2, 2, 5, 4)
    with pytest.raises(Exception) as theirs:
        F.scaled_dot_product_attention(q, q, q, dropout_p=dropout_p)
    for function in (ops.attention, ops.attention_with_weights):
        with pytest.raises(theirs.type, match="dropout_p"):
            function(q, q, q, dropout_p=dropout_p)


def test_dropout_one_drops_everything_as_sdpa_does():
    q, k, v = (torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    for dropout_p in (1.0, True, torch.tensor(1.0)):
        out = ops.attention(q, k, v, dropout_p=dropout_p)
        out_w, weights = ops.attention_with_weights(q, k, v, dropout_p=dropout_p)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(out_w, expected)
        torch.testing.assert_close(weights, torch.zeros(2, 2, 5, 5, dtype=torch.float64))
        grads = torch.autograd.grad((out + out_w).sum(), (q, k, v))
        for grad in grads:
            torch.testing.assert_close(grad, torch.zeros_like(grad))


def test_zero_dim_tensor_dropout_is_its_value():
    q = torch.randn(2, 2, 5, 4)
    results = []
    for dropout_p in (0.25, torch.tensor(0.25)):
        torch.manual_seed(3)
        results.append((ops.attention(q, q, q, dropout_p=dropout_p),
                        ops.attention_with_weights(q, q, q, dropout_p=dropout_p)))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    assert not torch.equal(results[0][0], ops.attention(q, q, q))  # it did drop


def test_torch_func_transforms_differentiate_the_reference():
    """ops.attention and attention_with_weights under torch.func's jvp, grad
    and jacrev: the reference's derivatives (functorch's jvp gave zero
    tangents through the op's own autograd)."""
    q, k, v = (torch.randn(2, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    lengths = torch.tensor([5, 3])
    mask = torch.arange(5)[None, :] < lengths[:, None]

    def ours(q):
        return ops.attention(q, k, v, key_padding_mask=lengths, is_causal=True)

    def ours_weights(q):
        return ops.attention_with_weights(q, k, v, key_padding_mask=lengths, is_causal=True)[1]

    def oracle(q):
        return reference.attention(q, k, v, None, mask, True)

    def oracle_weights(q):
        return reference.attention_weights(q, k, None, mask, True)

    tangent = torch.randn_like(q)
    for function, expected in ((ours, oracle), (ours_weights, oracle_weights)):
        torch.testing.assert_close(torch.func.jvp(function, (q,), (tangent,))[1],
                                   torch.func.jvp(expected, (q,), (tangent,))[1])
        torch.testing.assert_close(torch.func.jacrev(function)(q), torch.func.jacrev(expected)(q))
    assert torch.func.jvp(ours, (q,), (tangent,))[1].abs().max() > 0


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.bfloat16, torch.float32, torch.float32),
                                    (torch.float64,) * 3])
def test_autocast_as_sdpa(dtypes):
    """Under autocast SDPA computes in the autocast dtype (float64 is left as
    it is, and mixed float dtypes are cast alike); so do the functions, with
    a float mask cast too."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 4, generator=g).to(dtype) for dtype in dtypes)
    bias = torch.randn(5, 5, generator=g).to(dtypes[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.scaled_dot_product_attention(q, k, v, bias)
        got = ops.attention(q, k, v, bias)
        got_w, weights = ops.attention_with_weights(q, k, v, bias)
    assert got.dtype == got_w.dtype == weights.dtype == expected.dtype
    tolerance = dict(rtol=2e-2, atol=2e-2) if expected.dtype == torch.bfloat16 else {}
    torch.testing.assert_close(got, expected, **tolerance)
    torch.testing.assert_close(got_w, expected, **tolerance)
