"""The tagging examples: smoke runs of both scripts, torch.compile(fullgraph=True)
training, and the fastnlp / torch twins computing the same function."""

import math

import pytest
import torch

import bert_bilstm_crf
import bilstm_crf
from markers import import_transformers_bridge
from tagging import LABELS, TaggingTask, bilstm_crf as build_bilstm_crf, make_twins, span_f1, spans

pytest.importorskip("torchcrf")

SMOKE = ["--threads", "1", "--batch-size", "16", "--eval-sentences", "48", "--lr", "1e-2"]


def check_run(figures, out):
    first, last = figures["checkpoints"][0], figures["checkpoints"][-1]
    assert last["loss"] < first["loss"]
    assert all(0.0 <= c["f1"] <= 1.0 for c in figures["checkpoints"])
    assert all(math.isfinite(x) for x in figures["losses"])
    assert "span F1" in out and "tokens/s" in out


def test_bilstm_crf_smoke(capsys):
    threads = torch.get_num_threads()
    figures = bilstm_crf.main(SMOKE + ["--steps", "24"])
    out = capsys.readouterr().out
    assert torch.get_num_threads() == threads  # --threads does not leak into the rest of the suite
    check_run(figures, out)
    assert figures["speedup"] > 0 and "speed-up" in out
    assert figures["checkpoints"][-1]["f1"] > figures["checkpoints"][0]["f1"]


def test_bert_bilstm_crf_smoke(capsys):
    import_transformers_bridge()
    figures = bert_bilstm_crf.main(SMOKE + ["--steps", "12"])
    out = capsys.readouterr().out
    check_run(figures, out)
    assert figures["speedup"] > 0 and "speed-up" in out


def test_compile_flag_trains_fullgraph(capsys):
    figures = bilstm_crf.main(SMOKE + ["--steps", "12", "--compile", "--compile-backend", "aot_eager",
                                       "--no-baseline", "--no-progress"])
    check_run(figures, capsys.readouterr().out)


def model_builder(model):
    """The example's model constructor (the BERT one skips the test without transformers)."""
    if model == "bert_bilstm_crf":
        import_transformers_bridge()
        return bert_bilstm_crf.bert_bilstm_crf
    return build_bilstm_crf


@pytest.mark.parametrize("model", ["bilstm_crf", "bert_bilstm_crf"])
def test_compiled_model_has_no_graph_break_and_trains(model):
    """Padded batches (the packed path calls pack_padded_sequence, which TorchDynamo skips)."""
    build = model_builder(model)
    task = TaggingTask()
    batch = task.batches(0, 1, 8, pad_to=task.max_len)[0]
    torch.manual_seed(0)
    tagger = build(task, "fastnlp", packed=False)
    eager_loss = tagger(batch.tokens, batch.tags, batch.lengths)
    # fullgraph=True raises at the first call if TorchDynamo would break the graph.
    compiled = torch.compile(tagger, fullgraph=True, backend="aot_eager")
    optimizer = torch.optim.Adam(tagger.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = compiled(batch.tokens, batch.tags, batch.lengths)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    torch.testing.assert_close(torch.tensor(losses[0]), eager_loss.detach(), rtol=1e-5, atol=1e-4)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("model", ["bilstm_crf", "bert_bilstm_crf"])
def test_twins_compute_the_same_function(model, packed):
    """Unconstrained, the fastnlp model and its torch / pytorch-crf twin give
    the same loss, gradients and Viterbi paths, so the timing compares like with like."""
    build = model_builder(model)
    task = TaggingTask()
    batch = task.batches(3, 1, 6)[0]
    ours, theirs = make_twins(lambda kind: build(task, kind, packed=packed, constrained=False), seed=1)
    # Else this would compare torch with torch: the twins differ in their layers' origin.
    origins = [{type(m).__module__.split(".")[0] for m in tagger.modules()} for tagger in (ours, theirs)]
    assert "fastnlp" in origins[0] and "fastnlp" not in origins[1], origins
    losses, grads = [], []
    for tagger in (ours, theirs):
        loss = tagger(batch.tokens, batch.tags, batch.lengths)
        losses.append(loss)
        names, parameters = zip(*tagger.named_parameters())
        grads.append(dict(zip(names, torch.autograd.grad(loss, parameters))))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-4)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():
        assert ours.decode(batch.tokens, batch.lengths) == theirs.decode(batch.tokens, batch.lengths)


def test_task_is_well_formed():
    task = TaggingTask()
    batch = task.batches(0, 1, 64)[0]
    begins = {LABELS.index(f"B-{k}") for k in ("PER", "LOC", "ORG")}
    assert batch.lengths.min() >= task.min_len and batch.lengths.max() <= task.max_len
    for tokens, tags, n in zip(batch.tokens, batch.tags, batch.lengths.tolist()):
        assert (tokens[n:] == task.PAD).all() and (tokens[:n] != task.PAD).all()
        previous = "O"
        for tag in tags[:n].tolist():  # BIO: I-X only after B-X or I-X
            label = LABELS[tag]
            if label.startswith("I-"):
                assert previous[2:] == label[2:] and previous != "O"
            previous = label
    assert any(tag in begins for tag in batch.tags.flatten().tolist())


def test_span_f1():
    b_per, i_per, b_loc = LABELS.index("B-PER"), LABELS.index("I-PER"), LABELS.index("B-LOC")
    assert spans([0, b_per, i_per, 0, b_loc]) == {(1, 3, "PER"), (4, 5, "LOC")}
    assert spans([i_per, i_per]) == {(0, 2, "PER")}  # a stray I- opens a span
    assert span_f1([[b_per, i_per, 0]], [[b_per, i_per, 0]]) == (1.0, 1.0, 1.0)
    assert span_f1([[b_per, i_per, 0]], [[b_per, 0, 0]]) == (0.0, 0.0, 0.0)
    precision, recall, f1 = span_f1([[b_per, 0, b_loc]], [[b_per, 0, 0]])
    assert (precision, recall) == (1.0, 0.5) and abs(f1 - 2 / 3) < 1e-12
