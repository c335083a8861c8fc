"""fastnlp.nn.CRF: a drop-in for pytorch-crf's torchcrf.CRF on fused kernels."""

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from fastnlp.nn.constraints import AllowedTransitions
from fastnlp.ops import crf as F
from fastnlp.ops.crf import check_crf_dtypes, check_crf_shapes

class CRF(nn.Module):
    """Linear-chain conditional random field.

    Same constructor, parameters (``start_transitions``, ``end_transitions``,
    ``transitions[i, j]`` = score of tag i followed by tag j), forward and
    decode as pytorch-crf's ``torchcrf.CRF``: a state_dict of one loads
    unchanged into the other. Beyond it:

    * fused forward/backward and Viterbi kernels, no Python loop over time;
    * ``viterbi`` (paths and scores as tensors, on the device),
      ``viterbi_topk`` (k best paths) and ``marginals`` (posteriors);
    * ``constraints=allowed_transitions(scheme, labels)`` forbids ill-formed
      tag sequences (BIO, IOB1, BIOES, BMES) in training and decoding;
    * the mask need not start on: it selects the positions that form the
      chain, so special tokens or sub-word pieces can be masked out anywhere;
    * tags equal to ``ignore_index`` are unknown and marginalised out of the
      gold score (partial labels).

    Args:
        num_tags: number of tags K.
        batch_first: inputs are (batch, seq_len, ...) instead of (seq_len, batch, ...).
        constraints: an AllowedTransitions (from fastnlp.nn.allowed_transitions)
            whose forbidden starts, ends and transitions get probability zero.
        ignore_index: tag value meaning "unknown" in ``forward``.
    """

    def __init__(self, num_tags: int, batch_first: bool = False, *,
                 constraints: Optional[AllowedTransitions] = None, ignore_index: int = -100) -> None:
        if num_tags <= 0:
            raise ValueError(f"invalid number of tags: {num_tags}")
        super().__init__()
        self.num_tags = num_tags
        self.batch_first = batch_first
        self.ignore_index = ignore_index
        self.start_transitions = nn.Parameter(torch.empty(num_tags))
        self.end_transitions = nn.Parameter(torch.empty(num_tags))
        self.transitions = nn.Parameter(torch.empty(num_tags, num_tags))
        self.constrained = constraints is not None
        # Plain attributes, not buffers: a pytorch-crf state_dict (which has no
        # such entries) must load unchanged, and TorchScript puts even
        # non-persistent buffers in a scripted module's state_dict. _apply()
        # moves them with the module, as it would buffers.
        self.allowed_start, self.allowed_end, self.allowed_transitions = _allowed_masks(constraints, num_tags)
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # fn moves them (module.to(device)); module.half() etc. leave bool
        # tensors alone, but module.type(dtype) converts every tensor, so the
        # masks are made bool again.
        self.allowed_start, self.allowed_end, self.allowed_transitions = (
            fn(mask).bool() for mask in (self.allowed_start, self.allowed_end, self.allowed_transitions))
        return self

    def reset_parameters(self) -> None:
        """Initialise every transition score uniformly in (-0.1, 0.1), as pytorch-crf does."""
        nn.init.uniform_(self.start_transitions, -0.1, 0.1)
        nn.init.uniform_(self.end_transitions, -0.1, 0.1)
        nn.init.uniform_(self.transitions, -0.1, 0.1)

    def __repr__(self) -> str:
        extras = ""
        if self.batch_first:
            extras += ", batch_first=True"
        if self.constrained:
            extras += ", constrained=True"
        if self.ignore_index != -100:
            extras += f", ignore_index={self.ignore_index}"
        return f"{self.__class__.__name__}(num_tags={self.num_tags}{extras})"

    def forward(self, emissions: Tensor, tags: Tensor, mask: Optional[Tensor] = None,
                reduction: str = "sum") -> Tensor:
        """Log-likelihood of `tags` given `emissions`.

        Args:
            emissions: (seq_len, batch, K), or (batch, seq_len, K) if batch_first.
            tags: (seq_len, batch) integer tags, in [0, K) or ``ignore_index``.
            mask: (seq_len, batch) bool or uint8; the selected positions form the chain.
            reduction: "none" (per sequence), "sum", "mean" (over sequences) or
                "token_mean" (sum divided by the number of selected positions).
        """
        # pytorch-crf's order: shapes, the reduction, then what its ops refuse.
        check_crf_shapes(emissions, self.num_tags, tags, mask, check_dtypes=False)
        if reduction not in ("none", "sum", "mean", "token_mean"):
            raise ValueError(f"invalid reduction: {reduction}")
        check_crf_dtypes(emissions, tags, mask)
        if mask is None:
            mask = torch.ones_like(tags, dtype=torch.uint8)
        if not self.batch_first:
            emissions, tags, mask = emissions.transpose(0, 1), tags.transpose(0, 1), mask.transpose(0, 1)
        start, end, transitions = self._scores()
        if emissions.size(1) < 2:
            # No transition is scored. pytorch-crf's graph never reaches them
            # then, so transitions.grad stays None and optimizers skip it
            # (no weight decay, no momentum step on a zero gradient): the same.
            transitions = transitions.detach()
        llh = F.crf_log_likelihood(emissions, tags, start, end, transitions, mask, self.ignore_index)
        if reduction == "none":
            return llh
        if reduction == "sum":
            return llh.sum()
        if reduction == "mean":
            return llh.mean()
        # The kernels select every nonzero mask entry (a uint8 mask may hold 2s).
        # A float32 count, as pytorch-crf's mask.float().sum(): a half llh sum
        # divided by it is float32, as there.
        return llh.sum() / (mask != 0).sum().float()

    @torch.jit.export
    def decode(self, emissions: Tensor, mask: Optional[Tensor] = None) -> List[List[int]]:
        """Best tag sequence of each batch element, as lists holding the selected positions' tags."""
        paths, _ = self.viterbi(emissions, mask)
        if not self.batch_first:
            paths = paths.transpose(0, 1)
        # List operations on Python lists run in C; a tensor op per row would not.
        rows: List[List[int]] = paths.tolist()
        best: List[List[int]] = []
        for row in rows:
            head = row[:len(row) - row.count(-1)]
            if -1 in head:  # the mask has holes: keep just the selected positions
                head = []
                for tag in row:
                    if tag >= 0:
                        head.append(tag)
            best.append(head)
        return best

    @torch.jit.export
    def viterbi(self, emissions: Tensor, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Best paths, shaped like tags (int64, -1 where the mask excludes), and their scores (batch,)."""
        emissions, mask = self._batch_first_inputs(emissions, mask)
        start, end, transitions = self._scores()
        paths, scores = F.crf_viterbi(emissions, start, end, transitions, mask)
        if not self.batch_first:
            paths = paths.transpose(0, 1)
        return paths, scores

    @torch.jit.export
    def viterbi_topk(self, emissions: Tensor, k: int, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """The k best paths, shaped like tags with k appended, and their scores (batch, k), best first."""
        emissions, mask = self._batch_first_inputs(emissions, mask)
        start, end, transitions = self._scores()
        paths, scores = F.crf_viterbi_topk(emissions, k, start, end, transitions, mask)
        if not self.batch_first:
            paths = paths.transpose(0, 1)
        return paths, scores

    @torch.jit.export
    def marginals(self, emissions: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Posterior tag probabilities, shaped like emissions (0 where the mask excludes)."""
        emissions, mask = self._batch_first_inputs(emissions, mask)
        start, end, transitions = self._scores()
        probabilities = F.crf_marginals(emissions, start, end, transitions, mask)
        if not self.batch_first:
            probabilities = probabilities.transpose(0, 1)
        return probabilities

    def _batch_first_inputs(self, emissions: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        check_crf_shapes(emissions, self.num_tags, None, mask)
        if not self.batch_first:
            emissions = emissions.transpose(0, 1)
            if mask is not None:
                mask = mask.transpose(0, 1)
        return emissions, mask

    def _scores(self) -> Tuple[Tensor, Tensor, Tensor]:
        """The transition scores with forbidden moves at -inf (when constrained)."""
        if not self.constrained:
            return self.start_transitions, self.end_transitions, self.transitions
        forbidden = float("-inf")
        return (self.start_transitions.masked_fill(~self.allowed_start, forbidden),
                self.end_transitions.masked_fill(~self.allowed_end, forbidden),
                self.transitions.masked_fill(~self.allowed_transitions, forbidden))


def _allowed_masks(constraints: Optional[AllowedTransitions], num_tags: int) -> Tuple[Tensor, Tensor, Tensor]:
    if constraints is None:
        return (torch.ones(num_tags, dtype=torch.bool), torch.ones(num_tags, dtype=torch.bool),
                torch.ones(num_tags, num_tags, dtype=torch.bool))
    start, end, transitions = (torch.as_tensor(mask, dtype=torch.bool) for mask in constraints)
    expected = {"start": (num_tags,), "end": (num_tags,), "transitions": (num_tags, num_tags)}
    for name, mask in zip(expected, (start, end, transitions)):
        if tuple(mask.shape) != expected[name]:
            raise ValueError(f"constraints.{name} must have shape {expected[name]} for num_tags={num_tags}, "
                             f"got {tuple(mask.shape)}")
    return start.clone(), end.clone(), transitions.clone()
