"""Scaled-dot-product attention in plain PyTorch: the full score matrix is
materialised, masked and soft-maxed. Slow and memory hungry, obviously correct.

Semantics (shared with fastnlp.ops.attention):

* query (B, H, Lq, D), key (B, Hk, Lk, D), value (B, Hk, Lk, Dv); H % Hk == 0
  and query head h reads kv-head h // (H // Hk) (grouped-query attention).
* attn_mask: bool (True = take part, as in F.scaled_dot_product_attention) or
  additive float, broadcastable to (B, H, Lq, Lk).
* key_padding_mask: bool (B, Lk), True = real key. Padding keys are never
  read: whatever their key and value rows hold (NaN included) reaches no
  output or gradient, and their own gradients are 0.
* is_causal: query i sees keys j <= i (upper-left aligned, as SDPA).
* A query row that sees no key at all gives output 0 (and gradient 0), not NaN.
* dropout_mask: an explicit keep-mask (B, H, Lq, Lk) applied to the
  probabilities, kept entries scaled by 1 / (1 - dropout_p). The reference draws
  no random numbers itself: tests pass it the kernel's own mask.
"""

import math
from typing import Optional

import torch
from torch import Tensor


def visible_mask(batch: int, heads: int, query_len: int, key_len: int, attn_mask: Optional[Tensor],
                 key_padding_mask: Optional[Tensor], is_causal: bool, device) -> Tensor:
    """The dense boolean (B, H, Lq, Lk) mask of the entries that take part (bool masks only)."""
    visible = torch.ones(batch, heads, query_len, key_len, dtype=torch.bool, device=device)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = visible & attn_mask
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.bool()[:, None, None, :]
    if is_causal:
        visible = visible & torch.ones(query_len, key_len, dtype=torch.bool, device=device).tril()
    return visible


def attention_weights(query: Tensor, key: Tensor, attn_mask: Optional[Tensor] = None,
                      key_padding_mask: Optional[Tensor] = None, is_causal: bool = False, dropout_p: float = 0.0,
                      scale: Optional[float] = None, dropout_mask: Optional[Tensor] = None) -> Tensor:
    """The (B, H, Lq, Lk) weights that attention applies to the values, after dropout."""
    batch, heads, query_len, head_dim = query.shape
    kv_heads, key_len = key.shape[1], key.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    key = key.repeat_interleave(heads // kv_heads, dim=1)
    if key_padding_mask is not None:
        # Zeroed, not only masked in the scores: 0 * NaN in the product is NaN.
        key = key.masked_fill(~key_padding_mask.bool()[:, None, :, None], 0)
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        scores = scores + attn_mask.to(scores.dtype)
    visible = visible_mask(batch, heads, query_len, key_len, attn_mask, key_padding_mask, is_causal, query.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    # Rows with nothing visible: softmax of all -inf is NaN; give them zeros
    # through a where, which also keeps their gradient at exactly 0.
    seen = (scores != float("-inf")).any(dim=-1, keepdim=True)
    probs = torch.softmax(torch.where(seen, scores, torch.zeros_like(scores)), dim=-1)
    probs = torch.where(seen, probs, torch.zeros_like(probs))
    if dropout_mask is not None and dropout_p > 0:
        probs = probs * dropout_mask.to(probs.dtype) / (1.0 - dropout_p)
    return probs


def attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
              key_padding_mask: Optional[Tensor] = None, is_causal: bool = False, dropout_p: float = 0.0,
              scale: Optional[float] = None, dropout_mask: Optional[Tensor] = None) -> Tensor:
    probs = attention_weights(query, key, attn_mask, key_padding_mask, is_causal, dropout_p, scale, dropout_mask)
    value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    if key_padding_mask is not None:  # a weight of 0 times a NaN value is NaN
        value = value.masked_fill(~key_padding_mask.bool()[:, None, :, None], 0)
    return torch.matmul(probs, value)
