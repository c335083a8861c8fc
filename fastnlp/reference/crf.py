"""Pure-PyTorch linear-chain CRF: the oracle the kernels are tested against.

Same contract as the torch.ops.fastnlp.crf_* ops (batch first; see
csrc/ops.cpp): emissions (B, T, K); mask (B, T) bool selects each chain's
positions, which need not be a prefix; tags (B, T) int64 pins a selected
position to a tag, -1 leaves it free. Written for clarity, not speed: plain
loops over time, and over the batch where that is clearer.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor


def _pin_tags(emissions: Tensor, tags: Optional[Tensor]) -> Tensor:
    """Emissions with every state a pinned tag excludes set to -inf."""
    if tags is None:
        return emissions
    states = torch.arange(emissions.size(-1), device=emissions.device)
    allowed = (tags.unsqueeze(-1) < 0) | (tags.unsqueeze(-1) == states)
    return emissions.masked_fill(~allowed, float("-inf"))


def _logsumexp(x: Tensor, dim: int) -> Tensor:
    """torch.logsumexp, except that where every term is -inf the gradient is 0 rather than NaN.

    Constraints and pinned tags make whole columns -inf (a state no path
    reaches); torch.logsumexp's backward divides 0 by 0 there, and that NaN
    would reach every gradient. NaN inputs still give NaN.
    """
    top = x.amax(dim, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.exp(x - top).sum(dim)
    unreachable = total == 0
    safe_total = torch.where(unreachable, torch.ones_like(total), total)
    return torch.where(unreachable, torch.full_like(total, float("-inf")), torch.log(safe_total) + top.squeeze(dim))


def log_partition(emissions: Tensor, mask: Tensor, tags: Optional[Tensor], start_transitions: Tensor,
                  end_transitions: Tensor, transitions: Tensor) -> Tensor:
    """log-sum-exp of the scores of all paths (consistent with `tags`), shape (B,); 0 for empty chains."""
    emissions = _pin_tags(emissions, tags)
    batch, seq_len, num_tags = emissions.shape
    alpha = emissions.new_zeros(batch, num_tags)  # not emissions[:, 0]: there is none when seq_len == 0
    started = torch.zeros(batch, dtype=torch.bool, device=emissions.device)
    for t in range(seq_len):
        selected = mask[:, t].unsqueeze(1)
        first = start_transitions + emissions[:, t]
        step = _logsumexp(alpha.unsqueeze(2) + transitions, dim=1) + emissions[:, t]
        new_alpha = torch.where(started.unsqueeze(1), step, first)
        alpha = torch.where(selected, new_alpha, alpha)
        started = started | mask[:, t]
    total = _logsumexp(alpha + end_transitions, dim=1)
    return torch.where(started, total, torch.zeros_like(total))


def marginals(emissions: Tensor, mask: Tensor, start_transitions: Tensor, end_transitions: Tensor,
              transitions: Tensor) -> Tensor:
    """Posterior P(y_t = k), shape (B, T, K), 0 at unselected positions: the gradient of log Z."""
    if emissions.size(1) == 0:  # log Z is then 0 whatever the (absent) emissions, and no graph leads to them
        return torch.zeros_like(emissions)
    with torch.enable_grad():
        emissions = emissions.detach().requires_grad_(True)
        total = log_partition(emissions, mask, None, start_transitions.detach(), end_transitions.detach(),
                              transitions.detach()).sum()
        (grad,) = torch.autograd.grad(total, emissions)
    return grad


def viterbi(emissions: Tensor, mask: Tensor, start_transitions: Tensor, end_transitions: Tensor,
            transitions: Tensor) -> Tuple[Tensor, Tensor]:
    """Best path (B, T), -1 at unselected positions, and its score (B,). Ties go to the lowest tag."""
    batch, seq_len, _ = emissions.shape
    paths = torch.full((batch, seq_len), -1, dtype=torch.long, device=emissions.device)
    scores = torch.zeros(batch, dtype=emissions.dtype, device=emissions.device)
    for b in range(batch):
        positions = mask[b].nonzero().flatten().tolist()
        if not positions:
            continue
        score = start_transitions + emissions[b, positions[0]]
        backpointers = []
        for t in positions[1:]:
            # Same order of additions as pytorch-crf, so rounding ties break the same way.
            candidates = score.unsqueeze(1) + transitions + emissions[b, t].unsqueeze(0)
            score, best_prev = candidates.max(dim=0)
            backpointers.append(best_prev)
        final = score + end_transitions
        scores[b] = final.max()
        tag = int(final.argmax())
        best = [tag]
        for pointers in reversed(backpointers):
            tag = int(pointers[tag])
            best.append(tag)
        paths[b, positions] = torch.tensor(best[::-1], device=emissions.device)
    return paths, scores


def viterbi_topk(emissions: Tensor, mask: Tensor, start_transitions: Tensor, end_transitions: Tensor,
                 transitions: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The k best paths (B, T, k) and scores (B, k), best first.

    Ranks that do not exist (fewer than k paths) score -inf with path -1. Ties
    are ordered by previous tag, then previous rank, as the kernels do.
    """
    batch, seq_len, num_tags = emissions.shape
    paths = torch.full((batch, seq_len, k), -1, dtype=torch.long, device=emissions.device)
    scores = torch.full((batch, k), float("-inf"), dtype=emissions.dtype, device=emissions.device)
    for b in range(batch):
        positions = mask[b].nonzero().flatten().tolist()
        if not positions:
            scores[b, 0] = 0
            continue
        # beams[j]: up to k (score tensor, tag list) pairs ending in tag j, best first.
        beams = [[(start_transitions[j] + emissions[b, positions[0], j], [j])] for j in range(num_tags)]
        for t in positions[1:]:
            new_beams = []
            for j in range(num_tags):
                candidates = []
                for i in range(num_tags):
                    for rank, (score, path) in enumerate(beams[i]):
                        value = score + transitions[i, j] + emissions[b, t, j]
                        candidates.append((-value.item(), i, rank, value, path + [j]))
                candidates.sort(key=lambda c: c[:3])
                new_beams.append([(c[3], c[4]) for c in candidates[:k]])
            beams = new_beams
        finals = []
        for j in range(num_tags):
            for rank, (score, path) in enumerate(beams[j]):
                value = score + end_transitions[j]
                finals.append((-value.item(), j, rank, value, path))
        finals.sort(key=lambda c: c[:3])
        for n, (_, _, _, value, path) in enumerate(finals[:k]):
            scores[b, n] = value
            paths[b, positions, n] = torch.tensor(path, device=emissions.device)
    return paths, scores
