"""Linear-chain CRF: registration of the torch.ops.fastnlp.crf_* ops (fake
kernels, autograd) and the functional API.

The functional API is batch first: emissions (B, T, K) hold the score of tag k
at position t; start_transitions (K,), end_transitions (K,) and transitions
(K, K) (transitions[i, j]: from tag i to tag j) are the CRF's parameters. The
mask (B, T, bool or uint8) selects the positions that form each chain; they
need not be a prefix, so [CLS], [SEP] or non-first sub-word pieces can simply
be masked out, and a row with nothing selected is an empty sequence.

Scores come back in the inputs' promoted dtype; the kernels compute in
float32 (float16, bfloat16 and integer inputs) or float64. A NaN or +inf
score at a selected position, or in a parameter, makes that sequence's
results and gradients NaN (CPU kernels; see csrc/cpu/crf.cpp); -inf is a
valid score.

Every function validates its input before any kernel runs and raises an
error naming the argument: ValueError for shapes and values, as pytorch-crf;
IndexError for tags that are not integers or out of range, RuntimeError for a
mask that is not bool or uint8 and for complex emissions (the types of the
torch ops that fail inside pytorch-crf). On the CPU the kernel's own scan
finds out-of-range tags, with the same IndexError. Functions are
TorchScript-compatible because fastnlp.nn.CRF, which calls them, must be
scriptable.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from fastnlp.ops._backend import is_compiling, use_reference
from fastnlp.ops._double_backward import register_reference_backward
from fastnlp.ops._fake import register_fake
from fastnlp.reference import crf as reference

__all__ = [
    "crf_log_likelihood",
    "crf_log_partition",
    "crf_gold_score",
    "crf_marginals",
    "crf_viterbi",
    "crf_viterbi_topk",
]

# ---------------------------------------------------------------------------
# Registration: shapes for tracing (torch.compile, meta tensors). The kernels
# return contiguous tensors whatever the inputs' strides, so the fakes do too
# (new_empty, not empty_like, which would copy a transposed input's strides).


def _contiguous_like(*tensors):
    return tuple(t.new_empty(t.shape) for t in tensors)


@register_fake("fastnlp::crf_log_partition", "fastnlp.crf")
def _log_partition_fake(emissions, mask, tags, start_transitions, end_transitions, transitions):
    return emissions.new_empty(emissions.shape[0]), emissions.new_empty(emissions.shape)


@register_fake("fastnlp::crf_log_partition_backward", "fastnlp.crf")
def _log_partition_backward_fake(grad, emissions, mask, tags, start_transitions, end_transitions, transitions,
                                 alpha, log_partition):
    return _contiguous_like(emissions, start_transitions, end_transitions, transitions)


@register_fake("fastnlp::crf_viterbi", "fastnlp.crf")
def _viterbi_fake(emissions, mask, start_transitions, end_transitions, transitions):
    batch, seq_len, _ = emissions.shape
    return emissions.new_empty((batch, seq_len), dtype=torch.long), emissions.new_empty(batch)


@register_fake("fastnlp::crf_viterbi_topk", "fastnlp.crf")
def _viterbi_topk_fake(emissions, mask, start_transitions, end_transitions, transitions, k):
    batch, seq_len, _ = emissions.shape
    return emissions.new_empty((batch, seq_len, k), dtype=torch.long), emissions.new_empty((batch, k))


@register_fake("fastnlp::crf_log_likelihood", "fastnlp.crf")
def _log_likelihood_fake(emissions, mask, tags, start_transitions, end_transitions, transitions, ignore_index):
    batch, seq_len, num_tags = emissions.shape
    # The saved forward state is the CPU kernel's, in the emissions' dtype (the
    # precision its backward pass runs in); the CUDA composite saves none.
    if emissions.device.type == "cpu":
        state = emissions.new_empty((batch, 2, seq_len, num_tags))
    else:
        state = emissions.new_empty((0,), dtype=torch.float64)
    return emissions.new_empty(batch), state, emissions.new_empty(batch, dtype=torch.bool)


@register_fake("fastnlp::crf_log_likelihood_backward", "fastnlp.crf")
def _log_likelihood_backward_fake(grad, emissions, mask, tags, start_transitions, end_transitions, transitions,
                                  ignore_index, alpha, exact):
    return _contiguous_like(emissions, start_transitions, end_transitions, transitions)


# Autograd for crf_log_partition and crf_log_likelihood is registered in C++ (csrc/crf_autograd.cpp):
# the Python wrapper of torch.library.register_autograd cost ~0.1 ms a call.
# With create_graph=True its backward passes call these reference backward passes.


def _reference_log_partition(emissions, mask, tags, start_transitions, end_transitions, transitions):
    return (reference.log_partition(emissions, mask, tags, start_transitions, end_transitions, transitions),)


def _reference_log_likelihood(emissions, mask, tags, start_transitions, end_transitions, transitions,
                              ignore_index):
    pinned = torch.where(mask & (tags != ignore_index), tags, -1)  # the op's ignore_index: free, as in the reference
    gold = reference.log_partition(emissions, mask, pinned, start_transitions, end_transitions, transitions)
    return (gold - reference.log_partition(emissions, mask, None, start_transitions, end_transitions, transitions),)


register_reference_backward("crf_log_partition", _reference_log_partition)
register_reference_backward("crf_log_likelihood", _reference_log_likelihood)


# ---------------------------------------------------------------------------
# Input checks, shared with fastnlp.nn.CRF (which runs them in the user's
# layout before transposing, so messages show the shapes the user passed).


def _shape_str(shape: List[int]) -> str:
    """A shape the way Python prints a tuple, which is what pytorch-crf's messages show."""
    if len(shape) == 1:
        return "(" + str(shape[0]) + ",)"
    return "(" + ", ".join([str(size) for size in shape]) + ")"


def check_crf_shapes(emissions: Tensor, num_tags: int, tags: Optional[Tensor], mask: Optional[Tensor],
                     check_dtypes: bool = True) -> None:
    """pytorch-crf's shape checks, in its order and with its messages, then
    (with check_dtypes) check_crf_dtypes.

    nn.CRF.forward checks the reduction between the two, as pytorch-crf does
    (its dtype failures come later still, from the ops inside it), so that an
    input with several faults raises the error pytorch-crf raises.
    """
    if emissions.dim() != 3:
        raise ValueError(f"emissions must have dimension of 3, got {emissions.dim()}")
    if emissions.size(2) != num_tags:
        raise ValueError(f"expected last dimension of emissions is {num_tags}, got {emissions.size(2)}")
    if tags is not None and emissions.shape[:2] != tags.shape:
        raise ValueError("the first two dimensions of emissions and tags must match, "
                         f"got {_shape_str(emissions.shape[:2])} and {_shape_str(tags.shape)}")
    if mask is not None and emissions.shape[:2] != mask.shape:
        raise ValueError("the first two dimensions of emissions and mask must match, "
                         f"got {_shape_str(emissions.shape[:2])} and {_shape_str(mask.shape)}")
    if check_dtypes:
        check_crf_dtypes(emissions, tags, mask)


def check_crf_dtypes(emissions: Tensor, tags: Optional[Tensor], mask: Optional[Tensor]) -> None:
    """The dtypes pytorch-crf's arithmetic takes. Where a torch op inside it
    fails (tags used as an index, the mask as torch.where's condition), the
    error is of that op's type (IndexError, RuntimeError), with a message of
    our own."""
    # int64 and int32 index tensors; torch indexing refuses the other
    # integer types (uint8, like bool, would be read as a mask).
    if tags is not None and tags.dtype != torch.int64 and tags.dtype != torch.int32:
        raise IndexError(f"tags must be an int64 or int32 tensor, got {tags.dtype}")
    if mask is not None and mask.dtype != torch.bool and mask.dtype != torch.uint8:
        raise RuntimeError(f"mask must be a bool or uint8 tensor, got {mask.dtype}")
    # Integer emissions are scored in the parameters' floating type, as
    # pytorch-crf's arithmetic promotes them; complex ones have no order.
    if emissions.is_complex():
        raise RuntimeError(f"emissions must be a real tensor, got {emissions.dtype}")


def _check_parameters(emissions: Tensor, start_transitions: Tensor, end_transitions: Tensor,
                      transitions: Tensor) -> None:
    num_tags = transitions.size(0) if transitions.dim() == 2 else -1
    if transitions.dim() != 2 or transitions.size(1) != num_tags or num_tags < 1:
        raise ValueError(f"transitions must be a square (num_tags, num_tags) tensor, got {_shape_str(transitions.shape)}")
    for name, parameter in [("start_transitions", start_transitions), ("end_transitions", end_transitions)]:
        if parameter.dim() != 1 or parameter.size(0) != num_tags:
            raise ValueError(f"{name} must have shape ({num_tags},) to match transitions, "
                             f"got {_shape_str(parameter.shape)}")
    for name, tensor in [("start_transitions", start_transitions), ("end_transitions", end_transitions),
                         ("transitions", transitions)]:
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
        if tensor.device != emissions.device:
            raise ValueError(f"{name} is on {tensor.device} but emissions are on {emissions.device}")


def _result_dtype(emissions: Tensor, start_transitions: Tensor, end_transitions: Tensor,
                 transitions: Tensor) -> torch.dtype:
    """The dtype of the scores returned: that of the inputs promoted together, as torch's arithmetic gives."""
    dtype = torch.promote_types(emissions.dtype, transitions.dtype)
    return torch.promote_types(dtype, torch.promote_types(start_transitions.dtype, end_transitions.dtype))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 or float64, the kernels' types: half-precision inputs are accumulated in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x in dtype; skips Tensor.to when it would be a no-op, which still costs ~2 us a call (6 a step)."""
    return x if x.dtype == dtype else x.to(dtype)


def _prepare(emissions: Tensor, start_transitions: Tensor, end_transitions: Tensor, transitions: Tensor,
             mask: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, torch.dtype]:
    """Validate; return (emissions, mask, start, end, transitions) in the kernels' dtypes, and the result dtype."""
    _check_parameters(emissions, start_transitions, end_transitions, transitions)
    check_crf_shapes(emissions, transitions.size(0), None, mask)
    if mask is None:
        mask = torch.ones(emissions.shape[:2], dtype=torch.bool, device=emissions.device)
    elif mask.device != emissions.device:
        raise ValueError(f"mask is on {mask.device} but emissions are on {emissions.device}")
    out_dtype = _result_dtype(emissions, start_transitions, end_transitions, transitions)
    dtype = _compute_dtype(out_dtype)
    return (_as_dtype(emissions, dtype), _as_dtype(mask, torch.bool), _as_dtype(start_transitions, dtype),
            _as_dtype(end_transitions, dtype), _as_dtype(transitions, dtype), out_dtype)


def _check_tags(tags: Tensor, emissions: Tensor, mask: Tensor, ignore_index: int, check_range: bool) -> Tensor:
    """int64 tags, checked against emissions; with check_range, every selected tag is in [0, num_tags) or ignore_index.

    A tag outside [0, num_tags) would be an out-of-bounds read, so it must be
    refused before the kernel. Under torch.compile the check would be a graph
    break; the CPU kernels' own checks raise instead.
    """
    check_crf_shapes(emissions, emissions.size(2), tags, None)  # mask: checked by _prepare
    if tags.device != emissions.device:
        raise ValueError(f"tags is on {tags.device} but emissions are on {emissions.device}")
    tags = tags.long()
    if check_range and not is_compiling():
        # Few tensor ops on purpose: each costs ~10 us on a small CPU, as much as a kernel.
        bad = mask & (tags != ignore_index) & (tags.clamp(0, emissions.size(2) - 1) != tags)
        if bool(bad.any()):
            where = bad.nonzero()[0]
            raise IndexError(f"tags must be in [0, {emissions.size(2)}) or equal ignore_index ({ignore_index}) "
                             f"at the positions the mask selects; got {int(tags[where[0], where[1]])} at "
                             f"batch {int(where[0])}, position {int(where[1])}")
    return tags


def _prepare_tags(tags: Tensor, emissions: Tensor, mask: Tensor, ignore_index: int) -> Tensor:
    """int64 tags with -1 for "unknown" (ignore_index) and at unselected positions, range-checked."""
    tags = _check_tags(tags, emissions, mask, ignore_index, True)
    known = mask & (tags != ignore_index)
    if is_compiling():
        # The range check waits for the kernel then, which reads -1 as "free":
        # a selected -1 that is not ignore_index must stay out of range.
        tags = torch.where(tags == -1, emissions.size(2), tags)
    return torch.where(known, tags, -1)


# ---------------------------------------------------------------------------
# The functional API.


def crf_log_partition(emissions: Tensor, start_transitions: Tensor, end_transitions: Tensor, transitions: Tensor,
                      mask: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """log Z: log-sum-exp of the scores of every tag path, shape (B,); 0 for an empty sequence.

    Differentiable; its gradient with respect to the emissions is the posterior marginals.
    """
    emissions, mask, start, end, trans, out_dtype = _prepare(emissions, start_transitions, end_transitions,
                                                             transitions, mask)
    if not torch.jit.is_scripting():
        if use_reference(backend):
            return _as_dtype(reference.log_partition(emissions, mask, None, start, end, trans), out_dtype)
    return _as_dtype(torch.ops.fastnlp.crf_log_partition(emissions, mask, None, start, end, trans)[0], out_dtype)


def crf_gold_score(emissions: Tensor, tags: Tensor, start_transitions: Tensor, end_transitions: Tensor,
                   transitions: Tensor, mask: Optional[Tensor] = None, ignore_index: int = -100,
                   backend: Optional[str] = None) -> Tensor:
    """Score of the tagged path, shape (B,).

    Positions tagged `ignore_index` are unknown and marginalised out: the
    result is then the log-sum-exp over every path that agrees with the known
    tags. Same fused kernel as crf_log_partition, with states pinned by tags.
    """
    emissions, mask, start, end, trans, out_dtype = _prepare(emissions, start_transitions, end_transitions,
                                                             transitions, mask)
    tags = _prepare_tags(tags, emissions, mask, ignore_index)
    if not torch.jit.is_scripting():
        if use_reference(backend):
            return _as_dtype(reference.log_partition(emissions, mask, tags, start, end, trans), out_dtype)
    return _as_dtype(torch.ops.fastnlp.crf_log_partition(emissions, mask, tags, start, end, trans)[0], out_dtype)


def crf_log_likelihood(emissions: Tensor, tags: Tensor, start_transitions: Tensor, end_transitions: Tensor,
                       transitions: Tensor, mask: Optional[Tensor] = None, ignore_index: int = -100,
                       backend: Optional[str] = None) -> Tensor:
    """log p(tags | emissions) per sequence, shape (B,): gold score minus log Z.

    0 for an empty sequence; -inf (or below -1e4) when the tags follow a
    transition that is -inf (a constraint forbids it).

    One fused op computes both scores and, in the backward pass, the gold
    indicators minus the posterior marginals.
    """
    emissions, mask, start, end, trans, out_dtype = _prepare(emissions, start_transitions, end_transitions,
                                                             transitions, mask)
    if not torch.jit.is_scripting():
        if use_reference(backend):
            tags = _prepare_tags(tags, emissions, mask, ignore_index)
            gold = reference.log_partition(emissions, mask, tags, start, end, trans)
            return _as_dtype(gold - reference.log_partition(emissions, mask, None, start, end, trans), out_dtype)
    # The CPU kernel checks the tag range itself, with the same IndexError, in
    # a scan that costs less than the tensor ops of the check here.
    tags = _check_tags(tags, emissions, mask, ignore_index, emissions.device.type != "cpu")
    llh = torch.ops.fastnlp.crf_log_likelihood(emissions, mask, tags, start, end, trans, ignore_index)[0]
    return _as_dtype(llh, out_dtype)


def crf_marginals(emissions: Tensor, start_transitions: Tensor, end_transitions: Tensor, transitions: Tensor,
                  mask: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """Posterior tag probabilities P(y_t = k), shaped like emissions; 0 at unselected positions.

    Computed with the forward and backward algorithms (one kernel each); the
    result carries no gradient.
    """
    emissions, mask, start, end, trans, out_dtype = _prepare(emissions, start_transitions, end_transitions,
                                                             transitions, mask)
    emissions, start, end, trans = emissions.detach(), start.detach(), end.detach(), trans.detach()
    if not torch.jit.is_scripting():
        if use_reference(backend):
            return _as_dtype(reference.marginals(emissions, mask, start, end, trans), out_dtype)
    log_z, alpha = torch.ops.fastnlp.crf_log_partition(emissions, mask, None, start, end, trans)
    ones = torch.ones_like(log_z)
    probabilities = torch.ops.fastnlp.crf_log_partition_backward(ones, emissions, mask, None, start, end, trans,
                                                                 alpha, log_z)[0]
    return _as_dtype(probabilities, out_dtype)


def crf_viterbi(emissions: Tensor, start_transitions: Tensor, end_transitions: Tensor, transitions: Tensor,
                mask: Optional[Tensor] = None, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Best tag path, (B, T) int64 with -1 at unselected positions, and its score (B,).

    Backtrace included, everything runs on the tensors' device.
    """
    emissions, mask, start, end, trans, out_dtype = _prepare(emissions, start_transitions, end_transitions,
                                                             transitions, mask)
    emissions, start, end, trans = emissions.detach(), start.detach(), end.detach(), trans.detach()
    if not torch.jit.is_scripting():
        if use_reference(backend):
            paths, scores = reference.viterbi(emissions, mask, start, end, trans)
            return paths, _as_dtype(scores, out_dtype)
    paths, scores = torch.ops.fastnlp.crf_viterbi(emissions, mask, start, end, trans)
    return paths, _as_dtype(scores, out_dtype)


def crf_viterbi_topk(emissions: Tensor, k: int, start_transitions: Tensor, end_transitions: Tensor,
                     transitions: Tensor, mask: Optional[Tensor] = None,
                     backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """The k best tag paths, (B, T, k) int64, and their scores (B, k), best first.

    Where a sequence has fewer than k paths (K^length) the missing ranks
    score -inf and their paths are -1; positions the mask excludes are -1. A
    path that exists but is forbidden (constraints, -inf scores) keeps its
    tags and scores -inf, as in crf_viterbi.
    """
    if not torch.jit.is_scripting():
        # bool is an int to Python, and a tensor or float k would reach the op's schema check.
        if not isinstance(k, int) or isinstance(k, bool):
            raise ValueError("k must be a positive integer, got " + repr(k))
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    emissions, mask, start, end, trans, out_dtype = _prepare(emissions, start_transitions, end_transitions,
                                                             transitions, mask)
    emissions, start, end, trans = emissions.detach(), start.detach(), end.detach(), trans.detach()
    if not torch.jit.is_scripting():
        if use_reference(backend):
            paths, scores = reference.viterbi_topk(emissions, mask, start, end, trans, k)
            return paths, _as_dtype(scores, out_dtype)
    paths, scores = torch.ops.fastnlp.crf_viterbi_topk(emissions, mask, start, end, trans, k)
    return paths, _as_dtype(scores, out_dtype)
