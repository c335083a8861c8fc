"""The CRF ops (fastnlp.ops.crf_*) against brute-force enumeration and the
pure-PyTorch reference: values, gradients, dtypes, masks, partial labels,
errors, gradcheck, opcheck and torch.compile."""

import itertools
import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastnlp
from fastnlp import ops
from fastnlp.nn import allowed_transitions
from fastnlp.reference import crf as reference

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------
# Brute force: enumerate every path of one sequence, in float64.


def path_scores(emissions, mask, start, end, trans):
    """{path (tuple of tags over the selected positions): score} for one sequence."""
    positions = [t for t in range(emissions.shape[0]) if mask[t]]
    num_tags = emissions.shape[1]
    scores = {}
    for path in itertools.product(range(num_tags), repeat=len(positions)):
        if not path:
            scores[path] = 0.0
            continue
        score = float(start[path[0]]) + float(end[path[-1]])
        score += sum(float(emissions[t, y]) for t, y in zip(positions, path))
        score += sum(float(trans[a, b]) for a, b in zip(path, path[1:]))
        scores[path] = score
    return positions, scores


def logsumexp(values):
    values = list(values)
    top = max(values, default=NEG_INF)
    if top == NEG_INF:
        return NEG_INF
    return top + math.log(sum(math.exp(v - top) for v in values))


def brute_log_partition(emissions, mask, tags, start, end, trans):
    positions, scores = path_scores(emissions, mask, start, end, trans)

    def consistent(path):
        return tags is None or all(tags[t] < 0 or tags[t] == y for t, y in zip(positions, path))

    return logsumexp(s for p, s in scores.items() if consistent(p))


def brute_marginals(emissions, mask, start, end, trans):
    positions, scores = path_scores(emissions, mask, start, end, trans)
    log_z = logsumexp(scores.values())
    result = torch.zeros(emissions.shape, dtype=torch.float64)
    for path, score in scores.items():
        for t, y in zip(positions, path):
            result[t, y] += math.exp(score - log_z)
    return result


def random_problem(batch, seq_len, num_tags, dtype=torch.float64, device="cpu", seed=0, mask_kind="random",
                   scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    emissions = torch.randn(batch, seq_len, num_tags, generator=gen, dtype=torch.float64) * scale
    start = torch.randn(num_tags, generator=gen, dtype=torch.float64)
    end = torch.randn(num_tags, generator=gen, dtype=torch.float64)
    trans = torch.randn(num_tags, num_tags, generator=gen, dtype=torch.float64)
    if mask_kind == "random":
        mask = torch.rand(batch, seq_len, generator=gen) < 0.7
    elif mask_kind == "prefix":
        lengths = torch.randint(0, seq_len + 1, (batch,), generator=gen)
        mask = torch.arange(seq_len) < lengths.unsqueeze(1)
    else:
        mask = torch.ones(batch, seq_len, dtype=torch.bool)
    tags = torch.randint(0, num_tags, (batch, seq_len), generator=gen)
    tags[torch.rand(batch, seq_len, generator=gen) < 0.3] = -100  # unknown
    convert = dict(dtype=dtype, device=device)
    return (emissions.to(**convert), tags.to(device), mask.to(device), start.to(**convert), end.to(**convert),
            trans.to(**convert))


problems = st.tuples(st.integers(1, 3), st.integers(0, 5), st.integers(1, 4), st.integers(0, 2**16),
                     st.sampled_from(["random", "prefix", "full"]))


# ---------------------------------------------------------------------------
# Exact semantics on small problems, against enumeration of every path.


@given(problems)
def test_log_partition_gold_and_likelihood_match_enumeration(problem):
    batch, seq_len, num_tags, seed, mask_kind = problem
    emissions, tags, mask, start, end, trans = random_problem(batch, seq_len, num_tags, seed=seed,
                                                              mask_kind=mask_kind)
    log_z = ops.crf_log_partition(emissions, start, end, trans, mask)
    gold = ops.crf_gold_score(emissions, tags, start, end, trans, mask)
    llh = ops.crf_log_likelihood(emissions, tags, start, end, trans, mask)
    for b in range(batch):
        pinned = [int(t) if t >= 0 else -1 for t in tags[b]]
        expected_z = brute_log_partition(emissions[b], mask[b], None, start, end, trans)
        expected_gold = brute_log_partition(emissions[b], mask[b], pinned, start, end, trans)
        assert log_z[b].item() == pytest.approx(expected_z, abs=1e-9)
        assert gold[b].item() == pytest.approx(expected_gold, abs=1e-9)
        assert llh[b].item() == pytest.approx(expected_gold - expected_z, abs=1e-9)


@given(problems)
def test_marginals_match_enumeration(problem):
    batch, seq_len, num_tags, seed, mask_kind = problem
    emissions, _, mask, start, end, trans = random_problem(batch, seq_len, num_tags, seed=seed, mask_kind=mask_kind)
    result = ops.crf_marginals(emissions, start, end, trans, mask)
    for b in range(batch):
        torch.testing.assert_close(result[b], brute_marginals(emissions[b], mask[b], start, end, trans))


@given(problems)
def test_viterbi_matches_enumeration(problem):
    batch, seq_len, num_tags, seed, mask_kind = problem
    emissions, _, mask, start, end, trans = random_problem(batch, seq_len, num_tags, seed=seed, mask_kind=mask_kind)
    paths, scores = ops.crf_viterbi(emissions, start, end, trans, mask)
    for b in range(batch):
        positions, all_scores = path_scores(emissions[b], mask[b], start, end, trans)
        best = max(all_scores, key=all_scores.get)
        assert scores[b].item() == pytest.approx(all_scores[best], abs=1e-9)
        assert tuple(paths[b, positions].tolist()) == best
        unselected = ~mask[b]
        assert (paths[b][unselected] == -1).all()


@given(problems, st.integers(1, 6))
def test_viterbi_topk_matches_enumeration(problem, k):
    batch, seq_len, num_tags, seed, mask_kind = problem
    emissions, _, mask, start, end, trans = random_problem(batch, seq_len, num_tags, seed=seed, mask_kind=mask_kind)
    paths, scores = ops.crf_viterbi_topk(emissions, k, start, end, trans, mask)
    assert paths.shape == (batch, seq_len, k) and scores.shape == (batch, k)
    for b in range(batch):
        positions, all_scores = path_scores(emissions[b], mask[b], start, end, trans)
        ranked = sorted(all_scores.items(), key=lambda item: -item[1])
        for n in range(k):
            if n < len(ranked):
                path = tuple(paths[b, positions, n].tolist())
                assert scores[b, n].item() == pytest.approx(ranked[n][1], abs=1e-9)
                assert all_scores[path] == pytest.approx(scores[b, n].item(), abs=1e-9)
            else:
                assert scores[b, n].item() == NEG_INF
                assert (paths[b, :, n] == -1).all()
        found = [tuple(paths[b, positions, n].tolist()) for n in range(min(k, len(ranked)))]
        assert len(set(found)) == len(found), "k-best paths must be distinct"
        assert (paths[b][~mask[b]] == -1).all()


def test_reference_matches_enumeration():
    # The oracle itself is checked once, so kernel-vs-reference tests mean something.
    emissions, tags, mask, start, end, trans = random_problem(3, 5, 3, seed=7)
    tags = torch.where(tags == -100, torch.full_like(tags, -1), tags)
    tags = torch.where(mask, tags, torch.full_like(tags, -1))
    log_z = reference.log_partition(emissions, mask, None, start, end, trans)
    gold = reference.log_partition(emissions, mask, tags, start, end, trans)
    paths, _ = reference.viterbi(emissions, mask, start, end, trans)
    top_paths, top_scores = reference.viterbi_topk(emissions, mask, start, end, trans, 4)
    marg = reference.marginals(emissions, mask, start, end, trans)
    for b in range(3):
        positions, all_scores = path_scores(emissions[b], mask[b], start, end, trans)
        assert log_z[b].item() == pytest.approx(brute_log_partition(emissions[b], mask[b], None, start, end, trans))
        assert gold[b].item() == pytest.approx(
            brute_log_partition(emissions[b], mask[b], tags[b].tolist(), start, end, trans))
        assert tuple(paths[b, positions].tolist()) == max(all_scores, key=all_scores.get)
        ranked = sorted(all_scores.values(), reverse=True)[:4]
        assert top_scores[b, :len(ranked)].tolist() == pytest.approx(ranked)
        torch.testing.assert_close(marg[b], brute_marginals(emissions[b], mask[b], start, end, trans))


# ---------------------------------------------------------------------------
# Kernels against the reference on random shapes, values and gradients.


def likelihood_and_grads(emissions, tags, mask, start, end, trans, backend, ignore_index=-100):
    leaves = [x.detach().clone().requires_grad_(True) for x in (emissions, start, end, trans)]
    llh = ops.crf_log_likelihood(leaves[0], tags, leaves[1], leaves[2], leaves[3], mask, ignore_index=ignore_index,
                                 backend=backend)
    weights = torch.linspace(0.5, 1.5, llh.numel(), dtype=llh.dtype, device=llh.device)
    grads = torch.autograd.grad((llh * weights).sum(), leaves)
    return llh.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(st.integers(1, 5), st.integers(1, 12), st.integers(1, 7), st.integers(0, 2**16),
       st.sampled_from(["random", "prefix", "full"]))
def test_log_likelihood_and_gradients_match_reference(device, dtype, batch, seq_len, num_tags, seed, mask_kind):
    problem = random_problem(batch, seq_len, num_tags, dtype=dtype, device=device, seed=seed, mask_kind=mask_kind)
    assert_likelihood_matches_reference(problem, tolerance(dtype))


def tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


@given(st.integers(1, 5), st.integers(1, 12), st.integers(1, 7), st.integers(0, 2**16), st.integers(1, 4))
def test_decoding_matches_reference(device, batch, seq_len, num_tags, seed, k):
    emissions, _, mask, start, end, trans = random_problem(batch, seq_len, num_tags, dtype=torch.float32,
                                                           device=device, seed=seed)
    paths, scores = ops.crf_viterbi(emissions, start, end, trans, mask)
    ref_paths, ref_scores = ops.crf_viterbi(emissions, start, end, trans, mask, backend="reference")
    assert torch.equal(paths, ref_paths)
    torch.testing.assert_close(scores, ref_scores)
    top_paths, top_scores = ops.crf_viterbi_topk(emissions, k, start, end, trans, mask)
    ref_top_paths, ref_top_scores = ops.crf_viterbi_topk(emissions, k, start, end, trans, mask, backend="reference")
    torch.testing.assert_close(top_scores, ref_top_scores)
    assert torch.equal(top_paths, ref_top_paths)
    # k = 1 is plain Viterbi.
    assert torch.equal(top_paths[..., 0], paths)


# The CPU kernels work on vectors of columns (8 float32 or 4 float64 lanes, up
# to four vectors at a time, the last ones overlapping): tag counts on both
# sides of every block size, and integer scores, whose many exact ties must be
# broken as pytorch-crf breaks them (the lowest previous tag wins).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 70), st.integers(0, 2**16), st.booleans())
def test_wide_tag_sets_match_reference(device, dtype, batch, seq_len, num_tags, seed, integer_scores):
    problem = list(random_problem(batch, seq_len, num_tags, dtype=dtype, device=device, seed=seed))
    if integer_scores:
        for x in (0, 3, 4, 5):
            problem[x] = problem[x].mul(1.5).round()
    emissions, tags, mask, start, end, trans = problem
    paths, scores = ops.crf_viterbi(emissions, start, end, trans, mask)
    ref_paths, ref_scores = ops.crf_viterbi(emissions, start, end, trans, mask, backend="reference")
    assert torch.equal(paths, ref_paths)
    torch.testing.assert_close(scores, ref_scores)
    assert_likelihood_matches_reference(problem, tolerance(dtype))


def test_marginals_match_reference_and_sum_to_one(device):
    emissions, _, mask, start, end, trans = random_problem(4, 9, 6, device=device, seed=3)
    result = ops.crf_marginals(emissions, start, end, trans, mask)
    torch.testing.assert_close(result, ops.crf_marginals(emissions, start, end, trans, mask, backend="reference"))
    sums = result.sum(-1)
    torch.testing.assert_close(sums, mask.to(sums.dtype))


@pytest.mark.parametrize("dtype, scale", [(torch.float64, 1e10), (torch.float64, 1e20), (torch.float32, 1e4),
                                          (torch.float32, 1e5)])
def test_marginals_and_gradients_stay_exact_at_huge_score_magnitudes(dtype, scale):
    """At such magnitudes one tag dominates every position, and the reference
    (autograd through logsumexp) gives exact 0s and 1s. The CPU backward pass
    once formed alpha + beta - log Z, which cancels to ulp(|log Z|) (in float32
    for float32 inputs, whose saved log Z is float32): off by 1e-5 at 1e10 in
    float64, by 0.13 at 1e4 in float32, inf at 1e20. Each position is now
    normalised by its own sum."""
    emissions, tags, mask, start, end, trans = random_problem(6, 7, 4, dtype=dtype, seed=5)
    emissions = emissions * scale
    exact = [x.double() for x in (emissions, start, end, trans)]
    got = ops.crf_marginals(emissions, start, end, trans, mask)
    want = ops.crf_marginals(*exact, mask, backend="reference")
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    for op in (ops.crf_log_likelihood, ops.crf_log_partition):
        leaf, exact_leaf = emissions.clone().requires_grad_(), exact[0].clone().requires_grad_()
        args = (tags,) if op is ops.crf_log_likelihood else ()
        (grad,) = torch.autograd.grad(op(leaf, *args, start, end, trans, mask).sum(), leaf)
        (want_grad,) = torch.autograd.grad(op(exact_leaf, *args, *exact[1:], mask, backend="reference").sum(),
                                           exact_leaf)
        torch.testing.assert_close(grad.double(), want_grad, rtol=0, atol=1e-6)


def test_float32_marginals_are_not_limited_by_a_float32_log_partition():
    """crf_log_partition saves log Z in float32 for float32 inputs; the
    marginals are normalised per position instead, so its rounding (~2e-3 at
    |log Z| ~ 1e4 here) no longer enters. Measured: 4.4e-5 from float64, against
    2.0e-4 when the backward pass subtracted the saved log Z."""
    emissions, _, mask, start, end, trans = random_problem(32, 64, 20, dtype=torch.float32, seed=0,
                                                           mask_kind="full")
    emissions = emissions * 30
    got = ops.crf_marginals(emissions, start, end, trans, mask)
    want = ops.crf_marginals(*(x.double() for x in (emissions, start, end, trans)), mask, backend="reference")
    assert (got.double() - want).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_accumulate_in_float32(dtype):
    """Half-precision emissions with float32 parameters: results in float32 and
    as accurate as float32 arithmetic on the rounded emissions (the float64
    reference), where half-precision sums are off by 5e-3 (float16) to 2e-2. The
    likelihood's gradients: test_fused_likelihood_half_precision_gradients."""
    emissions, tags, mask, start, end, trans = random_problem(3, 10, 5, dtype=torch.float32, seed=11)
    low = emissions.to(dtype)
    exact = [x.double() for x in (low, start, end, trans)]
    llh = ops.crf_log_likelihood(low, tags, start, end, trans, mask)
    log_z = ops.crf_log_partition(low, start, end, trans, mask)
    marginals = ops.crf_marginals(low, start, end, trans, mask)
    assert llh.dtype == log_z.dtype == marginals.dtype == torch.float32
    want_llh = ops.crf_log_likelihood(exact[0], tags, *exact[1:], mask, backend="reference")
    torch.testing.assert_close(llh.double(), want_llh, rtol=1e-6, atol=1e-5)
    want_log_z = ops.crf_log_partition(*exact, mask, backend="reference")
    torch.testing.assert_close(log_z.double(), want_log_z, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(marginals.double(), ops.crf_marginals(*exact, mask, backend="reference"),
                               rtol=1e-5, atol=1e-6)
    paths, scores = ops.crf_viterbi(low, start, end, trans, mask)
    want_paths, want_scores = ops.crf_viterbi(*exact, mask, backend="reference")
    assert torch.equal(paths, want_paths)
    torch.testing.assert_close(scores.double(), want_scores, rtol=1e-6, atol=1e-5)


def test_long_sequences_stay_finite_and_exact():
    # T = 4096 with emissions of magnitude ~10: log Z ~ 4e4 must not overflow.
    emissions, tags, mask, start, end, trans = random_problem(2, 4096, 5, dtype=torch.float32, seed=5,
                                                              mask_kind="full", scale=10.0)
    llh = ops.crf_log_likelihood(emissions, tags, start, end, trans, mask)
    assert torch.isfinite(llh).all()
    exact = ops.crf_log_likelihood(emissions.double(), tags, start.double(), end.double(), trans.double(), mask,
                                   backend="reference")
    torch.testing.assert_close(llh.double(), exact, rtol=1e-5, atol=1e-2)
    log_z = ops.crf_log_partition(emissions.double(), start.double(), end.double(), trans.double(), mask)
    ref = reference.log_partition(emissions.double(), mask, None, start.double(), end.double(), trans.double())
    torch.testing.assert_close(log_z, ref)


@pytest.mark.parametrize("spread", [50.0, 400.0, 2000.0])
def test_extreme_scores_take_the_exact_fallback(spread):
    # Transition and emission ranges far beyond exp()'s range force the scaled
    # sums to underflow; the exact log-space fallback must keep results right.
    emissions, tags, mask, start, end, trans = random_problem(3, 8, 5, seed=13, scale=spread)
    trans = trans * spread
    start, end = start * spread, end * spread
    llh, grads = likelihood_and_grads(emissions, tags, mask, start, end, trans, backend=None)
    ref_llh, ref_grads = likelihood_and_grads(emissions, tags, mask, start, end, trans, backend="reference")
    torch.testing.assert_close(llh, ref_llh, rtol=1e-9, atol=1e-7)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)


def test_forbidden_transitions_give_zero_probability():
    emissions, _, mask, start, end, trans = random_problem(3, 6, 4, seed=17, mask_kind="full")
    trans = trans.clone()
    trans[0, 1] = NEG_INF       # 0 -> 1 is forbidden
    start = start.clone()
    start[2] = NEG_INF          # nothing starts with 2
    tags = torch.tensor([[0, 1, 0, 0, 0, 0], [2, 0, 0, 0, 0, 0], [3, 3, 3, 3, 3, 3]])
    llh = ops.crf_log_likelihood(emissions, tags, start, end, trans, mask)
    assert llh[0].item() == NEG_INF and llh[1].item() == NEG_INF and torch.isfinite(llh[2])
    marg = ops.crf_marginals(emissions, start, end, trans, mask)
    assert (marg[:, 0, 2] == 0).all()
    paths, _ = ops.crf_viterbi(emissions, start, end, trans, mask)
    top_paths, top_scores = ops.crf_viterbi_topk(emissions, 8, start, end, trans, mask)
    for path in [paths] + [top_paths[..., n] for n in range(8)]:
        assert (path[:, 0] != 2).all()
        assert not ((path[:, :-1] == 0) & (path[:, 1:] == 1)).any()
    assert torch.isfinite(top_scores).all()
    # Gradients of a legal gold path are finite even with -inf parameters around.
    leaves = [x.clone().requires_grad_(True) for x in (emissions, start, end, trans)]
    legal = ops.crf_log_likelihood(leaves[0][2:], tags[2:], leaves[1], leaves[2], leaves[3], mask[2:])
    for grad in torch.autograd.grad(legal.sum(), leaves):
        assert torch.isfinite(grad).all()


def test_masks_need_not_start_on():
    # A chain over scattered positions equals the same chain on compacted input.
    emissions, tags, _, start, end, trans = random_problem(1, 9, 4, seed=19)
    tags[tags < 0] = 0
    mask = torch.tensor([[False, True, True, False, False, True, False, True, False]])
    keep = mask[0].nonzero().flatten()
    compact = dict(emissions=emissions[:, keep], tags=tags[:, keep])
    llh = ops.crf_log_likelihood(emissions, tags, start, end, trans, mask)
    expected = ops.crf_log_likelihood(compact["emissions"], compact["tags"], start, end, trans)
    torch.testing.assert_close(llh, expected)
    paths, scores = ops.crf_viterbi(emissions, start, end, trans, mask)
    compact_paths, compact_scores = ops.crf_viterbi(compact["emissions"], start, end, trans)
    assert torch.equal(paths[:, keep], compact_paths) and (paths[:, ~mask[0]] == -1).all()
    torch.testing.assert_close(scores, compact_scores)


def test_empty_sequences():
    emissions, tags, _, start, end, trans = random_problem(2, 4, 3, seed=23)
    mask = torch.tensor([[False] * 4, [True, True, False, False]])
    llh = ops.crf_log_likelihood(emissions, tags.clamp(min=0), start, end, trans, mask)
    assert llh[0].item() == 0.0 and torch.isfinite(llh[1])
    paths, scores = ops.crf_viterbi(emissions, start, end, trans, mask)
    assert (paths[0] == -1).all() and scores[0].item() == 0.0
    _, top_scores = ops.crf_viterbi_topk(emissions, 3, start, end, trans, mask)
    assert top_scores[0].tolist() == [0.0, NEG_INF, NEG_INF]
    # Zero-sized batch and zero-length sequences: the kernels and the reference agree.
    for batch, seq_len in [(0, 4), (2, 0)]:
        e = torch.randn(batch, seq_len, 3, dtype=torch.float64)
        t = torch.zeros(batch, seq_len, dtype=torch.long)
        for backend in (None, "reference"):
            params = (start, end, trans)
            assert torch.equal(ops.crf_log_likelihood(e, t, *params, backend=backend), torch.zeros(batch).double())
            assert torch.equal(ops.crf_log_partition(e, *params, backend=backend), torch.zeros(batch).double())
            assert torch.equal(ops.crf_marginals(e, *params, backend=backend), torch.zeros_like(e))
            paths, scores = ops.crf_viterbi(e, *params, backend=backend)
            assert paths.shape == (batch, seq_len) and torch.equal(scores, torch.zeros(batch).double())


def test_partial_labels_marginalise_unknown_positions():
    emissions, _, mask, start, end, trans = random_problem(2, 5, 3, seed=29, mask_kind="full")
    all_unknown = torch.full((2, 5), -100)
    gold = ops.crf_gold_score(emissions, all_unknown, start, end, trans, mask)
    torch.testing.assert_close(gold, ops.crf_log_partition(emissions, start, end, trans, mask))
    llh = ops.crf_log_likelihood(emissions, all_unknown, start, end, trans, mask)
    torch.testing.assert_close(llh, torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)
    # A custom ignore_index works the same way.
    custom = torch.full((2, 5), 7)
    torch.testing.assert_close(ops.crf_gold_score(emissions, custom, start, end, trans, mask, ignore_index=7), gold)


# ---------------------------------------------------------------------------
# Bad input: a clear error before any kernel runs, never a crash.


def test_errors_name_the_argument():
    emissions, tags, mask, start, end, trans = random_problem(2, 4, 3, seed=31)
    tags = tags.clamp(min=0)
    with pytest.raises(IndexError, match="tags must be in \\[0, 3\\)"):
        ops.crf_log_likelihood(emissions, torch.full_like(tags, 3), start, end, trans)
    with pytest.raises(IndexError, match="got -1 at batch 0, position 0"):
        ops.crf_log_likelihood(emissions, torch.full_like(tags, -1), start, end, trans)
    with pytest.raises(ValueError, match="emissions must have dimension of 3"):
        ops.crf_log_partition(emissions[0], start, end, trans)
    with pytest.raises(ValueError, match="expected last dimension of emissions is 4, got 3"):
        ops.crf_log_partition(emissions, torch.zeros(4), torch.zeros(4), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="transitions must be a square"):
        ops.crf_log_partition(emissions, start, end, trans[:2])
    with pytest.raises(ValueError, match="start_transitions must have shape \\(3,\\)"):
        ops.crf_log_partition(emissions, start[:2], end, trans)
    with pytest.raises(RuntimeError, match="mask must be a bool or uint8"):
        ops.crf_log_partition(emissions, start, end, trans, mask.float())
    with pytest.raises(ValueError, match="the first two dimensions of emissions and mask must match"):
        ops.crf_log_partition(emissions, start, end, trans, mask[:, :2])
    with pytest.raises(ValueError, match="the first two dimensions of emissions and tags must match"):
        ops.crf_log_likelihood(emissions, tags[:1], start, end, trans)
    with pytest.raises(IndexError, match="tags must be an int64 or int32 tensor"):
        ops.crf_log_likelihood(emissions, tags.double(), start, end, trans)
    with pytest.raises(RuntimeError, match="emissions must be a real tensor"):
        ops.crf_log_partition(emissions.to(torch.complex64), start, end, trans)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        ops.crf_viterbi_topk(emissions, 0, start, end, trans)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.crf_log_partition(emissions, start, end, trans, backend="fast")


def test_kernel_refuses_out_of_range_tags_itself():
    # Called directly (as torch.compile does, past the Python checks), the
    # kernel still refuses an index it would read out of bounds.
    emissions, _, mask, start, end, trans = random_problem(1, 3, 3, seed=37, mask_kind="full")
    for bad in (3, -2):
        tags = torch.tensor([[0, bad, 1]])
        with pytest.raises(IndexError, match="tags must be in"):
            torch.ops.fastnlp.crf_log_partition(emissions, mask, tags, start, end, trans)


def test_backend_environment_variable(monkeypatch):
    emissions, tags, mask, start, end, trans = random_problem(2, 4, 3, seed=41)
    called = []
    original = reference.log_partition
    monkeypatch.setattr(reference, "log_partition", lambda *a: called.append(1) or original(*a))
    monkeypatch.setenv("FASTNLP_BACKEND", "reference")
    ops.crf_log_partition(emissions, start, end, trans, mask)
    assert called
    monkeypatch.setenv("FASTNLP_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTNLP_BACKEND must be one of"):
        ops.crf_log_partition(emissions, start, end, trans, mask)


@pytest.mark.parametrize("value", [None, "auto", "reference", "", "ref\udcffx"])  # the last: an undecodable byte
def test_backend_is_read_from_the_environment_as_os_environ_holds_it(monkeypatch, value):
    """use_reference reads FASTNLP_BACKEND through C getenv (cheaper than
    os.environ.get): it must see what os.environ writes, decoded the same way."""
    if value is None:
        monkeypatch.delenv("FASTNLP_BACKEND", raising=False)
    else:
        monkeypatch.setenv("FASTNLP_BACKEND", value)
    assert fastnlp._C.backend_from_environment() == os.environ.get("FASTNLP_BACKEND")


# ---------------------------------------------------------------------------
# PyTorch integration: gradcheck, opcheck, torch.compile.


def test_gradcheck_float64():
    emissions, tags, mask, start, end, trans = random_problem(3, 5, 4, seed=43)
    leaves = [x.clone().requires_grad_(True) for x in (emissions, start, end, trans)]

    def log_likelihood(e, s, n, t):
        return ops.crf_log_likelihood(e, tags, s, n, t, mask)

    def log_partition(e, s, n, t):
        return ops.crf_log_partition(e, s, n, t, mask)

    def gold_score(e, s, n, t):  # tags with unknown (-100) positions: the pinned-tags backward
        return ops.crf_gold_score(e, tags, s, n, t, mask)

    assert (tags == -100).any() and (tags >= 0).any()
    assert torch.autograd.gradcheck(log_likelihood, leaves)
    assert torch.autograd.gradcheck(log_partition, leaves)
    assert torch.autograd.gradcheck(gold_score, leaves)


@given(problems)
def test_gold_score_gradients_match_reference(device, problem):
    """crf_gold_score's own backward (crf_log_partition's, states pinned by the
    tags, unknown ones free), which the fused likelihood does not use."""
    batch, seq_len, num_tags, seed, mask_kind = problem
    emissions, tags, mask, start, end, trans = random_problem(batch, seq_len, num_tags, device=device, seed=seed,
                                                              mask_kind=mask_kind)
    results = []
    for backend in (None, "reference"):
        leaves = [x.clone().requires_grad_(True) for x in (emissions, start, end, trans)]
        gold = ops.crf_gold_score(leaves[0], tags, *leaves[1:], mask, backend=backend)
        weights = torch.linspace(0.5, 1.5, batch, dtype=gold.dtype, device=device)
        # materialize_grads: with no time step the reference's score does not depend on the emissions.
        grads = torch.autograd.grad((gold * weights).sum(), leaves, materialize_grads=True)
        results.append([gold] + list(grads))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def opcheck_samples(device):
    for seed, (batch, seq_len, num_tags), mask_kind in [(1, (3, 5, 4), "random"), (2, (2, 6, 1), "prefix"),
                                                        (3, (1, 1, 3), "full"), (4, (2, 0, 3), "full")]:
        for dtype in (torch.float32, torch.float64):
            emissions, tags, mask, start, end, trans = random_problem(batch, seq_len, num_tags, dtype=dtype,
                                                                      device=device, seed=seed, mask_kind=mask_kind)
            tags = torch.where(mask & (tags >= 0), tags, torch.full_like(tags, -1))
            yield emissions, tags, mask, start, end, trans
    # Strided views (as CRF(batch_first=False) passes its emissions): the
    # kernels' results are contiguous whatever the inputs' strides, and the
    # fake kernels must say the same, or compiled code asserts on them.
    emissions, tags, mask, start, end, trans = random_problem(3, 5, 4, device=device, seed=5, mask_kind="prefix")
    tags = torch.where(mask & (tags >= 0), tags, torch.full_like(tags, -1))
    yield _strided(emissions, 0, 1), tags, mask, start, end, _strided(trans, 0, 1)


def _strided(x, dim0, dim1):
    """x's values in a non-contiguous view (dims dim0 and dim1 swapped in memory)."""
    return x.transpose(dim0, dim1).contiguous().transpose(dim0, dim1)


def test_opcheck(device):
    for emissions, tags, mask, start, end, trans in opcheck_samples(device):
        leaves = [x.clone().requires_grad_(True) for x in (emissions, start, end, trans)]
        for pinned in (None, tags):
            args = (leaves[0], mask, pinned, leaves[1], leaves[2], leaves[3])
            torch.library.opcheck(torch.ops.fastnlp.crf_log_partition.default, args)
            log_z, alpha = torch.ops.fastnlp.crf_log_partition(emissions, mask, pinned, start, end, trans)
            torch.library.opcheck(torch.ops.fastnlp.crf_log_partition_backward.default,
                                  (torch.ones_like(log_z), emissions, mask, pinned, start, end, trans, alpha, log_z))
        torch.library.opcheck(torch.ops.fastnlp.crf_viterbi.default, (emissions, mask, start, end, trans))
        torch.library.opcheck(torch.ops.fastnlp.crf_viterbi_topk.default, (emissions, mask, start, end, trans, 3))


def test_gold_score_under_torch_compile_refuses_a_selected_minus_one():
    # Eager code checks tags before the kernel; compiled, the kernel's own check
    # must still see a -1 that is not ignore_index as out of range, not "free".
    torch._dynamo.reset()
    emissions, tags, mask, start, end, trans = random_problem(2, 4, 3, seed=67)
    tags = tags.clamp(min=0)
    tags[0, 0] = -1
    mask[0, 0] = True
    compiled = torch.compile(ops.crf_gold_score, fullgraph=True, backend="aot_eager")
    with pytest.raises(IndexError, match="tags must be in \\[0, 3\\)"):
        ops.crf_gold_score(emissions, tags, start, end, trans, mask)
    with pytest.raises(IndexError, match="tags must be in \\[0, 3\\)"):
        compiled(emissions, tags, start, end, trans, mask)
    # With ignore_index=-1 the same tag is unknown, compiled or not.
    torch.testing.assert_close(compiled(emissions, tags, start, end, trans, mask, ignore_index=-1),
                               ops.crf_gold_score(emissions, tags, start, end, trans, mask, ignore_index=-1))


@pytest.mark.parametrize("k", [True, 2.0, torch.tensor(2)])
def test_viterbi_topk_refuses_a_k_that_is_not_an_int(k):
    emissions, _, mask, start, end, trans = random_problem(2, 4, 3, seed=71)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        ops.crf_viterbi_topk(emissions, k, start, end, trans, mask)


def test_reference_gradients_are_finite_where_constraints_leave_states_unreachable():
    # A column of -inf transitions made the reference's logsumexp backward 0 / 0.
    allowed = allowed_transitions("BIO", ["O", "B-X", "I-X"])
    emissions, _, mask, start, end, trans = random_problem(3, 5, 3, dtype=torch.float64, seed=73)
    start = start.masked_fill(~torch.as_tensor(allowed.start), NEG_INF)
    end = end.masked_fill(~torch.as_tensor(allowed.end), NEG_INF)
    trans = trans.masked_fill(~torch.as_tensor(allowed.transitions), NEG_INF)
    tags = torch.zeros(3, 5, dtype=torch.long)  # all O: allowed
    llh, grads = likelihood_and_grads(emissions, tags, mask, start, end, trans, backend="reference")
    ref_llh, ref_grads = likelihood_and_grads(emissions, tags, mask, start, end, trans, backend=None)
    assert all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(llh, ref_llh)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("partial_labels", [False, True])
def test_nan_or_inf_score_makes_its_sequence_nan(device, dtype, bad, partial_labels):
    # log Z of a +inf or NaN score is undefined: that sequence's results and
    # gradients are NaN (the parameter gradients, summed over the batch, too);
    # the other sequences, and values at unselected positions, are untouched.
    # (The CUDA kernels' share of this is also checked without a GPU, in
    # test_cuda_emulated.py.)
    emissions, tags, mask, start, end, trans = random_problem(3, 6, 4, dtype=dtype, device=device, seed=79,
                                                              mask_kind="full")
    if not partial_labels:
        tags = tags.clamp(min=0)
    mask[2, 4] = False
    poisoned = emissions.clone()
    poisoned[1, 3, 2] = bad
    poisoned[2, 4, 0] = float("nan")  # not selected: ignored
    emissions[2, 4, 0] = 0.0
    args = (start, end, trans, mask)

    llh, grads = likelihood_and_grads(poisoned, tags, mask, start, end, trans, backend=None)
    clean_llh, clean_grads = likelihood_and_grads(emissions, tags, mask, start, end, trans, backend=None)
    others = [0, 2]
    assert torch.isnan(llh[1])
    torch.testing.assert_close(llh[others], clean_llh[others])
    assert torch.isnan(grads[0][1]).all()
    torch.testing.assert_close(grads[0][others], clean_grads[0][others])
    for grad in grads[1:]:
        assert torch.isnan(grad).all()

    for score in (ops.crf_log_partition(poisoned, *args), ops.crf_gold_score(poisoned, tags, *args)):
        assert torch.isnan(score[1]) and torch.isfinite(score[others]).all()
    leaf = poisoned.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(ops.crf_log_partition(leaf, *args).sum(), leaf)
    assert torch.isnan(grad[1]).all() and torch.isfinite(grad[others]).all()
    marginals = ops.crf_marginals(poisoned, *args)
    assert torch.isnan(marginals[1]).all()
    torch.testing.assert_close(marginals[others], ops.crf_marginals(emissions, *args)[others])

    paths, scores = ops.crf_viterbi(poisoned, *args)
    clean_paths, clean_scores = ops.crf_viterbi(emissions, *args)
    assert torch.isnan(scores[1]) and torch.equal(paths[others], clean_paths[others])
    torch.testing.assert_close(scores[others], clean_scores[others])
    _, top_scores = ops.crf_viterbi_topk(poisoned, 3, *args)
    assert torch.isnan(top_scores[1]).all() and not torch.isnan(top_scores[others]).any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_transition_parameter_makes_every_sequence_nan(device, bad):
    emissions, tags, mask, start, end, trans = random_problem(2, 5, 3, device=device, seed=83, mask_kind="full")
    trans = trans.clone()
    trans[1, 2] = bad
    llh, grads = likelihood_and_grads(emissions, tags, mask, start, end, trans, backend=None)
    assert torch.isnan(llh).all() and all(torch.isnan(grad).all() for grad in grads)
    assert torch.isnan(ops.crf_log_partition(emissions, start, end, trans, mask)).all()
    assert torch.isnan(ops.crf_viterbi(emissions, start, end, trans, mask)[1]).all()


@pytest.mark.parametrize("op", ["log_likelihood", "log_partition", "gold_score"])
@pytest.mark.parametrize("mask_kind", ["random", "prefix"])
def test_gradgradcheck(op, mask_kind):
    # With create_graph=True the backward pass runs the reference (see
    # fastnlp/ops/_double_backward.py): second derivatives for a gradient
    # penalty or a Hessian-vector product, with unknown tags (-100) among
    # the known ones.
    emissions, tags, mask, start, end, trans = random_problem(2, 4, 3, seed=89, mask_kind=mask_kind)
    leaves = [x.clone().requires_grad_(True) for x in (emissions, start, end, trans)]
    function = {"log_likelihood": lambda e, s, n, t: ops.crf_log_likelihood(e, tags, s, n, t, mask),
                "log_partition": lambda e, s, n, t: ops.crf_log_partition(e, s, n, t, mask),
                "gold_score": lambda e, s, n, t: ops.crf_gold_score(e, tags, s, n, t, mask)}[op]
    assert torch.autograd.gradgradcheck(function, leaves)
    # gradgradcheck differentiates whatever first-order gradients the recorded
    # backward returns; that they are the kernel's is checked here.
    weights = torch.tensor([0.7, 1.3], dtype=torch.float64)
    recorded = torch.autograd.grad((function(*leaves) * weights).sum(), leaves, create_graph=True)
    plain = torch.autograd.grad((function(*leaves) * weights).sum(), leaves)
    for got, want in zip(recorded, plain):
        torch.testing.assert_close(got.detach(), want)


@given(problem=problems, op=st.sampled_from(["log_likelihood", "log_partition", "gold_score"]))
def test_recorded_backward_equals_the_kernels_over_random_problems(problem, op):
    # With create_graph=True the gradients are the reference's, recomputed
    # from the op's arguments (unknown tags, masks that are not prefixes,
    # empty chains among them): they must be the kernel's.
    batch, seq_len, num_tags, seed, mask_kind = problem
    emissions, tags, mask, start, end, trans = random_problem(batch, seq_len, num_tags, seed=seed,
                                                              mask_kind=mask_kind)
    inputs = [x.clone().requires_grad_(True) for x in (emissions, start, end, trans)]
    function = {"log_likelihood": lambda e, s, n, t: ops.crf_log_likelihood(e, tags, s, n, t, mask),
                "log_partition": lambda e, s, n, t: ops.crf_log_partition(e, s, n, t, mask),
                "gold_score": lambda e, s, n, t: ops.crf_gold_score(e, tags, s, n, t, mask)}[op]
    weights = torch.linspace(0.5, 1.5, batch, dtype=torch.float64)
    recorded = torch.autograd.grad((function(*inputs) * weights).sum(), inputs, create_graph=True)
    plain = torch.autograd.grad((function(*inputs) * weights).sum(), inputs)
    for got, want in zip(recorded, plain):
        torch.testing.assert_close(got.detach(), want)


def test_double_backward_equals_the_reference_backends():
    emissions, tags, mask, start, end, trans = random_problem(3, 5, 4, seed=90)

    def penalty_gradients(backend):
        leaves = [x.clone().requires_grad_(True) for x in (emissions, start, end, trans)]
        weight = torch.linspace(0.5, 1.5, 3, dtype=torch.float64, requires_grad=True)
        llh = ops.crf_log_likelihood(leaves[0], tags, *leaves[1:], mask, backend=backend)
        # The weight is applied after the op: its second derivative runs back
        # through the op's backward via the gradient reaching the op.
        grads = torch.autograd.grad((weight * llh).sum(), leaves, create_graph=True)
        return grads + torch.autograd.grad(sum(g.pow(2).sum() for g in grads), leaves + [weight])

    for got, want in zip(penalty_gradients(None), penalty_gradients("reference")):
        torch.testing.assert_close(got, want)


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    emissions, tags, mask, start, end, trans = random_problem(3, 7, 4, dtype=torch.float32, seed=47)
    tags = tags.clamp(min=0)

    def loss_and_decode(e, s, n, t):
        llh = ops.crf_log_likelihood(e, tags, s, n, t, mask)
        paths, _ = ops.crf_viterbi(e, s, n, t, mask)
        return -llh.mean(), paths

    compiled = torch.compile(loss_and_decode, fullgraph=True, backend="aot_eager")
    eager_leaves = [x.clone().requires_grad_(True) for x in (emissions, start, end, trans)]
    compiled_leaves = [x.clone().requires_grad_(True) for x in (emissions, start, end, trans)]
    eager_loss, eager_paths = loss_and_decode(*eager_leaves)
    loss, paths = compiled(*compiled_leaves)
    torch.testing.assert_close(loss, eager_loss)
    assert torch.equal(paths, eager_paths)
    for got, want in zip(torch.autograd.grad(loss, compiled_leaves), torch.autograd.grad(eager_loss, eager_leaves)):
        torch.testing.assert_close(got, want)


def test_build_info_reports_backends():
    info = fastnlp.build_info()
    assert info["cpu"] is True
    assert info["torch_version"] == torch.__version__


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_far_below_the_best_that_later_dominates(dtype):
    # At t=0 state 1 is 1000 nats behind state 0, so exp-space sums that are
    # scaled by the best state underflow to zero for it; but no path may switch
    # state and state 0's later emissions are far worse, so state 1's chain is
    # the one that matters. Only the exact log-space fallback gets this right.
    emissions = torch.tensor([[[0.0, -1000.0], [-3000.0, 0.0], [-3000.0, 0.0]]], dtype=dtype)
    transitions = torch.tensor([[0.0, NEG_INF], [NEG_INF, 0.0]], dtype=dtype)
    start = end = torch.zeros(2, dtype=dtype)
    log_z = ops.crf_log_partition(emissions, start, end, transitions)
    assert log_z.item() == pytest.approx(-1000.0, abs=1e-3)
    marginals = ops.crf_marginals(emissions, start, end, transitions)
    torch.testing.assert_close(marginals[0, :, 1], torch.ones(3, dtype=dtype))
    paths, scores = ops.crf_viterbi(emissions, start, end, transitions)
    assert paths.tolist() == [[1, 1, 1]] and scores.item() == pytest.approx(-1000.0)


# ---------------------------------------------------------------------------
# The fused crf_log_likelihood op (gold score and log Z in one pass) against
# the reference, including what its scaled recursions must get exactly right.


def constrained_problem(batch, seq_len, num_tags, dtype, device, seed, mask_kind, forbid):
    """random_problem with a fraction `forbid` of the transition scores at -inf."""
    emissions, tags, mask, start, end, trans = random_problem(batch, seq_len, num_tags, dtype=dtype, device=device,
                                                              seed=seed, mask_kind=mask_kind)
    gen = torch.Generator().manual_seed(seed + 1)
    forbidden = torch.rand(num_tags, num_tags, generator=gen) < forbid
    trans = trans.masked_fill(forbidden.to(device), NEG_INF)
    start = start.masked_fill((torch.rand(num_tags, generator=gen) < forbid / 2).to(device), NEG_INF)
    end = end.masked_fill((torch.rand(num_tags, generator=gen) < forbid / 2).to(device), NEG_INF)
    if batch > 1:  # one empty row
        mask = mask.clone()
        mask[-1] = False
    return emissions, tags, mask, start, end, trans


def two_pass_likelihood_and_grads(emissions, tags, mask, start, end, trans, ignore_index=-100):
    """gold - log Z from two crf_log_partition calls: what crf_log_likelihood computed before the fused op."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (emissions, start, end, trans)]
    pinned = torch.where(mask & (tags != ignore_index), tags, -1)
    llh = (torch.ops.fastnlp.crf_log_partition(leaves[0], mask, pinned, *leaves[1:])[0]
           - torch.ops.fastnlp.crf_log_partition(leaves[0], mask, None, *leaves[1:])[0])
    weights = torch.linspace(0.5, 1.5, llh.numel(), dtype=llh.dtype, device=llh.device)
    return llh.detach(), torch.autograd.grad((llh * weights).sum(), leaves)


def assert_likelihood_matches_reference(problem, tol, ignore_index=-100):
    emissions, tags, mask, start, end, trans = problem
    got = likelihood_and_grads(emissions, tags, mask, start, end, trans, backend=None, ignore_index=ignore_index)
    want = likelihood_and_grads(emissions, tags, mask, start, end, trans, backend="reference",
                                ignore_index=ignore_index)
    # equal_nan: a sequence without any path is NaN (-inf - -inf) in both.
    torch.testing.assert_close(got[0], want[0], equal_nan=True, **tol)
    # The gradients are finite in both, impossible sequences included (they
    # get zero gradient): the reference's log-sum-exp passes none through a
    # column of -inf.
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(st.integers(1, 5), st.integers(1, 12), st.integers(1, 7), st.integers(0, 2**16),
       st.sampled_from(["random", "prefix", "full"]), st.sampled_from([0.0, 0.3, 0.6]))
def test_fused_likelihood_with_constraints_partial_labels_and_empty_rows(device, dtype, batch, seq_len, num_tags,
                                                                          seed, mask_kind, forbid):
    problem = constrained_problem(batch, seq_len, num_tags, dtype, device, seed, mask_kind, forbid)
    assert_likelihood_matches_reference(problem, tolerance(dtype))


def test_fused_likelihood_custom_ignore_index_inside_the_tag_range():
    # ignore_index 0 makes tag 0 "unknown" wherever it appears.
    emissions, tags, mask, start, end, trans = random_problem(4, 9, 5, seed=53)
    tags = tags.clamp(min=0)
    assert (tags == 0).any()
    assert_likelihood_matches_reference((emissions, tags, mask, start, end, trans),
                                        dict(rtol=1e-10, atol=1e-10), ignore_index=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_likelihood_half_precision_gradients(dtype):
    emissions, tags, mask, start, end, trans = random_problem(3, 10, 5, dtype=torch.float32, seed=59)
    low = emissions.to(dtype)
    llh, grads = likelihood_and_grads(low, tags, mask, start, end, trans, backend=None)
    ref_llh, ref_grads = likelihood_and_grads(low.float(), tags, mask, start, end, trans, backend="reference")
    assert llh.dtype == torch.float32 and grads[0].dtype == dtype
    torch.testing.assert_close(llh, ref_llh, rtol=1e-5, atol=1e-5)
    # The gradient is rounded to the emissions' dtype once, from float32.
    torch.testing.assert_close(grads[0], ref_grads[0].to(dtype))
    for got, want in zip(grads[1:], ref_grads[1:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fused_likelihood_long_sequence_gradients_match_float64_reference():
    # T = 4096, emissions of magnitude ~10: the per-step scaling must keep the
    # forward and backward variables finite and the marginals exact.
    emissions, tags, mask, start, end, trans = random_problem(2, 4096, 5, dtype=torch.float64, seed=61,
                                                              mask_kind="prefix", scale=10.0)
    mask[0] = True
    llh, grads = likelihood_and_grads(emissions.float(), tags, mask, start.float(), end.float(), trans.float(),
                                      backend=None)
    ref_llh, ref_grads = likelihood_and_grads(emissions, tags, mask, start, end, trans, backend="reference")
    assert torch.isfinite(llh).all()
    torch.testing.assert_close(llh.double(), ref_llh, rtol=1e-6, atol=1e-3)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    _, _, exact = torch.ops.fastnlp.crf_log_likelihood(emissions, mask, tags, start, end, trans, -100)
    assert not exact.any(), "magnitude-10 emissions must stay on the scaled path"


def float64_likelihood_and_grads(emissions, tags, mask, start, end, trans):
    """The fused kernel in float64 (within 1e-10 of the reference, tested above)."""
    return likelihood_and_grads(emissions.double(), tags, mask, start.double(), end.double(), trans.double(),
                                backend=None)


def assert_float32_near_float64(problem, llh_rtol=2e-7, grad_rtol=5e-7):
    """float32 results within llh_rtol of the float64 kernel's log-likelihood, and
    gradients within grad_rtol of each gradient's largest entry: a few float32
    roundings, which the scaled float32 recursions must keep to."""
    got = likelihood_and_grads(*problem, backend=None)
    want = float64_likelihood_and_grads(*problem)
    torch.testing.assert_close(got[0].double(), want[0], rtol=llh_rtol, atol=0)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g.double(), w, rtol=0, atol=grad_rtol * float(w.abs().max()))


@pytest.mark.parametrize("shape", [(8, 64, 50, 1.0), (2, 4096, 5, 1.0), (2, 1024, 20, 3.0)])
def test_float32_likelihood_runs_in_float32_at_float64_accuracy(shape):
    # float32 emissions whose scores fit float32's bound keep their scaled rows
    # in float32 (saved, none recomputed). Long chains (thousands of steps,
    # whose transition gradients sum over all of them) included.
    batch, seq_len, num_tags, scale = shape
    problem = random_problem(batch, seq_len, num_tags, dtype=torch.float32, seed=71, mask_kind="full", scale=scale)
    emissions, tags, mask, start, end, trans = problem
    _, alpha, exact = torch.ops.fastnlp.crf_log_likelihood(emissions, mask, tags, start, end, trans, -100)
    assert alpha.dtype == torch.float32 and not exact.any()
    assert_float32_near_float64(problem)


@given(st.integers(1, 4), st.integers(1, 40), st.integers(1, 12), st.integers(0, 2**16),
       st.sampled_from(["random", "prefix", "full"]), st.sampled_from([1.0, 10.0, 40.0, 400.0]))
def test_float32_likelihood_matches_float64_at_every_score_spread(batch, seq_len, num_tags, seed, mask_kind, scale):
    # Spreads from a few nats (the float32 tier) through tens (the double
    # tier) to hundreds (the exact path), with partial tags: whichever path a
    # float32 sequence takes, it agrees with the float64 kernel to float32
    # rounding.
    problem = random_problem(batch, seq_len, num_tags, dtype=torch.float32, seed=seed, mask_kind=mask_kind,
                             scale=scale)
    got = likelihood_and_grads(*problem, backend=None)
    want = float64_likelihood_and_grads(*problem)
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-6, atol=1e-6, equal_nan=True)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g.double(), w, rtol=0, atol=1e-6 * max(1.0, float(w.abs().max())))


def test_float32_likelihood_widens_per_sequence():
    # Per float32 sequence: scores within float32's bound run in float32;
    # ranges of ~60 nats in double (recomputed by the backward pass); ranges
    # of thousands of nats in exact log space. All three in one batch, with
    # partial tags (pinned chains) and constraints (zero weights).
    emissions, tags, mask, start, end, trans = random_problem(3, 12, 6, dtype=torch.float32, seed=73,
                                                              mask_kind="random")
    trans = trans.clone()
    trans[0, 1] = trans[2, 3] = float("-inf")
    emissions = emissions.clone()
    emissions[1] *= 15.0
    emissions[2] *= 1000.0
    mask[:, 0] = True
    _, _, exact = torch.ops.fastnlp.crf_log_likelihood(emissions, mask, tags, start, end, trans, -100)
    assert exact.tolist() == [False, True, True]
    problem = (emissions, tags, mask, start, end, trans)
    assert_float32_near_float64(problem)
    assert_likelihood_matches_reference(tuple(x.double() if x.is_floating_point() else x for x in problem),
                                        dict(rtol=1e-9, atol=1e-7))


def test_float32_likelihood_leaves_float32_when_a_row_max_is_tiny():
    # Every factor here fits float32's bound (>= 1e-12), but the only path
    # through position 1 has weight e^-27 * e^-27: its row's max is ~3e-24,
    # and products with that row would leave float32's normal range a step
    # later. The float32 tier must hand such a sequence to the double tier.
    ninf = float("-inf")
    start, end = torch.tensor([0.0, ninf, ninf]), torch.zeros(3)
    trans = torch.tensor([[ninf, -27.0, ninf], [-27.0, -27.0, ninf], [0.0, 0.0, 0.0]])
    emissions = torch.tensor([[[0.0, 0.0, 0.0], [0.0, -27.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    mask, tags = torch.ones(1, 4, dtype=torch.bool), torch.tensor([[0, 1, 0, 1]])
    _, _, exact32 = torch.ops.fastnlp.crf_log_likelihood(emissions, mask, tags, start, end, trans, -100)
    problem64 = [x.double() for x in (emissions, start, end, trans)]
    _, _, exact64 = torch.ops.fastnlp.crf_log_likelihood(problem64[0], mask, tags, *problem64[1:], -100)
    assert exact32.tolist() == [True] and exact64.tolist() == [False]
    assert_float32_near_float64((emissions, tags, mask, start, end, trans))


def test_fused_likelihood_falls_back_per_sequence():
    # One sequence with emission ranges of thousands of nats needs the exact
    # log-space path; its neighbours stay on the scaled one, and all are right.
    emissions, tags, mask, start, end, trans = random_problem(3, 8, 4, seed=67, mask_kind="full")
    emissions = emissions.clone()
    emissions[1] *= 1000.0
    _, _, exact = torch.ops.fastnlp.crf_log_likelihood(emissions, mask, torch.where(tags < 0, 0, tags), start, end,
                                                       trans, -100)
    assert exact.tolist() == [False, True, False]
    assert_likelihood_matches_reference((emissions, tags, mask, start, end, trans), dict(rtol=1e-9, atol=1e-7))


def test_fused_likelihood_impossible_sequences_match_the_two_pass_result():
    # No path at all (every start forbidden) and a gold path through a
    # forbidden transition: same values and gradients as gold - log Z from
    # crf_log_partition, which the op replaced.
    emissions, tags, mask, start, end, trans = random_problem(3, 6, 4, seed=71, mask_kind="full")
    tags = tags.clamp(min=0)
    trans = trans.clone()
    trans[tags[1, 0], tags[1, 1]] = NEG_INF
    llh, grads = likelihood_and_grads(emissions, tags, mask, start, end, trans, backend=None)
    two_pass, two_pass_grads = two_pass_likelihood_and_grads(emissions, tags, mask, start, end, trans)
    torch.testing.assert_close(llh, two_pass)
    for got, want in zip(grads, two_pass_grads):
        torch.testing.assert_close(got, want)
    assert llh[1].item() == NEG_INF
    assert_likelihood_matches_reference((emissions, tags, mask, start, end, trans), dict(rtol=1e-10, atol=1e-10))
    impossible = start.clone().fill_(NEG_INF)
    llh = ops.crf_log_likelihood(emissions, tags, impossible, end, trans, mask)
    two_pass = (ops.crf_gold_score(emissions, tags, impossible, end, trans, mask)
                - ops.crf_log_partition(emissions, impossible, end, trans, mask))
    torch.testing.assert_close(llh, two_pass, equal_nan=True)
    assert_likelihood_matches_reference((emissions, tags, mask, impossible, end, trans), dict(rtol=1e-10, atol=1e-10))


def test_fused_likelihood_gradcheck_with_constraints_and_partial_labels():
    emissions, tags, mask, start, end, trans = constrained_problem(3, 5, 4, torch.float64, "cpu", 73, "random", 0.3)
    leaves = [x.clone().requires_grad_(True) for x in (emissions, start, end, trans)]

    def log_likelihood(e, s, n, t):
        llh = ops.crf_log_likelihood(e, tags, s, n, t, mask)
        return torch.where(torch.isfinite(llh), llh, 0.0)

    assert torch.autograd.gradcheck(log_likelihood, leaves)


def test_fused_likelihood_kernel_refuses_out_of_range_tags_itself():
    emissions, _, mask, start, end, trans = random_problem(2, 3, 3, seed=79, mask_kind="full")
    for bad in (3, -2):
        tags = torch.tensor([[0, 1, 2], [0, bad, 1]])
        with pytest.raises(IndexError, match=f"tags must be in \\[0, 3\\) or equal ignore_index \\(-100\\) at the "
                                             f"positions the mask selects; got {bad} at batch 1, position 1"):
            torch.ops.fastnlp.crf_log_likelihood(emissions, mask, tags, start, end, trans, -100)
    # Unselected positions may hold anything.
    tags = torch.tensor([[0, 1, 2], [0, 99, 1]])
    mask = mask.clone()
    mask[1, 1] = False
    torch.ops.fastnlp.crf_log_likelihood(emissions, mask, tags, start, end, trans, -100)


def test_fused_likelihood_opcheck(device):
    for emissions, tags, mask, start, end, trans in opcheck_samples(device):
        leaves = [x.clone().requires_grad_(True) for x in (emissions, start, end, trans)]
        args = (leaves[0], mask, tags, leaves[1], leaves[2], leaves[3], -1)
        torch.library.opcheck(torch.ops.fastnlp.crf_log_likelihood.default, args)
        llh, alpha, exact = torch.ops.fastnlp.crf_log_likelihood(emissions, mask, tags, start, end, trans, -1)
        torch.library.opcheck(torch.ops.fastnlp.crf_log_likelihood_backward.default,
                              (torch.ones_like(llh), emissions, mask, tags, start, end, trans, -1, alpha, exact))


@pytest.mark.parametrize("op", ["crf_log_likelihood", "crf_log_partition", "crf_viterbi"])
def test_ops_refuse_a_meta_tensor_among_cpu_ones(op):
    # One meta argument sends the call to the fake kernel, which would
    # otherwise hand back uninitialised CPU tensors.
    emissions, mask = torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)
    tags, start, trans = torch.randint(0, 4, (2, 3)), torch.randn(4), torch.randn(4, 4)
    args = {"crf_log_likelihood": (emissions, mask, tags, start, start, trans.to("meta"), -100),
            "crf_log_partition": (emissions, mask, None, start, start, trans.to("meta")),
            "crf_viterbi": (emissions, mask, start, start, trans.to("meta"))}[op]
    with pytest.raises(RuntimeError, match="transitions is on meta but emissions is on cpu"):
        getattr(torch.ops.fastnlp, op)(*args)
    # The other way round: meta emissions among CPU tensors.
    with pytest.raises(RuntimeError, match="mask is on cpu but emissions is on meta"):
        getattr(torch.ops.fastnlp, op)(emissions.to("meta"), *args[1:])
    on_meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    expected_shape = (2, 3) if op == "crf_viterbi" else (2,)  # paths (B, T); else scores (B,)
    result = getattr(torch.ops.fastnlp, op)(*on_meta)[0]
    assert result.shape == expected_shape and result.device.type == "meta"
