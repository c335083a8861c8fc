"""fastnlp.nn.MultiheadAttention against torch.nn.MultiheadAttention: PyTorch's
own module test inputs, random configurations, state_dict both ways, errors,
fully-masked rows, NaN inputs, dropout, is_causal, torch.compile, and torch's
TransformerEncoderLayer / TransformerEncoder with the module patched in."""

import copy
import functools
import importlib
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fastnlp  # noqa: F401  (loads the ops)
from fastnlp import ops
from fastnlp.nn import MultiheadAttention
from markers import DEVICES, assert_same_error

attention_module = importlib.import_module("fastnlp.nn.attention")  # the module, not the class nn exports

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def assert_close(actual, expected, dtype, msg="", exact=None):
    """rtol = atol = TOLERANCE[dtype], the atol relative to the tensor's largest
    entry. In float32 a result summed over many large terms (PyTorch's test
    inputs are drawn from [-9, 9]) carries a rounding error of about that size
    in torch's own result too; where the two differ by more, `exact` (torch's
    module run in float64) decides: ours must then be no further from it than
    5x torch's float32 error (+ 1e-6 of the scale). Not 2x: the kernel's
    flash-style backward recomputes P = exp(s - lse), which in float32 carries a
    relative error of about |s| * eps; with PyTorch's large inputs (|s| ~ 50)
    that is a few times the error of torch's math path, whose P is stored."""
    tol = TOLERANCE[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    try:
        torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale,
                                   msg=(lambda m: f"{msg}: {m}") if msg else None)
    except AssertionError:
        if exact is None:
            raise
        ours_error = (actual.double() - exact).abs().max().item()
        torch_error = (expected.double() - exact).abs().max().item()
        assert ours_error <= 5 * torch_error + 1e-6 * scale, (
            f"{msg}: max error against float64 {ours_error:.3g}, torch's float32 error {torch_error:.3g}")


def make_pair(seed=0, device="cpu", dtype=None, **kwargs):
    """torch's module and ours, built from the same seed: same weights."""
    torch.manual_seed(seed)
    theirs = nn.MultiheadAttention(device=device, dtype=dtype, **kwargs)
    torch.manual_seed(seed)
    ours = MultiheadAttention(device=device, dtype=dtype, **kwargs)
    return theirs, ours


def assert_same_parameters(theirs, ours):
    assert repr(ours) == repr(theirs)
    a, b = theirs.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [n for n, _ in theirs.named_parameters()] == [n for n, _ in ours.named_parameters()]
    for attr in ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout", "batch_first",
                 "head_dim", "add_zero_attn"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert (ours.bias_k is None) == (theirs.bias_k is None)


def clone_inputs(args):
    """Fresh leaves, keeping `query is key` / `key is value` (torch takes other paths for them)."""
    fresh = {}
    out = []
    for a in args:
        if id(a) not in fresh:
            fresh[id(a)] = a.detach().clone().requires_grad_(a.requires_grad)
        out.append(fresh[id(a)])
    return out


def _where(keep, x):
    return x if keep is None else torch.where(keep, x, torch.zeros_like(x))


def run(module, args, kwargs, out_grad, weights_grad, keep=None, keep_weights=None):
    """Output, weights and the gradients of a random linear function of both,
    with respect to the inputs and every parameter. `keep` and `keep_weights`
    (broadcastable to the output and the weights) drop rows from the loss,
    through a where so that NaN rows contribute exactly nothing."""
    inputs = clone_inputs(args)
    out, weights = module(*inputs, **kwargs)
    loss = (_where(keep, out) * out_grad).sum()
    if weights is not None:
        loss = loss + (_where(keep_weights, weights).nan_to_num(0.0) * weights_grad).sum()
    leaves = list({id(x): x for x in inputs if x.requires_grad}.values())
    params = [p for _, p in module.named_parameters()]
    grads = torch.autograd.grad(loss, leaves + params, allow_unused=True)
    return out.detach(), None if weights is None else weights.detach(), grads


def as_float64(args, kwargs):
    """Inputs and float masks in float64, keeping `query is key` / `key is value`."""
    fresh = {}
    for a in args:
        fresh.setdefault(id(a), a.detach().double().requires_grad_(a.requires_grad))
    kwargs = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in kwargs.items()}
    return [fresh[id(a)] for a in args], kwargs


def compare(theirs, ours, args, kwargs, dtype, keep=None, keep_weights=None, kwargs_theirs=None, seed=0):
    """Runs both modules; outputs, weights and gradients must agree (on the
    kept rows; weights also only where torch's are finite, ours being 0 there).
    In float32, torch's module in float64 settles differences above the
    tolerance (see assert_close)."""
    kwargs_theirs = kwargs_theirs or kwargs
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        probe, probe_w = theirs(*args, **kwargs_theirs)
    out_grad = torch.randn(probe.shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=probe.device)
    w_shape = probe_w.shape if probe_w is not None else (1,)
    weights_grad = torch.randn(w_shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=probe.device)
    t_out, t_w, t_grads = run(theirs, args, kwargs_theirs, out_grad, weights_grad, keep, keep_weights)
    o_out, o_w, o_grads = run(ours, args, kwargs, out_grad, weights_grad, keep, keep_weights)
    e_out = e_w = None
    e_grads = [None] * len(t_grads)
    if dtype == torch.float32:
        args64, kwargs64 = as_float64(args, kwargs_theirs)
        e_out, e_w, e_grads = run(copy.deepcopy(theirs).double(), args64, kwargs64, out_grad.double(),
                                  weights_grad.double(), keep, keep_weights)
    assert o_out.shape == t_out.shape and o_out.dtype == t_out.dtype
    rows = torch.ones_like(o_out, dtype=torch.bool) if keep is None else keep.expand_as(o_out)
    assert_close(o_out[rows], t_out[rows], dtype, "output", None if e_out is None else e_out[rows])
    assert (o_w is None) == (t_w is None)
    if o_w is not None:
        assert o_w.shape == t_w.shape and o_w.dtype == t_w.dtype
        finite = t_w.isfinite()
        if keep_weights is not None:
            finite = finite & keep_weights.expand_as(finite)
        assert_close(o_w[finite], t_w[finite], dtype, "weights", None if e_w is None else e_w[finite])
        assert torch.all(o_w[~t_w.isfinite()] == 0)
    assert len(o_grads) == len(t_grads)
    for i, (a, b, e) in enumerate(zip(o_grads, t_grads, e_grads)):
        if a is None or b is None:
            assert a is None and b is None, i
            continue
        assert_close(a, b, dtype, f"gradient {i}", e)
    return o_out, o_w


# ---------------------------------------------------------------------------
# PyTorch's own module test inputs (torch.testing._internal.common_modules).


@functools.lru_cache(maxsize=None)
def torch_module_inputs(dtype):
    from torch.testing._internal.common_modules import module_db  # slow import: only when this test runs

    info = next(i for i in module_db if i.module_cls is torch.nn.MultiheadAttention)
    torch.manual_seed(0)  # the samples are drawn from the global generator
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pytorch_module_db_inputs(dtype):
    samples = torch_module_inputs(dtype)
    assert len(samples) > 0
    for index, sample in enumerate(samples):
        ctor_args, ctor_kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        args, kwargs = sample.forward_input.args, sample.forward_input.kwargs
        theirs, ours = make_pair(index, dtype=dtype, **dict(zip(("embed_dim", "num_heads"), ctor_args)),
                                 **ctor_kwargs)
        assert_same_parameters(theirs, ours)
        theirs.eval()
        ours.eval()
        for need_weights in (True, False):
            try:
                compare(theirs, ours, args, dict(kwargs, need_weights=need_weights), dtype, seed=index)
            except AssertionError as error:
                raise AssertionError(f"sample {index} ({ctor_kwargs}, {kwargs}, need_weights={need_weights}): "
                                     f"{error}") from error


# ---------------------------------------------------------------------------
# Random configurations.


@st.composite
def configs(draw):
    heads = draw(st.integers(1, 3))
    head_dim = draw(st.integers(1, 4))
    embed = heads * head_dim
    c = dict(
        heads=heads, embed=embed,
        kdim=draw(st.sampled_from([None, embed, 2, 5])),
        vdim=draw(st.sampled_from([None, embed, 3])),
        bias=draw(st.booleans()),
        add_bias_kv=draw(st.booleans()),
        add_zero_attn=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        unbatched=draw(st.booleans()),
        batch=draw(st.integers(1, 3)),
        tgt_len=draw(st.integers(1, 5)),
        src_len=draw(st.integers(1, 6)),
        attn_mask=draw(st.sampled_from(["none", "bool2d", "bool3d", "float2d", "float3d"])),
        padding=draw(st.sampled_from(["none", "bool", "float"])),
        dead=draw(st.booleans()),  # some batch rows fully padded
        sharing=draw(st.sampled_from(["self", "kv", "none"])),
        need_weights=draw(st.booleans()),
        average=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )
    return c


def make_inputs(c, dtype=torch.float64):
    """Inputs and masks for one config. Column 0 of every mask and every
    partially padded row stays visible, so the only rows torch turns into NaN
    are those of fully padded batch elements without extra keys."""
    gen = torch.Generator().manual_seed(c["seed"])
    B = 1 if c["unbatched"] else c["batch"]
    L, S, E, H = c["tgt_len"], c["src_len"], c["embed"], c["heads"]
    kdim, vdim = c["kdim"] or E, c["vdim"] or E
    sharing = c["sharing"]
    if sharing == "self" and (kdim != E or vdim != E or L != S):
        sharing = "none"
    if sharing == "kv" and kdim != vdim:
        sharing = "none"

    def seq(length, width):
        shape = (length, width) if c["unbatched"] else (B, length, width) if c["batch_first"] else (length, B, width)
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)

    query = seq(L, E)
    key = query if sharing == "self" else seq(S, kdim)
    value = key if sharing in ("self", "kv") else seq(S, vdim)
    kwargs = dict(need_weights=c["need_weights"], average_attn_weights=c["average"])
    if c["attn_mask"] != "none":
        shape = (L, S) if c["attn_mask"].endswith("2d") else (B * H, L, S)
        if c["attn_mask"].startswith("bool"):
            mask = torch.rand(shape, generator=gen) < 0.4
            mask[..., 0] = False
        else:
            mask = torch.randn(shape, generator=gen, dtype=torch.float64)
            mask[torch.rand(shape, generator=gen) < 0.3] = float("-inf")
            mask[..., 0] = 0.5
            mask = mask.to(dtype)
        kwargs["attn_mask"] = mask
    dead = torch.zeros(B, dtype=torch.bool)
    if c["padding"] != "none":
        lengths = torch.randint(1, S + 1, (B,), generator=gen)
        if c["dead"]:
            dead = torch.rand(B, generator=gen) < 0.5
            lengths[dead] = 0
        padded = torch.arange(S)[None, :] >= lengths[:, None]
        if c["padding"] == "float":
            padded = torch.zeros(B, S, dtype=dtype).masked_fill(padded, float("-inf"))
        kwargs["key_padding_mask"] = padded[0] if c["unbatched"] else padded
    module_kwargs = dict(embed_dim=E, num_heads=H, bias=c["bias"], add_bias_kv=c["add_bias_kv"],
                         add_zero_attn=c["add_zero_attn"], kdim=c["kdim"], vdim=c["vdim"],
                         batch_first=c["batch_first"])
    if c["add_bias_kv"] or c["add_zero_attn"]:
        dead[:] = False  # the appended keys are always visible
    return module_kwargs, (query, key, value), kwargs, dead


def torch_safe(kwargs, dead, unbatched):
    """torch's masks with the fully padded rows unpadded, so that torch stays
    NaN-free there; those rows are then left out of the comparison."""
    if not dead.any():
        return kwargs
    kwargs = dict(kwargs)
    kpm = kwargs["key_padding_mask"].clone()
    if unbatched:
        kpm.zero_()
    else:
        kpm[dead] = 0
    kwargs["key_padding_mask"] = kpm
    return kwargs


def keep_rows(dead, c):
    """Bool masks over the output and the weights, False on the rows of dead batch elements."""
    keep = ~dead
    if c["unbatched"]:
        return keep.reshape(1, 1), keep.reshape(1, 1) if c["average"] else keep.reshape(1, 1, 1)
    out_keep = keep.reshape(-1, 1, 1) if c["batch_first"] else keep.reshape(1, -1, 1)
    return out_keep, keep.reshape(-1, 1, 1, 1) if not c["average"] else keep.reshape(-1, 1, 1)


@pytest.mark.parametrize("sharing", ["self", "kv", "none", "kdim"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_mostly_padded_keys_are_projected_only_where_real(monkeypatch, sharing, batch_first, need_weights):
    """With at most 3/4 of the keys real, the CPU module projects keys and
    values at the real positions only; the results are torch's all the same."""
    E, H, N, L, S = 8, 2, 3, 5, 8
    gen = torch.Generator().manual_seed(7)

    def seq(length, width):
        shape = (N, length, width) if batch_first else (length, N, width)
        return torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_(True)

    query = seq(S if sharing == "self" else L, E)
    key = query if sharing == "self" else seq(S, 5 if sharing == "kdim" else E)
    value = key if sharing in ("self", "kv") else seq(S, E)
    lengths = torch.tensor([2, 6, 0])  # 8 of 24 real; one element fully padded
    padded = torch.arange(S)[None, :] >= lengths[:, None]
    kdim = 5 if sharing == "kdim" else None
    theirs, ours = make_pair(3, dtype=torch.float64, embed_dim=E, num_heads=H, kdim=kdim, vdim=kdim and E,
                             batch_first=batch_first)
    sparse_calls = []
    real_project_rows = attention_module._project_rows

    def spy(x, weight, bias, rows):
        sparse_calls.append(rows is not None)
        return real_project_rows(x, weight, bias, rows)

    monkeypatch.setattr(attention_module, "_project_rows", spy)
    dead = lengths == 0
    keep, keep_weights = keep_rows(dead, dict(unbatched=False, batch_first=batch_first, average=True))
    compare(theirs, ours, (query, key, value), dict(key_padding_mask=padded, need_weights=need_weights), torch.float64,
            keep=keep, keep_weights=keep_weights,
            kwargs_theirs=torch_safe(dict(key_padding_mask=padded), dead, False) | dict(need_weights=need_weights))
    assert sparse_calls and all(sparse_calls)


@given(configs())
@settings(max_examples=40)
def test_random_configs_match_torch(c):
    module_kwargs, args, kwargs, dead = make_inputs(c)
    theirs, ours = make_pair(c["seed"], dtype=torch.float64, **module_kwargs)
    assert_same_parameters(theirs, ours)
    keep, keep_weights = keep_rows(dead, c) if dead.any() else (None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mismatched mask types: torch's deprecation warning, in both
        out, weights = compare(theirs, ours, args, kwargs, torch.float64, keep=keep, keep_weights=keep_weights,
                               kwargs_theirs=torch_safe(kwargs, dead, c["unbatched"]), seed=c["seed"])
    if keep is not None:
        # Fully padded rows: attention output 0, so the result is out_proj's bias.
        rows = out[~keep.expand_as(out)].reshape(-1, c["embed"])
        expected = ours.out_proj.bias if c["bias"] else torch.zeros(c["embed"], dtype=torch.float64)
        assert torch.equal(rows, expected.detach().expand_as(rows))
        if weights is not None:
            dead_weights = weights[dead] if not c["unbatched"] else weights
            assert torch.all(dead_weights == 0)


# ---------------------------------------------------------------------------
# Fully masked rows: 0, never NaN.


def test_fully_masked_rows_give_bias_output_zero_weights_and_zero_gradients():
    theirs, ours = make_pair(embed_dim=8, num_heads=2)
    query = torch.randn(5, 3, 8, requires_grad=True)
    kpm = torch.zeros(3, 5, dtype=torch.bool)
    kpm[1] = True  # batch element 1 sees no key
    attn_mask = torch.zeros(5, 5, dtype=torch.bool)
    attn_mask[2] = True  # query 2 sees no key, in every batch element
    out, weights = ours(query, query, query, key_padding_mask=kpm, attn_mask=attn_mask,
                        average_attn_weights=False)
    t_out, _ = theirs(query, query, query, key_padding_mask=kpm, attn_mask=attn_mask)
    assert torch.isnan(t_out).any()  # what torch does
    assert torch.isfinite(out).all() and torch.isfinite(weights).all()
    dead = torch.zeros(5, 3, dtype=torch.bool)
    dead[:, 1] = True
    dead[2, :] = True
    torch.testing.assert_close(out[~dead], t_out[~dead], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[dead], ours.out_proj.bias.detach().expand(int(dead.sum()), 8))
    assert torch.all(weights[1] == 0) and torch.all(weights[:, :, 2] == 0)

    grad_query, *grad_params = torch.autograd.grad(out.sum(), [query, *ours.parameters()])
    assert all(torch.isfinite(g).all() for g in [grad_query, *grad_params])
    # Batch element 1 attends to nothing: its query, key and value get no gradient.
    assert torch.all(grad_query[:, 1] == 0)


def test_a_head_with_a_fully_masked_row_adds_nothing():
    """A (N * H, L, S) mask can hide every key from one head only: that head adds 0, the others are torch's."""
    theirs, ours = make_pair(embed_dim=6, num_heads=3, batch_first=True)
    theirs.eval(), ours.eval()
    query = torch.randn(2, 4, 6)
    key = torch.randn(2, 5, 6)
    mask = torch.zeros(2 * 3, 4, 5, dtype=torch.bool)
    mask[1, 3] = True  # batch 0, head 1, query 3
    out, weights = ours(query, key, key, attn_mask=mask, average_attn_weights=False)
    _, t_weights = theirs(query, key, key, attn_mask=mask, average_attn_weights=False)
    assert torch.all(weights[0, 1, 3] == 0)
    finite = t_weights.isfinite()
    assert not finite.all()
    torch.testing.assert_close(weights[finite], t_weights[finite], rtol=1e-5, atol=1e-5)
    # The output is out_proj(weights @ v, heads concatenated), with those weights.
    v = torch.nn.functional.linear(key, ours.in_proj_weight[12:], ours.in_proj_bias[12:])
    heads = weights @ v.unflatten(-1, (3, 2)).transpose(1, 2)
    expected = ours.out_proj(heads.transpose(1, 2).flatten(2))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(5, 7, 0), (5, 0, 2), (5, 0, 0), (5, 0, None), (0, 7, 2)])
@pytest.mark.parametrize("mask", ["padding", "all padding", "3-D attn_mask"])
def test_empty_batch_or_keys_or_queries_match_torch(shape, mask):
    """(L, S, N), N None for unbatched: the CPU path that projects only the
    real keys must cope with no keys at all, and a per-head (3-D) mask with no
    elements must still be split into its heads. torch itself fails without
    weights where N or S is 0 (a reshape in its SDPA path), so ours is checked
    against its need_weights=True output there."""
    L, S, N = shape
    theirs, ours = make_pair(embed_dim=16, num_heads=4, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    batch = () if N is None else (N,)
    query = torch.randn(L, *batch, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    key = torch.randn(S, *batch, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    value = torch.randn(S, *batch, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    if mask == "3-D attn_mask":
        kwargs = dict(attn_mask=torch.randn(4 * (1 if N is None else N), L, S, generator=gen, dtype=torch.float64))
    else:
        kwargs = dict(key_padding_mask=torch.full(batch + (S,), mask == "all padding"))
    compare(theirs, ours, (query, key, value), kwargs, torch.float64)
    out, weights = ours(query, key, value, need_weights=False, **kwargs)
    assert weights is None
    torch.testing.assert_close(out, theirs(query, key, value, **kwargs)[0])


def test_nan_and_inf_inputs_give_nan_weights_where_torch_does():
    """Rows whose scores hold a NaN or an inf have NaN weights (and output),
    as in torch; a row that sees no key keeps its 0 weights."""
    theirs, ours = make_pair(embed_dim=8, num_heads=2, batch_first=True)
    x = torch.randn(4, 5, 8)
    x[0, 1, 3] = float("nan")  # batch 0: a NaN query and key
    x[2, 0, 0] = float("inf")  # batch 2: an inf query and key
    key = x.clone()
    key[3, 2, 5] = float("nan")  # batch 3, with key: a NaN in a key and value only
    kpm = torch.zeros(4, 5, dtype=torch.bool)
    kpm[1] = True  # batch 1 sees no key: 0 weights in ours, NaN in torch
    live = torch.tensor([True, False, True, True])
    for keys in (x, key):
        for average in (True, False):
            kwargs = dict(key_padding_mask=kpm, average_attn_weights=average)
            o_out, o_w = ours(x, keys, keys, **kwargs)
            t_out, t_w = theirs(x, keys, keys, **kwargs)
            assert torch.equal(o_out[live].isnan(), t_out[live].isnan())
            assert torch.equal(o_w[live].isnan(), t_w[live].isnan())
            assert o_w[live].isnan().any()
            finite = t_w.isfinite()
            torch.testing.assert_close(o_w[finite], t_w[finite], rtol=1e-5, atol=1e-5)
            assert torch.all(o_w[1] == 0) and t_w[1].isnan().all()
            keep = t_out.isfinite()
            torch.testing.assert_close(o_out[keep], t_out[keep], rtol=1e-5, atol=1e-5)


def test_attention_with_weights_nan_rows_are_the_softmaxs():
    """fastnlp.ops.attention_with_weights: NaN exactly where softmax is NaN,
    but 0 on rows that the masks leave without a key (bool or float -inf)."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 2, 6, 3, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, 5, 3, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 2, 5, 3, generator=gen, dtype=torch.float64)
    q[0, 0, 1, 0] = float("nan")
    q[0, 1, 2, 1] = float("inf")
    q[1, 0, 3, 2] = float("-inf")
    k[1, 1, 4, 0] = float("nan")
    float_mask = torch.zeros(6, 5, dtype=torch.float64)
    float_mask[4] = float("-inf")  # row 4 sees nothing, in every head
    kpm = torch.ones(2, 5, dtype=torch.bool)
    kpm[0, 3] = False
    scores = q @ k.transpose(-2, -1) / 3 ** 0.5 + float_mask
    scores = scores.masked_fill(~kpm[:, None, None, :], float("-inf"))
    expected = torch.softmax(scores, dim=-1)
    blank = torch.zeros(2, 2, 6, 1, dtype=torch.bool)
    blank[:, :, 4] = True
    expected = torch.where(blank, torch.zeros_like(expected), expected)
    _, weights = ops.attention_with_weights(q, k, v, attn_mask=float_mask, key_padding_mask=kpm)
    assert expected.isnan().any()
    assert torch.equal(weights.isnan(), expected.isnan())
    torch.testing.assert_close(weights.nan_to_num(7.0), expected.nan_to_num(7.0))


# ---------------------------------------------------------------------------
# state_dict, constructor, repr.


@pytest.mark.parametrize("kwargs", [
    dict(embed_dim=8, num_heads=2),
    dict(embed_dim=8, num_heads=4, bias=False),
    dict(embed_dim=6, num_heads=3, add_bias_kv=True, add_zero_attn=True, batch_first=True),
    dict(embed_dim=8, num_heads=2, kdim=5, vdim=3),
    dict(embed_dim=8, num_heads=2, kdim=8, vdim=3, bias=False, add_bias_kv=True),
])
def test_state_dict_loads_both_ways(kwargs):
    theirs, ours = make_pair(seed=3, **kwargs)
    assert_same_parameters(theirs, ours)
    embed = kwargs["embed_dim"]
    packed = kwargs.get("kdim", embed) == embed and kwargs.get("vdim", embed) == embed
    assert ("in_proj_weight" in ours.state_dict()) == packed
    assert ("q_proj_weight" in ours.state_dict()) == (not packed)
    torch.manual_seed(11)
    other_theirs = nn.MultiheadAttention(**kwargs)
    ours.load_state_dict(other_theirs.state_dict())  # strict
    assert_same_parameters(other_theirs, ours)
    torch.manual_seed(12)
    other_ours = MultiheadAttention(**kwargs)
    theirs.load_state_dict(other_ours.state_dict())
    assert_same_parameters(theirs, other_ours)


def test_constructor_device_dtype_and_old_pickles():
    m = MultiheadAttention(4, 2, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 for p in m.parameters())
    state = m.__dict__.copy()
    del state["_qkv_same_embed_dim"]
    fresh = MultiheadAttention.__new__(MultiheadAttention)
    fresh.__setstate__(state)
    assert fresh._qkv_same_embed_dim is True


# ---------------------------------------------------------------------------
# Errors: same type and message as torch's.


def _q(*shape):
    return torch.randn(*shape)


ERROR_CASES = [
    # (constructor kwargs, forward args, forward kwargs)
    (dict(embed_dim=0, num_heads=2), None, None),
    (dict(embed_dim=4, num_heads=-1), None, None),
    (dict(embed_dim=6, num_heads=4), None, None),
    (dict(embed_dim=4, num_heads=2), (_q(5), _q(5), _q(5)), {}),
    (dict(embed_dim=4, num_heads=2), (_q(1, 2, 3, 4),) * 3, {}),
    (dict(embed_dim=4, num_heads=2), (_q(3, 2, 4), _q(5, 4), _q(5, 2, 4)), {}),
    (dict(embed_dim=4, num_heads=2), (_q(3, 4), _q(5, 2, 4), _q(5, 4)), {}),
    (dict(embed_dim=4, num_heads=2), (_q(3, 2, 4), _q(5, 2, 4), _q(5, 2, 4)),
     dict(key_padding_mask=torch.zeros(5, dtype=torch.bool))),
    (dict(embed_dim=4, num_heads=2), (_q(3, 4), _q(5, 4), _q(5, 4)),
     dict(key_padding_mask=torch.zeros(1, 5, dtype=torch.bool))),
    (dict(embed_dim=4, num_heads=2), (_q(3, 2, 4), _q(5, 2, 4), _q(5, 2, 4)),
     dict(attn_mask=torch.zeros(3, dtype=torch.bool))),
    (dict(embed_dim=4, num_heads=2), (_q(3, 4), _q(5, 4), _q(5, 4)),
     dict(attn_mask=torch.zeros(1, 1, 3, 5, dtype=torch.bool))),
    (dict(embed_dim=4, num_heads=2), (_q(3, 4), _q(5, 4), _q(5, 4)),
     dict(attn_mask=torch.zeros(3, 3, 5, dtype=torch.bool))),
    (dict(embed_dim=4, num_heads=2), (_q(3, 2, 4), _q(5, 2, 4), _q(5, 2, 4)),
     dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.int64))),
    (dict(embed_dim=4, num_heads=2), (_q(3, 2, 4), _q(5, 2, 4), _q(5, 2, 4)),
     dict(attn_mask=torch.zeros(3, 5, dtype=torch.int32))),
    (dict(embed_dim=4, num_heads=2), (_q(3, 2, 4), _q(5, 2, 4), _q(5, 2, 4)),
     dict(attn_mask=[[0.0] * 5] * 3)),
    (dict(embed_dim=4, num_heads=2), (_q(3, 2, 4), _q(5, 2, 4), _q(5, 2, 4)),
     dict(key_padding_mask=[[False] * 5] * 2)),
    (dict(embed_dim=4, num_heads=2), (_q(3, 2, 4), _q(5, 2, 4), _q(5, 2, 4)), dict(is_causal=True)),
    (dict(embed_dim=4, num_heads=2), (_q(3, 2, 6), _q(5, 2, 6), _q(5, 2, 6)), {}),
    (dict(embed_dim=4, num_heads=2), (_q(3, 2, 4), _q(5, 2, 4), _q(6, 2, 4)), {}),
    (dict(embed_dim=4, num_heads=2, batch_first=True), (_q(2, 3, 4), _q(2, 5, 4), _q(2, 6, 4)), {}),
    (dict(embed_dim=4, num_heads=2, kdim=3, vdim=2), (_q(3, 2, 4), _q(5, 2, 3), _q(6, 2, 2)), {}),
    (dict(embed_dim=4, num_heads=2, kdim=3, vdim=2), (_q(3, 2, 4), _q(5, 2, 5), _q(5, 2, 2)), {}),
    (dict(embed_dim=4, num_heads=2, kdim=3, vdim=2), (_q(3, 2, 4), _q(5, 2, 3), _q(5, 2, 7)), {}),
    (dict(embed_dim=4, num_heads=2), (_q(3, 2, 4), _q(5, 2, 3), _q(5, 2, 3)), {}),
    (dict(embed_dim=4, num_heads=2), (_q(3, 2, 4).double(),) * 3, {}),
    (dict(embed_dim=4, num_heads=2), (_q(3, 2, 4), _q(5, 2, 4), _q(5, 2, 4)),
     dict(attn_mask=torch.zeros(3, 4, dtype=torch.bool))),
    (dict(embed_dim=4, num_heads=2), (_q(3, 2, 4), _q(5, 2, 4), _q(5, 2, 4)),
     dict(attn_mask=torch.zeros(2, 3, 5, dtype=torch.bool))),
    (dict(embed_dim=4, num_heads=2, add_bias_kv=True), (_q(3, 2, 4), _q(5, 2, 4), _q(5, 2, 4)),
     dict(key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))),
    (dict(embed_dim=4, num_heads=2, add_zero_attn=True), (_q(3, 2, 4), _q(5, 2, 4), _q(5, 2, 4)),
     dict(key_padding_mask=torch.zeros(3, 5, dtype=torch.bool))),
    (dict(embed_dim=4, num_heads=2, batch_first=True), (_q(2, 3, 4), _q(5), _q(5)), {}),
]


def _outcome(fn):
    try:
        fn()
    except Exception as error:  # noqa: BLE001  (comparing whatever torch raises)
        return type(error), str(error)
    return None


@pytest.mark.parametrize("index", range(len(ERROR_CASES)))
def test_errors_match_torch(index):
    ctor, args, kwargs = ERROR_CASES[index]
    if args is None:
        theirs = _outcome(lambda: nn.MultiheadAttention(**ctor))
        ours = _outcome(lambda: MultiheadAttention(**ctor))
    else:
        t_module, o_module = make_pair(**ctor)
        theirs = _outcome(lambda: t_module(*args, **kwargs))
        ours = _outcome(lambda: o_module(*args, **kwargs))
    assert_same_error(ours, theirs)


@pytest.mark.parametrize("ctor,args", [
    (dict(embed_dim=4, num_heads=1), (_q(3, 1, 4), _q(3, 2, 4), _q(3, 2, 4))),
    (dict(embed_dim=4, num_heads=2, batch_first=True), (_q(1, 3, 4), _q(2, 3, 4), _q(2, 3, 4))),
    (dict(embed_dim=4, num_heads=2, kdim=3, vdim=2), (_q(3, 2, 4), _q(5, 3, 3), _q(5, 3, 2))),
    (dict(embed_dim=4, num_heads=2, add_bias_kv=True), (_q(3, 2, 4), _q(5, 1, 4), _q(5, 1, 4))),
])
def test_key_batch_unlike_query_batch_is_torchs_error_type(ctor, args):
    # torch fails in a reshape ("shape ... is invalid for input of size ..."):
    # the same type, and a message that says which batch sizes disagree.
    t_module, o_module = make_pair(**ctor)
    theirs = _outcome(lambda: t_module(*args))
    assert theirs is not None and theirs[0] is RuntimeError
    with pytest.raises(RuntimeError, match=r"key has batch size \d but query has \d"):
        o_module(*args)


def test_mismatched_mask_types_warn_like_torch():
    theirs, ours = make_pair(embed_dim=4, num_heads=2)
    x = torch.randn(3, 2, 4)
    kwargs = dict(key_padding_mask=torch.zeros(2, 3, dtype=torch.bool), attn_mask=torch.zeros(3, 3))
    for module in (theirs, ours):
        with pytest.warns(UserWarning, match="Support for mismatched key_padding_mask and attn_mask is deprecated"):
            module(x, x, x, **kwargs)


MASK_DTYPES = [None, torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("query_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("unbatched", [False, True])
def test_float_mask_dtypes_are_refused_like_torch(monkeypatch, query_dtype, need_weights, unbatched):
    """torch refuses float masks whose (summed) dtype its kernels do not take:
    ours raises the same type, naming the mask, before any kernel runs, and
    otherwise gives torch's result."""
    theirs, ours = make_pair(embed_dim=8, num_heads=2, dtype=query_dtype)
    L, S, N = 3, 4, 2
    query = torch.randn((L, 8) if unbatched else (L, N, 8), dtype=query_dtype)
    key = torch.randn((S, 8) if unbatched else (S, N, 8), dtype=query_dtype)
    kernel_calls = []

    def spy(real):
        def wrapped(*args, **kwargs):
            kernel_calls.append(real.__name__)
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(ops, "attention", spy(ops.attention))
    monkeypatch.setattr(ops, "attention_with_weights", spy(ops.attention_with_weights))
    refused = 0
    for mask_dtype in MASK_DTYPES:
        for padding_dtype in MASK_DTYPES:
            kwargs = dict(need_weights=need_weights)
            if mask_dtype is not None:
                kwargs["attn_mask"] = torch.zeros(L, S, dtype=mask_dtype)
            if padding_dtype is not None:
                kwargs["key_padding_mask"] = torch.zeros((S,) if unbatched else (N, S), dtype=padding_dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # mismatched mask types: torch's deprecation warning, in both
                theirs_outcome = _outcome(lambda: theirs(query, key, key, **kwargs))
                kernel_calls.clear()
                ours_outcome = _outcome(lambda: ours(query, key, key, **kwargs))
            case = f"attn_mask {mask_dtype}, key_padding_mask {padding_dtype}"
            if theirs_outcome is None:
                assert ours_outcome is None, f"{case}: {ours_outcome}"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.testing.assert_close(ours(query, key, key, **kwargs)[0], theirs(query, key, key, **kwargs)[0])
                continue
            refused += 1
            assert theirs_outcome[0] is RuntimeError, case
            assert ours_outcome is not None and ours_outcome[0] is RuntimeError, f"{case}: {ours_outcome}"
            named = [name for name, dtype in (("attn_mask", mask_dtype), ("key_padding_mask", padding_dtype))
                     if dtype not in (None, torch.bool, query_dtype)]
            assert any(f"Expected {name}" in ours_outcome[1] or f"and {name} dtype" in ours_outcome[1]
                       for name in named), f"{case}: {ours_outcome[1]}"
            assert kernel_calls == [], case
    assert refused > 0


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("masks", ["attn_mask", "key_padding_mask", "both"])
def test_learned_float_masks_get_torchs_gradients(masks, need_weights):
    # A float mask that requires grad (a learned position bias) gets the
    # gradient torch gives it, as do the inputs and parameters.
    theirs, ours = make_pair(embed_dim=8, num_heads=2, batch_first=True, dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 8, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(3, 5, 8, generator=gen, dtype=torch.float64)
    bias = torch.randn(2 * 3, 5, 5, generator=gen, dtype=torch.float64) if masks != "key_padding_mask" else None
    padding = torch.randn(3, 5, generator=gen, dtype=torch.float64) if masks != "attn_mask" else None
    results = []
    for module in (theirs, ours):
        inputs = [t.clone().requires_grad_(True) for t in (x, bias, padding) if t is not None]
        leaves = iter(inputs)
        query = next(leaves)
        attn_mask = next(leaves) if bias is not None else None
        key_padding_mask = next(leaves) if padding is not None else None
        out, _ = module(query, query, query, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                        need_weights=need_weights)
        results.append((out, torch.autograd.grad(out, inputs + list(module.parameters()), grad_out)))
    torch.testing.assert_close(results[1][0], results[0][0])
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------
# is_causal: torch's use of the hint, reproduced.


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("causal_mask", [True, False])
def test_is_causal_follows_torch(need_weights, padding, causal_mask):
    """With a wrong hint (attn_mask not causal) torch uses the causal mask where
    it hands the hint to SDPA and attn_mask elsewhere: ours does the same."""
    theirs, ours = make_pair(embed_dim=8, num_heads=2, batch_first=True)
    x = torch.randn(3, 6, 8, dtype=torch.float32, requires_grad=True)
    if causal_mask:
        mask = nn.Transformer.generate_square_subsequent_mask(6)
    else:
        mask = torch.rand(6, 6) < 0.3
        mask[:, 0] = False
        mask = torch.zeros(6, 6).masked_fill(mask, float("-inf"))
    kwargs = dict(attn_mask=mask, is_causal=True, need_weights=need_weights)
    if padding:
        kwargs["key_padding_mask"] = torch.tensor([[0.0] * 6, [0.0] * 4 + [float("-inf")] * 2, [0.0] * 6])
    compare(theirs, ours, (x, x, x), kwargs, torch.float32)


@pytest.mark.parametrize("need_weights, padding", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("hint", [None, 0, torch.tensor(False), 1])
def test_is_causal_that_is_not_a_bool_follows_torch(need_weights, padding, hint):
    """torch tests only the hint's truth value where it does not hand it to
    SDPA, and SDPA refuses a non-bool (TypeError). A falsy non-bool once
    reached our op's bool check on every path."""
    theirs, ours = make_pair(embed_dim=8, num_heads=2)
    x = torch.randn(5, 2, 8)
    kwargs = dict(attn_mask=nn.Transformer.generate_square_subsequent_mask(5), is_causal=hint,
                  need_weights=need_weights)
    if padding:
        kwargs["key_padding_mask"] = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    try:
        expected = theirs(x, x, x, **kwargs)
    except TypeError:
        with pytest.raises(TypeError, match="is_causal must be a bool"):
            ours(x, x, x, **kwargs)
        return
    for got, want in zip(ours(x, x, x, **kwargs), expected):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Dropout (training mode): the kernel's random stream, so compared with itself.


# Each dropout value that no random draw decides: torch's module refuses it
# (the same exception type here) or runs without dropping (0, or a negative
# one on the weights path) or dropping everything (1, True).
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("dropout", ["0.1", None, 1.5, -0.1, float("nan"), 1.0, True, 0])
def test_dropout_values_as_torch_takes_them(dropout, need_weights):
    theirs, ours = make_pair(embed_dim=8, num_heads=2, dropout=dropout, batch_first=True)
    x = torch.randn(2, 5, 8)
    results = []
    for module in (theirs, ours):
        try:
            results.append(module(x, x, x, need_weights=need_weights))
        except Exception as error:  # noqa: BLE001  (type and message compared below)
            results.append((type(error), str(error)))
    theirs_result, ours_result = results
    if isinstance(theirs_result, tuple) and isinstance(theirs_result[0], type):
        ours_error = ours_result if isinstance(ours_result, tuple) and isinstance(ours_result[0], type) else None
        if need_weights:  # torch's own checks, which ours repeats, message and all
            assert_same_error(ours_error, theirs_result)
        else:  # SDPA's path: its type, in a message of ours that names the argument
            assert ours_error is not None and ours_error[0] is theirs_result[0], (ours_error, theirs_result)
            assert "dropout_p" in ours_error[1], ours_error
    else:
        assert not (isinstance(ours_result, tuple) and isinstance(ours_result[0], type)), ours_result
        torch.testing.assert_close(ours_result, theirs_result, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # eval: dropout is not read
        theirs.eval(), ours.eval()
        torch.testing.assert_close(ours(x, x, x)[0], theirs(x, x, x)[0], rtol=1e-5, atol=1e-6)

def test_dropout_weights_are_the_ones_the_output_used():
    torch.manual_seed(0)
    m = MultiheadAttention(8, 2, dropout=0.5, batch_first=True)
    x = torch.randn(2, 7, 8)
    torch.manual_seed(1)
    out, weights = m(x, x, x, average_attn_weights=False)
    torch.manual_seed(1)
    out_fast, _ = m(x, x, x, need_weights=False)
    torch.testing.assert_close(out, out_fast)  # same draw with or without weights
    assert ((weights == 0).float().mean() - 0.5).abs() < 0.1
    v = torch.nn.functional.linear(x, m.in_proj_weight[16:], m.in_proj_bias[16:]).unflatten(-1, (2, 4))
    heads = weights @ v.transpose(1, 2)
    torch.testing.assert_close(out, m.out_proj(heads.transpose(1, 2).flatten(2)), rtol=1e-5, atol=1e-5)
    torch.manual_seed(2)
    assert not torch.equal(m(x, x, x, need_weights=False)[0], out)
    m.eval()
    theirs = nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True).eval()
    theirs.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x, x, x)[0], theirs(x, x, x)[0], rtol=1e-5, atol=1e-5)  # eval: no dropout


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_error_bounded_by_torchs(dtype):
    """Against torch in float32: ours in low precision errs no more than torch in the same precision (x2)."""
    theirs, ours = make_pair(embed_dim=16, num_heads=4, batch_first=True)
    x = torch.randn(2, 9, 16)
    kpm = torch.tensor([[False] * 9, [False] * 5 + [True] * 4])
    want, want_w = theirs(x, x, x, key_padding_mask=kpm)
    low_theirs, low_ours = theirs.to(dtype), ours.to(dtype)
    xl = x.to(dtype)
    t_out, t_w = low_theirs(xl, xl, xl, key_padding_mask=kpm)
    for need_weights in (True, False):
        out, weights = low_ours(xl, xl, xl, key_padding_mask=kpm, need_weights=need_weights)
        assert out.dtype == dtype
        assert (out.float() - want).abs().max() <= 2 * (t_out.float() - want).abs().max() + 1e-3
        if need_weights:
            assert weights.dtype == dtype
            assert (weights.float() - want_w).abs().max() <= 2 * (t_w.float() - want_w).abs().max() + 1e-3


# ---------------------------------------------------------------------------
# fastnlp.ops.attention_with_weights, the path need_weights=True takes.


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_with_weights_is_the_softmax_and_its_gradient(kv_heads):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, kv_heads, 7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, kv_heads, 7, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    attn_mask = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    attn_mask[1] = float("-inf")  # query 1 sees nothing
    lengths = torch.tensor([7, 3])
    out, weights = ops.attention_with_weights(q, k, v, attn_mask=attn_mask, key_padding_mask=lengths)
    group = 4 // kv_heads
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ kk.transpose(-2, -1) / 3 ** 0.5 + attn_mask
    scores = scores.masked_fill(torch.arange(7)[None, None, None, :] >= lengths[:, None, None, None], float("-inf"))
    seen = (scores != float("-inf")).any(dim=-1, keepdim=True)
    expected = torch.softmax(torch.where(seen, scores, torch.zeros_like(scores)), dim=-1)
    expected = torch.where(seen, expected, torch.zeros_like(expected))
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(out, expected @ vv)
    assert torch.all(weights[:, :, 1] == 0)
    g_out, g_w = torch.randn_like(out), torch.randn_like(weights)
    got = torch.autograd.grad((out * g_out).sum() + (weights * g_w).sum(), [q, k, v])
    want = torch.autograd.grad((expected @ vv * g_out).sum() + (expected * g_w).sum(), [q, k, v])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_inference_matches_torch_fast_path():
    """In eval mode without grad torch takes its native fast path; ours still runs the kernel."""
    theirs, ours = make_pair(embed_dim=16, num_heads=4, batch_first=True)
    theirs.eval(), ours.eval()
    x = torch.randn(3, 7, 16)
    kpm = torch.tensor([[False] * 7, [False] * 4 + [True] * 3, [False] * 2 + [True] * 5])
    with torch.no_grad():
        for need_weights in (False, True):
            t_out, t_w = theirs(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
            o_out, o_w = ours(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
            torch.testing.assert_close(o_out, t_out, rtol=1e-5, atol=1e-5)
            if need_weights:
                torch.testing.assert_close(o_w, t_w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("inputs", ["self", "shared_kv", "distinct", "kdim_vdim"])
def test_trains_on_inputs_made_under_inference_mode(batch_first, inputs):
    """Trainable weights, inputs from torch.inference_mode(): torch's batch_first path projects
    transposed copies, so it trains; ours copies those inputs (and also trains sequence first,
    where torch refuses to save them)."""
    extra = dict(kdim=5, vdim=3) if inputs == "kdim_vdim" else {}
    theirs, ours = make_pair(embed_dim=8, num_heads=2, batch_first=batch_first, **extra)
    def sequence(length, width):
        return torch.randn((3, length, width) if batch_first else (length, 3, width))

    with torch.inference_mode():
        query = sequence(4, 8)
        if inputs == "self":
            key = value = query
        elif inputs == "shared_kv":
            key = value = sequence(6, 8)
        elif inputs == "distinct":
            key, value = sequence(6, 8), sequence(6, 8)
        else:
            key, value = sequence(6, 5), sequence(6, 3)
        kpm = torch.zeros(3, 4 if inputs == "self" else 6, dtype=torch.bool)
        kpm[1, -2:] = True
    out, weights = ours(query, key, value, key_padding_mask=kpm)
    (out.sum() + weights.sum()).backward()
    # torch on normal copies of the inputs (identity kept: self-attention takes its own path).
    copies = {}
    args = [copies[id(t)] if id(t) in copies else copies.setdefault(id(t), t.clone()) for t in (query, key, value)]
    t_out, t_weights = theirs(*args, key_padding_mask=kpm.clone())
    (t_out.sum() + t_weights.sum()).backward()
    torch.testing.assert_close(out, t_out, rtol=1e-5, atol=1e-6)
    for (name, got), (_, want) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5, msg=name)
    if batch_first:  # torch itself trains on the inference tensors here
        theirs.zero_grad()
        t_out, t_weights = theirs(query, key, value, key_padding_mask=kpm)
        (t_out.sum() + t_weights.sum()).backward()
        torch.testing.assert_close(out, t_out, rtol=1e-5, atol=1e-6)
        for (name, got), (_, want) in zip(ours.named_parameters(), theirs.named_parameters()):
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5, msg=name)


def _patched_copy(model):
    """A copy of `model` with fastnlp's attention swapped in; `model` stays torch's."""
    ours = copy.deepcopy(model)
    report = fastnlp.patch(ours)
    assert any(new == "fastnlp.nn.attention.MultiheadAttention" for _, _, new in report.swapped), str(report)
    return ours


def _count_our_forward_calls(monkeypatch):
    """A list whose one entry counts the calls of our MultiheadAttention.forward from now on.
    (Not a hook: torch's encoder layer leaves its fast path when its attention has hooks.)"""
    calls = [0]
    forward = MultiheadAttention.forward

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(MultiheadAttention, "forward", counted)
    return calls


def _encoder_inputs(batch_first):
    gen = torch.Generator().manual_seed(5)
    src = torch.randn((3, 6, 8) if batch_first else (6, 3, 8), generator=gen)
    padding = torch.arange(6)[None, :] >= torch.tensor([6, 4, 2])[:, None]
    return src, padding, nn.Transformer.generate_square_subsequent_mask(6)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mode", ["eval_no_grad", "eval", "train"])
def test_patched_transformer_encoder_layer_matches_torch(monkeypatch, batch_first, mode):
    """In eval without grad, batch_first, torch's TransformerEncoderLayer takes
    its fast path, which needs self_attn.merge_masks and runs torch's kernel on
    our weights; otherwise it calls our forward. Either way: torch's results."""
    torch.manual_seed(0)
    theirs = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
    ours = _patched_copy(nn.Sequential(theirs))[0]
    calls = _count_our_forward_calls(monkeypatch)
    fast_path = mode == "eval_no_grad" and batch_first
    src, padding, causal = _encoder_inputs(batch_first)
    masks = [dict(), dict(src_key_padding_mask=padding), dict(src_mask=causal),
             dict(src_mask=causal, src_key_padding_mask=padding),
             dict(src_mask=causal.expand(3 * 2, 6, 6).clone(),
                  src_key_padding_mask=torch.zeros(3, 6).masked_fill(padding, float("-inf")))]
    for module in (theirs, ours):
        module.train(mode == "train")
    for kwargs in masks:
        with torch.set_grad_enabled(mode != "eval_no_grad"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # mismatched mask types: torch's deprecation warning, in both
            x = src.clone().requires_grad_(mode != "eval_no_grad")
            x_ours = src.clone().requires_grad_(mode != "eval_no_grad")
            calls[0] = 0
            want, got = theirs(x, **kwargs), ours(x_ours, **kwargs)
            assert calls[0] == (0 if fast_path else 1)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            if mode != "eval_no_grad":
                grad_out = torch.randn_like(want)
                want_grads = torch.autograd.grad(want, [x, *theirs.parameters()], grad_out)
                got_grads = torch.autograd.grad(got, [x_ours, *ours.parameters()], grad_out)
                for a, b in zip(got_grads, want_grads):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mode", ["eval_no_grad", "train"])
def test_patched_transformer_encoder_with_padding_matches_torch(monkeypatch, batch_first, mode):
    """TransformerEncoder with a src_key_padding_mask: in eval without grad (and
    batch_first) it hands its layers NestedTensor input on the fast path, where
    torch's kernel runs on our weights and our forward is never called; the
    patch must leave that path working. Otherwise each layer calls our forward."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # enable_nested_tensor without batch_first: torch's warning
        theirs = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    ours = _patched_copy(theirs)
    src, padding, _ = _encoder_inputs(batch_first)
    theirs.train(mode == "train"), ours.train(mode == "train")
    calls = _count_our_forward_calls(monkeypatch)
    with torch.set_grad_enabled(mode == "train"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "nested tensors are a prototype" warning
        want = theirs(src, src_key_padding_mask=padding)
        got = ours(src, src_key_padding_mask=padding)
    assert calls[0] == (0 if mode == "eval_no_grad" and batch_first else 2)  # two layers
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn_mask", [None, "2d", "3d"])
@pytest.mark.parametrize("padding", [None, "bool", "float"])
def test_merge_masks_matches_torch(attn_mask, padding):
    theirs, ours = make_pair(embed_dim=8, num_heads=2, batch_first=True)
    query = torch.randn(3, 5, 8)
    mask = {None: None, "2d": torch.randn(5, 5), "3d": torch.randn(3 * 2, 5, 5)}[attn_mask]
    kpm = {None: None, "bool": torch.rand(3, 5) < 0.5, "float": torch.randn(3, 5)}[padding]
    if mask is not None and kpm is not None and kpm.dtype == torch.bool:
        kpm = torch.zeros(3, 5).masked_fill(kpm, float("-inf"))  # torch's layer hands over both as floats
    want, want_type = theirs.merge_masks(mask, kpm, query)
    got, got_type = ours.merge_masks(mask, kpm, query)
    assert got_type == want_type
    if want is None:
        assert got is None
    else:
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------
# torch.compile, other devices.


def test_torch_compile_fullgraph_training_with_dropout():
    torch.manual_seed(0)
    m = MultiheadAttention(8, 2, dropout=0.3)
    x = torch.randn(5, 3, 8)
    compiled = torch.compile(lambda x: m(x, x, x, average_attn_weights=False), fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    out, weights = compiled(x)
    torch.manual_seed(1)
    eager, eager_weights = m(x, x, x, average_attn_weights=False)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(weights, eager_weights)


@pytest.mark.parametrize("need_weights", [False, True])
def test_torch_compile_fullgraph_forward_and_backward(need_weights):
    torch.manual_seed(0)
    m = MultiheadAttention(8, 2, batch_first=True, add_zero_attn=need_weights)
    x = torch.randn(3, 5, 8)
    kpm = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [True] * 5])
    mask = torch.rand(5, 5) < 0.2

    def forward(x):
        return m(x, x, x, key_padding_mask=kpm, attn_mask=mask, need_weights=need_weights)

    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    x_eager = x.clone().requires_grad_(True)
    x_comp = x.clone().requires_grad_(True)
    out, w = forward(x_eager)
    c_out, c_w = compiled(x_comp)
    torch.testing.assert_close(c_out, out)
    loss = out.square().sum() + (0 if w is None else w.square().sum())
    c_loss = c_out.square().sum() + (0 if c_w is None else c_w.square().sum())
    grads = torch.autograd.grad(loss, [x_eager, *m.parameters()])
    c_grads = torch.autograd.grad(c_loss, [x_comp, *m.parameters()])
    for a, b in zip(c_grads, grads):
        torch.testing.assert_close(a, b)
        assert torch.isfinite(a).all()


@pytest.mark.parametrize("device", DEVICES)
def test_matches_torch_on_device(device):
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fastnlp::attention_forward",
                                                           "CPU" if device == "cpu" else device.upper()):
        pytest.skip(f"no {device} attention kernel in this build")
    theirs, ours = make_pair(device=device, embed_dim=16, num_heads=4, batch_first=True)
    x = torch.randn(2, 9, 16, device=device, requires_grad=True)
    kpm = torch.tensor([[False] * 9, [False] * 5 + [True] * 4], device=device)
    for need_weights in (False, True):
        compare(theirs, ours, (x, x, x), dict(key_padding_mask=kpm, need_weights=need_weights), torch.float32)


def test_torch_func_transforms_as_torchs():
    """Under torch.func's differentiating transforms the op runs its reference
    (with the op's own autograd, functorch's jvp gave zero tangents without a
    word): jvp and jacrev equal torch's module's in float64, with weights
    and a key_padding_mask. vmap over a batched key_padding_mask runs (the
    sparse key projection's nonzero() has no batching rule: skipped there)."""
    theirs, ours = make_pair(embed_dim=8, num_heads=2, dtype=torch.float64)
    x = torch.randn(3, 2, 8, dtype=torch.float64)
    padding = torch.tensor([[False, False, True], [False, False, False]])

    def output(module):
        return lambda z: module(z, z, z, key_padding_mask=padding)[0]

    tangent = torch.randn_like(x)
    torch.testing.assert_close(torch.func.jvp(output(ours), (x,), (tangent,))[1],
                               torch.func.jvp(output(theirs), (x,), (tangent,))[1])
    torch.testing.assert_close(torch.func.jacrev(output(ours))(x), torch.func.jacrev(output(theirs))(x))
    batched_x = torch.randn(4, 3, 2, 8, dtype=torch.float64)
    batched_padding = torch.zeros(4, 2, 3, dtype=torch.bool)
    batched_padding[:, 0, -1] = True

    def batched(module):
        return torch.func.vmap(lambda z, k: module(z, z, z, key_padding_mask=k)[0])(batched_x, batched_padding)

    torch.testing.assert_close(batched(ours), batched(theirs))


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("masks", ["none", "bf16 attn_mask", "f16 attn_mask", "f32 attn_mask", "f64 attn_mask",
                                   "bf16 key_padding_mask", "bf16 attn_mask + bool key_padding_mask"])
def test_autocast_as_torchs(masks, need_weights):
    """Under CPU autocast (bfloat16) the projections run in bfloat16 and torch
    hands the masks to its kernels cast as autocast casts them: any float mask
    but float64 passes (this module once checked them against the float32
    input and refused). Same dtypes, values at bfloat16's rounding. A float64
    mask fails in both; torch's message comes from inside its kernels (on the
    weights path a baddbmm's), ours names the mask and both dtypes."""
    theirs, ours = make_pair(embed_dim=8, num_heads=2)
    x = torch.randn(3, 2, 8)
    g = torch.Generator().manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32, "f64": torch.float64}
    kwargs = {}
    if "attn_mask" in masks:
        kwargs["attn_mask"] = torch.randn(3, 3, generator=g).to(dtype[masks.split()[0]])
    if "bool key_padding_mask" in masks:
        kwargs["key_padding_mask"] = torch.tensor([[False, False, True], [False, False, False]])
    elif "key_padding_mask" in masks:
        kwargs["key_padding_mask"] = torch.randn(2, 3, generator=g).bfloat16()
    results = []
    for module in (theirs, ours):
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's "mismatched key_padding_mask and attn_mask" deprecation
                results.append(module(x, x, x, need_weights=need_weights, **kwargs))
        except RuntimeError as error:
            results.append(error)
    if isinstance(results[0], RuntimeError):
        assert masks == "f64 attn_mask", results[0]
        assert isinstance(results[1], RuntimeError), "fastnlp accepts what torch refuses"
        allowed = "bool" if need_weights else "bool or float32"
        assert str(results[1]) == (f"Expected attn_mask dtype to be {allowed} or to match query dtype, but got "
                                   "attn_mask.dtype: torch.float64 and query.dtype: torch.bfloat16 instead.")
        return
    for got, want in zip(results[1], results[0]):
        if want is None:
            assert got is None
            continue
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_double_backward_equals_torch():
    # A gradient penalty on the query, with key padding and a causal mask:
    # the recorded backward pass runs the reference (see
    # fastnlp/ops/_double_backward.py), so it differentiates as torch's does
    # (torch's own has no double backward with need_weights=False on the CPU:
    # its fused SDPA kernel's backward is not differentiable; ours is, both ways).
    theirs, ours = make_pair(embed_dim=8, num_heads=2, batch_first=True, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    results = []
    for model, need_weights in ((theirs, True), (ours, True), (ours, False)):
        leaf = x.clone().requires_grad_(True)
        out, _ = model(leaf, leaf, leaf, key_padding_mask=padding, attn_mask=causal, need_weights=need_weights)
        (grad,) = torch.autograd.grad(out.pow(2).sum(), leaf, create_graph=True)
        results.append((grad,) + torch.autograd.grad(grad.pow(2).sum(), [leaf, *model.parameters()]))
    for ours_result in results[1:]:
        for got, want in zip(ours_result, results[0]):
            torch.testing.assert_close(got, want)
