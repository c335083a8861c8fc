"""fastnlp attention as a Hugging Face transformers attention implementation.

Importing this module registers the name "fastnlp" with transformers'
attention interface and its mask interface, so that

    import fastnlp.integrations.transformers
    model = BertModel(BertConfig(..., attn_implementation="fastnlp"))

runs every attention layer that goes through the interface on
fastnlp.ops.attention. (An existing model: model.set_attn_implementation("fastnlp").)

Masks are boolean, True = take part, the convention of "sdpa" and of
fastnlp.ops.attention. A plain padding mask (an encoder's) reaches the kernel
as the (batch, key_len) padding broadcast over the query positions (stride 0),
never materialised as (Lq, Lk): the kernel reads it through those strides and
skips key tiles that are all padding, so padding costs no work. Every other
pattern (causal with padding, sliding windows, packed sequences) is built by
transformers' own "sdpa" mask function.

Beyond "sdpa": output_attentions=True returns the attention weights from the
fused kernel's row log-sum-exp (fastnlp.ops.attention_with_weights) instead of
warning that they are unavailable, and a query row whose keys are all masked
gives 0, never NaN. A learned position bias (T5) is an additive mask with a
gradient. softcap and attention sinks (s_aux) are refused with a clear error.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor
try:
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        AttentionMaskInterface,
        bidirectional_mask_function,
        prepare_padding_mask,
        sdpa_mask,
    )
except ImportError as error:  # absent, too old to have the mask interface, or newer than the torch
    raise ImportError("fastnlp.integrations.transformers needs transformers >= 5.0 and a torch that version "
                      "supports (transformers 5 needs torch >= 2.6): pip install 'fastnlp-kernels[transformers]'"
                      f" (the import failed with: {error})") from error

from fastnlp.ops.attention import attention, attention_with_weights

IMPLEMENTATION_NAME = "fastnlp"


def _additive_position_bias(position_bias: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    """A learned bias added to the scores (T5-style models), merged with the
    model's mask into one additive float mask: masked positions get -inf."""
    if attention_mask is None:
        return position_bias
    if attention_mask.dtype == torch.bool:
        return position_bias.masked_fill(~attention_mask, float("-inf"))
    return position_bias + attention_mask


def fastnlp_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                              attention_mask: Optional[Tensor], dropout: float = 0.0,
                              scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                              position_bias: Optional[Tensor] = None, **kwargs) -> Tuple[Tensor, Optional[Tensor]]:
    """The attention-interface function: query (B, H, Lq, D), key and value
    (B, Hk, Lk, D) with Hk dividing H; returns (output (B, Lq, H, Dv), weights
    (B, H, Lq, Lk) when output_attentions is asked for, else None)."""
    if kwargs.get("softcap") is not None:
        raise ValueError("the fastnlp attention implementation does not support softcap; "
                         "use attn_implementation='eager' for this model")
    if kwargs.get("s_aux") is not None:
        # Attention sinks (GPT-OSS): an extra logit per head in each softmax
        # denominator. Ignoring it would give wrong outputs without a word.
        raise ValueError("the fastnlp attention implementation does not support attention sinks (s_aux); "
                         "use attn_implementation='eager' for this model")
    if kwargs.get("cache") is not None:
        raise NotImplementedError("the fastnlp attention implementation does not support paged caches "
                                  "(continuous batching); use attn_implementation='sdpa' for generation with one")
    query_len, key_len = query.shape[2], key.shape[2]
    # As for "sdpa": the module's flag, unless the call overrides it; a mask the
    # model built already holds the causal pattern, and one query sees all keys.
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    is_causal = bool(is_causal) and attention_mask is None and query_len > 1
    if is_causal and key_len > query_len:
        # Only a prefill into an empty static cache gets here: the keys past the
        # queries are empty slots. Upper-left causal alignment ignores them.
        key, value = key[:, :, :query_len], value[:, :, :query_len]
        if position_bias is not None:
            position_bias = position_bias[..., :query_len]
    attn_mask = attention_mask
    if position_bias is not None:
        attn_mask = _additive_position_bias(position_bias, attention_mask)
    if kwargs.get("output_attentions", False):
        out, weights = attention_with_weights(query, key, value, attn_mask=attn_mask, is_causal=is_causal,
                                              dropout_p=dropout, scale=scaling)
    else:
        out = attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout,
                        scale=scaling)
        weights = None
    return out.transpose(1, 2).contiguous(), weights


def fastnlp_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function=bidirectional_mask_function, attention_mask: Optional[Tensor] = None,
                 local_size: Optional[int] = None, **kwargs) -> Optional[Tensor]:
    """The mask-interface function: a broadcast view for plain padding, None
    when there is nothing to mask, and "sdpa"'s boolean mask otherwise."""
    if mask_function is bidirectional_mask_function and local_size is None:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if padding is None:
            return None
        keys = padding[:, kv_offset:kv_offset + kv_length].bool()
        return keys[:, None, None, :].expand(batch_size, 1, q_length, kv_length)
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     local_size=local_size, **kwargs)


AttentionInterface.register(IMPLEMENTATION_NAME, fastnlp_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION_NAME, fastnlp_mask)
