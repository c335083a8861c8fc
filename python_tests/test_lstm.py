"""The LSTM layer op (torch.ops.fastnlp.lstm_forward/backward) against the
pure-PyTorch reference: outputs and every gradient over random shapes, lengths,
directions, projections and dtypes; gradcheck; opcheck; torch.compile; errors."""

import contextlib

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence

import fastnlp
from fastnlp.ops import lstm_cell, lstm_layer, lstm_layer_pair
from markers import DEVICES, requires_cuda


def make_layer_inputs(lengths, input_size, hidden, proj, bias, dtype, device, seed=0, packed=True):
    """Time-major packed rows for sequences of the given lengths (sorted longest first)."""
    g = torch.Generator().manual_seed(seed)
    lengths = sorted(lengths, reverse=True)
    B, T = len(lengths), max(lengths)
    if packed:
        batch_sizes = torch.tensor([sum(n > t for n in lengths) for t in range(T)], dtype=torch.long)
    else:
        batch_sizes = torch.empty(0, dtype=torch.long)
    rows = int(batch_sizes.sum()) if packed else B * T
    P = proj or hidden

    def rand(*shape):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1).to(dtype).to(device).requires_grad_()

    tensors = {
        "input": rand(rows, input_size),
        "h0": rand(B, P),
        "c0": rand(B, hidden),
        "weight_ih": rand(4 * hidden, input_size),
        "weight_hh": rand(4 * hidden, P),
        "bias_ih": rand(4 * hidden) if bias in ("both", "ih") else None,
        "bias_hh": rand(4 * hidden) if bias in ("both", "hh") else None,
        "weight_hr": rand(P, hidden) if proj else None,
    }
    return batch_sizes, tensors


def make_regularisers(batch_sizes, tensors, seed=2):
    """Random recurrent-dropout mask and zoneout weights (any z in [0, 1] is valid)."""
    g = torch.Generator().manual_seed(seed)
    h0, c0, rows = tensors["h0"], tensors["c0"], tensors["input"].shape[0]

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64).to(h0.dtype).to(h0.device)

    return {"recurrent_mask": (rand(*h0.shape) > 0.3).to(h0.dtype) / 0.7,
            "zoneout_cell": rand(rows, c0.shape[1]), "zoneout_hidden": rand(rows, h0.shape[1])}


def run_layer(batch_sizes, tensors, reverse, backend=None, regularisers=None):
    t = tensors
    return lstm_layer(t["input"], batch_sizes, t["h0"], t["c0"], t["weight_ih"], t["weight_hh"], t["bias_ih"],
                      t["bias_hh"], t["weight_hr"], reverse, backend=backend, **(regularisers or {}))


@contextlib.contextmanager
def intra_op_threads(threads):
    """torch's intra-op thread count set to `threads` inside, put back after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def gate_panels_allowed(allowed):
    """The CPU LSTM's whole-sequence forward loop on gate panels allowed inside or not (fastnlp._C.allow_gate_panels;
    not: the step loop runs), put back after."""
    previous = fastnlp._C.allow_gate_panels(allowed)
    try:
        yield
    finally:
        fastnlp._C.allow_gate_panels(previous)


def assert_both_directions_match_reference(batch_sizes, tensors, rtol, atol):
    """Outputs and every gradient of the kernel and the reference, forward and reverse, are close."""
    for reverse in (False, True):
        out, grads = outputs_and_grads(batch_sizes, tensors, reverse)
        ref_out, ref_grads = outputs_and_grads(batch_sizes, tensors, reverse, backend="reference")
        for a, b in zip(out + grads, ref_out + ref_grads):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def outputs_and_grads(batch_sizes, tensors, reverse, backend=None, seed=1, regularisers=None):
    outputs = run_layer(batch_sizes, tensors, reverse, backend, regularisers)
    g = torch.Generator().manual_seed(seed)
    # Random weights on every output, so each gradient path (output, h_n, c_n) counts.
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum()
               for o in outputs)
    wrt = [v for v in tensors.values() if v is not None]
    return outputs, torch.autograd.grad(loss, wrt)


# Random layer configurations, for the plain and the layer-norm reference tests.
LAYER_CASES = dict(
    lengths=st.lists(st.integers(1, 7), min_size=1, max_size=6),
    input_size=st.integers(1, 9),
    hidden=st.integers(1, 9),
    use_proj=st.booleans(),
    bias=st.sampled_from(["both", "none", "ih", "hh"]),
    reverse=st.booleans(),
    packed=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    regularise=st.sampled_from([None, "recurrent_mask", "zoneout", "all"]),
)

TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5),
              torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("device", DEVICES)
@given(**LAYER_CASES)
def test_layer_matches_reference(device, lengths, input_size, hidden, use_proj, bias, reverse, packed, dtype,
                                 regularise):
    proj = max(1, hidden - 1) if use_proj and hidden > 1 else 0
    if not packed:
        lengths = [max(lengths)] * len(lengths)
    batch_sizes, tensors = make_layer_inputs(lengths, input_size, hidden, proj, bias, dtype, device, packed=packed)
    reg = None
    if regularise is not None:
        reg = make_regularisers(batch_sizes, tensors)
        if regularise == "recurrent_mask":
            reg = {"recurrent_mask": reg["recurrent_mask"]}
        elif regularise == "zoneout":
            del reg["recurrent_mask"]
    out, grads = outputs_and_grads(batch_sizes, tensors, reverse, regularisers=reg)
    ref_out, ref_grads = outputs_and_grads(batch_sizes, tensors, reverse, backend="reference", regularisers=reg)
    for a, b in zip(out + grads, ref_out + ref_grads):
        torch.testing.assert_close(a, b, **TOLERANCES[dtype])


def test_packed_equals_padded_per_sequence():
    """Packed sequences give what each sequence gives when run alone, padding never leaks in."""
    lengths = [6, 4, 4, 1]
    batch_sizes, tensors = make_layer_inputs(lengths, 5, 4, 0, "both", torch.float64, "cpu")
    for reverse in (False, True):
        output, h_n, c_n = run_layer(batch_sizes, tensors, reverse)
        offsets = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), batch_sizes]), 0)
        for b, n in enumerate(lengths):
            rows = torch.stack([tensors["input"][offsets[t] + b] for t in range(n)])
            alone = {k: v for k, v in tensors.items()}
            alone.update(input=rows, h0=tensors["h0"][b:b + 1], c0=tensors["c0"][b:b + 1])
            out_b, h_b, c_b = run_layer(None, alone, reverse)
            torch.testing.assert_close(torch.stack([output[offsets[t] + b] for t in range(n)]), out_b)
            torch.testing.assert_close(h_n[b:b + 1], h_b)
            torch.testing.assert_close(c_n[b:b + 1], c_b)


@pytest.mark.parametrize("regularise", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("proj", [0, 2])
def test_layer_gradcheck(reverse, proj, regularise):
    batch_sizes, tensors = make_layer_inputs([4, 3, 1], 3, 3, proj, "both", torch.float64, "cpu")
    names = [k for k, v in tensors.items() if v is not None]
    reg = make_regularisers(batch_sizes, tensors) if regularise else None

    def fn(*values):
        t = dict.fromkeys(tensors)
        t.update(zip(names, values))
        return run_layer(batch_sizes, t, reverse, regularisers=reg)

    assert torch.autograd.gradcheck(fn, [tensors[k] for k in names])


@pytest.mark.parametrize("layer_norm", [False, True])
def test_cell_gradcheck_and_reference(layer_norm):
    _, t = make_layer_inputs([1, 1, 1], 4, 5, 0, "both", torch.float64, "cpu")
    ln = make_layer_norm(5, torch.float64, "cpu") if layer_norm else {}
    args = (t["input"], t["h0"], t["c0"], t["weight_ih"], t["weight_hh"], t["bias_ih"], t["bias_hh"])
    n = len(args)

    def cell(*a):
        return lstm_cell(*a[:n], **dict(zip(ln, a[n:])))

    assert torch.autograd.gradcheck(cell, args + tuple(ln.values()))
    # Second derivatives (the reference's, with create_graph=True).
    assert torch.autograd.gradgradcheck(cell, args + tuple(ln.values()))
    h, c = lstm_cell(*args, **ln)
    ref_h, ref_c = fastnlp.reference.lstm.lstm_cell(*args, layer_norm=tuple(ln.values()) if ln else None)
    torch.testing.assert_close(h, ref_h)
    torch.testing.assert_close(c, ref_c)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("proj", [0, 2])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_opcheck(device, packed, proj, layer_norm):
    lengths = [5, 3, 3, 1] if packed else [4, 4]
    batch_sizes, t = make_layer_inputs(lengths, 3, 4, proj, "both", torch.float32, device, packed=packed)
    reg = make_regularisers(batch_sizes, t)
    ln = make_layer_norm(4, torch.float32, device) if layer_norm else {}
    # The states as strided views: the kernels return contiguous states
    # whatever the inputs' strides, and the fake kernels must say the same.
    h0_strided, c0_strided = (x.t().contiguous().t() for x in (t["h0"], t["c0"]))
    for reverse in (False, True):
        args = (t["input"], batch_sizes, t["h0"], t["c0"], t["weight_ih"], t["weight_hh"], t["bias_ih"],
                t["bias_hh"], t["weight_hr"], reverse)
        torch.library.opcheck(torch.ops.fastnlp.lstm_forward.default, args, kwargs=ln)
        strided = args[:2] + (h0_strided, c0_strided) + args[4:]
        torch.library.opcheck(torch.ops.fastnlp.lstm_forward.default, strided, kwargs=ln)
        torch.library.opcheck(torch.ops.fastnlp.lstm_forward.default, args + tuple(reg.values()) + tuple(ln.values()))


def half_precision_inputs(dtype, layer_norm, lengths=(5, 2), input_size=4, hidden=6, bias="both"):
    """A small layer's arguments in dtype on the CPU: (batch_sizes, its tensors, layer norm's)."""
    batch_sizes, t = make_layer_inputs(list(lengths), input_size, hidden, 0, bias, torch.float32, "cpu")
    low = {k: (v.detach().to(dtype).requires_grad_() if v is not None else None) for k, v in t.items()}
    return batch_sizes, low, make_layer_norm(hidden, dtype, "cpu") if layer_norm else {}


def half_precision_run(dtype, layer_norm, lengths=(5, 2), input_size=4, hidden=6, bias="both"):
    """A small layer in dtype on the CPU: (batch_sizes, its tensors, layer norm's, its outputs and gradients,
    the float64 reference's on the same values, the float32 kernel's outputs on the widened values)."""
    batch_sizes, low, ln = half_precision_inputs(dtype, layer_norm, lengths, input_size, hidden, bias)
    out, grads = layer_norm_outputs_and_grads(batch_sizes, low, ln, False)
    exact = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in low.items()}
    exact_ln = {k: v.detach().double().requires_grad_() for k, v in ln.items()}
    ref_out, ref_grads = layer_norm_outputs_and_grads(batch_sizes, exact, exact_ln, False, backend="reference")
    widened = run_layer(batch_sizes, {k: (v.float() if v is not None else None) for k, v in low.items()}, False,
                        regularisers={k: v.float() for k, v in ln.items()})
    return batch_sizes, low, ln, (out, grads), (ref_out, ref_grads), widened


def assert_close_to_reference(dtype, results, reference):
    for a, b in zip(results[0] + results[1], reference[0] + reference[1]):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, **TOLERANCES[dtype])


@pytest.mark.parametrize("layer_norm", [False, True])
def test_float16_on_cpu_is_computed_in_float32(layer_norm):
    """float16 tensors on the CPU are widened, run in float32 and the results
    rounded once: outputs as the float32 kernel's on the widened values,
    outputs and every gradient close to the float64 reference, all in float16."""
    _, _, _, results, reference, widened = half_precision_run(torch.float16, layer_norm)
    for a, w in zip(results[0], widened):
        torch.testing.assert_close(a, w.to(torch.float16), rtol=0, atol=0)
    assert_close_to_reference(torch.float16, results, reference)


def product_operand_dtypes(fn):
    """fn's result, and the dtypes of the matrix products' operands that fn runs (this thread and the
    kernel's), as the profiler records them."""
    products = ("aten::mm", "aten::addmm", "aten::addmm_", ONEDNN_PRODUCT)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profile:
        result = fn()
    dtypes = set()
    for event in profile.events():
        if event.name in products:
            if not hasattr(event, "input_dtypes"):
                pytest.skip("this torch's profiler records no input dtypes")
            dtypes.update(d for d, shape in zip(event.input_dtypes, event.input_shapes) if len(shape) == 2)
    return result, dtypes


def onednn_has_bfloat16():
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("lengths, hidden", [((5, 2), 6), ((9, 9, 8, 8, 7, 7, 3), 19), ((40,) * 30, 8)])
def test_bfloat16_on_cpu_rounds_the_products_operands_only(layer_norm, lengths, hidden):
    """bfloat16 on the CPU (csrc/cpu/lstm.cpp): where oneDNN has bfloat16
    products, every matrix product through ATen or oneDNN, forward and
    backward, takes bfloat16 operands (the last two sizes take oneDNN's
    prepared step products, and the last one's 1200 rows make two chunks
    in the backward, whose weight gradients are summed in float32; steps of
    up to four rows take the few-rows loops on the bfloat16 weight, tested
    below, which round the forward's rows themselves), while the state and
    activations stay float32. Outputs and every gradient are
    bfloat16, and their error against float64 on the same values is at most
    three times that of the reference computed in bfloat16 (measured: 0.1
    to 1.3 times its own, per tensor; with layer norm, which magnifies the
    products' rounding, up to 2.7% of a tensor's largest entry).
    With oneDNN off, or where it has no bfloat16, the layer runs in float32
    on the widened values, as float16 does."""
    def run():
        return half_precision_run(torch.bfloat16, layer_norm, lengths, hidden=hidden)

    if onednn_has_bfloat16():
        batch_sizes, low, ln, results, exact, _ = run()
        _, dtypes = product_operand_dtypes(lambda: layer_norm_outputs_and_grads(batch_sizes, low, ln, False))
        assert dtypes == {"c10::BFloat16"}, dtypes
        fresh = {k: (v.detach().requires_grad_() if v is not None else None) for k, v in low.items()}
        fresh_ln = {k: v.detach().requires_grad_() for k, v in ln.items()}
        in_bfloat16 = layer_norm_outputs_and_grads(batch_sizes, fresh, fresh_ln, False, backend="reference")
        for i, (a, r, e) in enumerate(zip(results[0] + results[1], in_bfloat16[0] + in_bfloat16[1],
                                          exact[0] + exact[1])):
            assert a.dtype == torch.bfloat16
            err, ref_err = (a.double() - e).abs().max().item(), (r.double() - e).abs().max().item()
            # The floor keeps a lucky, near-exact reference from making the bound zero.
            floor = torch.finfo(torch.bfloat16).eps * max(e.abs().max().item(), 1.0)
            assert err <= 3 * ref_err + floor, f"tensor {i}: error {err:.3g}, reference's error {ref_err:.3g}"
    with torch.backends.mkldnn.flags(enabled=False):
        _, _, _, results, exact, widened = run()
    for a, w in zip(results[0], widened):
        torch.testing.assert_close(a, w.to(torch.bfloat16), rtol=0, atol=0)
    assert_close_to_reference(torch.bfloat16, results, exact)


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("input_size, hidden", [(37, 21), (16, 8), (64, 5)])
@pytest.mark.parametrize("threads", [1, 2])
def test_bfloat16_few_row_products_on_cpu_are_exact(rows, input_size, hidden, threads):
    """Up to four rows times a bfloat16 weight run in the bfloat16 loops of
    csrc/cpu/few_rows_matmul.cpp (the forward's rows rounded to bfloat16,
    which leaves these exact; tails of odd lengths). On values whose products and
    sums float32 holds exactly (6 and 5 significant bits, a few dozen terms),
    a bfloat16 cell step equals the float32 kernel's on the widened values
    bit for bit, as does the gradient of c; that of h (the backward's
    recurrent product, the other loop, on float32 gate gradients) within
    one bfloat16 rounding."""
    g = torch.Generator().manual_seed(100 * rows + hidden)

    def dyadic(*shape, scale):  # multiples of 1/16 in [-scale, scale)
        return (torch.randint(-16 * scale, 16 * scale, shape, generator=g) / 16).bfloat16()

    low = [dyadic(rows, input_size, scale=2), dyadic(rows, hidden, scale=2), dyadic(rows, hidden, scale=2),
           dyadic(4 * hidden, input_size, scale=1), dyadic(4 * hidden, hidden, scale=1), dyadic(4 * hidden, scale=1),
           dyadic(4 * hidden, scale=1)]
    grads = [dyadic(rows, hidden, scale=1), dyadic(rows, hidden, scale=1)]
    with intra_op_threads(threads):
        results = []
        for tensors in (low, [t.float() for t in low]):
            leaves = [t.detach().requires_grad_() for t in tensors]
            outputs = lstm_cell(*leaves)
            state_grads = torch.autograd.grad(outputs, leaves[1:3], [gr.to(tensors[0].dtype) for gr in grads])
            results.append(list(outputs) + list(state_grads))
    (h, c, grad_h, grad_c), widened = results
    torch.testing.assert_close(h, widened[0].bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(c, widened[1].bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(grad_c, widened[3].bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(grad_h.float(), widened[2], rtol=2 ** -8, atol=1e-6)


def few_rows_forward_loops(*dtypes):
    """(weight dtype, allow_avx512) for each loop of csrc/cpu/few_rows_matmul.cpp that can take a forward
    product (W^T on the right) of a weight in one of these dtypes, as fastnlp._C.few_rows_addmm_ chooses it:
    AVX-512 where this CPU has it (for bfloat16, with its bfloat16 dot product), and the other loops."""
    params = []
    for dtype in dtypes:
        has = fastnlp._C.cpu_has_bfloat16_dot() if dtype == torch.bfloat16 else fastnlp._C.cpu_has_avx512()
        name = str(dtype)[len("torch."):]
        params += [pytest.param(dtype, True, id=f"{name}-avx512",
                                marks=pytest.mark.skipif(not has, reason="this CPU lacks that AVX-512")),
                   pytest.param(dtype, False, id=f"{name}-other")]
    return params


@pytest.mark.parametrize("dtype, allow_avx512", few_rows_forward_loops(torch.float32, torch.bfloat16))
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("K", [1, 7, 31, 32, 33, 70, 256])
@pytest.mark.parametrize("N", [4, 12, 16, 20, 68])
def test_few_row_forward_products_on_cpu(dtype, allow_avx512, rows, K, N):
    """The few-rows loops' product of float32 rows by a weight's rows (the
    forward's h W_hh^T; csrc/cpu/few_rows_matmul.cpp), on AVX-512 and on the
    other loops. A bfloat16 weight's rows are rounded to bfloat16 first, as
    in every other product of the bfloat16 LSTM, and the products summed in
    float32. Compared with the float64 product (of the rounded rows) within
    the bound of a float32 sum of K terms (K * 2^-24 * the sum of the terms'
    magnitudes), which for bfloat16 the product of the unrounded rows
    overshoots. beta = 0 ignores what out held (NaN here), beta = 1 adds to
    it; K and N cover the loops' whole blocks (16 or 32 elements, 16 and 4
    rows of the weight) and their tails."""
    g = torch.Generator().manual_seed(1000 * rows + 10 * K + N)
    a = torch.randn(rows, K, generator=g)
    weight = torch.randn(N, K, generator=g).to(dtype)
    rows_as_multiplied = a.to(dtype).double()
    exact = rows_as_multiplied @ weight.double().t()
    magnitude = rows_as_multiplied.abs() @ weight.double().abs().t()
    unrounded = a.double() @ weight.double().t()
    for beta in (0.0, 1.0):
        start = torch.randn(rows, N, generator=g)
        out = start.clone() if beta else torch.full((rows, N), float("nan"))
        assert fastnlp._C.few_rows_addmm_(out, a, weight.t(), beta, allow_avx512)
        expected = exact + beta * start.double()
        bound = K * 2.0 ** -24 * (magnitude + beta * start.double().abs()) + 2.0 ** -24 * expected.abs()
        assert ((out.double() - expected).abs() <= bound).all(), (out.double() - expected).abs().max()
        if dtype == torch.bfloat16:
            assert ((unrounded + beta * start.double() - expected).abs() > bound).any()


@pytest.mark.parametrize("dtype, allow_avx512", few_rows_forward_loops(torch.bfloat16))
def test_bfloat16_few_row_products_decline_what_they_do_not_take(dtype, allow_avx512):
    """The few-rows loops take up to four rows and leave out untouched otherwise (the caller's
    addmm_ runs then): five rows, a float64 a with a bfloat16 weight, W^T with N not a multiple of four."""
    weight = torch.randn(8, 6).to(dtype)
    out = torch.zeros(5, 8)
    assert not fastnlp._C.few_rows_addmm_(out, torch.randn(5, 6), weight.t(), 0.0, allow_avx512)
    assert not fastnlp._C.few_rows_addmm_(out[:1].double(), torch.randn(1, 6).double(), weight.t(), 0.0,
                                          allow_avx512)
    assert not fastnlp._C.few_rows_addmm_(out[:1, :6], torch.randn(1, 6), weight[:6].t(), 0.0, allow_avx512)
    assert (out == 0).all()


@pytest.mark.parametrize("layer_norm", [False, True])
def test_bfloat16_on_cpu_opcheck(layer_norm):
    """The bfloat16 CPU kernel saves float32 tensors for the backward pass; the fake kernels say so
    (torch.compile traces with them), for one direction and for the pair."""
    batch_sizes, low, ln = half_precision_inputs(torch.bfloat16, layer_norm, (6, 4, 4, 2, 1), hidden=5)
    t = low
    args = (t["input"], batch_sizes, t["h0"], t["c0"], t["weight_ih"], t["weight_hh"], t["bias_ih"], t["bias_hh"],
            t["weight_hr"], False)
    torch.library.opcheck(torch.ops.fastnlp.lstm_forward.default, args, kwargs=ln)
    saved = torch.ops.fastnlp.lstm_forward.default(*args, **ln)[3:]
    assert all(x.dtype == torch.float32 for x in saved)
    direction = [t["h0"], t["c0"], t["weight_ih"], t["weight_hh"], t["bias_ih"], t["bias_hh"], t["weight_hr"],
                 None, None, None] + list(ln.values() if ln else [None] * 6)
    torch.library.opcheck(torch.ops.fastnlp.lstm_forward_pair.default,
                          (t["input"], batch_sizes, direction, [x.detach() if x is not None else None
                                                               for x in direction]))


def test_bfloat16_ops_on_cpu_refuse_an_argument_in_another_dtype():
    """The CPU kernel widens a bfloat16 call to float32 inside; an argument in
    another dtype is refused before that, as in any other dtype."""
    batch_sizes, low, _ = half_precision_inputs(torch.bfloat16, False)
    t = {k: v.detach() if v is not None else None for k, v in low.items()}
    args = (t["input"], batch_sizes, t["h0"], t["c0"], t["weight_ih"], t["weight_hh"], t["bias_ih"], t["bias_hh"],
            None, False)
    output, h_n, c_n, gates, cells = torch.ops.fastnlp.lstm_forward(*args)[:5]
    message = "h0 has dtype Float but input has dtype BFloat16"
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastnlp.lstm_forward(*args[:2], t["h0"].float(), *args[3:])
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastnlp.lstm_backward(output, h_n, c_n, t["input"], batch_sizes, t["h0"].float(), t["c0"],
                                        t["weight_ih"], t["weight_hh"], None, True, False, output, gates, cells)
    direction = [t["h0"], t["c0"], t["weight_ih"], t["weight_hh"], t["bias_ih"], t["bias_hh"], None, None, None,
                 None] + [None] * 6
    widened_h0 = [t["h0"].float()] + direction[1:]
    with pytest.raises(RuntimeError, match="forward_args entry 0 has dtype Float but input has dtype BFloat16"):
        torch.ops.fastnlp.lstm_forward_pair(t["input"], batch_sizes, widened_h0, direction)


@pytest.mark.parametrize("extras", ["none", "regularisers and layer norm"])
def test_compiled_layer_matches_eager(extras):
    batch_sizes, t = make_layer_inputs([4, 3, 1], 3, 5, 2, "both", torch.float32, "cpu")
    ln = make_layer_norm(5, torch.float32, "cpu") if extras != "none" else {}
    reg = make_regularisers(batch_sizes, t) if extras != "none" else {}

    def run(batch_sizes, t, ln):  # {**a, **b}: TorchDynamo before torch 2.6 cannot trace dict(a, **b)
        return run_layer(batch_sizes, t, True, regularisers={**reg, **ln})

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    leaves = [v for v in t.values() if v is not None] + list(ln.values())
    outs = compiled(batch_sizes, t, ln)
    eager = run(batch_sizes, t, ln)
    for a, b in zip(outs, eager):
        torch.testing.assert_close(a, b)
    grads = torch.autograd.grad(sum((o * o).sum() for o in outs), leaves)
    ref = torch.autograd.grad(sum((o * o).sum() for o in eager), leaves)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)


# (change to a valid call, the op's error); each case is also run through the reference backend.
MALFORMED_LAYER_INPUTS = [
    (dict(batch_sizes=torch.tensor([3, 1, 2])), "must be non-increasing, got 1 then 2 at step 2$"),
    (dict(batch_sizes=torch.tensor([3, 2, 2])), "sum to 7 but input has 6 rows"),
    (dict(batch_sizes=torch.tensor([2, 2, 2])), "batch_sizes\\[0\\] is 2 but h0 has batch size 3"),
    (dict(batch_sizes=torch.tensor([3, 0, 3])), "must be positive, got 0 at step 1$"),
    (dict(batch_sizes=torch.tensor([3.0, 2.0, 1.0])), "int64 CPU tensor"),
    (dict(weight_ih=torch.zeros(16, 5)), "input has 4 features but weight_ih takes 5 \\(its input_size\\)"),
    (dict(input=torch.zeros(6, 3)), "input has 3 features but weight_ih takes 4"),
    (dict(weight_hh=torch.zeros(16, 3)), "weight_hh must have shape \\(16, 4\\)"),
    (dict(bias_ih=torch.zeros(15)), "bias_ih must have shape \\(16\\)"),
    (dict(c0=torch.zeros(2, 4)), "h0 and c0 disagree on the batch size"),
    # The weights fix the sizes: a state of the wrong width is named itself.
    (dict(h0=torch.zeros(3, 5)), "h0 must have shape \\(3, 4\\), got \\[3, 5\\]"),
    (dict(c0=torch.zeros(3, 3)), "c0 must have shape \\(3, 4\\), got \\[3, 3\\]"),
    (dict(weight_ih=torch.zeros(15, 4)), "weight_ih must have shape \\(4 \\* hidden_size, input_size\\)"),
    (dict(weight_hr=torch.zeros(4, 3)), "weight_hr must have shape \\(4, 4\\), got \\[4, 3\\]"),
    (dict(weight_hr=torch.zeros(2, 4)), "weight_hh must have shape \\(16, 2\\)"),  # proj_size 2
    (dict(h0=torch.zeros(3, 4, dtype=torch.float64)), "h0 has dtype Double but input has dtype Float"),
    (dict(input=torch.zeros(6, 4, dtype=torch.int64)), "float32, float64 or bfloat16, got Long"),
    # One meta tensor among CPU ones sends the call to the fake kernel.
    (dict(weight_ih=torch.zeros(16, 4, device="meta")), "weight_ih is on meta but input is on cpu"),
    (dict(c0=torch.zeros(3, 4, device="meta")), "c0 is on meta but input is on cpu"),
    (dict(batch_sizes=torch.tensor([3, 2, 1], device="meta")), "batch_sizes is on meta but input is on cpu"),
    # A meta input among CPU tensors once gave uninitialised CPU states.
    (dict(input=torch.zeros(6, 4, device="meta")), "h0 is on cpu but input is on meta"),
    (dict(recurrent_mask=torch.ones(3, 5)), "recurrent_mask must have shape \\(3, 4\\)"),
    (dict(zoneout_cell=torch.zeros(5, 4)), "zoneout_cell must have shape \\(6, 4\\)"),
]

# Where the reference backend's message differs: the op's comes from the CPU
# kernel's dtype dispatch or the fake kernel, which the reference never meets.
REFERENCE_MESSAGES = {"float32, float64 or bfloat16, got Long": "input must be floating point, got Long",
                      "batch_sizes is on meta but input is on cpu": "batch_sizes must be a 1-D int64 CPU tensor"}


def malformed_layer_arguments(change):
    args = dict(input=torch.zeros(6, 4), batch_sizes=torch.tensor([3, 2, 1]), h0=torch.zeros(3, 4),
                c0=torch.zeros(3, 4), weight_ih=torch.zeros(16, 4), weight_hh=torch.zeros(16, 4),
                bias_ih=None, bias_hh=None, weight_hr=None)
    args.update(change)
    return args


@pytest.mark.parametrize("change, message", MALFORMED_LAYER_INPUTS)
def test_op_rejects_malformed_input(change, message):
    args = malformed_layer_arguments(change)
    positional = [args.pop(name) for name in list(args)[:9]]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastnlp.lstm_forward(*positional, False, **args)


@pytest.mark.parametrize("change, message", MALFORMED_LAYER_INPUTS)
def test_reference_backend_rejects_malformed_input_as_the_op_does(change, message):
    """The reference loop would slice a malformed batch_sizes into wrong rows without a word: it runs the op's
    checks first."""
    with pytest.raises(RuntimeError, match=REFERENCE_MESSAGES.get(message, message)):
        lstm_layer(**malformed_layer_arguments(change), backend="reference")


def test_op_on_meta_tensors_gives_the_shapes():
    meta = dict(device="meta")
    out = torch.ops.fastnlp.lstm_forward(torch.zeros(6, 4, **meta), torch.tensor([3, 2, 1]), torch.zeros(3, 4, **meta),
                                         torch.zeros(3, 4, **meta), torch.zeros(16, 4, **meta),
                                         torch.zeros(16, 4, **meta), None, None, None, False)
    assert [tuple(t.shape) for t in out[:5]] == [(6, 4), (3, 4), (3, 4), (6, 16), (6, 4)]
    assert {t.device.type for t in out} == {"meta"}


def scaled_copy(tensors, hidden, dtype, scale=1.0):
    """Leaf copies in `dtype`, weights and biases in nn.LSTM's init range 1/sqrt(hidden) times `scale`."""
    out = {}
    for name, value in tensors.items():
        if value is None:
            out[name] = None
            continue
        value = value.detach()
        if name.startswith(("weight", "bias")):
            value = value * (scale / hidden ** 0.5)
        out[name] = value.to(dtype).requires_grad_()
    return out


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("proj", [0, 5])
@pytest.mark.parametrize("reverse", [False, True])
def test_cuda_half_precision_error_is_bounded_by_the_references(dtype, proj, reverse):
    """float16/bfloat16 on CUDA (stored in the dtype, computed in float32): the error against a float64 run
    on the same rounded inputs is at most a few times that of the reference computed in the same dtype."""
    hidden = 33
    batch_sizes, t = make_layer_inputs([9, 7, 7, 3, 1], 13, hidden, proj, "both", torch.float64, "cuda", seed=3)
    low = scaled_copy(t, hidden, dtype)
    exact = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in low.items()}
    out, grads = outputs_and_grads(batch_sizes, low, reverse)
    ref_out, ref_grads = outputs_and_grads(batch_sizes, low, reverse, backend="reference")
    exact_out, exact_grads = outputs_and_grads(batch_sizes, exact, reverse, backend="reference")
    names = ["output", "h_n", "c_n"] + [k for k, v in low.items() if v is not None]
    for name, a, r, e in zip(names, out + grads, ref_out + ref_grads, exact_out + exact_grads):
        assert a.dtype == dtype, name
        err = (a.double() - e).abs().max().item()
        ref_err = (r.double() - e).abs().max().item()
        # The floor keeps a lucky, near-exact reference from making the bound zero.
        floor = torch.finfo(dtype).eps * max(e.abs().max().item(), 1.0)
        assert err <= 3 * ref_err + floor, f"{name}: error {err:.3g}, reference's error {ref_err:.3g}"


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_saturated_gates_are_exact_and_finite(dtype):
    """Pre-activations of +-1e4 drive every gate to exactly 0 or 1 (g to -1 or 1): no NaN, and the
    states are what the float64 reference gives for the same inputs."""
    hidden = 6
    g = torch.Generator().manual_seed(5)
    signs = torch.randint(0, 2, (4 * hidden, 1), generator=g).double() * 2 - 1
    exact = {
        "input": torch.ones(8, 1, dtype=torch.float64),
        "h0": torch.zeros(2, hidden, dtype=torch.float64),
        "c0": torch.rand(2, hidden, generator=g, dtype=torch.float64) * 2 - 1,
        "weight_ih": signs * 1e4,
        "weight_hh": torch.zeros(4 * hidden, hidden, dtype=torch.float64),
        "bias_ih": None, "bias_hh": None, "weight_hr": None,
    }
    low = {k: (v.to(dtype).cuda().requires_grad_() if v is not None else None) for k, v in exact.items()}
    exact = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in low.items()}
    batch_sizes = torch.empty(0, dtype=torch.long)
    out, grads = outputs_and_grads(batch_sizes, low, False)
    ref_out, ref_grads = outputs_and_grads(batch_sizes, exact, False, backend="reference")
    # A few roundings of the cell state, which grows by up to 1 per step.
    tol = max(8 * torch.finfo(dtype).eps, 1e-12)
    for a, b in zip(out + grads, ref_out + ref_grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lengths, hidden", [([9, 7, 7, 3, 1], 6), ([6] * 64, 33), ([5, 4, 2], 256)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("regularise", [False, True])
def test_cuda_sequence_kernel_equals_the_step_loop(monkeypatch, dtype, lengths, hidden, reverse, regularise):
    """The whole-sequence kernels (csrc/cuda/lstm.cu, taken where no projection or layer norm is) give
    the step loop's outputs and gradients (FASTNLP_CUDA_LSTM_SEQUENCE_KERNEL=0), up to the order of
    the recurrent product's sums; 64 sequences (its largest batch) take 16 blocks, H = 256 is the
    bench's size."""
    batch_sizes, t = make_layer_inputs(lengths, 5, hidden, 0, "both", torch.float64, "cuda", seed=4)
    t = scaled_copy(t, hidden, dtype)
    regularisers = make_regularisers(batch_sizes, t) if regularise else None
    results, kernels = {}, {}
    for setting in ("1", "0"):
        monkeypatch.setenv("FASTNLP_CUDA_LSTM_SEQUENCE_KERNEL", setting)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            results[setting] = outputs_and_grads(batch_sizes, t, reverse, regularisers=regularisers)
            torch.cuda.synchronize()
        kernels[setting] = {event.name for event in profile.events()}
    for kernel in ("lstm_sequence_forward_kernel", "lstm_sequence_backward_kernel"):
        assert any(kernel in name for name in kernels["1"]), f"{kernel} did not run"
        assert not any(kernel in name for name in kernels["0"]), f"{kernel} ran when turned off"
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]
    for a, b in zip(results["1"][0] + results["1"][1], results["0"][0] + results["0"][1]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@requires_cuda
def test_cuda_step_larger_than_one_grid_pass():
    """2100 rows x 1024 units is more than the kernels' 8192 blocks x 256 threads, so threads loop."""
    hidden = 1024
    batch_sizes, t = make_layer_inputs([2] * 2100, 8, hidden, 0, "both", torch.float32, "cuda")
    t = scaled_copy(t, hidden, torch.float32)
    out, grads = outputs_and_grads(batch_sizes, t, True)
    ref_out, ref_grads = outputs_and_grads(batch_sizes, t, True, backend="reference")
    for a, b in zip(out + grads, ref_out + ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lengths", [[5, 3, 1], [5] * 20 + [3, 1]])
def test_wide_layer_splits_the_recurrent_product(lengths):
    """A layer wide enough (4H >= 64 columns per thread) takes the CPU path that
    splits the per-step products over threads (csrc/lstm.cpp, split_addmm_),
    with few rows and with many: values and gradients must not change, and the
    worker threads must not see autograd."""
    with intra_op_threads(2):
        for proj in (0, 129):
            batch_sizes, tensors = make_layer_inputs(lengths, 7, 130, proj, "both", torch.float64, "cpu")
            # Sums over 520 gate rows of unit-range weights: float64 rounding reaches 1e-10.
            assert_both_directions_match_reference(batch_sizes, tensors, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("hidden, proj", [(13, 0), (13, 11), (130, 0)])
@pytest.mark.parametrize("dtype, layer_norm", [(torch.float32, False), (torch.float64, False), (torch.float64, True)])
def test_few_rows_products_match_reference(threads, hidden, proj, dtype, layer_norm):
    """Steps with one to five sequences alive: the CPU kernel's own products up
    to four rows (csrc/cpu/few_rows_matmul.cpp: h W_hh^T forward, g W_hh
    backward), MKL's for five. Sizes leave vector tails (13 = 8 + 5 floats,
    3 * 4 + 1 doubles; P = 11), H = 130 with two threads splits W_hh in column
    blocks (split_addmm_), and layer norm writes the forward's product into a
    buffer that was never written (beta = 0). The reference runs in float64 on
    the same values: in float32, sums of 130 to 520 unit-range terms stray
    from it by up to ~4.5e-6 of a tensor's largest entry, in the float32
    reference as in the kernel (measured), whatever their order. (The step
    loop's products: the whole-sequence loop, which takes the float32 layers
    without layer norm, is turned off.)"""
    with intra_op_threads(threads), gate_panels_allowed(False):
        for lengths, packed in (([9, 7, 5, 3, 1], True), ([4], False), ([4, 4, 4], False)):
            batch_sizes, tensors = make_layer_inputs(lengths, 13, hidden, proj, "both", dtype, "cpu", packed=packed)
            ln = make_layer_norm(hidden, dtype, "cpu") if layer_norm else {}
            exact = {k: v.detach().double().requires_grad_() if v is not None else None for k, v in tensors.items()}
            for reverse in (False, True):
                out, grads = layer_norm_outputs_and_grads(batch_sizes, tensors, ln, reverse)
                ref_out, ref_grads = layer_norm_outputs_and_grads(batch_sizes, exact, ln, reverse,
                                                                  backend="reference")
                for a, b in zip(out + grads, ref_out + ref_grads):
                    assert a.dtype == dtype
                    error = ((a.double() - b).abs().max() / b.abs().max().clamp_min(1.0)).item()
                    assert error <= (1e-5 if dtype == torch.float32 else 1e-12), error


@pytest.mark.parametrize("threads", [1, 2])
def test_column_major_weights_match_reference(threads):
    """Weights whose columns, not rows, are contiguous (x.t().contiguous().t():
    what a transposed parameter looks like) give the few-rows loops the other
    layout of each product (csrc/cpu/few_rows_matmul.cpp), or MKL where
    neither fits; few rows and many, 4H = 64 and P = 16 so that both
    layouts' multiple-of-four conditions hold."""
    with intra_op_threads(threads):
        for lengths, packed in (([5, 3, 1], True), ([3], False), ([6] * 7, False)):
            batch_sizes, tensors = make_layer_inputs(lengths, 12, 16, 0, "both", torch.float64, "cpu", packed=packed)
            for name in ("weight_ih", "weight_hh"):
                tensors[name] = tensors[name].detach().t().contiguous().t().requires_grad_()
                assert not tensors[name].is_contiguous()
            assert_both_directions_match_reference(batch_sizes, tensors, rtol=1e-10, atol=1e-10)


def operators_called(fn):
    """fn's result, and the names of the operators it calls through the dispatcher (on this thread)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        result = fn()
    return result, {event.key for event in profile.key_averages()}


ONEDNN_PRODUCT = "mkldnn::_linear_pointwise"


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
# (mkldnn.flags() also sets oneDNN's TF32 switch, which a CPU-only torch warns about.)
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("proj, layer_norm, regularise", [(0, False, False), (11, False, True), (0, True, True)])
def test_onednn_step_products_match_reference(threads, proj, layer_norm, regularise):
    """A float32 call with at least four steps of more than four rows runs its
    recurrent products, forward and backward, through oneDNN on W_hh
    reordered once for the call (csrc/cpu/onednn_matmul.cpp, StepProduct in
    csrc/lstm.cpp); in a packed batch the last steps, of four rows and fewer,
    go back to the few-rows loops. H = 130 leaves oneDNN a tail of columns.
    Checked against the float64 reference, as the few-rows test is, but with
    a bound three times as wide: over these longer recurrences the float32
    reference itself strays from it by up to 1.2e-5 of a tensor's largest
    entry, and so does the kernel with oneDNN turned off (measured). Turned
    off (torch.backends.mkldnn), the call must not use oneDNN. opcheck runs
    on the same calls once. (The step loop's products: the whole-sequence
    loop, which would take the plain layer, is turned off.)"""
    with intra_op_threads(threads), gate_panels_allowed(False):
        for lengths, packed in (([9, 9, 9, 8, 7, 6, 5, 3, 1], True), ([6] * 7, False)):
            batch_sizes, tensors = make_layer_inputs(lengths, 13, 130, proj, "both", torch.float32, "cpu",
                                                     packed=packed)
            extra = make_regularisers(batch_sizes, tensors) if regularise else {}
            ln = make_layer_norm(130, torch.float32, "cpu") if layer_norm else {}
            exact = {k: v.detach().double().requires_grad_() if v is not None else None for k, v in tensors.items()}
            ln_exact = {k: v.detach().double().requires_grad_() for k, v in ln.items()}
            extra_exact = {k: v.double() for k, v in extra.items()}
            for reverse in (False, True):
                def run():
                    return layer_norm_outputs_and_grads(batch_sizes, tensors, ln, reverse, regularisers=extra)

                (out, grads), called = operators_called(run)
                assert ONEDNN_PRODUCT in called
                with torch.backends.mkldnn.flags(enabled=False):
                    assert ONEDNN_PRODUCT not in operators_called(run)[1]
                ref_out, ref_grads = layer_norm_outputs_and_grads(batch_sizes, exact, ln_exact, reverse,
                                                                  backend="reference", regularisers=extra_exact)
                for a, b in zip(out + grads, ref_out + ref_grads):
                    assert a.dtype == torch.float32
                    error = ((a.double() - b).abs().max() / b.abs().max().clamp_min(1.0)).item()
                    assert error <= 3e-5, error
            if threads == 1:
                t = tensors
                args = (t["input"], batch_sizes, t["h0"], t["c0"], t["weight_ih"], t["weight_hh"], t["bias_ih"],
                        t["bias_hh"], t["weight_hr"], False)
                torch.library.opcheck(torch.ops.fastnlp.lstm_forward.default, args, kwargs=dict(extra, **ln))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
@pytest.mark.parametrize("column_major", [False, True])
@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_onednn_products_over_all_rows_match_reference(column_major, layer_norm, threads):
    """In float32 the products over all rows of a call -- the input product
    and the input gradient -- run through oneDNN's linear
    (csrc/cpu/onednn_matmul.cpp), for weights of either layout; the weight
    gradients stay on ATen's mm. Two steps are too few for the prepared
    step products, so those two are all the oneDNN calls; with oneDNN off,
    none. Checked against the float64 reference as in the test above."""
    with intra_op_threads(threads):
        batch_sizes, tensors = make_layer_inputs([2] * 6, 7, 9, 0, "both", torch.float32, "cpu", packed=False)
        if column_major:
            for name in ("weight_ih", "weight_hh"):
                tensors[name] = tensors[name].detach().t().contiguous().t().requires_grad_()
        ln = make_layer_norm(9, torch.float32, "cpu") if layer_norm else {}
        exact = {k: v.detach().double().requires_grad_() if v is not None else None for k, v in tensors.items()}
        ln_exact = {k: v.detach().double().requires_grad_() for k, v in ln.items()}

        def run():
            return layer_norm_outputs_and_grads(batch_sizes, tensors, ln, False)

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            out, grads = run()
        calls = [event.name for event in profile.events()]
        assert calls.count(ONEDNN_PRODUCT) == 2 and calls.count("aten::addmm_") >= 2
        with torch.backends.mkldnn.flags(enabled=False):
            assert ONEDNN_PRODUCT not in operators_called(run)[1]
        ref_out, ref_grads = layer_norm_outputs_and_grads(batch_sizes, exact, ln_exact, False, backend="reference")
        for a, b in zip(out + grads, ref_out + ref_grads):
            error = ((a.double() - b).abs().max() / b.abs().max().clamp_min(1.0)).item()
            assert error <= 1e-5, error


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
def test_input_product_of_32_mib_is_made_in_blocks_and_matches_reference():
    """An input product whose result takes 32 MiB or more (here 8192 rows of 4H = 1024 float32) is
    made by oneDNN in blocks of 8 MiB (2048 rows) copied into one result on huge pages
    (csrc/cpu/onednn_matmul.h, kHugeResultBytes): four products of 2048 rows, and the layer's
    outputs and gradients those of the float64 reference, forward and reverse. (Weights in nn.LSTM's
    initial range: at H = 256 the unit range saturates the gates, and float32 and float64 part ways.)"""
    batch_sizes, tensors = make_layer_inputs([128] * 64, 3, 256, 0, "both", torch.float64, "cpu", packed=False)
    tensors = scaled_copy(tensors, 256, torch.float32)
    exact = {k: v.detach().double().requires_grad_() if v is not None else None for k, v in tensors.items()}
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                 record_shapes=True) as profile:
        run_layer(batch_sizes, tensors, False)
    blocks = [event.input_shapes[0] for event in profile.events() if event.name == ONEDNN_PRODUCT]
    assert blocks.count([2048, 3]) == 4, blocks
    for reverse in (False, True):
        out, grads = outputs_and_grads(batch_sizes, tensors, reverse)
        ref_out, ref_grads = outputs_and_grads(batch_sizes, exact, reverse, backend="reference")
        for a, b in zip(out + grads, ref_out + ref_grads):
            assert error_against(a, b) <= 3e-5, error_against(a, b)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
@given(long=st.lists(st.integers(4, 9), min_size=5, max_size=7), short=st.lists(st.integers(1, 3), max_size=3),
       input_size=st.integers(1, 9), hidden=st.integers(1, 20), use_proj=st.booleans(),
       bias=st.sampled_from(["both", "none", "ih", "hh"]), reverse=st.booleans(), packed=st.booleans())
# An ill-conditioned draw (gradients up to 132): the kernel's float32 gradients
# were 1.0e-4 off, the float32 reference's 6.3e-6, while the float64 gradients
# themselves move by 3e-5 to 1.2e-4 when the inputs move by one float32 ulp.
@example(long=[5, 5, 7, 8, 8, 9], short=[1, 2], input_size=4, hidden=17, use_proj=True, bias="both",
         reverse=False, packed=True)
def test_onednn_step_products_over_random_layers(long, short, input_size, hidden, use_proj, bias, reverse, packed):
    """Random small float32 layers with at least four steps of five or more
    rows (five or more sequences of length four or more), so that they take
    the oneDNN step products, and packed ones a few-rows tail; against the
    float64 reference, bound as in the test above or, where the recurrence
    magnifies rounding more, by four times the larger of the float32
    reference's own error and the layer's conditioning: how far the float64
    results move when the inputs move by about one float32 rounding (one such
    layer, H = 18 over nine steps with gradients up to 40: the kernel 7.6e-5,
    the float32 reference 2.8e-5, the kernel with oneDNN off 1.7e-5; oneDNN's
    products round a little differently from MKL's). The float32 reference
    alone is no bound: it can be luckier than the layer's conditioning allows.
    (The step loop: the whole-sequence loop, which takes the layers without
    projection, is turned off.)"""
    lengths = long + short if packed else [max(long)] * (len(long) + len(short))
    proj = max(1, hidden - 1) if use_proj and hidden > 1 else 0
    batch_sizes, tensors = make_layer_inputs(lengths, input_size, hidden, proj, bias, torch.float32, "cpu",
                                             packed=packed)
    exact = {k: v.detach().double().requires_grad_() if v is not None else None for k, v in tensors.items()}
    with gate_panels_allowed(False):
        (out, grads), called = operators_called(lambda: outputs_and_grads(batch_sizes, tensors, reverse))
    assert ONEDNN_PRODUCT in called
    ref_out, ref_grads = outputs_and_grads(batch_sizes, exact, reverse, backend="reference")
    ref32_out, ref32_grads = outputs_and_grads(batch_sizes, tensors, reverse, backend="reference")

    def error(a, b):
        return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1.0)).item()

    # The float64 reference on inputs moved by float32's rounding (relative 2^-24, random signs), twice.
    g = torch.Generator().manual_seed(0)
    moved = []
    for _ in range(2):
        nudged = {k: (v.detach() * (1 + 2.0 ** -24 * torch.randn(v.shape, generator=g, dtype=torch.float64)))
                  .requires_grad_() if v is not None else None for k, v in exact.items()}
        moved.append(outputs_and_grads(batch_sizes, nudged, reverse, backend="reference"))
    for k, (a, a32, b) in enumerate(zip(out + grads, ref32_out + ref32_grads, ref_out + ref_grads)):
        conditioning = max(error(m[0][k] if k < len(out) else m[1][k - len(out)], b) for m in moved)
        bound = max(3e-5, 4 * error(a32, b), 4 * conditioning)
        assert error(a, b) <= bound, (error(a, b), error(a32, b), conditioning)


SEQUENCE_FORWARD = "fastnlp::lstm_sequence_forward_cpu"
CHUNK_BACKWARD = "fastnlp::lstm_chunk_backward_cpu"
requires_avx512 = pytest.mark.skipif(not fastnlp._C.cpu_has_avx512(), reason="this CPU lacks AVX-512 (F and BW)")


def whole_loop_runs(fn):
    """fn's result, and how many times the CPU's whole-sequence forward loop and its chunk backward loop
    ran in it (they name themselves in profiles, on whichever thread they run)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        result = fn()
    counts = {event.key: event.count for event in profile.key_averages()}
    return result, (counts.get(SEQUENCE_FORWARD, 0), counts.get(CHUNK_BACKWARD, 0))


def sequence_forward_runs(fn):
    """fn's result, and how many times the CPU's whole-sequence forward loop ran in it."""
    result, (forward_runs, _) = whole_loop_runs(fn)
    return result, forward_runs


def error_against(a, exact):
    """a's largest distance from the float64 `exact`, relative to exact's largest entry (at least 1)."""
    return ((a.double() - exact).abs().max() / exact.abs().max().clamp_min(1.0)).item()


def fresh_leaves(tensors):
    """The same values as new leaves that require grad (None stays None)."""
    return {k: v.detach().requires_grad_() if v is not None else None for k, v in tensors.items()}


def assert_loops_match_reference(dtype, float32_bound, loops, exact, low_reference):
    """Each entry of `loops` (the outputs and gradients of one way of running the layer) is within a bound
    of the float64 reference `exact`: in float32 float32_bound of a tensor's largest entry; in bfloat16
    three times the bfloat16 reference's own error (low_reference() gives that reference's outputs and
    gradients), as test_bfloat16_on_cpu_rounds_the_products_operands_only bounds the step loop."""
    low = None
    if dtype == torch.bfloat16:
        low_out, low_grads = low_reference()
        low = low_out + low_grads
    for k, b in enumerate(exact):
        bound = float32_bound
        if low is not None:
            bound = 3 * error_against(low[k], b) + torch.finfo(torch.bfloat16).eps
        for loop in loops:
            assert error_against(loop[k], b) <= bound, (k, error_against(loop[k], b), bound)


@requires_avx512
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not fastnlp._C.cpu_has_bfloat16_dot(), reason="this CPU lacks AVX-512 BF16"))], ids=str)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("hidden", [1, 15, 16, 33, 70])
@pytest.mark.parametrize("lengths, packed", [([9, 7, 7, 5, 4, 2, 1], True), ([6] * 9, False), ([4], False)])
@pytest.mark.parametrize("regularise", [False, True])
def test_cpu_sequence_forward_matches_reference_and_step_loop(dtype, threads, hidden, lengths, packed, regularise):
    """A float32 or bfloat16 layer of four steps or more without projection or layer norm runs its
    forward as one loop on gate panels (csrc/cpu/lstm.cpp, sequence_forward_cpu; csrc/cpu/gate_panels.cpp),
    and its backward as one loop per chunk of steps on unit panels (chunk_backward_cpu; here one chunk;
    H = 70 gives two threads unit panels of 64 and 6 units).
    Its outputs and gradients match the float64 reference on the same values, and so do the step loop's:
    float32 within 1e-5 of a tensor's largest entry (as test_few_rows_products_match_reference bounds
    it), bfloat16 within three times the bfloat16 reference's own error (as
    test_bfloat16_on_cpu_rounds_the_products_operands_only bounds it). Sizes: H = 15 and 33 leave a
    panel partly empty (masked lanes; odd H, a bfloat16 pair half empty), 16 fills one, 70 gives two
    threads panels of 2 and 3; nine sequences are tiles of 4, 4 and 1 rows; packed, in reverse, rows
    join part-way through (they start from h0); recurrent dropout masks the product's rows, zoneout
    reads h_{t-1} while h_t is written to the other buffer."""
    with intra_op_threads(threads):
        batch_sizes, tensors = make_layer_inputs(lengths, 5, hidden, 0, "both", dtype, "cpu", packed=packed)
        regularisers = make_regularisers(batch_sizes, tensors) if regularise else {}
        exact = {k: v.detach().double().requires_grad_() if v is not None else None for k, v in tensors.items()}
        regularisers_exact = {k: v.double() for k, v in regularisers.items()}
        for reverse in (False, True):
            def run(inputs=tensors, **kwargs):
                return outputs_and_grads(batch_sizes, inputs, reverse, regularisers=regularisers, **kwargs)

            (out, grads), runs = whole_loop_runs(run)
            assert runs == (1, 1)
            with gate_panels_allowed(False):
                (step_out, step_grads), step_runs = whole_loop_runs(run)
            assert step_runs == (0, 0)
            ref_out, ref_grads = outputs_and_grads(batch_sizes, exact, reverse, backend="reference",
                                                   regularisers=regularisers_exact)
            assert all(a.dtype == dtype for a in out + grads)
            assert_loops_match_reference(dtype, 1e-5, [out + grads, step_out + step_grads], ref_out + ref_grads,
                                         lambda: run(fresh_leaves(tensors), backend="reference"))


@requires_avx512
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not fastnlp._C.cpu_has_bfloat16_dot(), reason="this CPU lacks AVX-512 BF16"))], ids=str)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("regularise", [False, True])
@pytest.mark.parametrize("lengths, chunk_loops", [([40] * 30 + [3] * 5, 2), ([40] * 20 + [30] * 10 + [3] * 5, 1)])
def test_cpu_chunk_backward_over_several_chunks(dtype, threads, regularise, lengths, chunk_loops):
    """1215 or 1115 packed rows make two chunks of the backward walk (at least 1024 rows each but the
    last, csrc/lstm.cpp plan_chunks): the chunk loop runs on each chunk of four steps or more (in
    either direction, the first lengths' last chunk has five or six), the step loop on a shorter one
    (the second's, two steps going forward), and the gradients carried from chunk to chunk (dh, dc,
    zoneout's share) and summed over them (the weights') match the float64 reference and the step
    loop's (bound as in test_cpu_sequence_forward_matches_reference_and_step_loop, float32 by 3e-5
    here: these recurrences are longer). H = 130: three unit panels, the last of 2 units."""
    with intra_op_threads(threads):
        batch_sizes, tensors = make_layer_inputs(lengths, 6, 130, 0, "both", torch.float64, "cpu")
        tensors = scaled_copy(tensors, 130, dtype)
        regularisers = make_regularisers(batch_sizes, tensors) if regularise else {}
        exact = {k: v.detach().double().requires_grad_() if v is not None else None for k, v in tensors.items()}
        regularisers_exact = {k: v.double() for k, v in regularisers.items()}
        for reverse in (False, True):
            def run():
                return outputs_and_grads(batch_sizes, tensors, reverse, regularisers=regularisers)

            (out, grads), (forward_runs, backward_runs) = whole_loop_runs(run)
            expected = chunk_loops if not reverse else 2  # (going backward in reverse, both chunks are long)
            assert forward_runs == 1 and backward_runs == expected, (forward_runs, backward_runs)
            with gate_panels_allowed(False):
                step_out, step_grads = run()
            ref_out, ref_grads = outputs_and_grads(batch_sizes, exact, reverse, backend="reference",
                                                   regularisers=regularisers_exact)
            assert_loops_match_reference(
                dtype, 3e-5, [out + grads, step_out + step_grads], ref_out + ref_grads,
                lambda: outputs_and_grads(batch_sizes, fresh_leaves(tensors), reverse, backend="reference",
                                          regularisers=regularisers))


@requires_avx512
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_sequence_forward_runs_each_direction_of_a_bidirectional_module(threads):
    """fastnlp.nn.LSTM, bidirectional and two layers deep: four whole-sequence loops (one per layer
    and direction; with two threads the directions run side by side, one loop on each), and torch's
    nn.LSTM's outputs."""
    torch.manual_seed(0)
    with intra_op_threads(threads):
        ours = fastnlp.nn.LSTM(6, 20, num_layers=2, bidirectional=True)
        theirs = torch.nn.LSTM(6, 20, num_layers=2, bidirectional=True)
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(7, 5, 6)
        (out, (h, c)), runs = sequence_forward_runs(lambda: ours(x))
        assert runs == 4
        (_, grads), (_, backward_runs) = whole_loop_runs(
            lambda: (None, torch.autograd.grad(out.sum(), list(ours.parameters()))))
        assert backward_runs == 4
        ref_out, (ref_h, ref_c) = theirs(x)
        for a, b in ((out, ref_out), (h, ref_h), (c, ref_c)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cpu_sequence_forward_declines_what_it_does_not_take():
    """Three steps, float64, a projection, layer norm and gate panels turned off all keep the step loop
    (the loop takes only what sequence_forward_cpu documents); so does every call on a CPU without
    AVX-512, which the tests above then skip."""
    def runs(lengths=(4, 4), proj=0, dtype=torch.float32, layer_norm=False):
        batch_sizes, tensors = make_layer_inputs(list(lengths), 5, 7, proj, "both", dtype, "cpu")
        ln = make_layer_norm(7, dtype, "cpu") if layer_norm else {}
        return sequence_forward_runs(lambda: layer_norm_outputs_and_grads(batch_sizes, tensors, ln, False))[1]

    assert runs() == (1 if fastnlp._C.cpu_has_avx512() else 0)
    assert runs(lengths=(3, 3)) == 0
    assert runs(dtype=torch.float64) == 0
    assert runs(proj=4) == 0
    assert runs(layer_norm=True) == 0
    with gate_panels_allowed(False):
        assert runs() == 0


@pytest.mark.parametrize("bias", ["both", "none", "ih", "hh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cell_step_of_few_rows_matches_reference(bias, dtype):
    """A step of one to four rows in all (an LSTMCell call, T = 1) also takes
    its input product x W_ih^T + biases through the CPU's few-rows loop
    (csrc/lstm.cpp, input_product), five rows through addmm; every bias
    combination, gradients included; no argument written to (the bias is
    where the product starts, and a (1, 4H) view of it is still the bias)."""
    for rows in (1, 2, 4, 5):
        batch_sizes, tensors = make_layer_inputs([1] * rows, 13, 7, 0, bias, dtype, "cpu", packed=False)
        exact = {k: v.detach().clone().double().requires_grad_() if v is not None else None
                 for k, v in tensors.items()}
        out, grads = layer_norm_outputs_and_grads(batch_sizes, tensors, {}, False)
        for name, value in tensors.items():
            if value is not None:
                assert torch.equal(value.double(), exact[name]), name
        ref_out, ref_grads = layer_norm_outputs_and_grads(batch_sizes, exact, {}, False, backend="reference")
        for a, b in zip(out + grads, ref_out + ref_grads):
            error = ((a.double() - b).abs().max() / b.abs().max().clamp_min(1.0)).item()
            assert error <= (1e-6 if dtype == torch.float32 else 1e-14), (rows, error)


# -- layer normalisation (the LayerNorm-LSTM of Ba et al.) --------------------

LAYER_NORM_NAMES = ("layer_norm_ih_weight", "layer_norm_ih_bias", "layer_norm_hh_weight", "layer_norm_hh_bias",
                    "layer_norm_cell_weight", "layer_norm_cell_bias")


def make_layer_norm(hidden, dtype, device, seed=4):
    """Gains in [0.5, 1.5] and biases in [-0.5, 0.5], so none of them is a no-op."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in LAYER_NORM_NAMES:
        size = hidden if "cell" in name else 4 * hidden
        value = torch.rand(size, generator=g, dtype=torch.float64) - 0.5
        if name.endswith("weight"):
            value = value + 1.0
        out[name] = value.to(dtype).to(device).requires_grad_()
    return out


def layer_norm_outputs_and_grads(batch_sizes, tensors, layer_norm, reverse, backend=None, regularisers=None):
    """outputs_and_grads with the layer-norm tensors among the arguments and the differentiated leaves."""
    outputs = run_layer(batch_sizes, tensors, reverse, backend, dict(regularisers or {}, **layer_norm))
    g = torch.Generator().manual_seed(1)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum()
               for o in outputs)
    wrt = [v for v in tensors.values() if v is not None] + list(layer_norm.values())
    return outputs, torch.autograd.grad(loss, wrt)


@pytest.mark.parametrize("device", DEVICES)
@given(**LAYER_CASES)
def test_layer_norm_layer_matches_reference(device, lengths, input_size, hidden, use_proj, bias, reverse, packed,
                                            dtype, regularise):
    proj = max(1, hidden - 1) if use_proj and hidden > 1 else 0
    if not packed:
        lengths = [max(lengths)] * len(lengths)
    batch_sizes, tensors = make_layer_inputs(lengths, input_size, hidden, proj, bias, dtype, device, packed=packed)
    ln = make_layer_norm(hidden, dtype, device)
    reg = None
    if regularise is not None:
        reg = make_regularisers(batch_sizes, tensors)
        if regularise == "recurrent_mask":
            reg = {"recurrent_mask": reg["recurrent_mask"]}
        elif regularise == "zoneout":
            del reg["recurrent_mask"]
    out, grads = layer_norm_outputs_and_grads(batch_sizes, tensors, ln, reverse, regularisers=reg)
    ref_out, ref_grads = layer_norm_outputs_and_grads(batch_sizes, tensors, ln, reverse, backend="reference",
                                                      regularisers=reg)
    if dtype == torch.float64:
        for a, b in zip(out + grads, ref_out + ref_grads):
            torch.testing.assert_close(a, b, **TOLERANCES[dtype])
        return
    # float32: LN over a handful of units (hidden >= 1 here) is badly conditioned, and both the
    # kernel and the float32 reference then stray from the exact result by up to ~3e-4 of a
    # tensor's largest entry (or, for tensors that are ~0 by cancellation, of 1). So each is
    # measured against float64 on the same (rounded) values, and the kernel must be about as
    # accurate as the reference.
    def double(values):
        return {k: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None)
                for k, v in values.items()}

    exact_out, exact_grads = layer_norm_outputs_and_grads(
        batch_sizes, double(tensors), double(ln), reverse, backend="reference",
        regularisers=double(reg) if reg is not None else None)
    for ours, ref, exact in zip(out + grads, ref_out + ref_grads, exact_out + exact_grads):
        scale = exact.abs().max().clamp_min(1.0)
        ours_error = ((ours.double() - exact).abs().max() / scale).item()
        ref_error = ((ref.double() - exact).abs().max() / scale).item()
        assert ours_error <= 10 * ref_error + 2e-5, (ours_error, ref_error)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("proj, layer_norm, regularise", [(0, False, False), (2, False, True), (0, True, True),
                                                          (2, True, False)])
def test_backward_over_several_chunks_matches_reference(reverse, packed, proj, layer_norm, regularise):
    """Enough rows (1179 packed, 2400 padded) for the CPU backward to walk two or three of
    its 1024-row chunks (lstm.cpp, kCpuChunkRows), packed ones of uneven batch sizes."""
    lengths = [400, 350, 301, 120, 7, 1]
    if not packed:
        lengths = [max(lengths)] * len(lengths)
    batch_sizes, tensors = make_layer_inputs(lengths, 2, 3, proj, "both", torch.float64, "cpu", packed=packed)
    ln = make_layer_norm(3, torch.float64, "cpu") if layer_norm else {}
    reg = make_regularisers(batch_sizes, tensors) if regularise else None
    out, grads = layer_norm_outputs_and_grads(batch_sizes, tensors, ln, reverse, regularisers=reg)
    ref_out, ref_grads = layer_norm_outputs_and_grads(batch_sizes, tensors, ln, reverse, backend="reference",
                                                      regularisers=reg)
    # 400 steps with unit-scale weights: gradients reach ~1e3 and float64 rounding grows with them.
    for a, b in zip(out + grads, ref_out + ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_layer_norm_changes_the_result_and_its_parameters_matter():
    """Guards against a kernel that ignores layer_norm: output differs from the plain LSTM, and
    every LN tensor gets a non-zero gradient."""
    batch_sizes, t = make_layer_inputs([5, 3, 2], 4, 6, 0, "both", torch.float64, "cpu")
    ln = make_layer_norm(6, torch.float64, "cpu")
    plain = run_layer(batch_sizes, t, False)
    normed = run_layer(batch_sizes, t, False, regularisers=ln)
    assert not torch.allclose(plain[0], normed[0])
    grads = torch.autograd.grad(sum(o.sum() for o in normed), list(ln.values()))
    for name, g in zip(ln, grads):
        assert g.abs().sum() > 0, name


@pytest.mark.parametrize("regularise", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("proj", [0, 2])
def test_layer_norm_layer_gradcheck(reverse, proj, regularise):
    batch_sizes, tensors = make_layer_inputs([4, 3, 1], 3, 3, proj, "both", torch.float64, "cpu")
    ln = make_layer_norm(3, torch.float64, "cpu")
    names = [k for k, v in tensors.items() if v is not None]
    reg = make_regularisers(batch_sizes, tensors) if regularise else {}

    def fn(*values):
        t = dict.fromkeys(tensors)
        t.update(zip(names, values[:len(names)]))
        return run_layer(batch_sizes, t, reverse, regularisers={**reg, **dict(zip(ln, values[len(names):]))})

    assert torch.autograd.gradcheck(fn, [tensors[k] for k in names] + list(ln.values()))


def test_layer_norm_arguments_are_checked():
    batch_sizes, t = make_layer_inputs([3, 2], 4, 4, 0, "both", torch.float32, "cpu")
    ln = make_layer_norm(4, torch.float32, "cpu")
    partial = {k: v for k, v in ln.items() if k != "layer_norm_hh_bias"}
    with pytest.raises(ValueError, match="missing: layer_norm_hh_bias"):
        run_layer(batch_sizes, t, False, regularisers=partial)
    args = (t["input"], batch_sizes, t["h0"], t["c0"], t["weight_ih"], t["weight_hh"], None, None, None, False)
    with pytest.raises(RuntimeError, match="layer_norm_hh_bias is missing"):
        torch.ops.fastnlp.lstm_forward(*args, **partial)
    with pytest.raises(RuntimeError, match="layer_norm_cell_bias must have shape \\(4\\)"):
        torch.ops.fastnlp.lstm_forward(*args, **dict(ln, layer_norm_cell_bias=torch.zeros(16)))
    with pytest.raises(RuntimeError, match="layer_norm_ih_weight has dtype Double"):
        torch.ops.fastnlp.lstm_forward(*args, **dict(ln, layer_norm_ih_weight=torch.ones(16, dtype=torch.float64)))


@requires_cuda
def test_cuda_layer_norm_rows_beyond_one_grid_and_units_beyond_one_block():
    """The layer-norm step kernels run one block per row: 8200 rows is more than their 8192 blocks (so blocks
    loop over rows) and H = 300 more than a block's 256 threads (so threads loop over units)."""
    hidden = 300
    batch_sizes, t = make_layer_inputs([2] * 8200, 5, hidden, 0, "both", torch.float32, "cuda")
    t = scaled_copy(t, hidden, torch.float32)
    ln = make_layer_norm(hidden, torch.float32, "cuda")
    reg = make_regularisers(batch_sizes, t)
    out, grads = layer_norm_outputs_and_grads(batch_sizes, t, ln, True, regularisers=reg)
    ref_out, ref_grads = layer_norm_outputs_and_grads(batch_sizes, t, ln, True, backend="reference",
                                                      regularisers=reg)
    for a, b in zip(out + grads, ref_out + ref_grads):
        # Gradients of the gains sum over 16400 rows: compare relative to the largest entry.
        scale = max(b.abs().max().item(), 1.0)
        torch.testing.assert_close(a / scale, b / scale, rtol=1e-4, atol=1e-4)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_layer_norm_half_precision_error_is_bounded_by_the_references(dtype):
    hidden = 33
    batch_sizes, t = make_layer_inputs([9, 7, 7, 3, 1], 13, hidden, 5, "both", torch.float64, "cuda", seed=3)
    low = scaled_copy(t, hidden, dtype)
    ln_low = {k: v.detach().to(dtype).requires_grad_() for k, v in make_layer_norm(hidden, torch.float64,
                                                                                    "cuda").items()}
    exact = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in low.items()}
    ln_exact = {k: v.detach().double().requires_grad_() for k, v in ln_low.items()}
    out, grads = layer_norm_outputs_and_grads(batch_sizes, low, ln_low, False)
    ref_out, ref_grads = layer_norm_outputs_and_grads(batch_sizes, low, ln_low, False, backend="reference")
    exact_out, exact_grads = layer_norm_outputs_and_grads(batch_sizes, exact, ln_exact, False, backend="reference")
    names = ["output", "h_n", "c_n"] + [k for k, v in low.items() if v is not None] + list(ln_low)
    for name, a, r, e in zip(names, out + grads, ref_out + ref_grads, exact_out + exact_grads):
        assert a.dtype == dtype, name
        err = (a.double() - e).abs().max().item()
        ref_err = (r.double() - e).abs().max().item()
        floor = torch.finfo(dtype).eps * max(e.abs().max().item(), 1.0)
        assert err <= 3 * ref_err + floor, f"{name}: error {err:.3g}, reference's error {ref_err:.3g}"


# ---------------------------------------------------------------------------
# lstm_layer_pair: both directions of a layer in one op, concurrently (on two
# CPU threads, on two CUDA streams). It must be exactly the two
# single-direction layers.


def make_pair_inputs(packed, proj, dtype, regularise, layer_norm, device="cpu"):
    """One shared input and, per direction, its own states, weights, regularisers and layer norm."""
    lengths = [5, 3, 3, 1] if packed else [4, 4, 4]
    directions = []
    for d in range(2):
        batch_sizes, t = make_layer_inputs(lengths, 3, 4, proj, "both", dtype, device, seed=10 + d, packed=packed)
        if regularise:
            t.update(make_regularisers(batch_sizes, t, seed=20 + d))
        if layer_norm:
            t.update(make_layer_norm(4, dtype, device, seed=30 + d))
        directions.append(t)
    shared = directions[0].pop("input")
    directions[1].pop("input")
    return shared, batch_sizes, directions


def assert_pair_equals_two_single_direction_layers(input, batch_sizes, fwd, rev, tolerance, run_pair=None):
    """Outputs and every gradient of lstm_layer_pair against two lstm_layer calls."""
    differentiable = [input] + [v for t in (fwd, rev) for v in t.values() if v is not None and v.requires_grad]
    g = torch.Generator().manual_seed(5)

    def loss(outputs):
        return sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o)).sum() for o in outputs)

    with run_pair or contextlib.nullcontext():
        pair = lstm_layer_pair(input, batch_sizes, fwd, rev)
        pair_grads = torch.autograd.grad(loss(pair[0] + pair[1]), differentiable)
    single = tuple(lstm_layer(input, batch_sizes, reverse=reverse, **t) for reverse, t in ((False, fwd), (True, rev)))
    g.manual_seed(5)
    single_grads = torch.autograd.grad(loss(single[0] + single[1]), differentiable)
    for got, want in zip(pair[0] + pair[1], single[0] + single[1]):
        torch.testing.assert_close(got, want, **tolerance)
    for got, want in zip(pair_grads, single_grads):
        torch.testing.assert_close(got, want, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("proj", [0, 2])
@pytest.mark.parametrize("regularise, layer_norm", [(False, False), (True, False), (False, True), (True, True)])
def test_pair_equals_two_single_direction_layers(dtype, threads, packed, proj, regularise, layer_norm):
    input, batch_sizes, (fwd, rev) = make_pair_inputs(packed, proj, dtype, regularise, layer_norm)
    # float64: the same arithmetic; float32: the BLAS may split a product differently on one thread.
    tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    assert_pair_equals_two_single_direction_layers(input, batch_sizes, fwd, rev, tolerance,
                                                   run_pair=intra_op_threads(threads))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stream", ["current", "side"])
# The whole-sequence forward kernel (no projection, no layer norm) and the step loop.
@pytest.mark.parametrize("packed, proj, regularise, layer_norm", [(True, 0, True, False), (False, 0, False, False),
                                                                  (True, 2, True, False), (False, 0, True, True)])
def test_cuda_pair_equals_two_single_direction_layers(dtype, stream, packed, proj, regularise, layer_norm):
    # The CUDA pair runs each direction on a stream of its own, which waits
    # for the caller's stream; "side": the caller's stream is not the default
    # one, and the inputs are made on it just before the call.
    side = torch.cuda.Stream()
    with torch.cuda.stream(side) if stream == "side" else contextlib.nullcontext():
        input, batch_sizes, (fwd, rev) = make_pair_inputs(packed, proj, dtype, regularise, layer_norm, "cuda")
        # The same kernels in the same order; cuBLAS may pick another algorithm on another stream.
        tolerance = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6),
                     torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}[dtype]
        assert_pair_equals_two_single_direction_layers(input, batch_sizes, fwd, rev, tolerance)
    torch.cuda.synchronize()


@pytest.mark.parametrize("layer_norm", [False, True])
def test_pair_gradcheck(layer_norm):
    input, batch_sizes, (fwd, rev) = make_pair_inputs(True, 2, torch.float64, True, layer_norm)
    names = [(d, k) for d, t in enumerate((fwd, rev)) for k, v in t.items() if v is not None and v.requires_grad]

    def fn(x, *values):
        dirs = [dict(fwd), dict(rev)]
        for (d, k), v in zip(names, values):
            dirs[d][k] = v
        (out_f, h_f, c_f), (out_r, h_r, c_r) = lstm_layer_pair(x, batch_sizes, dirs[0], dirs[1])
        return out_f, h_f, c_f, out_r, h_r, c_r

    leaves = [input] + [(fwd, rev)[d][k] for d, k in names]
    assert torch.autograd.gradcheck(fn, leaves)
    # Second derivatives: with create_graph=True the backward runs the reference
    # (fastnlp/ops/_double_backward.py), a direction at a time.
    assert torch.autograd.gradgradcheck(fn, leaves)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_pair_opcheck(device, packed, layer_norm):
    input, batch_sizes, directions = make_pair_inputs(packed, 2, torch.float32, True, layer_norm, device)
    order = ["h0", "c0", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr", "recurrent_mask",
             "zoneout_cell", "zoneout_hidden"] + list(LAYER_NORM_NAMES)
    args = [[t.get(name) for name in order] for t in directions]
    torch.library.opcheck(torch.ops.fastnlp.lstm_forward_pair.default, (input, batch_sizes, args[0], args[1]))


def test_pair_rejects_malformed_lists():
    input, batch_sizes, (fwd, rev) = make_pair_inputs(False, 0, torch.float32, False, False)
    short = [fwd["h0"], fwd["c0"], fwd["weight_ih"]]
    with pytest.raises(RuntimeError, match="16 tensors"):
        torch.ops.fastnlp.lstm_forward_pair(input, batch_sizes, short, short)
    args = [fwd[name] for name in ("h0", "c0", "weight_ih", "weight_hh", "bias_ih", "bias_hh")] + [None] * 10
    on_meta = list(args)
    on_meta[3] = on_meta[3].to("meta")
    with pytest.raises(RuntimeError, match=r"reverse_args\[3\] is on meta but input is on cpu"):
        torch.ops.fastnlp.lstm_forward_pair(input, batch_sizes, args, on_meta)
    with pytest.raises(ValueError, match="zoneout_hidden needs zoneout_cell"):
        lstm_layer_pair(input, batch_sizes, dict(fwd, zoneout_hidden=torch.zeros(12, 4)), rev)
    # A misspelt or foreign key was once ignored (a bias silently dropped).
    typo = {("b_hh" if name == "bias_hh" else name): value for name, value in fwd.items()}
    with pytest.raises(TypeError, match=r"forward has unknown keys \['b_hh'\]"):
        lstm_layer_pair(input, batch_sizes, typo, rev)
    with pytest.raises(TypeError, match=r"reverse has unknown keys \['reverse'\]"):
        lstm_layer_pair(input, batch_sizes, fwd, dict(rev, reverse=True))
    without_c0 = {name: value for name, value in rev.items() if name != "c0"}
    with pytest.raises(TypeError, match=r"reverse is missing \['c0'\]"):
        lstm_layer_pair(input, batch_sizes, fwd, without_c0)


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("name", ["input", "h0", "c0", "weight_ih", "weight_hh"])
def test_a_missing_required_tensor_is_named(backend, name):
    args = malformed_layer_arguments({name: None})
    with pytest.raises(TypeError, match=f"{name} must be a tensor, got None"):
        lstm_layer(**args, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("change, message", [
    (dict(h0=torch.zeros(3, 4, dtype=torch.float64)), "h0 has dtype Double but input has dtype {}"),
    (dict(weight_ih=torch.zeros(16, 4, dtype=torch.float32)), "weight_ih has dtype Float but input has dtype {}"),
    (dict(bias_ih=torch.zeros(16, dtype=torch.int64)), "bias_ih has dtype Long but input has dtype {}"),
])
def test_half_precision_cpu_input_refuses_other_dtypes(dtype, change, message):
    """The CPU kernel runs half-precision input widened to float32; the op's
    dtype checks come first, so a float64 h0 or an int64 bias is refused as
    in float32, not widened along with the rest."""
    args = {name: value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
            for name, value in malformed_layer_arguments({}).items()}
    args.update(change)
    dtype_name = {torch.float16: "Half", torch.bfloat16: "BFloat16"}[dtype]
    with pytest.raises(RuntimeError, match=message.format(dtype_name)):
        lstm_layer(**args)


@pytest.mark.parametrize("name", ["recurrent_mask", "zoneout_cell", "zoneout_hidden"])
@pytest.mark.parametrize("entry", ["layer", "pair"])
def test_masks_that_require_grad_are_refused(entry, name):
    """The kernels' backward gives the regularisers no gradient; one that
    requires grad is refused rather than silently left at zero. Without grad
    mode, or detached, it is taken."""
    input, batch_sizes, (fwd, rev) = make_pair_inputs(True, 0, torch.float64, True, False)
    wanting = dict(fwd, **{name: fwd[name].clone().requires_grad_()})

    def run(direction):
        if entry == "pair":
            return lstm_layer_pair(input, batch_sizes, rev, direction)
        return lstm_layer(input, batch_sizes, **direction)

    with pytest.raises(RuntimeError, match=f"{name} is a constant to autograd .* pass {name}.detach"):
        run(wanting)
    with torch.no_grad():
        run(wanting)
    run(fwd)


def _double_backward_results(model, x, state, packed_lengths=None):
    """A gradient penalty's pieces: the input's gradient (create_graph=True),
    then the penalty's gradients for x, the state and every parameter, and a
    head above the model (whose second derivative runs back through the
    model's backward via the gradient reaching it)."""
    torch.manual_seed(1)
    width = getattr(model, "proj_size", 0) or model.hidden_size
    head = torch.nn.Linear(width * (2 if getattr(model, "bidirectional", False) else 1), 1).double()
    rows = pack_padded_sequence(x, packed_lengths) if packed_lengths is not None else x
    result = model(rows, state)
    out = result[0] if not isinstance(result, torch.Tensor) else result
    out = out.data if packed_lengths is not None else out
    score = head(out).pow(2).sum()
    leaves = [x, *state]
    grads = torch.autograd.grad(score, leaves, create_graph=True)
    penalty = sum(g.pow(2).sum() for g in grads)
    wrt = leaves + list(model.parameters()) + list(head.parameters())
    return grads, torch.autograd.grad(penalty, wrt)


@pytest.mark.parametrize("module", ["uni", "bi", "bi packed", "projected", "cell"])
def test_double_backward_matches_torch(module):
    # With create_graph=True the backward pass runs the reference (see
    # fastnlp/ops/_double_backward.py), so a gradient penalty, MAML or a
    # Hessian-vector product through the layer works as through torch's.
    torch.manual_seed(0)
    if module == "cell":
        theirs, ours = torch.nn.LSTMCell(3, 4).double(), fastnlp.nn.LSTMCell(3, 4).double()
        x, state_shape = torch.randn(2, 3, dtype=torch.float64, requires_grad=True), (2, 4)
    else:
        kwargs = dict(num_layers=2, bidirectional=module.startswith("bi"), proj_size=2 if module == "projected" else 0)
        theirs, ours = torch.nn.LSTM(3, 4, **kwargs).double(), fastnlp.nn.LSTM(3, 4, **kwargs).double()
        x = torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True)
        layers = 2 * (2 if kwargs["bidirectional"] else 1)
        state_shape = (layers, 3, kwargs["proj_size"] or 4)
    ours.load_state_dict(theirs.state_dict())
    h0 = torch.randn(state_shape, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(state_shape[:-1] + (4,), dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 4, 2]) if module == "bi packed" else None
    got = _double_backward_results(ours, x, (h0, c0), lengths)
    want = _double_backward_results(theirs, x, (h0, c0), lengths)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(a, b)
    # torch.autograd.functional.jvp differentiates a vjp with respect to its
    # incoming gradient (it once gave zeros).
    for a, b in zip(*(torch.autograd.functional.jvp(lambda x: m(x)[0], x, torch.ones_like(x))
                      for m in (ours, theirs))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_layer_gradgradcheck(reverse, layer_norm):
    # Packed, projected, with the regularisers and layer norm: every argument
    # of the op at once.
    batch_sizes, tensors = make_layer_inputs([3, 2, 1], 2, 2, 1, "both", torch.float64, "cpu")
    if layer_norm:
        tensors.update(make_layer_norm(2, torch.float64, "cpu"))
    names = [k for k, v in tensors.items() if v is not None]
    reg = make_regularisers(batch_sizes, tensors)

    def fn(*values):
        t = dict(zip(names, values))
        ln = {k: t.pop(k) for k in LAYER_NORM_NAMES if k in t}
        return run_layer(batch_sizes, t, reverse, regularisers=dict(reg, **ln))

    assert torch.autograd.gradgradcheck(fn, [tensors[k] for k in names])


@given(**LAYER_CASES, layer_norm=st.booleans(), pair=st.booleans())
def test_recorded_backward_equals_the_kernels_over_random_layers(lengths, input_size, hidden, use_proj, bias, reverse,
                                                                 packed, dtype, regularise, layer_norm, pair):
    """With create_graph=True the gradients come from the reference backward,
    called with the op's arguments as its autograd rebuilds them from what
    it saved (csrc/lstm_autograd.cpp): each optional tensor (either bias,
    the projection, the regularisers, the layer norm's six) must land in its
    own place, for lstm_forward and for both directions of
    lstm_forward_pair. Against the plain backward's gradients."""
    proj = max(1, hidden - 1) if use_proj and hidden > 1 else 0
    if not packed:
        lengths = [max(lengths)] * len(lengths)
    directions = []
    for d in range(2 if pair else 1):
        batch_sizes, t = make_layer_inputs(lengths, input_size, hidden, proj, bias, dtype, "cpu", seed=d,
                                           packed=packed)
        if regularise is not None:
            reg = make_regularisers(batch_sizes, t, seed=10 + d)
            t.update({k: v for k, v in reg.items() if regularise == "all" or (k == "recurrent_mask") ==
                      (regularise == "recurrent_mask")})
        if layer_norm:
            t.update(make_layer_norm(hidden, dtype, "cpu", seed=20 + d))
        directions.append({k: v for k, v in t.items() if v is not None})
    input = directions[0].pop("input")
    for direction in directions[1:]:
        direction.pop("input")
    if pair:
        def run():
            forward, backward = lstm_layer_pair(input, batch_sizes, directions[0], directions[1])
            return forward + backward
    else:
        def run():
            return lstm_layer(input, batch_sizes, reverse=reverse, **directions[0])
    wrt = [input] + [v for direction in directions for v in direction.values() if v.requires_grad]

    def gradients(create_graph):
        g = torch.Generator().manual_seed(1)
        loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in run())
        return torch.autograd.grad(loss, wrt, create_graph=create_graph)

    for recorded, plain in zip(gradients(True), gradients(False)):
        assert recorded.requires_grad
        tolerance = TOLERANCES[dtype]
        if layer_norm and dtype == torch.float32:
            # LN over a handful of units is badly conditioned in float32: the kernel and the
            # reference each stray by up to ~3e-4 of a tensor's largest entry (see
            # test_layer_norm_layer_matches_reference), so they may differ by twice that.
            tolerance = dict(rtol=0, atol=6e-4 * plain.abs().max().clamp_min(1.0).item())
        torch.testing.assert_close(recorded.detach(), plain, **tolerance)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_only_a_recorded_backward_runs_the_reference(bidirectional):
    # A plain backward pass runs the kernel; create_graph=True the reference.
    model = fastnlp.nn.LSTM(3, 4, bidirectional=bidirectional)
    x = torch.randn(5, 2, 3, requires_grad=True)
    kernel = "fastnlp::lstm_backward_pair" if bidirectional else "fastnlp::lstm_backward"
    reference = "fastnlp::lstm_forward_reference_backward"
    for create_graph, want, unwanted in ((False, kernel, reference), (True, reference, kernel)):
        _, called = operators_called(lambda: torch.autograd.grad(model(x)[0].sum(), x, create_graph=create_graph))
        assert want in called and unwanted not in called
    plain = torch.autograd.grad(model(x)[0].pow(2).sum(), x)[0]
    recorded = torch.autograd.grad(model(x)[0].pow(2).sum(), x, create_graph=True)[0]
    torch.testing.assert_close(recorded, plain)
    # torch.compile traces a plain backward pass: the kernel's.
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: model(x)[0].sum(), fullgraph=True)
    _, called = operators_called(lambda: compiled(x).backward())
    assert kernel in called and reference not in called


def test_recorded_backward_under_autocast_and_on_meta_tensors():
    # The recomputation runs with autocast off, as the op did (autocast on
    # around the backward call would otherwise recompute in bfloat16), and
    # on meta tensors, where torch.autocast itself would raise.
    torch.manual_seed(0)
    model = fastnlp.nn.LSTM(3, 4, bidirectional=True)
    x = torch.randn(5, 2, 3, requires_grad=True)
    grads = []
    for create_graph in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x)[0].float().pow(2).sum()
            grads.append(torch.autograd.grad(loss, x, create_graph=create_graph)[0])
    assert grads[1].requires_grad
    torch.testing.assert_close(grads[1].detach(), grads[0], rtol=2e-2, atol=2e-2)
    meta = [torch.randn(shape, device="meta", requires_grad=True) for shape in ((6, 3), (2, 4), (16, 3), (16, 4))]
    output = lstm_layer(meta[0], None, meta[1], meta[1], meta[2], meta[3])[0]
    (grad,) = torch.autograd.grad(output.sum(), meta[0], create_graph=True)
    assert grad.shape == (6, 3) and grad.device.type == "meta" and grad.requires_grad


def test_double_backward_refuses_an_inference_input_by_name():
    # A frozen layer keeps no input made under inference_mode (autograd
    # cannot save one), so its backward cannot be recomputed.
    model = fastnlp.nn.LSTM(3, 4).requires_grad_(False)
    with torch.inference_mode():
        x = torch.randn(5, 2, 3)
    h0 = torch.randn(1, 2, 4, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x, (h0, h0.detach()))[0].sum(), h0)  # a plain backward works
    with pytest.raises(RuntimeError, match="cannot be differentiated twice where its input is an inference tensor"):
        torch.autograd.grad(model(x, (h0, h0.detach()))[0].sum(), h0, create_graph=True)


def _products(call):
    """How many matrix products (aten mm / addmm) call runs, and its result."""
    with torch.profiler.profile() as profile:
        result = call()
    names = ("aten::mm", "aten::addmm", "aten::addmm_")
    return sum(1 for event in profile.events() if event.name in names), result


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_backward_makes_only_the_gradients_autograd_wants(bidirectional, packed, layer_norm):
    """The backward skips the products of gradients autograd does not want
    (an input that needs none, as over a frozen embedding; a frozen layer;
    torch.autograd.grad for some inputs only), and what it returns equals
    the full backward's."""
    torch.manual_seed(0)
    model = fastnlp.nn.LSTM(3, 5, num_layers=2, bidirectional=bidirectional, proj_size=2,
                            layer_norm=layer_norm).double()
    directions = 2 if bidirectional else 1
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2 * directions, 2, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2 * directions, 2, 5, dtype=torch.float64, requires_grad=True)
    params = list(model.parameters())
    every = [x, h0, c0] + params

    def loss(x=x):
        rows = pack_padded_sequence(x, torch.tensor([6, 4])) if packed else x
        out, (h, c) = model(rows, (h0, c0))
        return (out.data if packed else out).pow(2).sum() + h.sum() + c.pow(2).sum()

    count_all, full = _products(lambda: torch.autograd.grad(loss(), every))
    for subset in ([0], [1], [2], [0, 1], list(range(3, len(every))), [3], [len(every) - 1]):
        count, grads = _products(lambda: torch.autograd.grad(loss(), [every[i] for i in subset]))
        for i, grad in zip(subset, grads):
            torch.testing.assert_close(grad, full[i], rtol=0, atol=0)
        if 0 not in subset:
            assert count < count_all, subset
    # A frozen input: the bottom layer's input gradient is not made, and the
    # rest equal the full backward's.
    count, grads = _products(lambda: torch.autograd.grad(loss(x.detach()), every[1:]))
    assert count < count_all
    for grad, want in zip(grads, full[1:]):
        torch.testing.assert_close(grad, want, rtol=0, atol=0)


@pytest.mark.parametrize("module", ["uni", "bi", "bi packed", "cell"])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_frozen_layer_takes_an_inference_input(module, layer_norm):
    """A frozen layer (no parameter requires grad) gives the full backward's
    gradients for the rest, and takes an input made under inference_mode
    (which autograd refuses to save) as torch.nn.LSTMCell does: the kernel's
    backward reads the input's values only for the weights' gradients."""
    torch.manual_seed(0)
    if module == "cell":
        model = fastnlp.nn.LSTMCell(3, 5, layer_norm=layer_norm).double()
        state_shape, x_shape = (2, 5), (2, 3)
    else:
        model = fastnlp.nn.LSTM(3, 5, num_layers=2, bidirectional=module != "uni", layer_norm=layer_norm).double()
        state_shape, x_shape = (2 * (2 if module != "uni" else 1), 2, 5), (6, 2, 3)
    h0 = torch.randn(state_shape, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(state_shape, dtype=torch.float64, requires_grad=True)
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)

    def loss(x):
        rows = pack_padded_sequence(x, torch.tensor([6, 4])) if module == "bi packed" else x
        result = model(rows, (h0, c0))
        out, (h, c) = (result[0], result) if module == "cell" else result
        return (out.data if module == "bi packed" else out).pow(2).sum() + h.sum() + c.pow(2).sum()

    full = torch.autograd.grad(loss(x), [x, h0, c0])
    model.requires_grad_(False)
    grads = torch.autograd.grad(loss(x), [x, h0, c0])
    for grad, want in zip(grads, full):
        torch.testing.assert_close(grad, want, rtol=0, atol=0)
    with torch.inference_mode():
        made_in_inference = x.detach().clone()
    for grad, want in zip(torch.autograd.grad(loss(made_in_inference), [h0, c0]), full[1:]):
        torch.testing.assert_close(grad, want, rtol=0, atol=0)


def test_frozen_cell_takes_an_inference_input_as_torch_does():
    torch.manual_seed(0)
    ours, theirs = fastnlp.nn.LSTMCell(3, 5).requires_grad_(False), torch.nn.LSTMCell(3, 5).requires_grad_(False)
    ours.load_state_dict(theirs.state_dict())
    with torch.inference_mode():
        x = torch.randn(2, 3)
    h = torch.randn(2, 5, requires_grad=True)
    grads = [torch.autograd.grad(model(x, (h, h.detach()))[0].sum(), h)[0] for model in (ours, theirs)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize("input_grad", [False, True])
@pytest.mark.parametrize("weight_grads", [False, True])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_opcheck_backward_with_gradients_left_out(input_grad, weight_grads, layer_norm):
    batch_sizes, t = make_layer_inputs([5, 3, 3, 1], 3, 4, 2, "both", torch.float32, "cpu")
    ln = make_layer_norm(4, torch.float32, "cpu") if layer_norm else {}
    t = {k: v.detach() for k, v in t.items()}
    ln = {k: v.detach() for k, v in ln.items()}
    args = (t["input"], batch_sizes, t["h0"], t["c0"], t["weight_ih"], t["weight_hh"], t["bias_ih"], t["bias_hh"],
            t["weight_hr"], False)
    output, _, _, gates, cells, norm_ih, norm_hh, ln_stats = torch.ops.fastnlp.lstm_forward(*args, **ln)
    saved = dict(norm_ih=norm_ih, norm_hh=norm_hh, ln_stats=ln_stats) if layer_norm else {}
    ln_backward = {k: ln[k] for k in ("layer_norm_ih_weight", "layer_norm_hh_weight", "layer_norm_cell_weight",
                                      "layer_norm_cell_bias")} if layer_norm else {}
    backward_args = (torch.randn_like(output), torch.randn_like(t["h0"]), torch.randn_like(t["c0"]), t["input"],
                     batch_sizes, t["h0"], t["c0"], t["weight_ih"], t["weight_hh"], t["weight_hr"], True, False,
                     output, gates, cells)
    kwargs = dict(ln_backward, **saved, input_grad=input_grad, weight_grads=weight_grads)
    torch.library.opcheck(torch.ops.fastnlp.lstm_backward.default, backward_args, kwargs=kwargs)
    some = torch.ops.fastnlp.lstm_backward(*backward_args, **kwargs)
    full = torch.ops.fastnlp.lstm_backward(*backward_args, **ln_backward, **saved)
    for index, (got, want) in enumerate(zip(some, full)):
        skipped = (index == 0 and not input_grad) or (index >= 3 and not weight_grads)
        if skipped:
            assert got.numel() == 0, index
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
