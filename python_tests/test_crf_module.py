"""fastnlp.nn.CRF as a drop-in for pytorch-crf's torchcrf.CRF, and what it adds."""

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastnlp.nn import CRF, allowed_transitions

torchcrf = pytest.importorskip("torchcrf")

# pytorch-crf itself warns about uint8 conditions in torch.where; not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:where received a uint8 condition"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script.*` is deprecated:DeprecationWarning"),
]


def make_pair(num_tags, batch_first, seed=0):
    torch.manual_seed(seed)
    theirs = torchcrf.CRF(num_tags, batch_first=batch_first)
    ours = CRF(num_tags, batch_first=batch_first)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def make_inputs(seq_len, batch, num_tags, batch_first, seed=0, mask_dtype=torch.uint8):
    gen = torch.Generator().manual_seed(seed)
    emissions = torch.randn(seq_len, batch, num_tags, generator=gen)
    tags = torch.randint(num_tags, (seq_len, batch), generator=gen)
    lengths = torch.randint(1, seq_len + 1, (batch,), generator=gen)
    lengths[0] = seq_len
    mask = (torch.arange(seq_len).unsqueeze(1) < lengths).to(mask_dtype)  # prefix masks, as pytorch-crf needs
    if batch_first:
        emissions, tags, mask = emissions.transpose(0, 1), tags.transpose(0, 1), mask.transpose(0, 1)
    return emissions.contiguous(), tags.contiguous(), mask.contiguous()


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "token_mean"])
@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.bool, None])
def test_forward_and_gradients_equal_pytorch_crf(batch_first, reduction, mask_dtype):
    theirs, ours = make_pair(6, batch_first)
    emissions, tags, mask = make_inputs(11, 5, 6, batch_first, mask_dtype=mask_dtype or torch.uint8)
    if mask_dtype is None:
        mask = None
    e1, e2 = emissions.clone().requires_grad_(True), emissions.clone().requires_grad_(True)
    want = theirs(e1, tags, mask, reduction=reduction)
    got = ours(e2, tags, mask, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    want_grads = torch.autograd.grad(want.sum(), [e1, *theirs.parameters()])
    got_grads = torch.autograd.grad(got.sum(), [e2, *ours.parameters()])
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_double_backward_equals_pytorch_crf():
    # A gradient penalty on the emissions, through the loss as users write it.
    theirs, ours = make_pair(5, True)
    theirs.double(), ours.double()
    emissions, tags, mask = make_inputs(6, 3, 5, True)
    results = []
    for model in (theirs, ours):
        leaf = emissions.double().requires_grad_(True)
        (grad,) = torch.autograd.grad(-model(leaf, tags, mask), leaf, create_graph=True)
        results.append((grad,) + torch.autograd.grad(grad.pow(2).sum(), [leaf, *model.parameters()]))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)


@given(st.integers(1, 20), st.integers(1, 8), st.integers(1, 12), st.booleans(), st.integers(0, 2**16))
def test_decode_equals_pytorch_crf(seq_len, batch, num_tags, batch_first, seed):
    theirs, ours = make_pair(num_tags, batch_first, seed)
    emissions, _, mask = make_inputs(seq_len, batch, num_tags, batch_first, seed)
    assert ours.decode(emissions, mask) == theirs.decode(emissions, mask)
    assert ours.decode(emissions) == theirs.decode(emissions)


def test_benchmark_shape_log_likelihood_equals_pytorch_crf():
    # The brief's headline shape: rtol 1e-6 on the log-likelihood.
    theirs, ours = make_pair(20, True)
    emissions, tags, mask = make_inputs(64, 32, 20, True, seed=1)
    want = theirs(emissions, tags, mask, reduction="none")
    torch.testing.assert_close(ours(emissions, tags, mask, reduction="none"), want, rtol=1e-6, atol=0)


def test_state_dict_parameters_repr_and_init():
    theirs = torchcrf.CRF(7)
    ours = CRF(7)
    assert [name for name, _ in ours.named_parameters()] == [name for name, _ in theirs.named_parameters()]
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())  # strict: no extra or missing keys
    theirs.load_state_dict(ours.state_dict())
    assert repr(CRF(7)).startswith("CRF(num_tags=7")
    assert repr(CRF(7)) == repr(theirs)
    torch.manual_seed(0)
    fresh = CRF(50)
    for parameter in fresh.parameters():
        assert parameter.abs().max() < 0.1 and parameter.std() > 0.03  # uniform(-0.1, 0.1)
    # Constraints are buffers kept out of the state_dict, so checkpoints stay interchangeable.
    constrained = CRF(3, constraints=allowed_transitions("BIO", ["O", "B-X", "I-X"]))
    constrained.load_state_dict(torchcrf.CRF(3).state_dict())
    assert constrained.state_dict().keys() == torchcrf.CRF(3).state_dict().keys()


def test_errors_match_pytorch_crf():
    theirs, ours = make_pair(5, False)
    emissions, tags, mask = make_inputs(4, 3, 5, False)
    cases = [
        (lambda m: m(emissions[0], tags), "emissions must have dimension of 3, got 2"),
        (lambda m: m(torch.randn(4, 3, 6), tags), "expected last dimension of emissions is 5, got 6"),
        (lambda m: m(emissions, tags[:2]),
         r"the first two dimensions of emissions and tags must match, got \(4, 3\) and \(2, 3\)"),
        (lambda m: m(emissions, tags, mask[:2]),
         r"the first two dimensions of emissions and mask must match, got \(4, 3\) and \(2, 3\)"),
        (lambda m: m(emissions, tags, reduction="foo"), "invalid reduction: foo"),
        (lambda m: m.decode(emissions[0]), "emissions must have dimension of 3, got 2"),
        (lambda m: m.decode(emissions, mask[:, :1]),
         r"the first two dimensions of emissions and mask must match, got \(4, 3\) and \(4, 1\)"),
    ]
    for call, message in cases:
        for module in (theirs, ours):
            with pytest.raises(ValueError, match=message):
                call(module)
    for cls in (torchcrf.CRF, CRF):
        with pytest.raises(ValueError, match="invalid number of tags: 0"):
            cls(0)
    # Where pytorch-crf's checks pass and a torch op inside it fails, the same
    # error type as that op's (tags as an index, the mask as a condition).
    type_cases = [
        (lambda m: m(emissions, torch.full_like(tags, 5)), IndexError, r"tags must be in \[0, 5\)"),
        (lambda m: m(emissions, tags.double()), IndexError, "tags must be an int64 or int32 tensor"),
        (lambda m: m(emissions, tags.to(torch.int16)), IndexError, "tags must be an int64 or int32 tensor"),
        (lambda m: m(emissions, tags.to(torch.int8)), IndexError, "tags must be an int64 or int32 tensor"),
        (lambda m: m(emissions, tags, mask.float()), RuntimeError, "mask must be a bool or uint8 tensor"),
        (lambda m: m.decode(emissions, mask.to(torch.int8)), RuntimeError, "mask must be a bool or uint8 tensor"),
        (lambda m: m(emissions.to(torch.complex64), tags), RuntimeError, "emissions must be a real tensor"),
    ]
    for call, error, message in type_cases:
        with pytest.raises(error):
            call(theirs)
        with pytest.raises(error, match=message):
            call(ours)
    # (A tag of -5 is read by pytorch-crf as tag 0, Python's negative index;
    # fastnlp refuses it.)
    with pytest.raises(IndexError, match="got -5 at batch 0, position 0"):
        ours(emissions, torch.full_like(tags, -5))



def test_several_faults_raise_what_pytorch_crf_raises():
    """pytorch-crf checks shapes, then the reduction; dtypes fail later, in its
    ops. An input with two faults must raise the same type as there."""
    theirs, ours = make_pair(5, False)
    emissions, tags, mask = make_inputs(4, 3, 5, False)
    cases = [
        (lambda m: m(emissions, tags, mask.long(), reduction="foo"), ValueError, "invalid reduction: foo"),
        (lambda m: m(emissions, tags.double(), reduction="foo"), ValueError, "invalid reduction: foo"),
        (lambda m: m(emissions, tags.double(), mask[:2]), ValueError, "emissions and mask must match"),
        (lambda m: m(emissions, tags, mask.float()[:2]), ValueError, "emissions and mask must match"),
        (lambda m: m(emissions.to(torch.complex64), tags, mask[:2]), ValueError, "emissions and mask must match"),
    ]
    for call, error, message in cases:
        for module in (theirs, ours):
            with pytest.raises(error, match=message):
                call(module)

def test_torchscript():
    _, ours = make_pair(5, False)
    scripted = torch.jit.script(ours)
    emissions, tags, mask = make_inputs(6, 3, 5, False)
    torch.testing.assert_close(scripted(emissions, tags, mask), ours(emissions, tags, mask))
    torch.testing.assert_close(scripted(emissions, tags), ours(emissions, tags))
    assert scripted.decode(emissions, mask) == ours.decode(emissions, mask)
    e1, e2 = emissions.clone().requires_grad_(True), emissions.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(scripted(e1, tags, mask), e1)
    (want,) = torch.autograd.grad(ours(e2, tags, mask), e2)
    torch.testing.assert_close(grad, want)
    paths, scores = scripted.viterbi(emissions, mask)
    torch.testing.assert_close(scores, ours.viterbi(emissions, mask)[1])


def test_torch_compile_module_fullgraph():
    torch._dynamo.reset()
    _, ours = make_pair(5, True)
    emissions, tags, mask = make_inputs(6, 3, 5, True)

    def step(e):
        return -ours(e, tags, mask, reduction="mean")

    compiled = torch.compile(step, fullgraph=True)
    e1, e2 = emissions.clone().requires_grad_(True), emissions.clone().requires_grad_(True)
    loss, want = compiled(e1), step(e2)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(torch.autograd.grad(loss, e1)[0], torch.autograd.grad(want, e2)[0])


def test_viterbi_topk_and_marginals_follow_batch_first():
    for batch_first in (False, True):
        _, ours = make_pair(4, batch_first)
        emissions, tags, mask = make_inputs(5, 3, 4, batch_first)
        paths, scores = ours.viterbi(emissions, mask)
        assert paths.shape == tags.shape and scores.shape == (3,)
        assert ((paths >= 0) == mask.bool()).all()
        top_paths, top_scores = ours.viterbi_topk(emissions, 3, mask)
        assert top_paths.shape == (*tags.shape, 3) and top_scores.shape == (3, 3)
        assert torch.equal(top_paths[..., 0], paths)
        assert (top_scores[:, :-1] >= top_scores[:, 1:]).all()
        marginals = ours.marginals(emissions, mask)
        assert marginals.shape == emissions.shape
        torch.testing.assert_close(marginals.sum(-1), mask.float())


def is_legal_bio(path, labels):
    previous = "O"
    for tag in path:
        label = labels[tag]
        if label.startswith("I-") and previous[2:] != label[2:]:
            return False
        previous = label
    return True


def test_constraints_make_illegal_paths_impossible():
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    crf = CRF(5, batch_first=True, constraints=allowed_transitions("BIO", labels))
    with torch.no_grad():
        # Push hard towards I- tags, which are illegal after O and at the start.
        crf.transitions.normal_()
        emissions = torch.randn(4, 6, 5)
        emissions[..., 2] += 3
        emissions[..., 4] += 3
    for path in crf.decode(emissions):
        assert is_legal_bio(path, labels)
    top_paths, top_scores = crf.viterbi_topk(emissions, 10)
    for b, n in itertools.product(range(4), range(10)):
        assert is_legal_bio(top_paths[b, :, n].tolist(), labels) == bool(torch.isfinite(top_scores[b, n]))
    illegal = torch.tensor([[0, 2, 2, 0, 0, 0]])  # O I-PER
    legal = torch.tensor([[0, 1, 2, 0, 3, 4]])
    assert crf(emissions[:1], illegal).item() < -1e4
    assert torch.isfinite(crf(emissions[:1], legal))
    marginals = crf.marginals(emissions)
    assert (marginals[:, 0, [2, 4]] == 0).all()  # no sequence starts inside a chunk
    with pytest.raises(ValueError, match=r"constraints.start must have shape \(4,\) for num_tags=4"):
        CRF(4, constraints=allowed_transitions("BIO", labels))


def test_partial_labels_and_masks_that_do_not_start_on():
    _, ours = make_pair(4, True)
    emissions = torch.randn(2, 6, 4)
    # [CLS] w1 w2 ##piece w3 [SEP]: only the words take part.
    mask = torch.tensor([[False, True, True, False, True, False]] * 2)
    tags = torch.tensor([[-100, 1, 2, -100, 3, -100], [-100, 1, -100, -100, 3, -100]])
    llh = ours(emissions, tags, mask, reduction="none")
    words = emissions[:, [1, 2, 4]]
    full = ours(words[:1], tags[:1, [1, 2, 4]], reduction="none")
    torch.testing.assert_close(llh[:1], full)
    # An unknown middle word is summed out: the likelihood of the known two.
    partial = sum(ours(words[1:], torch.tensor([[1, k, 3]]), reduction="none").exp() for k in range(4)).log()
    torch.testing.assert_close(llh[1:], partial)
    paths, _ = ours.viterbi(emissions, mask)
    assert ours.decode(emissions, mask) == [paths[b][mask[b]].tolist() for b in range(2)]
    assert all(len(best) == 3 for best in ours.decode(emissions, mask))


def test_empty_mask_row_is_an_empty_sequence():
    _, ours = make_pair(3, True)
    emissions = torch.randn(2, 4, 3)
    mask = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.uint8)
    tags = torch.zeros(2, 4, dtype=torch.long)
    assert ours(emissions, tags, mask, reduction="none")[0].item() == 0
    assert ours.decode(emissions, mask)[0] == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_module(dtype):
    """Half-precision emissions: a float32 likelihood and a gradient in their
    dtype, both close to pytorch-crf's in float64 on the same rounded emissions."""
    theirs, ours = make_pair(4, True)
    theirs.double()
    emissions, tags, mask = make_inputs(5, 3, 4, True)
    low = emissions.to(dtype).requires_grad_(True)
    exact = low.detach().double().requires_grad_(True)
    llh = ours(low, tags, mask, reduction="none")
    want = theirs(exact, tags, mask, reduction="none")
    assert llh.dtype == torch.float32
    torch.testing.assert_close(llh.double(), want, rtol=1e-6, atol=1e-5)
    weights = torch.linspace(0.5, 1.5, llh.numel(), dtype=torch.float64)
    (grad,) = torch.autograd.grad((llh.double() * weights).sum(), low)
    (want_grad,) = torch.autograd.grad((want * weights).sum(), exact)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, want_grad.to(dtype))  # rounded once, from float32


@pytest.mark.parametrize("constrained", [False, True])
def test_scripted_module_state_dict_is_pytorch_crf_state_dict(constrained):
    # TorchScript keeps even non-persistent buffers in state_dict, so the
    # constraint masks must not be buffers for a checkpoint to load both ways.
    theirs, _ = make_pair(3, False)
    constraints = allowed_transitions("BIO", ["O", "B-X", "I-X"]) if constrained else None
    scripted = torch.jit.script(CRF(3, constraints=constraints))
    assert sorted(scripted.state_dict()) == sorted(theirs.state_dict())
    scripted.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(scripted.state_dict())


def test_constraint_masks_move_with_the_module():
    def constrained():
        return CRF(3, constraints=allowed_transitions("BIO", ["O", "B-X", "I-X"]))

    moved = constrained().to("meta")
    assert {mask.device.type for mask in (moved.allowed_start, moved.allowed_end, moved.allowed_transitions)} == {"meta"}
    # module.type(dtype) converts every tensor, bool ones too: the masks stay bool, and the module still runs.
    for converted in (constrained().double(), constrained().type(torch.float64)):
        assert converted.allowed_transitions.dtype == torch.bool
        assert not converted.allowed_transitions[0, 2]  # O -> I-X stays forbidden
        emissions = torch.randn(4, 2, 3, dtype=torch.float64)
        assert converted(emissions, torch.zeros(4, 2, dtype=torch.long)).isfinite()
        for path in converted.decode(emissions * 10):  # BIO: no I-X first, nor after O
            assert path[0] != 2 and (0, 2) not in set(zip(path, path[1:]))


def test_token_mean_counts_every_selected_position_of_a_uint8_mask():
    _, ours = make_pair(4, True)
    emissions, tags, mask = make_inputs(5, 3, 4, True)
    twos = mask * 2  # the kernels select every nonzero entry
    torch.testing.assert_close(ours(emissions, tags, twos, reduction="token_mean"),
                               ours(emissions, tags, mask, reduction="token_mean"))


def test_integer_emissions_are_scored_like_pytorch_crf():
    theirs, ours = make_pair(4, False)
    emissions, tags, mask = make_inputs(5, 3, 4, False)
    integers = (emissions * 3).round().long()
    torch.testing.assert_close(ours(integers, tags, mask), theirs(integers, tags, mask))
    assert ours.decode(integers, mask) == theirs.decode(integers, mask)
    # pytorch-crf's shape checks come first, whatever the dtype.
    with pytest.raises(ValueError, match="the first two dimensions of emissions and tags must match"):
        ours(integers, tags[:2])
    with pytest.raises(RuntimeError, match="emissions must be a real tensor"):
        ours(emissions.to(torch.complex64), tags)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_returns_scores_in_its_dtype(dtype):
    # As pytorch-crf's arithmetic would give; the kernels still accumulate in float32.
    _, ours = make_pair(4, True)
    emissions, tags, mask = make_inputs(5, 3, 4, True)
    want = ours(emissions.to(dtype).float(), tags, mask, reduction="none")
    low = ours.to(dtype)
    llh = low(emissions.to(dtype), tags, mask, reduction="none")
    assert llh.dtype == dtype
    torch.testing.assert_close(llh, want.to(dtype))
    # pytorch-crf divides by mask.float().sum(): its token mean is float32.
    theirs = torchcrf.CRF(4, batch_first=True).to(dtype)
    theirs.load_state_dict(low.state_dict())
    for reduction in ("none", "sum", "mean", "token_mean"):
        got = low(emissions.to(dtype), tags, mask, reduction=reduction)
        assert got.dtype == theirs(emissions.to(dtype), tags, mask, reduction=reduction).dtype, reduction
    paths, scores = low.viterbi(emissions.to(dtype), mask)
    assert scores.dtype == dtype and paths.dtype == torch.long
    assert low.marginals(emissions.to(dtype), mask).dtype == dtype


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("batch_first", [False, True])
def test_decode_with_non_finite_emissions_equals_pytorch_crf(bad, batch_first):
    # NaN and +inf make a sequence's scores NaN (see ops), but its decoded path
    # is still the one pytorch-crf's torch.max picks: NaN wins, first of equals.
    theirs, ours = make_pair(4, batch_first, seed=3)
    emissions, tags, mask = make_inputs(7, 5, 4, batch_first, seed=3)
    gen = torch.Generator().manual_seed(5)
    for row in range(5):
        position = int(torch.randint(0, int(mask.sum(1 if batch_first else 0)[row]), (1,), generator=gen))
        tag = int(torch.randint(0, 4, (1,), generator=gen))
        index = (row, position, tag) if batch_first else (position, row, tag)
        emissions[index] = bad
    assert ours.decode(emissions, mask) == theirs.decode(emissions, mask)
    llh = ours(emissions, tags, mask, reduction="none")
    assert torch.isnan(llh).all() if bad != float("-inf") else not torch.isnan(llh).any()


@pytest.mark.parametrize("seq_len", [1, 2])
def test_parameters_the_chain_never_uses_get_no_gradient(seq_len):
    # With one step no transition is scored: pytorch-crf leaves
    # transitions.grad None (so optimizers skip it: no weight decay, no
    # momentum step on a zero gradient), and so does fastnlp.
    theirs, ours = make_pair(4, False)
    emissions, tags, mask = make_inputs(seq_len, 3, 4, False)
    for module in (theirs, ours):
        module(emissions, tags, mask).backward()
    for name in ("start_transitions", "end_transitions", "transitions"):
        got, want = getattr(ours, name).grad, getattr(theirs, name).grad
        assert (got is None) == (want is None), name
        if want is not None:
            torch.testing.assert_close(got, want)
    assert (ours.transitions.grad is None) == (seq_len == 1)


def test_torch_func_transforms_differentiate_as_pytorch_crfs():
    """Under torch.func's differentiating transforms the ops run the reference
    (the kernels' C++ autograd is refused there): gradients, jvp and the
    Hessian (a second derivative, which the kernels do not have) of the
    log-likelihood equal pytorch-crf's in float64; decode is unchanged."""
    theirs, ours = make_pair(4, False)
    theirs, ours = theirs.double(), ours.double()
    emissions, tags, mask = make_inputs(5, 3, 4, False)
    emissions = emissions.double()

    def llh(module):
        return lambda e: module(e, tags, mask)

    tangent = torch.randn_like(emissions)
    for transform in (torch.func.grad, torch.func.hessian, lambda f: lambda e: torch.func.jvp(f, (e,), (tangent,))[1]):
        torch.testing.assert_close(transform(llh(ours))(emissions), transform(llh(theirs))(emissions))
    params = {name: p.detach() for name, p in ours.named_parameters()}
    got = torch.func.grad(lambda p: torch.func.functional_call(ours, p, (emissions, tags, mask)))(params)
    want = torch.func.grad(lambda p: torch.func.functional_call(theirs, p, (emissions, tags, mask)))(params)
    for name in params:
        torch.testing.assert_close(got[name], want[name])
    assert torch.func.vmap(lambda e: ours(e, tags, mask))(emissions.unsqueeze(0).repeat(2, 1, 1, 1)).shape == (2,)


@pytest.mark.parametrize("scheme", [None, "BIO", "BIOES"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_viterbi_scores_and_marginals_match_a_brute_force_enumeration(scheme, batch_first):
    """The module's Viterbi scores and marginals, under its constraints,
    against every path enumerated by hand: the best allowed path's score, and
    each tag's share of the allowed paths' exp-scores (BIOES has an end
    constraint, which BIO lacks)."""
    labels = ["O", "B-X", "I-X", "E-X", "S-X"] if scheme == "BIOES" else ["O", "B-X", "I-X", "B-Y", "I-Y"]
    constraints = allowed_transitions(scheme, labels) if scheme else None
    torch.manual_seed(1)
    crf = CRF(5, batch_first=batch_first, constraints=constraints)
    with torch.no_grad():
        for parameter in crf.parameters():
            parameter.normal_()
    allowed = [torch.as_tensor(m) for m in constraints] if scheme else [torch.ones(5, dtype=torch.bool),
                                                                        torch.ones(5, dtype=torch.bool),
                                                                        torch.ones(5, 5, dtype=torch.bool)]
    emissions, _, mask = make_inputs(4, 3, 5, batch_first, seed=2, mask_dtype=torch.bool)
    paths, scores = crf.viterbi(emissions, mask)
    marginals = crf.marginals(emissions, mask)
    by_sequence = (lambda t, b: t[b]) if batch_first else (lambda t, b: t[:, b])
    start, end, transitions = (t.detach().double() for t in (crf.start_transitions, crf.end_transitions,
                                                               crf.transitions))
    for b in range(3):
        e, length = by_sequence(emissions, b).double(), int(by_sequence(mask, b).sum())
        weights, best = torch.zeros(length, 5, dtype=torch.float64), float("-inf")
        total = 0.0
        for path in itertools.product(range(5), repeat=length):
            if not (allowed[0][path[0]] and allowed[1][path[-1]]
                    and all(allowed[2][a, c] for a, c in zip(path, path[1:]))):
                continue
            score = float(start[path[0]] + end[path[-1]] + sum(e[t, y] for t, y in enumerate(path))
                          + sum(transitions[a, c] for a, c in zip(path, path[1:])))
            best = max(best, score)
            total += math.exp(score)
            for t, y in enumerate(path):
                weights[t, y] += math.exp(score)
        torch.testing.assert_close(scores[b].double(), torch.tensor(best, dtype=torch.float64), rtol=1e-5,
                                   atol=1e-5)
        torch.testing.assert_close(by_sequence(marginals, b)[:length].double(), weights / total, rtol=1e-5,
                                   atol=1e-6)
        assert (by_sequence(marginals, b)[length:] == 0).all()
        assert (by_sequence(paths, b)[length:] == -1).all()
