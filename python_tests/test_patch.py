"""fastnlp.patch / fastnlp.unpatch on models built from torch's layers and pytorch-crf."""

import pytest
import torch
from torch import nn

import fastnlp

torchcrf = pytest.importorskip("torchcrf")

NUM_TAGS, VOCAB, EMBED, HIDDEN = 5, 30, 16, 12


class Tagger(nn.Module):
    """Embeddings -> BiLSTM -> self-attention -> LSTMCell refinement -> CRF,
    with layers nested in containers, as real models have them."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, EMBED)
        self.encoder = nn.ModuleList([nn.LSTM(EMBED, HIDDEN, batch_first=True, bidirectional=True)])
        self.attention = nn.Sequential(nn.MultiheadAttention(2 * HIDDEN, 4, batch_first=True))
        self.cell = nn.LSTMCell(2 * HIDDEN, HIDDEN)
        self.emissions = nn.Linear(HIDDEN, NUM_TAGS)
        self.crf = torchcrf.CRF(NUM_TAGS, batch_first=True)

    def features(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        states, _ = self.encoder[0](self.embed(tokens))
        attended, _ = self.attention[0](states, states, states, key_padding_mask=~mask)
        h = c = torch.zeros(tokens.shape[0], HIDDEN, dtype=states.dtype)
        steps = []
        for t in range(tokens.shape[1]):
            h, c = self.cell(attended[:, t], (h, c))
            steps.append(h)
        return self.emissions(torch.stack(steps, dim=1))

    def forward(self, tokens, tags, mask):
        return -self.crf(self.features(tokens, mask), tags, mask, reduction="mean")

    def decode(self, tokens, mask):
        return self.crf.decode(self.features(tokens, mask), mask)


def _batch():
    generator = torch.Generator().manual_seed(3)
    lengths = torch.tensor([7, 4, 6])
    tokens = torch.randint(0, VOCAB, (3, 7), generator=generator)
    tags = torch.randint(0, NUM_TAGS, (3, 7), generator=generator)
    mask = torch.arange(7)[None, :] < lengths[:, None]
    return tokens, tags, mask


def _model(dtype=torch.float32) -> Tagger:
    torch.manual_seed(0)
    return Tagger().to(dtype).eval()


def test_patch_swaps_every_layer_keeping_parameters_mode_and_outputs():
    model = _model()
    tokens, tags, mask = _batch()
    with torch.no_grad():
        expected_loss, expected_paths = model(tokens, tags, mask), model.decode(tokens, mask)
    parameters_before = dict(model.named_parameters())
    keys_before = list(model.state_dict())

    report = fastnlp.patch(model)

    assert [name for name, _, _ in report.swapped] == ["encoder.0", "attention.0", "cell", "crf"]
    assert report.skipped == []
    assert isinstance(model.encoder[0], fastnlp.nn.LSTM)
    assert isinstance(model.attention[0], fastnlp.nn.MultiheadAttention)
    assert isinstance(model.cell, fastnlp.nn.LSTMCell)
    assert isinstance(model.crf, fastnlp.nn.CRF)
    assert "encoder.0: torch.nn.modules.rnn.LSTM -> fastnlp.nn.lstm.LSTM" in str(report)
    # The very Parameter objects, under the same names; eval mode kept.
    assert list(model.state_dict()) == keys_before
    for name, parameter in model.named_parameters():
        assert parameter is parameters_before[name], name
    assert not any(module.training for module in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, tags, mask), expected_loss, atol=1e-5, rtol=1e-5)
        assert model.decode(tokens, mask) == expected_paths


def test_an_optimizer_built_before_the_patch_trains_the_patched_model_and_unpatch_keeps_the_training():
    model = _model().train()
    originals = {"encoder.0": model.encoder[0], "attention.0": model.attention[0], "cell": model.cell,
                 "crf": model.crf}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    tokens, tags, mask = _batch()
    fastnlp.patch(model)
    assert model.encoder[0].training
    before = model.crf.transitions.detach().clone()
    for _ in range(3):
        optimizer.zero_grad()
        model(tokens, tags, mask).backward()
        optimizer.step()
    assert not torch.equal(model.crf.transitions, before)
    trained = {name: value.detach().clone() for name, value in model.state_dict().items()}

    restored = fastnlp.unpatch(model.eval())

    assert sorted(restored) == sorted(originals)
    assert model.encoder[0] is originals["encoder.0"] and model.attention[0] is originals["attention.0"]
    assert model.cell is originals["cell"] and model.crf is originals["crf"]
    assert not model.encoder[0].training
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, trained[name], atol=0, rtol=0, msg=name)
    assert fastnlp.unpatch(model) == []


def test_patch_keeps_float64():
    model = _model(torch.float64)
    tokens, tags, mask = _batch()
    with torch.no_grad():
        expected = model(tokens, tags, mask)
        fastnlp.patch(model)
        got = model(tokens, tags, mask)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


def test_patch_only_the_layers_asked_for():
    model = _model()
    report = fastnlp.patch(model, layers="crf")
    assert [name for name, _, _ in report.swapped] == ["crf"]
    assert type(model.encoder[0]) is nn.LSTM and isinstance(model.crf, fastnlp.nn.CRF)
    report = fastnlp.patch(model, layers=("lstm",))
    assert [name for name, _, _ in report.swapped] == ["encoder.0", "cell"]


class MyLSTM(nn.LSTM):
    pass


def test_what_is_left_alone_is_reported_with_the_reason():
    model = nn.Module()
    model.subclassed = MyLSTM(4, 3)
    model.hooked = nn.LSTM(4, 3)
    model.hooked.register_forward_hook(lambda module, args, output: None)
    model.plain = nn.LSTMCell(4, 3)
    report = fastnlp.patch(model)
    assert [name for name, _, _ in report.swapped] == ["plain"]
    reasons = {name: reason for name, _, reason in report.skipped}
    assert set(reasons) == {"subclassed", "hooked"}
    assert "subclass" in reasons["subclassed"] and "hooks" in reasons["hooked"]
    assert type(model.subclassed) is MyLSTM and type(model.hooked) is nn.LSTM

    lstm = nn.LSTM(4, 3)
    report = fastnlp.patch(lstm)
    assert report.swapped == [] and "the model itself" in report.skipped[0][2]


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("alteration", ["parametrization", "old_weight_norm", "hook"])
def test_attention_with_an_altered_out_proj_is_left_alone_and_nothing_is_half_patched(alteration):
    # The replacement builds its own out_proj, which would not carry these.
    model = nn.Sequential(nn.LSTM(4, 5), nn.MultiheadAttention(8, 2))
    out_proj = model[1].out_proj
    if alteration == "parametrization":
        torch.nn.utils.parametrizations.weight_norm(out_proj)
    elif alteration == "old_weight_norm":
        torch.nn.utils.weight_norm(out_proj)
    else:
        out_proj.register_forward_hook(lambda module, args, output: None)
    report = fastnlp.patch(model)
    assert [name for name, _, _ in report.swapped] == ["0"]
    ((name, _, reason),) = report.skipped
    assert name == "1" and "out_proj" in reason
    assert type(model[1]) is nn.MultiheadAttention and model[1].out_proj is out_proj


def test_attention_with_a_head_dim_above_the_kernels_is_left_alone():
    model = nn.Sequential(nn.MultiheadAttention(600, 2))
    report = fastnlp.patch(model)
    assert report.swapped == [] and "head dim 300" in report.skipped[0][2]
    x = torch.randn(4, 2, 600)
    model[0](x, x, x)  # still torch's, still running


def test_a_failed_build_leaves_the_model_as_it_was(monkeypatch):
    model = nn.Sequential(nn.LSTM(4, 5), nn.LSTMCell(4, 5))
    original = fastnlp.patching._build_replacement

    def build_then_fail(module, swap):
        if isinstance(module, nn.LSTMCell):
            raise RuntimeError("build failed")
        return original(module, swap)

    monkeypatch.setattr(fastnlp.patching, "_build_replacement", build_then_fail)
    with pytest.raises(RuntimeError, match="build failed"):
        fastnlp.patch(model)
    assert type(model[0]) is nn.LSTM and type(model[1]) is nn.LSTMCell


def test_patching_a_crf_draws_no_random_numbers():
    def next_draw(patch):
        torch.manual_seed(0)
        model = nn.Sequential(torchcrf.CRF(NUM_TAGS))
        torch.manual_seed(1)
        if patch:
            assert len(fastnlp.patch(model).swapped) == 1
        return torch.rand(3)

    torch.testing.assert_close(next_draw(True), next_draw(False), rtol=0, atol=0)


def test_a_model_on_the_meta_device_is_patched_or_reported():
    with torch.device("meta"):
        model = nn.Sequential(nn.LSTM(3, 4), nn.MultiheadAttention(8, 2))
    report = fastnlp.patch(model)  # it raised on the dispatch key's spelling ("Meta")
    # Both have meta kernels (fake tensors), so both are swapped, not skipped.
    assert [name for name, _, _ in report.swapped] == ["0", "1"] and not report.skipped
    assert isinstance(model[0], fastnlp.nn.LSTM) and isinstance(model[1], fastnlp.nn.MultiheadAttention)


def _lstm_input(layer):
    return (torch.randn(2, 5, layer.input_size) if layer.batch_first else torch.randn(5, 2, layer.input_size),)


def _attention_input(layer):
    query = torch.randn(2, 5, layer.embed_dim)
    key, value = torch.randn(2, 6, layer.kdim), torch.randn(2, 6, layer.vdim)
    return tuple(x if layer.batch_first else x.transpose(0, 1) for x in (query, key, value))


@pytest.mark.parametrize("build, config, make_input", [
    (nn.LSTM, dict(num_layers=2, dropout=0.3), _lstm_input),
    (nn.LSTM, dict(proj_size=3), _lstm_input),
    (nn.LSTM, dict(bias=False, batch_first=True, bidirectional=True), _lstm_input),
    (nn.LSTMCell, dict(bias=False), lambda layer: (torch.randn(2, layer.input_size),)),
    (nn.MultiheadAttention, dict(dropout=0.2), _attention_input),
    (nn.MultiheadAttention, dict(kdim=5, vdim=7, batch_first=True), _attention_input),
    (nn.MultiheadAttention, dict(add_zero_attn=True, add_bias_kv=True), _attention_input),
    (nn.MultiheadAttention, dict(bias=False), _attention_input),
], ids=lambda value: getattr(value, "__name__", None) if callable(value) else "-".join(value))
def test_patch_carries_each_configuration_over(build, config, make_input):
    torch.manual_seed(0)
    sizes = (8, 2) if build is nn.MultiheadAttention else (4, 6)
    model = nn.Sequential(build(*sizes, **config)).eval()
    inputs = make_input(model[0])
    original = model[0]
    want = original(*inputs)
    assert len(fastnlp.patch(model).swapped) == 1
    assert type(model[0]).__module__.startswith("fastnlp")
    for name in config:
        if hasattr(original, name):  # torch's MultiheadAttention keeps no bias / add_bias_kv attribute
            assert getattr(model[0], name) == getattr(original, name), name
    torch.testing.assert_close(model[0](*inputs), want, rtol=1e-5, atol=1e-6)


def test_a_module_shared_under_two_names_gets_one_replacement():
    shared = nn.LSTM(4, 3)
    model = nn.ModuleDict({"first": shared, "second": shared})
    report = fastnlp.patch(model)
    assert [name for name, _, _ in report.swapped] == ["first", "second"]
    assert model["first"] is model["second"] and isinstance(model["first"], fastnlp.nn.LSTM)
    fastnlp.unpatch(model)
    assert model["first"] is shared and model["second"] is shared


def test_bad_arguments():
    with pytest.raises(ValueError, match="layers must be a subset"):
        fastnlp.patch(nn.Module(), layers=("lstm", "gru"))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fastnlp.patch("not a model")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fastnlp.unpatch(None)
