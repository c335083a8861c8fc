"""fastnlp.nn.LSTM / LSTMCell as drop-ins for torch.nn.LSTM / LSTMCell: the
same parameters and initialisation, state_dicts both ways, the same outputs
and gradients over PyTorch's own module-test configurations and over random
packed/padded batches, the same errors, and torch.compile."""

import contextlib
import copy
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastnlp
from fastnlp.nn import LSTM, LSTMCell
from markers import assert_same_error

# PyTorch's own module tests: every constructor/forward configuration they
# exercise for these modules (torch.testing._internal needs expecttest).
from torch.testing._internal.common_modules import module_db  # noqa: E402

TORCH_MODULE_INPUTS = {info.module_cls: info for info in module_db
                       if info.module_cls in (torch.nn.LSTM, torch.nn.LSTMCell)}
OURS = {torch.nn.LSTM: LSTM, torch.nn.LSTMCell: LSTMCell}


def flatten(value):
    """Every tensor in a (nested) output, PackedSequences included."""
    if isinstance(value, PackedSequence):
        return [value.data]
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in flatten(v)]
    return []


def twin_modules(torch_cls, *args, **kwargs):
    """The torch module and ours built from the same seed; ours must draw the same weights."""
    torch.manual_seed(0)
    theirs = torch_cls(*args, **kwargs)
    torch.manual_seed(0)
    ours = OURS[torch_cls](*args, **kwargs)
    return theirs, ours


def assert_same_forward_and_backward(theirs, ours, args, kwargs, rtol, atol):
    args_t, kwargs_t = copy.deepcopy((args, kwargs))
    args_o, kwargs_o = copy.deepcopy((args, kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "LSTM with projections is not supported with oneDNN"
        out_t = flatten(theirs(*args_t, **kwargs_t))
    out_o = flatten(ours(*args_o, **kwargs_o))
    assert len(out_t) == len(out_o)
    for a, b in zip(out_o, out_t):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in out_t]
    leaves_t = list(theirs.parameters()) + [t for t in flatten((args_t, list(kwargs_t.values()))) if t.requires_grad]
    leaves_o = list(ours.parameters()) + [t for t in flatten((args_o, list(kwargs_o.values()))) if t.requires_grad]
    grads_t = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out_t, weights)), leaves_t, allow_unused=True)
    grads_o = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out_o, weights)), leaves_o, allow_unused=True)
    for a, b in zip(grads_o, grads_t):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("torch_cls", [torch.nn.LSTM, torch.nn.LSTMCell], ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pytorch_module_test_configurations(torch_cls, dtype):
    info = TORCH_MODULE_INPUTS[torch_cls]
    samples = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True)
    assert samples, "PyTorch's module tests gave no configurations"
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for sample in samples:
        ctor = sample.constructor_input
        theirs, ours = twin_modules(torch_cls, *ctor.args, **ctor.kwargs)
        theirs.to(dtype)
        ours.to(dtype)
        # Same names, shapes and initial values: a given seed builds the same module.
        assert list(ours.state_dict()) == list(theirs.state_dict())
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), name
        assert repr(ours) == repr(theirs)
        assert_same_forward_and_backward(theirs, ours, sample.forward_input.args, sample.forward_input.kwargs, **tol)


CONFIGS = st.fixed_dictionaries({
    "num_layers": st.integers(1, 3),
    "bias": st.booleans(),
    "batch_first": st.booleans(),
    "bidirectional": st.booleans(),
    "proj": st.booleans(),
})


@given(config=CONFIGS, lengths=st.lists(st.integers(1, 6), min_size=1, max_size=5),
       packing=st.sampled_from(["padded", "sorted", "unsorted"]), with_hx=st.booleans())
def test_matches_torch_lstm(config, lengths, packing, with_hx):
    input_size, hidden = 4, 5
    proj = 3 if config.pop("proj") else 0
    theirs, ours = twin_modules(torch.nn.LSTM, input_size, hidden, proj_size=proj, **config)
    g = torch.Generator().manual_seed(len(lengths))
    if packing == "sorted":
        lengths = sorted(lengths, reverse=True)
    B, T = len(lengths), max(lengths)
    shape = (B, T, input_size) if config["batch_first"] else (T, B, input_size)
    x = torch.randn(shape, generator=g, requires_grad=True)
    directions = 2 if config["bidirectional"] else 1
    hx = None
    if with_hx:
        L = config["num_layers"] * directions
        hx = (torch.randn(L, B, proj or hidden, generator=g, requires_grad=True),
              torch.randn(L, B, hidden, generator=g, requires_grad=True))
    if packing == "padded":
        args = (x, hx)
    else:
        packed = pack_padded_sequence(x.detach(), torch.tensor(lengths), batch_first=config["batch_first"],
                                      enforce_sorted=packing == "sorted")
        # The packed data is the leaf whose gradient is compared.
        args = (packed._replace(data=packed.data.requires_grad_()), hx)
    assert_same_forward_and_backward(theirs, ours, args, {}, rtol=1e-5, atol=1e-5)


def test_packed_output_equals_padded_output_per_sequence():
    """What the user gets from packed input is what each sequence gives alone."""
    torch.manual_seed(0)
    lstm = LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(3, 6, 3)
    lengths = torch.tensor([2, 6, 4])
    out, (h, c) = lstm(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    padded, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
    for b in range(3):
        alone, (h_b, c_b) = lstm(x[b:b + 1, :lengths[b]])
        torch.testing.assert_close(padded[b:b + 1, :lengths[b]], alone)
        torch.testing.assert_close(h[:, b:b + 1], h_b)
        torch.testing.assert_close(c[:, b:b + 1], c_b)


def test_state_dicts_load_both_ways():
    theirs = torch.nn.LSTM(3, 6, num_layers=2, bidirectional=True, proj_size=2)
    ours = LSTM(3, 6, num_layers=2, bidirectional=True, proj_size=2)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(ours(x)[0], theirs(x)[0])
    ours.reset_parameters()
    theirs.load_state_dict(ours.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(ours(x)[0], theirs(x)[0])
    cell_theirs, cell_ours = torch.nn.LSTMCell(3, 4, bias=False), LSTMCell(3, 4, bias=False)
    cell_ours.load_state_dict(cell_theirs.state_dict())
    torch.testing.assert_close(cell_ours(x[0])[0], cell_theirs(x[0])[0])


def test_compatibility_attributes():
    ours = LSTM(3, 4, num_layers=2, bidirectional=True)
    theirs = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    ours.flatten_parameters()  # a no-op, but code written for torch calls it
    assert [[p.shape for p in ws] for ws in ours.all_weights] == [[p.shape for p in ws] for ws in theirs.all_weights]
    for attr in ["input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional",
                 "proj_size", "mode"]:
        assert getattr(ours, attr) == getattr(theirs, attr), attr


@pytest.mark.parametrize("kwargs", [dict(num_layers=2, bidirectional=True), dict(proj_size=2, bias=False)])
def test_flat_weights_follow_the_parameters_as_torch_does(kwargs):
    """_flat_weights, which weight-drop wrappers read: torch's order, and the
    tensor forward uses after a weight is replaced by a plain tensor."""
    theirs, ours = twin_modules(torch.nn.LSTM, 3, 4, **kwargs)
    assert ours._flat_weights_names == theirs._flat_weights_names
    for a, b in zip(ours._flat_weights, theirs._flat_weights):
        assert torch.equal(a, b)
    for module in (ours, theirs):
        del module.weight_hh_l0
        module.weight_hh_l0 = torch.zeros(16, module.weight_hr_l0.shape[0] if kwargs.get("proj_size") else 4)
    assert ours._flat_weights[1] is ours.weight_hh_l0 and torch.equal(ours._flat_weights[1], theirs._flat_weights[1])
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(ours(x)[0], theirs(x)[0])


@pytest.mark.parametrize("kwargs", [dict(), dict(num_layers=2, bidirectional=True, proj_size=2),
                                    dict(batch_first=True)])
def test_public_check_helpers_are_torchs(kwargs):
    """check_input, get_expected_hidden_size / cell_size, check_hidden_size,
    check_forward_args and permute_hidden: torch.nn.LSTM's public helpers,
    which subclasses call. Same results, same errors."""
    theirs, ours = twin_modules(torch.nn.LSTM, 3, 4, **kwargs)
    x = torch.randn(5, 2, 3)
    batch_sizes = torch.tensor([2, 2, 1])
    h_size, c_size = theirs.get_expected_hidden_size(x, None), theirs.get_expected_cell_size(x, None)
    good = (torch.zeros(h_size), torch.zeros(c_size))
    for module in (theirs, ours):
        assert module.get_expected_hidden_size(x, None) == h_size
        assert module.get_expected_cell_size(x, None) == c_size
        assert module.get_expected_hidden_size(x[0], batch_sizes)[1] == 2
        module.check_forward_args(x, good, None)
    calls = [
        lambda m: m.check_input(x.double(), None),
        lambda m: m.check_input(x, batch_sizes),
        lambda m: m.check_input(x[..., :2], None),
        lambda m: m.check_hidden_size(good[0][:, :1], h_size),
        lambda m: m.check_hidden_size(good[0][:, :1], h_size, "{} vs {}"),
        lambda m: m.check_forward_args(x, (good[0], good[1][:, :1]), None),
        lambda m: m.check_forward_args(x, (good[0][..., :1], good[1]), None),
    ]
    for call in calls:
        errors = []
        for module in (ours, theirs):
            with pytest.raises(Exception) as error:
                call(module)
            errors.append((error.type, str(error.value)))
        assert_same_error(*errors)  # older torch words some of these messages differently
    permutation = torch.tensor([1, 0])
    for a, b in zip(ours.permute_hidden(good, permutation), theirs.permute_hidden(good, permutation)):
        assert torch.equal(a, b)
    assert ours.permute_hidden(good, None) is good


def test_subclass_overrides_of_the_helpers_take_effect():
    """forward goes through the helpers as torch's does: a subclass's override
    of check_forward_args or permute_hidden changes what it does."""
    def subclass(base):
        class Strict(base):
            def check_forward_args(self, input, hidden, batch_sizes):
                if hidden[0].abs().max() > 10:
                    raise ValueError("h_0 out of range")
                super().check_forward_args(input, hidden, batch_sizes)

            def permute_hidden(self, hx, permutation):  # ignores the order
                return hx
        return Strict

    torch.manual_seed(0)
    theirs = subclass(torch.nn.LSTM)(3, 4)
    torch.manual_seed(0)
    ours = subclass(LSTM)(3, 4)
    x = torch.randn(5, 2, 3)
    big = (torch.full((1, 2, 4), 20.0), torch.zeros(1, 2, 4))
    for module in (theirs, ours):
        with pytest.raises(ValueError, match="h_0 out of range"):
            module(x, big)
    packed = pack_padded_sequence(x, torch.tensor([3, 5]), enforce_sorted=False)
    hx = (torch.randn(1, 2, 4), torch.randn(1, 2, 4))
    out_theirs, (h_theirs, c_theirs) = theirs(packed, hx)
    out_ours, (h_ours, c_ours) = ours(packed, hx)
    torch.testing.assert_close(out_ours.data, out_theirs.data)
    torch.testing.assert_close(h_ours, h_theirs)
    torch.testing.assert_close(c_ours, c_theirs)


def test_dropout_between_layers():
    ours = LSTM(3, 4, num_layers=2, dropout=0.5)
    x = torch.randn(5, 2, 3)
    ours.eval()
    a, b = ours(x)[0], ours(x)[0]
    torch.testing.assert_close(a, b)  # no dropout in eval mode
    ours.train()
    torch.manual_seed(1)
    c = ours(x)[0]
    torch.manual_seed(1)
    torch.testing.assert_close(ours(x)[0], c)  # deterministic for a given seed
    assert not torch.allclose(c, a)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_module_on_cpu(dtype):
    """A half-precision module on the CPU: outputs and every gradient in its
    dtype, close to torch.nn.LSTM run in float64 on the same rounded values."""
    theirs, ours = twin_modules(torch.nn.LSTM, 4, 6, bidirectional=True)
    ours.to(dtype)
    theirs.to(dtype).double()  # the same rounded weights, without further rounding
    x = torch.randn(5, 3, 4).to(dtype)
    x_o, x_t = x.clone().requires_grad_(), x.double().requires_grad_()
    out_o, out_t = flatten(ours(x_o)), flatten(theirs(x_t))
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in out_t]
    grads_o = torch.autograd.grad(sum((o.double() * w).sum() for o, w in zip(out_o, weights)),
                                  [x_o] + list(ours.parameters()))
    grads_t = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out_t, weights)),
                                  [x_t] + list(theirs.parameters()))
    tolerance = 2e-3 if dtype == torch.float16 else 2e-2
    for a, b in zip(out_o + list(grads_o), out_t + list(grads_t)):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, rtol=tolerance, atol=tolerance)


def raised(fn):
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - comparing whatever torch raises
        return type(error), str(error)
    return None


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m(torch.randn(5, 2, 4)),  # wrong input size
        lambda m: m(torch.randn(2, 3, 4, 5)),  # 4-D
        lambda m: m(torch.randn(5, 2, 3).double()),  # dtype differs from the weights
        lambda m: m(torch.randn(5, 2, 3), (torch.zeros(2, 2, 4), torch.zeros(2, 2, 4))),  # wrong num_layers*dirs
        lambda m: m(torch.randn(5, 2, 3), (torch.zeros(1, 3, 4), torch.zeros(1, 2, 4))),  # wrong batch in h
        lambda m: m(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 5))),  # wrong size in c
        lambda m: m(torch.randn(5, 2, 3), (torch.zeros(2, 4), torch.zeros(2, 4))),  # 2-D hx for batched input
        lambda m: m(torch.randn(5, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))),  # 3-D hx, unbatched input
    ],
)
def test_lstm_errors_match_torch(call):
    theirs, ours = twin_modules(torch.nn.LSTM, 3, 4)
    assert_same_error(raised(lambda: call(ours)), raised(lambda: call(theirs)))


@pytest.mark.parametrize(
    "kwargs",
    [dict(dropout=1.5), dict(dropout=True), dict(dropout=None), dict(dropout="0.1"), dict(dropout=[0.1]),
     dict(bias=1), dict(batch_first=None), dict(num_layers=0),
     dict(proj_size=-1), dict(proj_size=4), dict(hidden_size=0), dict(input_size=2.0)],
)
def test_constructor_errors_match_torch(kwargs):
    args = dict(input_size=3, hidden_size=4)
    args.update(kwargs)
    assert_same_error(raised(lambda: LSTM(**args)), raised(lambda: torch.nn.LSTM(**args)))


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m(torch.randn(2, 3, 3)),  # 3-D input
        lambda m: m(torch.randn(2, 5)),  # wrong input size
        lambda m: m(torch.randn(2, 3), (torch.zeros(3, 4), torch.zeros(2, 4))),  # batch mismatch
        lambda m: m(torch.randn(2, 3), (torch.zeros(2, 4), torch.zeros(2, 5))),  # hidden size mismatch
        lambda m: m(torch.randn(2, 3), (torch.zeros(2, 4, 1), torch.zeros(2, 4))),  # 3-D hx
        lambda m: m(torch.randn(2, 3), (torch.zeros(4), torch.zeros(4))),  # batched input, 1-D hx
        lambda m: m(torch.randn(3), (torch.zeros(2, 4), torch.zeros(2, 4))),  # unbatched input, 2-D hx
    ],
)
def test_cell_errors_match_torch(call):
    theirs, ours = twin_modules(torch.nn.LSTMCell, 3, 4)
    assert_same_error(raised(lambda: call(ours)), raised(lambda: call(theirs)))


class StepLoop(torch.nn.Module):
    """A Python loop over time steps of a cell: how LSTMCell users run it."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, x):
        h = c = x.new_zeros(x.size(1), self.cell.hidden_size)
        outs = []
        for t in range(x.size(0)):
            h, c = self.cell(x[t], (h, c))
            outs.append(h)
        return torch.stack(outs), c


def test_cell_step_loop_matches_torch():
    theirs, ours = twin_modules(torch.nn.LSTMCell, 3, 4)
    x = torch.randn(6, 2, 3, requires_grad=True)
    assert_same_forward_and_backward(StepLoop(theirs), StepLoop(ours), (x,), {}, rtol=1e-5, atol=1e-5)


def _old_weight_norm(module, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated
        torch.nn.utils.weight_norm(module, name)


@pytest.mark.parametrize("name", ["weight_hh", "bias_ih"])
@pytest.mark.parametrize("reparametrize", [torch.nn.utils.parametrizations.weight_norm, _old_weight_norm])
def test_cell_with_reparametrized_weights_matches_torch(reparametrize, name):
    """A parametrization makes a weight a property, the old weight_norm a plain
    attribute recomputed before each call: LSTMCell must use what they give,
    not the parameter they replaced."""
    theirs, ours = twin_modules(torch.nn.LSTMCell, 3, 4)
    for module in (theirs, ours):
        reparametrize(module, name)
        assert name not in module._parameters
    ours.load_state_dict(theirs.state_dict())
    with torch.no_grad():  # weights unlike those the cell was built with: a stale one would show
        for module in (theirs, ours):
            for parameter in module.parameters():
                parameter.mul_(torch.linspace(0.5, 1.5, parameter.numel()).reshape(parameter.shape))
    x = torch.randn(6, 2, 3, requires_grad=True)
    assert_same_forward_and_backward(StepLoop(theirs), StepLoop(ours), (x,), {}, rtol=1e-5, atol=1e-5)


def test_cell_under_functional_call_uses_the_given_weights():
    """torch.func.functional_call swaps the tensors in _parameters for the call."""
    theirs, ours = twin_modules(torch.nn.LSTMCell, 3, 4)
    given = {name: torch.randn(p.shape) for name, p in theirs.named_parameters()}
    x, hx = torch.randn(2, 3), (torch.randn(2, 4), torch.randn(2, 4))
    expected = torch.func.functional_call(theirs, given, (x, hx))
    got = torch.func.functional_call(ours, given, (x, hx))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours(x, hx)[0], got[0])  # the module's own weights are back after the call


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_saturated_and_nan_gates_behave_like_torch(dtype):
    """Pre-activations far past the float exp's range saturate to torch's 0/1/-1;
    a NaN input gives NaN where torch gives NaN (the step kernels compute the
    activations in the storage type, float32 with its own vectorised exp)."""
    theirs, ours = twin_modules(torch.nn.LSTM, 3, 21, dtype=dtype)  # 21: 8-lane vectors and a tail
    x = torch.randn(5, 2, 3, dtype=dtype) * torch.tensor([1.0, 50.0, 1000.0], dtype=dtype)
    x[2, 0] = -x[2, 0]
    outs = []
    for module in (theirs, ours):
        xi = x.clone().requires_grad_(True)
        out, (h, c) = module(xi)
        weights = torch.linspace(-1, 1, out.numel(), dtype=dtype).reshape(out.shape)
        grads = torch.autograd.grad((out * weights).sum() + c.sum(), [xi, *module.parameters()])
        outs.append(([out, h, c], grads))
    (t_values, t_grads), (values, grads) = outs
    for a, b in zip(values, t_values):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Inputs of size 1000 make float32 weight gradients large and their
    # rounding with them: compared relative to each gradient's largest entry.
    for a, b in zip(grads, t_grads):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max().clamp_min(1.0)
    x_nan = x.detach().clone()
    x_nan[3, 1, 0] = float("nan")
    with torch.no_grad():
        (out, (h, c)), (t_out, (t_h, t_c)) = ours(x_nan), theirs(x_nan)
    assert torch.equal(out.isnan(), t_out.isnan()) and out.isnan().any()
    assert torch.equal(c.isnan(), t_c.isnan())


def test_module_exported():
    assert fastnlp.nn.LSTM is LSTM and fastnlp.nn.LSTMCell is LSTMCell


@pytest.mark.parametrize("kwargs", [dict(recurrent_dropout=0.4), dict(zoneout=0.3),
                                    dict(recurrent_dropout=0.2, zoneout=0.2, proj_size=2)])
def test_regularisers_in_training_match_the_reference(kwargs, monkeypatch):
    """Same torch seed, same masks: the kernel and the pure-PyTorch path agree, gradients included."""
    torch.manual_seed(0)
    lstm = LSTM(3, 4, num_layers=2, bidirectional=True, **kwargs)
    x = torch.randn(5, 3, 3, requires_grad=True)

    def run():
        torch.manual_seed(7)
        out, (h, c) = lstm(pack_padded_sequence(x, torch.tensor([5, 2, 4]), enforce_sorted=False))
        loss = (out.data ** 2).sum() + h.sum() + c.sum()
        return [out.data, h, c] + list(torch.autograd.grad(loss, [x] + list(lstm.parameters())))

    ours = run()
    monkeypatch.setenv("FASTNLP_BACKEND", "reference")
    reference = run()
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b)
    monkeypatch.delenv("FASTNLP_BACKEND")
    torch.testing.assert_close(run()[0], ours[0])  # deterministic for a seed
    lstm.recurrent_dropout = lstm.zoneout = 0.0
    assert not torch.allclose(run()[0], ours[0])  # and they do change the result


def test_regularisers_at_evaluation():
    torch.manual_seed(0)
    plain = LSTM(3, 4)
    dropped = LSTM(3, 4, recurrent_dropout=0.5).eval()
    zoned = LSTM(3, 4, zoneout=0.25).eval()
    for m in (dropped, zoned):
        m.load_state_dict(plain.state_dict())
    x = torch.randn(6, 2, 3)
    torch.testing.assert_close(dropped(x)[0], plain(x)[0])  # recurrent dropout is off
    # Zoneout at evaluation mixes in the previous state with its expected weight p.
    rows = x.reshape(12, 3)
    z_c, z_h = torch.full((12, 4), 0.25), torch.full((12, 4), 0.25)
    expected, _, _ = fastnlp.reference.lstm.lstm_layer(
        rows, torch.empty(0, dtype=torch.long), torch.zeros(2, 4), torch.zeros(2, 4), plain.weight_ih_l0,
        plain.weight_hh_l0, plain.bias_ih_l0, plain.bias_hh_l0, zoneout_cell=z_c, zoneout_hidden=z_h)
    torch.testing.assert_close(zoned(x)[0], expected.view(6, 2, 4))
    assert "zoneout=0.25" in repr(zoned) and "recurrent_dropout=0.5" in repr(dropped)


@pytest.mark.parametrize("kwargs", [dict(zoneout=1.0), dict(zoneout=-0.1), dict(recurrent_dropout=True),
                                    dict(recurrent_dropout="0.1")])
def test_regulariser_arguments_are_checked(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        LSTM(3, 4, **kwargs)


# -- layer_norm=True ----------------------------------------------------------

LN_KINDS = ("layer_norm_ih_weight", "layer_norm_ih_bias", "layer_norm_hh_weight", "layer_norm_hh_bias",
            "layer_norm_cell_weight", "layer_norm_cell_bias")


def perturb_layer_norm(module, seed=3):
    """Gains and biases away from their 1 / 0 init, so that each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("layer_norm_"):
                p.add_(torch.rand(p.shape, generator=g, dtype=p.dtype) - 0.5)


def test_layer_norm_parameters_follow_torchs():
    theirs, ours = twin_modules(torch.nn.LSTM, 3, 6, num_layers=2, bidirectional=True, proj_size=2)
    torch.manual_seed(0)
    normed = LSTM(3, 6, num_layers=2, bidirectional=True, proj_size=2, layer_norm=True)
    torch_names = [n for n, _ in theirs.named_parameters()]
    names = [n for n, _ in normed.named_parameters()]
    assert [n for n, _ in ours.named_parameters()] == torch_names  # layer_norm=False: exactly torch's
    assert list(ours.state_dict()) == list(theirs.state_dict())
    expected_ln = [kind + f"_l{k}" + rev for k in range(2) for rev in ("", "_reverse") for kind in LN_KINDS]
    assert names == torch_names + expected_ln
    for name, p in normed.named_parameters():
        if name in torch_names:
            torch.testing.assert_close(p, dict(theirs.named_parameters())[name])  # same seed, same draws
        else:
            assert p.shape == ((6,) if "cell" in name else (24,)), name
            assert torch.equal(p, torch.ones_like(p) if "_weight" in name else torch.zeros_like(p)), name
    result = normed.load_state_dict(theirs.state_dict(), strict=False)
    assert result.missing_keys == expected_ln and result.unexpected_keys == []
    assert "layer_norm=True" in repr(normed) and "layer_norm" not in repr(ours)
    assert normed._all_weights == theirs._all_weights  # all_weights: torch's parameters only

    cell = LSTMCell(3, 4, layer_norm=True)
    assert [n for n, _ in cell.named_parameters()] == ["weight_ih", "weight_hh", "bias_ih", "bias_hh", *LN_KINDS]
    assert "layer_norm=True" in repr(cell) and "layer_norm" not in repr(LSTMCell(3, 4))
    with pytest.raises(TypeError, match="layer_norm should be of type bool"):
        LSTM(3, 4, layer_norm=1)
    with pytest.raises(TypeError, match="layer_norm should be of type bool"):
        LSTMCell(3, 4, layer_norm="yes")


@pytest.mark.parametrize("config", [
    dict(num_layers=2, bidirectional=True, proj_size=2),
    dict(num_layers=1, bidirectional=False, bias=False),
    dict(num_layers=2, bidirectional=True, batch_first=True),
    dict(num_layers=2, bidirectional=True, recurrent_dropout=0.3, zoneout=0.2),
])
@pytest.mark.parametrize("form", ["packed", "padded", "unbatched"])
def test_layer_norm_module_matches_the_reference(config, form, monkeypatch):
    torch.manual_seed(0)
    lstm = LSTM(3, 5, layer_norm=True, **config).double()
    perturb_layer_norm(lstm)
    batch_first = config.get("batch_first", False)
    x = torch.randn(6, 3, 3, dtype=torch.float64, requires_grad=True)
    hx_shape = (4 if config["num_layers"] == 2 and config.get("bidirectional") else config["num_layers"], 3)
    h0 = torch.randn(*hx_shape, config.get("proj_size") or 5, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(*hx_shape, 5, dtype=torch.float64, requires_grad=True)

    def run():
        torch.manual_seed(7)  # the same regulariser masks for both backends
        if form == "packed":
            out, (h, c) = lstm(pack_padded_sequence(x, torch.tensor([6, 2, 4]), enforce_sorted=False), (h0, c0))
            out = out.data
        elif form == "padded":
            out, (h, c) = lstm(x.transpose(0, 1) if batch_first else x, (h0, c0))
        else:
            out, (h, c) = lstm(x[:, 0], (h0[:, 0], c0[:, 0]))
        loss = (out ** 2).sum() + h.sum() + (c * c).sum()
        return [out, h, c] + list(torch.autograd.grad(loss, [x, h0, c0] + list(lstm.parameters())))

    ours = run()
    monkeypatch.setenv("FASTNLP_BACKEND", "reference")
    reference = run()
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_layer_norm_removes_the_scale_of_the_weights():
    """A property the plain LSTM lacks and that the reference does not decide: each gate product is
    normalised, so scaling weight_ih and weight_hh by positive constants changes nothing, up to eps:
    the weights start 10x torch's init so that eps (1e-5) is negligible against every row's variance."""
    torch.manual_seed(0)
    lstm = LSTM(4, 6, num_layers=2, bidirectional=True, layer_norm=True).double()
    perturb_layer_norm(lstm)

    def scale(ih, hh):
        with torch.no_grad():
            for name, p in lstm.named_parameters():
                if name.startswith("weight_ih"):
                    p.mul_(ih)
                elif name.startswith("weight_hh"):
                    p.mul_(hh)

    x = torch.randn(5, 2, 4, dtype=torch.float64)
    scale(10.0, 10.0)
    before = lstm(x)[0]
    scale(3.0, 4.0)
    torch.testing.assert_close(lstm(x)[0], before, rtol=1e-4, atol=1e-4)
    lstm.layer_norm = False  # and without the normalisation the scale does matter
    assert not torch.allclose(lstm(x)[0], before, rtol=1e-2, atol=1e-2)


def test_layer_norm_cell_matches_the_layer_and_reference():
    torch.manual_seed(0)
    cell = LSTMCell(3, 4, layer_norm=True).double()
    perturb_layer_norm(cell)
    layer = LSTM(3, 4, layer_norm=True).double()
    with torch.no_grad():
        for name, p in cell.named_parameters():
            getattr(layer, name + "_l0").copy_(p)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    h = c = torch.zeros(2, 4, dtype=torch.float64)
    outs = []
    for x_t in x:
        h, c = cell(x_t, (h, c))
        outs.append(h)
    out, (h_n, c_n) = layer(x)
    torch.testing.assert_close(torch.stack(outs), out)
    torch.testing.assert_close(c, c_n[0])
    ln = tuple(getattr(cell, k) for k in LN_KINDS)
    ref_h, ref_c = fastnlp.reference.lstm.lstm_cell(x[0], torch.zeros(2, 4, dtype=torch.float64),
                                                    torch.zeros(2, 4, dtype=torch.float64), cell.weight_ih,
                                                    cell.weight_hh, cell.bias_ih, cell.bias_hh, layer_norm=ln)
    torch.testing.assert_close(cell(x[0])[0], ref_h)
    torch.testing.assert_close(cell(x[0])[1], ref_c)
    torch.testing.assert_close(cell(x[0, 0])[0], ref_h[0])  # unbatched


@pytest.mark.parametrize("layer_norm", [False, True])
def test_module_compiles_with_fullgraph(layer_norm):
    torch.manual_seed(0)
    lstm = LSTM(3, 5, num_layers=2, bidirectional=True, batch_first=True, proj_size=2, layer_norm=layer_norm)
    if layer_norm:
        perturb_layer_norm(lstm)
    x = torch.randn(2, 4, 3, requires_grad=True)
    eager_out, (eager_h, eager_c) = lstm(x)
    eager_grads = torch.autograd.grad(eager_out.sum() + eager_c.sum(), [x] + list(lstm.parameters()))
    compiled = torch.compile(lstm, fullgraph=True, backend="aot_eager")
    out, (h, c) = compiled(x)
    grads = torch.autograd.grad(out.sum() + c.sum(), [x] + list(lstm.parameters()))
    torch.testing.assert_close(out, eager_out)
    torch.testing.assert_close(h, eager_h)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_cell_step_loop_compiles_with_fullgraph(layer_norm):
    torch.manual_seed(0)
    cell = LSTMCell(3, 5, layer_norm=layer_norm)
    if layer_norm:
        perturb_layer_norm(cell)
    loop = StepLoop(cell)
    x = torch.randn(4, 2, 3, requires_grad=True)
    eager = loop(x)
    eager_grads = torch.autograd.grad(eager[0].sum() + eager[1].sum(), [x] + list(cell.parameters()))
    compiled = torch.compile(loop, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    grads = torch.autograd.grad(out[0].sum() + out[1].sum(), [x] + list(cell.parameters()))
    for a, b in zip(out + grads, eager + eager_grads):
        torch.testing.assert_close(a, b)


# -- hx structure, empty sequences, dtypes, devices, autocast ------------------

def raised_type(fn):
    """The type and message of what fn raises (None if nothing), torch's warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return raised(fn)


@pytest.mark.parametrize(
    "torch_cls, call, ours_says",
    [
        (torch.nn.LSTM, lambda m: m(torch.randn(5, 2, 3), torch.zeros(2, 1, 2, 4)), "hx must be a tuple"),
        # A tensor for hx (h_0 alone, say): torch reads hx[0] and hx[1] first.
        (torch.nn.LSTM, lambda m: m(torch.randn(5, 2, 3), torch.zeros(2, 2, 4)), "hx and cx should also be 3-D"),
        (torch.nn.LSTM, lambda m: m(torch.randn(5, 2, 3), torch.zeros(1, 2, 4)), "it has no hx[1]"),
        (torch.nn.LSTM, lambda m: m(torch.randn(5, 3), torch.zeros(2, 4)), "hx and cx should also be 2-D"),
        (torch.nn.LSTM, lambda m: m(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4),)), "it has no hx[1]"),
        (torch.nn.LSTM, lambda m: m(pack_padded_sequence(torch.randn(5, 2, 3), [5, 3]), (torch.zeros(1, 2, 4),)),
         "expects two hidden states"),
        (torch.nn.LSTM, lambda m: m(pack_padded_sequence(torch.randn(5, 2, 3), [5, 3]), torch.zeros(1, 2, 4)),
         "hx must be a tuple"),
        (torch.nn.LSTM, lambda m: m(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4),) * 3), "expects two hidden states"),
        (torch.nn.LSTM, lambda m: m(pack_padded_sequence(torch.randn(5, 2, 3), [5, 3]), (torch.zeros(1, 2, 4),) * 3),
         "expects two hidden states"),
        (torch.nn.LSTMCell, lambda m: m(torch.randn(2, 3), (torch.zeros(2, 4),) * 3), "expects two hidden states"),
        (torch.nn.LSTMCell, lambda m: m(torch.randn(2, 3), (torch.zeros(2, 4),)), "expects two hidden states"),
        (torch.nn.LSTMCell, lambda m: m(torch.randn(2, 3), torch.zeros(2, 4)), "hx must be a tuple"),
        (torch.nn.LSTMCell, lambda m: m(torch.randn(2, 3), torch.zeros(2, 2, 4)), "hx must be a tuple"),
        # torch checks the entries' ranks first (a 4-D tensor's rows are 3-D),
        # then reads hx[1] for unbatched input.
        (torch.nn.LSTMCell, lambda m: m(torch.randn(2, 3), torch.zeros(2, 2, 2, 4)), "Expected hx[0] to be 1D or 2D"),
        (torch.nn.LSTMCell, lambda m: m(torch.randn(3), (torch.zeros(4),)), "it has no hx[1]"),
    ],
)
def test_hx_that_is_not_two_states_raises_like_torch(torch_cls, call, ours_says):
    """torch's exception type, and a message about hx, before anything runs."""
    theirs, ours = twin_modules(torch_cls, 3, 4)
    expected = raised_type(lambda: call(theirs))
    assert expected is not None
    got = raised_type(lambda: call(ours))
    assert got is not None and got[0] is expected[0] and ours_says in got[1], (got, expected)
    assert "hx" in got[1] or "hidden states" in got[1]


@pytest.mark.parametrize(
    "kwargs, shape, with_hx",
    [({}, (0, 2, 3), False), ({}, (0, 3), False), (dict(batch_first=True), (2, 0, 3), False),
     ({}, (0, 2, 3), True), (dict(bidirectional=True, num_layers=2), (0, 2, 3), False)],
)
def test_empty_sequence_raises_like_torch(kwargs, shape, with_hx):
    theirs, ours = twin_modules(torch.nn.LSTM, 3, 4, **kwargs)
    layers = 2 * theirs.num_layers if theirs.bidirectional else theirs.num_layers
    args = (torch.randn(shape),) + (((torch.zeros(layers, 2, 4),) * 2,) if with_hx else ())
    expected = raised_type(lambda: theirs(*args))
    assert expected is not None and expected[0] is RuntimeError
    assert raised_type(lambda: ours(*args)) == expected


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("torch_cls, kwargs, shape", [
    (torch.nn.LSTM, dict(batch_first=True), (0, 5, 3)),
    (torch.nn.LSTM, dict(bidirectional=True, num_layers=2, proj_size=2), (5, 0, 3)),
    (torch.nn.LSTMCell, {}, (0, 3)),
])
def test_empty_batch_still_runs_like_torch(monkeypatch, backend, torch_cls, kwargs, shape):
    """No sequences: empty results, and a backward pass through them that
    gives every parameter a zero gradient, as torch's does, on both backends."""
    monkeypatch.setenv("FASTNLP_BACKEND", backend)
    theirs, ours = twin_modules(torch_cls, 3, 4, **kwargs)
    x = torch.randn(shape)
    out_o, out_t = flatten(ours(x)), flatten(theirs(x))
    for a, b in zip(out_o, out_t):
        assert a.shape == b.shape and a.dtype == b.dtype
    grads_o = torch.autograd.grad(sum(t.sum() for t in out_o), list(ours.parameters()), materialize_grads=True)
    grads_t = torch.autograd.grad(sum(t.sum() for t in out_t), list(theirs.parameters()), materialize_grads=True)
    for a, b in zip(grads_o, grads_t):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("shape", [(2, 3), (3,)])
def test_cell_of_hidden_size_zero_runs_like_torch(monkeypatch, backend, shape):
    """torch.nn.LSTMCell accepts hidden_size=0 (nn.LSTM refuses it): empty
    states, and zero gradients for the input. The CPU backward step once
    took an empty tensor's null data pointer for an absent tensor."""
    monkeypatch.setenv("FASTNLP_BACKEND", backend)
    theirs, ours = twin_modules(torch.nn.LSTMCell, 3, 0)
    x = torch.randn(shape, requires_grad=True)
    grads = []
    for module in (theirs, ours):
        h, c = module(x)
        assert h.shape == c.shape == shape[:-1] + (0,)
        grads.append(torch.autograd.grad(h.sum() + c.sum(), [x] + list(module.parameters()),
                                         materialize_grads=True))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "module_dtype, input_dtype, h_dtype, c_dtype",
    [
        (torch.float32, torch.bfloat16, None, None),  # input in another dtype than the weights
        (torch.float32, torch.float64, None, None),
        (torch.float64, torch.float32, None, None),
        (torch.float32, torch.float32, torch.float64, torch.float32),  # h0 in another dtype
        (torch.float32, torch.float32, torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.float32, torch.float32, torch.float64),  # only c0: torch promotes, runs
        (torch.float32, torch.float32, torch.float32, torch.bfloat16),
        (torch.float64, torch.float64, torch.float64, torch.float32),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32),
    ],
)
def test_cell_dtype_mismatches_behave_like_torch(module_dtype, input_dtype, h_dtype, c_dtype):
    theirs, ours = twin_modules(torch.nn.LSTMCell, 3, 4, dtype=module_dtype)
    x = torch.randn(2, 3).to(input_dtype)
    hx = None if h_dtype is None else (torch.randn(2, 4).to(h_dtype), torch.randn(2, 4).to(c_dtype))
    expected = raised_type(lambda: theirs(x, hx))
    if expected is not None:
        got = raised_type(lambda: ours(x, hx))
        assert got is not None and got[0] is expected[0] and "not the same dtype" in got[1], (got, expected)
        return
    out_t, out_o = theirs(x, hx), ours(x, hx)
    tol = dict(rtol=2e-2, atol=2e-2) if torch.bfloat16 in (module_dtype, c_dtype) else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(out_o, out_t):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize(
    "module_dtype, h_dtype, c_dtype",
    [(torch.float32, torch.float64, torch.float32), (torch.float32, torch.float32, torch.float64),
     (torch.bfloat16, torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16, torch.float32)],
)
def test_lstm_hidden_dtype_mismatches_raise_like_torch(module_dtype, h_dtype, c_dtype):
    theirs, ours = twin_modules(torch.nn.LSTM, 3, 4, dtype=module_dtype)
    x = torch.randn(5, 2, 3).to(module_dtype)
    hx = (torch.zeros(1, 2, 4, dtype=h_dtype), torch.zeros(1, 2, 4, dtype=c_dtype))
    expected = raised_type(lambda: theirs(x, hx))
    got = raised_type(lambda: ours(x, hx))
    assert got is not None and "not the same dtype" in got[1], got
    if expected is None:
        # On a CPU with native bfloat16 (avx512_bf16: this machine's AMD EPYC),
        # torch runs a bfloat16 LSTM through oneDNN, which skips the check of
        # c's dtype and gives a float32 c_n. We keep the check that torch
        # makes everywhere else.
        assert module_dtype == torch.bfloat16
    else:
        assert got[0] is expected[0], (got, expected)


def _packed(x):
    return pack_padded_sequence(x, torch.tensor([5, 3]), enforce_sorted=False)


META = dict(device="meta")


@pytest.mark.parametrize(
    "torch_cls, call",
    [
        (torch.nn.LSTM, lambda m: m(torch.randn(5, 2, 3, **META))),
        (torch.nn.LSTM, lambda m: m(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4, **META), torch.zeros(1, 2, 4)))),
        (torch.nn.LSTM, lambda m: m(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4, **META)))),
        (torch.nn.LSTM, lambda m: m(_packed(torch.randn(5, 2, 3, **META)))),
        (torch.nn.LSTM, lambda m: m(_packed(torch.randn(5, 2, 3)), (torch.zeros(1, 2, 4, **META), torch.zeros(1, 2, 4)))),
        (torch.nn.LSTM, lambda m: m(_packed(torch.randn(5, 2, 3)), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4, **META)))),
        (torch.nn.LSTMCell, lambda m: m(torch.randn(2, 3, **META))),
        (torch.nn.LSTMCell, lambda m: m(torch.randn(2, 3), (torch.zeros(2, 4, **META), torch.zeros(2, 4)))),
        (torch.nn.LSTMCell, lambda m: m(torch.randn(2, 3), (torch.zeros(2, 4), torch.zeros(2, 4, **META)))),
    ],
)
def test_device_mismatch_raises_like_torch(torch_cls, call):
    """Input, hx and parameters on different devices (meta vs cpu: no GPU needed)."""
    theirs, ours = twin_modules(torch_cls, 3, 4)
    expected = raised_type(lambda: call(theirs))
    assert expected is not None
    got = raised_type(lambda: call(ours))
    assert got is not None and got[0] is expected[0] and "not at the same device" in got[1], (got, expected)
    if "not at the same device" in expected[1]:  # torch's padded LSTM names it as we do
        assert got == expected


def test_packed_input_with_2d_hx_names_the_expected_size():
    """torch's packed path fails on a 2-D hx by accident (IndexError in its permutation);
    ours makes torch's own hidden-size check (what torch raises for padded input)."""
    ours = LSTM(3, 4)
    got = raised_type(lambda: ours(_packed(torch.randn(5, 2, 3)), (torch.zeros(2, 4), torch.zeros(2, 4))))
    assert got == (RuntimeError, "Expected hidden[0] size (1, 2, 4), got [2, 4]")


@contextlib.contextmanager
def torch_without_onednn():
    """torch's native RNN: its oneDNN LSTM fails under CPU autocast for float32 input."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the flags' notice about TF32 on Intel GPUs
        with torch.backends.mkldnn.flags(enabled=False):
            yield


AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]
AUTOCAST_TOLERANCES = {torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=4e-3, atol=4e-3)}


@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize(
    "torch_cls, kwargs, make_args",
    [
        (torch.nn.LSTM, {}, lambda lp: (torch.randn(6, 3, 4),)),
        (torch.nn.LSTM, dict(proj_size=3), lambda lp: (torch.randn(6, 3, 4),)),
        (torch.nn.LSTM, dict(num_layers=2, bidirectional=True), lambda lp: (torch.randn(6, 3, 4),)),
        (torch.nn.LSTM, dict(batch_first=True), lambda lp: (torch.randn(3, 6, 4),)),
        (torch.nn.LSTM, dict(bidirectional=True), lambda lp: (_packed(torch.randn(5, 2, 4)),)),
        (torch.nn.LSTM, {}, lambda lp: (torch.randn(6, 3, 4).to(lp),)),  # input already low precision
        (torch.nn.LSTM, {}, lambda lp: (torch.randn(6, 3, 4), (torch.randn(1, 3, 5), torch.randn(1, 3, 5).to(lp)))),
        (torch.nn.LSTM, {}, lambda lp: (torch.randn(6, 3, 4), (torch.randn(1, 3, 5).to(lp), torch.randn(1, 3, 5)))),
        (torch.nn.LSTMCell, {}, lambda lp: (torch.randn(3, 4),)),
        (torch.nn.LSTMCell, {}, lambda lp: (torch.randn(3, 4).to(lp),)),
        (torch.nn.LSTMCell, {}, lambda lp: (torch.randn(3, 4), (torch.randn(3, 5), torch.randn(3, 5).to(lp)))),
        (torch.nn.LSTMCell, {}, lambda lp: (torch.randn(3, 4), (torch.randn(3, 5), torch.randn(3, 5).double()))),
    ],
)
def test_cpu_autocast_matches_torch(autocast_dtype, torch_cls, kwargs, make_args):
    """Under CPU autocast: torch's output dtypes (float32 cell states stay float32), its numbers to the
    precision's tolerance, and gradients. torch runs its native implementation (see torch_without_onednn)."""
    hidden = 5
    theirs, ours = twin_modules(torch_cls, 4, hidden, **kwargs)
    torch.manual_seed(2)
    args = make_args(autocast_dtype)
    x_t, x_o = copy.deepcopy(args), copy.deepcopy(args)
    inputs_t = [t.requires_grad_() for t in flatten(x_t) if t.is_floating_point()]
    inputs_o = [t.requires_grad_() for t in flatten(x_o) if t.is_floating_point()]
    with torch_without_onednn(), torch.autocast("cpu", dtype=autocast_dtype):
        out_t = flatten(theirs(*x_t))
    with torch.autocast("cpu", dtype=autocast_dtype):
        out_o = flatten(ours(*x_o))
    tol = AUTOCAST_TOLERANCES[autocast_dtype]
    assert [t.dtype for t in out_o] == [t.dtype for t in out_t]
    for a, b in zip(out_o, out_t):
        torch.testing.assert_close(a.double(), b.double(), **tol)
    weights = [torch.randn(t.shape, generator=torch.Generator().manual_seed(0)).to(t.dtype) for t in out_t]
    grads_t = torch.autograd.grad(sum((o * w).float().sum() for o, w in zip(out_t, weights)),
                                  inputs_t + list(theirs.parameters()))
    grads_o = torch.autograd.grad(sum((o * w).float().sum() for o, w in zip(out_o, weights)),
                                  inputs_o + list(ours.parameters()))
    # Gradients sum many low-precision terms over the steps: torch's own are
    # several eps off a float64 run (ours less), so compared relative to each
    # gradient's largest entry.
    for a, b in zip(grads_o, grads_t):
        assert a.dtype == b.dtype
        scale = b.abs().max().double().clamp_min(1.0).item()
        torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=2 * tol["atol"] * scale)


def test_autocast_float64_operands_raise_like_torch():
    """Autocast leaves float64 alone: a float64 input or h0 against low-precision-cast weights fails in torch."""
    for call in (lambda m: m(torch.randn(6, 3, 4).double()),
                 lambda m: m(torch.randn(6, 3, 4), (torch.zeros(1, 3, 5).double(), torch.zeros(1, 3, 5)))):
        theirs, ours = twin_modules(torch.nn.LSTM, 4, 5)
        with torch_without_onednn(), torch.autocast("cpu", dtype=torch.bfloat16):
            expected = raised_type(lambda: call(theirs))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = raised_type(lambda: call(ours))
        assert expected is not None and got is not None and got[0] is expected[0], (got, expected)


def test_module_compiles_under_autocast():
    torch.manual_seed(0)
    lstm = LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2)
    x = torch.randn(4, 2, 3)
    compiled = torch.compile(lstm, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, out = flatten(lstm(x)), flatten(compiled(x))
    for a, b in zip(out, eager):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace.*` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("bidirectional", [False, True])
def test_torch_jit_trace_matches_eager(bidirectional):
    # The paired-direction op takes lists of optional tensors, which the tracer
    # cannot record: under tracing the two directions run as two ops.
    torch.manual_seed(0)
    model = LSTM(4, 5, num_layers=2, bidirectional=bidirectional)
    x = torch.randn(6, 3, 4)
    traced = torch.jit.trace(model, (x,))
    other = torch.randn(6, 3, 4)
    for got, want in zip(traced(other)[1], model(other)[1]):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(traced(other)[0], model(other)[0])


@pytest.mark.parametrize("kind", ["lstm", "bidirectional", "cell"])
def test_torch_func_transforms_differentiate_as_torchs(kind):
    """Under torch.func's differentiating transforms the op runs its reference
    (the kernels' C++ autograd is refused there): grad, jacrev and jvp of
    input and parameters, and per-sample gradients (vmap over grad), equal
    torch's in float64. torch.func.vmap of LSTM has no batching rule in torch;
    ours runs it, so the per-sample ones are compared with a loop."""
    if kind == "cell":
        theirs, ours = twin_modules(torch.nn.LSTMCell, 3, 4)
        x = torch.randn(2, 3, dtype=torch.float64)
    else:
        theirs, ours = twin_modules(torch.nn.LSTM, 3, 4, bidirectional=kind == "bidirectional")
        x = torch.randn(5, 2, 3, dtype=torch.float64)
    theirs, ours = theirs.double(), ours.double()

    def output(module):
        return lambda x: module(x)[0]

    def loss(module):
        return lambda params, x: torch.func.functional_call(module, params, (x,))[0].pow(2).sum()

    tangent = torch.randn_like(x)
    for transform in (lambda f: torch.func.jacrev(f)(x), lambda f: torch.func.jvp(f, (x,), (tangent,))[1]):
        torch.testing.assert_close(transform(output(ours)), transform(output(theirs)))
    params = {name: p.detach() for name, p in ours.named_parameters()}
    got = torch.func.grad(loss(ours))(params, x)
    want = torch.func.grad(loss(theirs))(params, x)
    for name in params:
        torch.testing.assert_close(got[name], want[name])
    samples = torch.stack([x, 2 * x])
    per_sample = torch.func.vmap(torch.func.grad(loss(ours)), in_dims=(None, 0))(params, samples)
    second = torch.func.grad(loss(theirs))(params, 2 * x)
    for name in params:
        torch.testing.assert_close(per_sample[name][1], second[name])


@pytest.mark.parametrize("bidirectional", [False, True])
def test_training_regularisers_are_drawn_at_their_rates(monkeypatch, bidirectional):
    """What the module hands the ops in training: a recurrent-dropout mask per
    sequence (kept units scaled by 1 / keep), independent zoneout draws for c
    and h at rate p, and dropout between the layers (not after the last), each
    direction its own draws; in eval, no recurrent mask and zoneout's
    expectation p. The ops' own tests take these masks as given."""
    from fastnlp.ops import lstm as lstm_ops

    p_drop, p_recurrent, p_zoneout, B, T, H = 0.4, 0.3, 0.2, 256, 20, 32
    calls = []  # per layer: (input rows, output rows, [each direction's keyword arguments])
    layer, pair = lstm_ops.lstm_layer, lstm_ops.lstm_layer_pair

    def layer_spy(rows, batch_sizes, **kwargs):
        result = layer(rows, batch_sizes, **kwargs)
        if kwargs["reverse"] and calls and calls[-1][0] is rows:  # the second direction of a layer
            calls[-1][2].append(kwargs)
            calls[-1][1] = torch.cat((calls[-1][1], result[0]), dim=1)
        else:
            calls.append([rows, result[0], [kwargs]])
        return result

    def pair_spy(rows, batch_sizes, forward, reverse):
        result = pair(rows, batch_sizes, forward, reverse)
        calls.append([rows, torch.cat((result[0][0], result[1][0]), dim=1), [forward, reverse]])
        return result

    monkeypatch.setattr(lstm_ops, "lstm_layer", layer_spy)
    monkeypatch.setattr(lstm_ops, "lstm_layer_pair", pair_spy)
    torch.manual_seed(0)
    model = LSTM(8, H, num_layers=2, dropout=p_drop, bidirectional=bidirectional, recurrent_dropout=p_recurrent,
                 zoneout=p_zoneout)
    out, _ = model(torch.randn(T, B, 8))
    directions = 2 if bidirectional else 1
    assert len(calls) == 2 and all(len(call[2]) == directions for call in calls)
    draws = []
    for _, _, per_direction in calls:
        for kwargs in per_direction:
            mask, zoneout_cell, zoneout_hidden = (kwargs[k] for k in ("recurrent_mask", "zoneout_cell",
                                                                      "zoneout_hidden"))
            assert mask.shape == (B, H)
            assert mask.unique().tolist() == [0.0, pytest.approx(1 / (1 - p_recurrent))]
            assert abs((mask == 0).float().mean().item() - p_recurrent) < 0.02
            assert zoneout_cell.shape == zoneout_hidden.shape == (T * B, H)
            for weights in (zoneout_cell, zoneout_hidden):
                assert set(weights.unique().tolist()) == {0.0, 1.0}
                assert abs(weights.mean().item() - p_zoneout) < 0.01
            draws += [mask, zoneout_cell, zoneout_hidden]
    # Every draw its own: per sequence, per direction, per layer, c apart from h.
    assert not any(torch.equal(a, b) for i, a in enumerate(draws) for b in draws[i + 1:] if a.shape == b.shape)
    assert all(not torch.equal(mask[0], mask[1]) for mask in draws[::3])
    # Dropout between the layers: the second layer's input is the first's
    # output with p_drop of it zeroed and the rest scaled; none after the last.
    first_out, second_in = calls[0][1], calls[1][0]
    dropped = second_in == 0
    assert abs(dropped.float().mean().item() - p_drop) < 0.01
    torch.testing.assert_close(second_in[~dropped], first_out[~dropped] / (1 - p_drop))
    torch.testing.assert_close(out.reshape(T * B, -1), calls[1][1], rtol=0, atol=0)
    calls.clear()
    model.eval()
    model(torch.randn(T, B, 8))
    for _, _, per_direction in calls:
        for kwargs in per_direction:
            assert kwargs["recurrent_mask"] is None
            assert (kwargs["zoneout_cell"] == p_zoneout).all() and (kwargs["zoneout_hidden"] == p_zoneout).all()
