"""Fused scaled-dot-product attention: registration of the
torch.ops.fastnlp.attention_* ops (fake kernels, autograd) and the functional
API fastnlp.ops.attention.

Same result as torch.nn.functional.scaled_dot_product_attention given the
equivalent dense mask, but the masks are given in their natural, small form --
key_padding_mask (B, Lk) or key lengths (B,), is_causal, an attn_mask that
broadcasts -- and the kernel skips the work they hide, so its cost follows the
visible area. A query row with no visible key gives 0, not NaN. See
fastnlp/reference/attention.py for the semantics in plain PyTorch.
"""

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from fastnlp import triton as _triton
from fastnlp.ops._autocast import autocast_cast, autocast_dtype
from fastnlp.ops._backend import is_compiling, use_reference
from fastnlp.ops._double_backward import reference_gradients
from fastnlp.ops._fake import register_fake
from fastnlp.reference import attention as reference

__all__ = ["attention", "attention_with_weights"]

MAX_HEAD_DIM = 256  # what the GPU kernels will support; the CPU kernel keeps to it for one contract


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------
# Registration: shapes for tracing (torch.compile, meta tensors) and autograd.


@register_fake("fastnlp::attention_forward", "fastnlp.attention", host_tensors=("rng_state",))
def _forward_fake(query, key, value, attn_mask, key_padding_mask, is_causal, dropout_p, scale, rng_state):
    batch, heads, query_len, _ = query.shape
    out = query.new_empty((batch, heads, query_len, value.shape[-1]))
    lse = query.new_empty((batch, heads, query_len), dtype=_accumulation_dtype(query.dtype))
    return out, lse


@register_fake("fastnlp::attention_backward", "fastnlp.attention", host_tensors=("rng_state",))
def _backward_fake(grad_out, query, key, value, out, lse, attn_mask, key_padding_mask, is_causal, dropout_p, scale,
                   rng_state):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


@register_fake("fastnlp::attention_dropout_mask", "fastnlp.attention", host_tensors=("rng_state",))
def _dropout_mask_fake(query, key, dropout_p, rng_state):
    batch, heads, query_len, _ = query.shape
    return query.new_empty((batch, heads, query_len, key.shape[2]), dtype=torch.bool)


def _setup_context(ctx, inputs, output):
    query, key, value, attn_mask, key_padding_mask, is_causal, dropout_p, scale, rng_state = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse, attn_mask, key_padding_mask, rng_state)
    ctx.is_causal, ctx.dropout_p, ctx.scale = is_causal, dropout_p, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    saved = ctx.saved_tensors
    query, key, value, out, lse, attn_mask, key_padding_mask, rng_state = saved
    if torch.is_grad_enabled():  # create_graph=True: see fastnlp/ops/_double_backward.py
        grads = _reference_backward(grad_out, query, key, value, attn_mask, key_padding_mask, ctx.is_causal,
                                    ctx.dropout_p, ctx.scale, rng_state)
        return (*grads, None, None, None, None, None)
    grad_query, grad_key, grad_value = torch.ops.fastnlp.attention_backward(
        grad_out, query, key, value, out, lse, attn_mask, key_padding_mask, ctx.is_causal, ctx.dropout_p,
        ctx.scale, rng_state)
    grad_mask = None
    if ctx.needs_input_grad[3]:  # a learned additive mask (a position bias)
        grad_mask = _mask_gradient(grad_out, query, key, value, out, lse, attn_mask, key_padding_mask,
                                   ctx.is_causal, ctx.dropout_p, ctx.scale, rng_state)
    return grad_query, grad_key, grad_value, grad_mask, None, None, None, None, None


def _reference_backward(grad_out, query, key, value, attn_mask, key_padding_mask, is_causal, dropout_p, scale,
                        rng_state):
    """The gradients of query, key, value and attn_mask, differentiable: the reference's, recomputed."""
    dropout_mask = None
    if rng_state is not None:  # the kernels' own keep-mask, so that the recomputation drops what they dropped
        dropout_mask = torch.ops.fastnlp.attention_dropout_mask(query.detach(), key.detach(), dropout_p, rng_state)

    def forward(query, key, value, attn_mask):
        return (reference.attention(query, key, value, attn_mask, key_padding_mask, is_causal, dropout_p, scale,
                                    dropout_mask),)

    return reference_gradients(forward, (query, key, value, attn_mask), (grad_out,))


def _mask_gradient(grad_out, query, key, value, out, lse, attn_mask, key_padding_mask, is_causal, dropout_p, scale,
                   rng_state):
    """The gradient of an additive float attn_mask: that of the scores, P * (dP - delta).

    Dense, (B, H, Lq, Lk), unlike the kernels' tiles: only for a mask that
    requires grad, which is itself a (broadcast) Lq x Lk tensor. P comes from
    the forward's lse, as for the returned weights; dP = dout v^T, through
    the same dropout mask as the kernels'; delta = rowsum(dout * out), since
    out = (P after dropout) v. Summed back to the mask's own shape.
    """
    probabilities = _weights_from_lse(query, key, lse, attn_mask, key_padding_mask, is_causal, scale)
    heads, accumulate = query.shape[1], lse.dtype
    if value.shape[1] != heads:
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
    grad_p = torch.matmul(grad_out.to(accumulate), value.to(accumulate).transpose(-2, -1))
    if rng_state is not None:
        keep = torch.ops.fastnlp.attention_dropout_mask(query, key, dropout_p, rng_state)
        grad_p = grad_p * keep.to(accumulate) / (1.0 - dropout_p)
    delta = (grad_out.to(accumulate) * out.to(accumulate)).sum(dim=-1, keepdim=True)
    grad_scores = probabilities * (grad_p - delta)
    return grad_scores.to(attn_mask.dtype).sum_to_size(attn_mask.shape)


torch.library.register_autograd("fastnlp::attention_forward", _backward, setup_context=_setup_context)

# The CUDA kernels are Triton's (fastnlp/triton/attention.py); without triton they raise a clear error.
_triton.register("attention", ["attention_forward", "attention_backward", "attention_dropout_mask"])


# ---------------------------------------------------------------------------
# Input checks: every problem is reported before any kernel runs, naming the
# argument and what was wrong with it.


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def _check_qkv(query, key, value) -> None:
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, length, head_dim), or query, key and value all "
                             f"3-D (batch, length, head_dim), got shape {_shape(tensor.shape)}")
        if tensor.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {tensor.dtype}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"query, key and value must have one dtype, got {query.dtype}, {key.dtype} and {value.dtype}")
    if key.device != query.device or value.device != query.device:
        raise ValueError(f"query, key and value must be on one device, got {query.device}, {key.device} "
                         f"and {value.device}")
    batch, heads, _, head_dim = query.shape
    if key.shape[0] != batch or value.shape[0] != batch:
        raise ValueError(f"query, key and value must have the same batch size, got shapes {_shape(query.shape)}, "
                         f"{_shape(key.shape)} and {_shape(value.shape)}")
    if key.shape[1] != value.shape[1]:
        raise ValueError(f"key and value must have the same number of heads, got shapes {_shape(key.shape)} "
                         f"and {_shape(value.shape)}")
    if key.shape[1] == 0 or heads % key.shape[1] != 0:
        raise ValueError(f"the heads of query ({heads}) must be a multiple of the heads of key and value "
                         f"({key.shape[1]}), got shapes {_shape(query.shape)} and {_shape(key.shape)}")
    if key.shape[2] != value.shape[2]:
        raise ValueError(f"key and value must have the same length, got shapes {_shape(key.shape)} "
                         f"and {_shape(value.shape)}")
    if key.shape[3] != head_dim:
        raise ValueError(f"query and key must have the same head dim, got shapes {_shape(query.shape)} "
                         f"and {_shape(key.shape)}")
    for name, dim in (("query and key", head_dim), ("value", value.shape[3])):
        if not 0 < dim <= MAX_HEAD_DIM:
            raise ValueError(f"the head dim of {name} must be in [1, {MAX_HEAD_DIM}], got {dim}")


def _prepare_attn_mask(attn_mask, query: Tensor, key: Tensor) -> Optional[Tensor]:
    """The mask as the kernel takes it: bool, or float in the accumulation dtype,
    expanded (never copied) to (B, H, Lq, Lk)."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and attn_mask.dtype not in (query.dtype, torch.float32):
        raise TypeError(f"attn_mask must be bool, {query.dtype} (the dtype of query) or float32, "
                        f"got {attn_mask.dtype}")
    if attn_mask.device != query.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
    full = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    shape = tuple(attn_mask.shape)
    if len(shape) > 4 or any(s != 1 and s != f for s, f in zip(reversed(shape), reversed(full))):
        raise ValueError(f"attn_mask of shape {_shape(shape)} does not broadcast to (batch, heads, query_len, "
                         f"key_len) = {_shape(full)}")
    if attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(_accumulation_dtype(query.dtype))
    return attn_mask.reshape((1,) * (4 - len(shape)) + shape).expand(full)


def _prepare_key_padding_mask(key_padding_mask, query: Tensor, key: Tensor) -> Optional[Tensor]:
    """bool (B, Lk), True = real key; integer lengths (B,) become their prefix mask."""
    if key_padding_mask is None:
        return None
    if not isinstance(key_padding_mask, Tensor):
        raise TypeError(f"key_padding_mask must be a Tensor or None, got {type(key_padding_mask).__name__}")
    if key_padding_mask.device != query.device:
        raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but query is on {query.device}")
    batch, key_len = query.shape[0], key.shape[2]
    if key_padding_mask.dtype == torch.bool:
        if tuple(key_padding_mask.shape) != (batch, key_len):
            raise ValueError(f"key_padding_mask must have shape (batch, key_len) = {_shape((batch, key_len))}, "
                             f"got {_shape(key_padding_mask.shape)}")
        return key_padding_mask
    if key_padding_mask.is_floating_point() or key_padding_mask.is_complex():
        raise TypeError("key_padding_mask must be bool (batch, key_len) or integer key lengths (batch,), "
                        f"got {key_padding_mask.dtype}")
    if tuple(key_padding_mask.shape) != (batch,):
        raise ValueError(f"key lengths given as key_padding_mask must have shape (batch,) = ({batch},), "
                         f"got {_shape(key_padding_mask.shape)}")
    if not is_compiling():
        bad = (key_padding_mask < 0) | (key_padding_mask > key_len)
        if bool(bad.any()):
            where = int(bad.nonzero()[0, 0])
            raise ValueError(f"key lengths given as key_padding_mask must be in [0, {key_len}], got "
                             f"{int(key_padding_mask[where])} at batch {where}")
    return torch.arange(key_len, device=key.device)[None, :] < key_padding_mask[:, None]


def _prepare_inputs(query, key, value, attn_mask, key_padding_mask, is_causal, dropout_p, scale, enable_gqa):
    """_prepare for the public functions, which also take SDPA's 3-D form:
    (batch, length, head_dim) each, run as one head of the 4-D form (a 3-D
    attn_mask gains the heads dim too; errors then say their shapes did).
    Returns query, key, value, attn_mask, key_padding_mask, dropout_p, scale
    and whether the inputs were 3-D."""
    dropout_p = _dropout_probability(dropout_p)  # first, as SDPA's argument parser reads it
    one_head = all(isinstance(t, Tensor) and t.dim() == 3 for t in (query, key, value))
    if one_head:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if isinstance(attn_mask, Tensor) and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
    try:
        prepared = _prepare(query, key, value, attn_mask, key_padding_mask, is_causal, dropout_p, scale, enable_gqa)
    except (TypeError, ValueError) as error:
        if not one_head:
            raise
        raise type(error)(f"{error} (3-D inputs run as one head: these shapes include its heads dim of 1)") from None
    return (query, key, value) + prepared + (one_head,)


def _prepare(query, key, value, attn_mask, key_padding_mask, is_causal, dropout_p, scale, enable_gqa=False):
    _check_qkv(query, key, value)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    elif not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    attn_mask = _prepare_attn_mask(attn_mask, query, key)
    key_padding_mask = _prepare_key_padding_mask(key_padding_mask, query, key)
    return attn_mask, key_padding_mask, float(dropout_p), float(scale)


def _dropout_probability(dropout_p) -> float:
    """dropout_p as SDPA takes it, with its error types: a Python number or a
    0-dim tensor (TypeError for anything else), in [0, 1] (RuntimeError
    outside; 1 drops every weight)."""
    if isinstance(dropout_p, Tensor) and dropout_p.dim() == 0 and not dropout_p.is_complex():
        dropout_p = dropout_p.item()
    if not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p <= 1.0:  # NaN too
        raise RuntimeError(f"dropout_p must be in [0, 1], got {dropout_p}")
    return float(dropout_p)


def _check_kernel_exists(device: torch.device) -> None:
    if device.type == "meta":
        return  # meta tensors run the fake kernel, which every build registers
    try:  # CPU, CUDA, XPU, MPS, ...: the device type in capitals names its dispatch key
        has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("fastnlp::attention_forward",
                                                                    device.type.upper())
    except RuntimeError:  # a device type whose dispatch key is spelt otherwise: no kernel of ours
        has_kernel = False
    if not has_kernel:
        raise NotImplementedError(f"fastnlp.ops.attention has no {device.type} kernel in this build (there are CPU "
                                  "and CUDA (Triton) kernels); pass backend='reference' for the pure-PyTorch version")


def _autocast_arguments(query, key, value, attn_mask) -> Optional[tuple]:
    """(query, key, value, attn_mask) as autocast hands them to SDPA, which is
    on its lower-precision list (floating tensors but float64 cast to the
    autocast dtype), where autocast is on for query's device; else None.

    The caller then runs with autocast off: the op's own products (the
    weights from lse, the reference, a learned mask's gradient) are computed
    in the dtypes chosen for them, not cast again half-way through.
    """
    if not isinstance(query, Tensor):
        return None  # the checks name it
    dtype = autocast_dtype(query)
    if dtype is None:
        return None
    return tuple(autocast_cast(t, dtype) if isinstance(t, Tensor) else t for t in (query, key, value, attn_mask))


def _draw_rng_state(dropout_p: float) -> Optional[Tensor]:
    """(seed, offset) for the kernel's counter-based dropout, drawn from torch's
    default generator, so torch.manual_seed makes a run repeatable. A tensor, so
    torch.compile can keep the draw inside its graph."""
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2**62, (2,), dtype=torch.int64)


# ---------------------------------------------------------------------------
# The functional API.


def attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
              dropout_p: float = 0.0, is_causal: bool = False, *, scale: Optional[float] = None,
              enable_gqa: bool = False, key_padding_mask: Optional[Tensor] = None,
              backend: Optional[str] = None) -> Tensor:
    """softmax(query key^T * scale + masks) value, shape (B, H, Lq, Dv).

    Called as torch.nn.functional.scaled_dot_product_attention is: the same
    positional arguments, scale and enable_gqa keyword-only; key_padding_mask
    is keyword-only too.

    query (B, H, Lq, D); key (B, Hk, Lk, D) and value (B, Hk, Lk, Dv) with H a
    multiple of Hk (grouped-query attention: head h reads kv-head h // (H // Hk));
    or all three 3-D, (B, L, D), as SDPA takes them (one head; the result is
    then (B, Lq, Dv)); head dims up to 256. float32, float64, bfloat16 or
    float16 (accumulated in float32; float64 in float64).

    attn_mask: bool (True = take part) or additive float (query's dtype or
    float32), broadcastable to (B, H, Lq, Lk). key_padding_mask: bool (B, Lk),
    True = real key, or integer key lengths (B,). is_causal: query i sees keys
    j <= i. dropout_p: probability in [0, 1] of dropping an attention weight
    (kept ones are scaled by 1 / (1 - p); at 1 the result is 0); the random
    stream comes from torch's default generator. scale defaults to
    1 / sqrt(D). Rows with no visible key give 0.

    Differentiable with respect to query, key and value, and a float
    attn_mask that requires grad (a learned position bias; its gradient is
    computed densely, (B, H, Lq, Lk), in the backward pass).

    enable_gqa is there for SDPA's signature: grouped-query heads work with
    or without it. Under autocast it computes in the autocast dtype, as SDPA
    does (see _autocast_arguments).
    """
    autocast = _autocast_arguments(query, key, value, attn_mask)
    if autocast is not None:
        with torch.autocast(query.device.type, enabled=False):
            return attention(*autocast, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa,
                             key_padding_mask=key_padding_mask, backend=backend)
    query, key, value, attn_mask, key_padding_mask, dropout_p, scale, one_head = _prepare_inputs(
        query, key, value, attn_mask, key_padding_mask, is_causal, dropout_p, scale, enable_gqa)
    drop_all = dropout_p == 1.0
    if drop_all:  # every weight dropped, as SDPA does it: zeros, and zero gradients (from the product below)
        dropout_p = 0.0
    rng_state = _draw_rng_state(dropout_p)
    if use_reference(backend):
        dropout_mask = None
        if rng_state is not None:
            dropout_mask = torch.ops.fastnlp.attention_dropout_mask(query, key, dropout_p, rng_state)
        out = reference.attention(query, key, value, attn_mask, key_padding_mask, is_causal, dropout_p, scale,
                                  dropout_mask)
    else:
        if not is_compiling():  # a dispatcher query dynamo cannot trace; the dispatcher itself still refuses
            _check_kernel_exists(query.device)
        out = torch.ops.fastnlp.attention_forward(query, key, value, attn_mask, key_padding_mask, is_causal,
                                                  dropout_p, scale, rng_state)[0]
    if drop_all:
        out = out * 0.0
    return out.squeeze(1) if one_head else out


def dropout_mask(query: Tensor, key: Tensor, dropout_p: float, rng_state: Tensor) -> Tensor:
    """The keep-mask (B, H, Lq, Lk) the kernels draw for this rng_state: for tests."""
    return torch.ops.fastnlp.attention_dropout_mask(query, key, float(dropout_p), rng_state)


def attention_with_weights(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                           dropout_p: float = 0.0, is_causal: bool = False, *, scale: Optional[float] = None,
                           enable_gqa: bool = False, key_padding_mask: Optional[Tensor] = None) -> tuple:
    """fastnlp.ops.attention and, beside it, the attention weights it used:
    (out (B, H, Lq, Dv), weights (B, H, Lq, Lk) in query's dtype).

    Same arguments and semantics as fastnlp.ops.attention. The output comes
    from the fused kernel, which also returns each row's log-sum-exp; the
    weights are then exp(q k^T * scale + mask - lse), renormalised by their row
    sum: one (Lq, Lk) product and no pass for the row maxima. With dropout they
    are the weights after dropout (kept ones scaled by 1 / (1 - dropout_p)),
    drawn from the same random stream as the output's, so out == weights @
    value. Rows with no visible key give 0 weights; rows whose scores hold a
    NaN or +inf, or are all -inf, give NaN weights, as softmax does. The output is
    differentiable with respect to query, key and value, the weights with
    respect to query and key (the softmax's gradient). The reference computes
    both where it is chosen (FASTNLP_BACKEND=reference, or a torch.func
    transform that differentiates); otherwise the compiled kernel, with the
    weights from its lse.
    """
    autocast = _autocast_arguments(query, key, value, attn_mask)
    if autocast is not None:
        with torch.autocast(query.device.type, enabled=False):
            return attention_with_weights(*autocast, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa,
                                          key_padding_mask=key_padding_mask)
    query, key, value, attn_mask, key_padding_mask, dropout_p, scale, one_head = _prepare_inputs(
        query, key, value, attn_mask, key_padding_mask, is_causal, dropout_p, scale, enable_gqa)
    drop_all = dropout_p == 1.0
    if drop_all:  # as in attention: zeros, the weights too
        dropout_p = 0.0
    rng_state = _draw_rng_state(dropout_p)
    if use_reference(None):
        keep = None
        if rng_state is not None:
            keep = torch.ops.fastnlp.attention_dropout_mask(query, key, dropout_p, rng_state)
        masks = (attn_mask, key_padding_mask, is_causal, dropout_p, scale, keep)
        out = reference.attention(query, key, value, *masks)
        weights = reference.attention_weights(query, key, *masks)
    else:
        if not is_compiling():
            _check_kernel_exists(query.device)
        out, lse = torch.ops.fastnlp.attention_forward(query, key, value, attn_mask, key_padding_mask, is_causal,
                                                       dropout_p, scale, rng_state)
        weights = _weights_from_lse(query, key, lse, attn_mask, key_padding_mask, is_causal, scale)
        if rng_state is not None:
            keep = torch.ops.fastnlp.attention_dropout_mask(query, key, dropout_p, rng_state)
            weights = weights * keep.to(weights.dtype) / (1.0 - dropout_p)
    weights = weights.to(query.dtype)
    if drop_all:
        out, weights = out * 0.0, weights * 0.0
    return (out.squeeze(1), weights.squeeze(1)) if one_head else (out, weights)


def _weights_from_lse(query: Tensor, key: Tensor, lse: Tensor, attn_mask: Optional[Tensor],
                      key_padding_mask: Optional[Tensor], is_causal: bool, scale: float) -> Tensor:
    """softmax(q k^T * scale + masks) from the kernel's row log-sum-exp, with
    the masks as _prepare leaves them (bool = take part)."""
    heads, query_len, key_len = query.shape[1], query.shape[2], key.shape[2]
    if key.shape[1] != heads:
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
    if key_padding_mask is not None:  # padding keys are never read, as in the kernel (0 * NaN is NaN)
        key = key.masked_fill(~key_padding_mask[:, None, :, None], 0)
    scores = torch.matmul(query.to(lse.dtype), key.to(lse.dtype).transpose(-2, -1)) * scale
    visible = None
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = attn_mask
    if key_padding_mask is not None:
        padding = key_padding_mask[:, None, None, :]
        visible = padding if visible is None else visible & padding
    if is_causal:
        causal = torch.ones(query_len, key_len, dtype=torch.bool, device=query.device).tril()
        visible = causal if visible is None else visible & causal
    float_mask = None if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask
    logits = scores if float_mask is None else scores + float_mask
    # lse is -inf on rows that saw no key; 0 there keeps exp() and its gradient finite.
    seen = torch.isfinite(lse)[..., None]
    lse = torch.where(seen, lse[..., None], torch.zeros_like(lse[..., None]))
    shifted = logits - lse
    if visible is not None:
        shifted = shifted.masked_fill(~visible, float("-inf"))
    # exp(s - lse) alone is the softmax up to the rounding of the kernel's own
    # scores, which can differ from these in the last bits (relative error of
    # |s| * eps); dividing by the row sum (1 up to that error) removes it, and
    # autograd then gives the softmax's own gradient. lse is a constant shift
    # that keeps exp() in range without another pass for the row maximum.
    exps = torch.exp(shifted)
    total = exps.sum(dim=-1, keepdim=True)
    weights = exps / torch.where(seen, total, torch.ones_like(total))
    # lse is -inf on a row that sees no key, which gets 0 weights, but also on
    # a row whose scores hold a NaN or +inf or are all -inf (the kernel's sum
    # of exponentials is then NaN or 0), whose softmax is NaN as in torch. The
    # masks, not lse, tell the two apart.
    reachable = visible
    if float_mask is not None:
        finite = float_mask != float("-inf")
        reachable = finite if reachable is None else reachable & finite
    if key_len == 0:
        blank = torch.ones_like(seen)
    elif reachable is None:
        blank = torch.zeros_like(seen)
    else:
        blank = ~reachable.any(dim=-1, keepdim=True)
    unseen = torch.zeros_like(lse).masked_fill(~blank, float("nan"))  # per row: 0 if blank, else NaN
    return torch.where(seen, weights, unseen)
