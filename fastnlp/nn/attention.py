"""fastnlp.nn.MultiheadAttention: a drop-in for torch.nn.MultiheadAttention on the fused attention kernel."""

import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import constant_, xavier_normal_, xavier_uniform_
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from fastnlp import ops
from fastnlp.ops._autocast import autocast_dtype
from fastnlp.ops._backend import in_function_transform, is_compiling

__all__ = ["MultiheadAttention"]


class MultiheadAttention(nn.Module):
    r"""Multi-head attention, ``Concat(head_1, ..., head_h) W^O`` with
    ``head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)``.

    Same constructor, parameters (names, shapes, registration order and
    initialisation: one seed gives both modules the same weights), state_dict,
    forward and errors as :class:`torch.nn.MultiheadAttention`; a state_dict
    of one loads unchanged into the other. Masks follow torch's conventions: a
    boolean ``True`` means *masked out*; float masks are added to the scores;
    ``attn_mask`` is (L, S) or (N * num_heads, L, S), ``key_padding_mask`` (N, S).

    The attention itself always runs in :func:`fastnlp.ops.attention` (the
    fused, flash-style kernel); with ``need_weights=True`` the weights are
    recomputed beside it from q, k and the kernel's row log-sum-exp
    (:func:`fastnlp.ops.attention_with_weights`). Beyond torch's module:

    * a query row that sees no key at all (every key masked or padded) gets
      attention output 0 (so its result is ``out_proj.bias``), weights 0 and
      gradient 0, where torch gives NaN (which then spreads to every
      parameter's gradient);
    * key blocks hidden by ``key_padding_mask``, a causal mask or a boolean
      ``attn_mask`` are skipped by the kernel, so the cost follows the visible
      area; the (L, S) score matrix is never stored when ``need_weights=False``;
    * on the CPU (eager), when a boolean ``key_padding_mask`` hides at least a
      quarter of the keys, the key and value projections are computed at the
      real positions only (padded keys take part in nothing, and their
      projections are left 0);
    * works under ``torch.compile(fullgraph=True)``, forward and backward.

    Differences from torch: dropout draws from the kernel's counter-based
    stream, so the dropped entries differ from torch's for one seed (the rate
    and scaling are the same); forward has
    no inference fast path and takes no NestedTensor input (torch takes those
    only on its fast path). ``merge_masks`` is there for
    torch.nn.TransformerEncoderLayer, whose own inference fast path then runs
    torch's kernel on this module's weights (see merge_masks).

    Args:
        embed_dim: total dimension of the model; split across ``num_heads``.
        num_heads: number of parallel attention heads; must divide ``embed_dim``.
        dropout: dropout probability on the attention weights (training only).
        bias: add biases to the input and output projections.
        add_bias_kv: append a learned key and value (``bias_k``, ``bias_v``)
            to the key and value sequences.
        add_zero_attn: append a zero key and value (after ``bias_k``/``bias_v``).
        kdim, vdim: feature sizes of key and value (default ``embed_dim``);
            when they differ from it the input projection is kept as
            ``q_proj_weight``, ``k_proj_weight`` and ``v_proj_weight``.
        batch_first: inputs and output are (N, L, E) instead of (L, N, E).
    """

    __constants__ = ["batch_first"]
    bias_k: Optional[Tensor]
    bias_v: Optional[Tensor]

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be greater than 0,"
                             f" got embed_dim={embed_dim} and num_heads={num_heads} instead")
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != self.embed_dim:
            raise AssertionError("embed_dim must be divisible by num_heads")

        # Registration order matters: it is the state_dict's key order, and
        # the order of the random draws at initialisation.
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        # torch's own class (a plain Linear that quantization leaves alone), so
        # repr, quantization and state_dict treat both modules alike.
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
        else:
            self.bias_k = self.bias_v = None  # plain attributes, as in torch: no state_dict entry
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        if self._qkv_same_embed_dim:
            xavier_uniform_(self.in_proj_weight)
        else:
            xavier_uniform_(self.q_proj_weight)
            xavier_uniform_(self.k_proj_weight)
            xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            constant_(self.in_proj_bias, 0.0)
            constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            xavier_normal_(self.bias_v)

    def __setstate__(self, state):
        # Modules pickled by torch 1.1 predate separate projection weights.
        if "_qkv_same_embed_dim" not in state:
            state["_qkv_same_embed_dim"] = True
        super().__setstate__(state)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        r"""Attention of ``query`` over ``key``/``value``; returns ``(attn_output, attn_weights)``.

        Args:
            query: (L, E) unbatched, (L, N, E), or (N, L, E) if ``batch_first``.
            key: (S, kdim), (S, N, kdim) or (N, S, kdim).
            value: (S, vdim), (S, N, vdim) or (N, S, vdim).
            key_padding_mask: (N, S) or (S,) unbatched; bool (``True`` = padding,
                ignored) or float (added to the scores of that key).
            need_weights: also return the attention weights.
            attn_mask: (L, S) or (N * num_heads, L, S) ((num_heads, L, S)
                unbatched); bool (``True`` = not allowed to attend) or float (added).
            average_attn_weights: average the returned weights over heads.
            is_causal: a hint that ``attn_mask`` is the causal mask, which
                must then be given, as in torch. Where torch would use the hint
                (no key_padding_mask, ``need_weights=False``) the kernel applies
                the causal mask itself and ``attn_mask`` is not read; otherwise
                ``attn_mask`` is used.

        Returns:
            attn_output: (L, E), (L, N, E) or (N, L, E) if ``batch_first``.
            attn_weights: None unless ``need_weights``; (N, L, S) averaged over
                heads or (N, num_heads, L, S) (without N for unbatched input),
                S counting the ``bias_k`` and zero-attention keys.
        """
        # torch's checks, in torch's order, so malformed calls fail alike;
        # its first look at the masks is this test for its inference fast path.
        _ = ((attn_mask is not None and torch.is_floating_point(attn_mask))
             or (key_padding_mask is not None and torch.is_floating_point(key_padding_mask)))
        is_batched = query.dim() == 3
        _check_mask_type(key_padding_mask, "key_padding_mask", _dtype_or_none(attn_mask), "attn_mask")
        _check_mask_type(attn_mask, "attn_mask", None, "")
        if query.is_nested or key.is_nested or value.is_nested:
            raise AssertionError("fastnlp.nn.MultiheadAttention does not support NestedTensor input")
        batch_first = self.batch_first and is_batched
        if batch_first:
            # torch transposes these before checking their shapes: a 1-D key
            # or value fails in that transpose first.
            for tensor in (key, value):
                if tensor.dim() < 2:
                    tensor.transpose(1, 0)
        _check_shapes(query, key, value, key_padding_mask, attn_mask, self.num_heads)

        # Self- and encoder-decoder attention share one projection product; as
        # in torch, unbatched inputs are treated as distinct tensors.
        self_attention = is_batched and query is key and key is value
        shared_kv = is_batched and key is value
        if not is_batched:  # a batch of one, sequence first
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        seq_dim = 1 if batch_first else 0
        tgt_len, bsz, embed_dim = query.shape[seq_dim], query.shape[1 - seq_dim], query.shape[2]
        src_len = key.shape[seq_dim]

        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        # Where torch hands the hint to SDPA, the kernel applies the causal
        # mask; everywhere else torch uses attn_mask and tests only the hint's
        # truth value. So a non-bool hint (None, 0, a tensor) reaches the op,
        # whose TypeError is SDPA's, only where torch hands it on.
        hands_hint_on = key_padding_mask is None and not need_weights
        kernel_causal = is_causal if hands_hint_on else False
        if kernel_causal:
            attn_mask = None
        if embed_dim != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {embed_dim}")
        if self._qkv_same_embed_dim:
            if key.shape != value.shape:
                raise AssertionError(f"key shape {_seq_first(key.shape, batch_first)} does not match value shape "
                                     f"{_seq_first(value.shape, batch_first)}")
        elif key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {_seq_first(key.shape, batch_first)[:2]} do not "
                                 f"match value's {_seq_first(value.shape, batch_first)[:2]}")

        key_rows = _real_key_rows(key_padding_mask, bsz, src_len, seq_dim, key.device)
        query, key, value = self._trainable_inputs(query, key, value)
        q, k, v = self._in_projection(query, key, value, self_attention, shared_kv, key_rows)

        if attn_mask is not None:
            expected = (tgt_len, src_len) if attn_mask.dim() == 2 else (bsz * self.num_heads, tgt_len, src_len)
            if attn_mask.shape != expected:
                raise RuntimeError(f"The shape of the {attn_mask.dim()}D attn_mask is {attn_mask.shape}, "
                                   f"but should be {expected}.")
        if self.bias_k is not None and self.bias_v is None:
            raise AssertionError("bias_k is set but bias_v is None")
        if self.bias_v is not None and self.bias_k is None:
            raise AssertionError("bias_v is set but bias_k is None")
        if key.shape[1 - seq_dim] != bsz:
            # torch's heads reshape fails here, a RuntimeError; this one says why.
            raise RuntimeError(f"key has batch size {key.shape[1 - seq_dim]} but query has {bsz}")
        extra = (self.bias_k is not None) + bool(self.add_zero_attn)  # keys appended after the sequence
        if key_padding_mask is not None:
            for dim, want in ((0, bsz), (1, src_len)):
                got = key_padding_mask.shape[dim]
                if got != want:
                    raise AssertionError(f"Expected key_padded_mask.shape[{dim}] to be {want + extra * dim}, "
                                         f"but got {got + extra * dim}")
        _check_mask_dtypes(attn_mask, key_padding_mask, query.dtype, need_weights, autocast_dtype(q), q.dtype)

        k, v = self._append_keys(k, v, bsz, seq_dim)
        mask, padding = _kernel_masks(attn_mask, key_padding_mask, extra, bsz, self.num_heads, tgt_len, q.dtype)
        q, k, v = (self._split_heads(x, seq_dim) for x in (q, k, v))
        dropout_p = self.dropout if self.training else 0.0
        if need_weights and self.training:
            # torch's weights path: F.dropout on the weights only when dropout
            # > 0 (a str or None fails this comparison, a TypeError, as there;
            # a negative one or NaN means none), F.dropout's ValueError above
            # 1. Without weights the op checks dropout_p as SDPA does.
            if not dropout_p > 0.0:
                dropout_p = 0.0
            elif dropout_p > 1.0:
                raise ValueError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
        if need_weights:
            out, weights = ops.attention_with_weights(q, k, v, mask, dropout_p, kernel_causal,
                                                      key_padding_mask=padding)
        else:
            out = ops.attention(q, k, v, mask, dropout_p, kernel_causal, key_padding_mask=padding)
            weights = None
        out = self._merge_heads(out, seq_dim)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)

        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not is_batched:
            out = out.squeeze(1)
            if weights is not None:
                weights = weights.squeeze(0)
        return out, weights

    def _trainable_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """The inputs, with a copy of each made under torch.inference_mode() where autograd must save it.

        A projection's input is saved for its weight's gradient, and autograd
        cannot save an inference tensor. torch's batch_first path projects a
        transposed copy of each input, so there such an input trains; here
        the inputs are projected as they come, so a copy is made instead (in
        either layout: an input is not malformed for where it was made).
        """
        weights = ((self.in_proj_weight,) if self._qkv_same_embed_dim
                   else (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight))
        # Dynamo cannot trace is_inference(); under torch.compile it is left to torch.
        if (is_compiling() or not torch.is_grad_enabled()
                or not any(weight.requires_grad for weight in weights)):
            return query, key, value
        copies = {}  # one copy of an input passed as several (self-attention)
        for tensor in (query, key, value):
            if tensor.is_inference() and id(tensor) not in copies:
                copies[id(tensor)] = tensor.clone()
        return tuple(copies.get(id(tensor), tensor) for tensor in (query, key, value))

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor, self_attention: bool, shared_kv: bool,
                       key_rows: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """q, k, v; with key_rows, k and v are projected only at those rows (the rest are 0)."""
        bias_q = bias_k = bias_v = None
        if self.in_proj_bias is not None:
            bias_q, bias_k, bias_v = self.in_proj_bias.chunk(3)
        if not self._qkv_same_embed_dim:
            embed, kdim, vdim = query.shape[-1], key.shape[-1], value.shape[-1]
            for name, weight, width in (("query", self.q_proj_weight, embed), ("key", self.k_proj_weight, kdim),
                                        ("value", self.v_proj_weight, vdim)):
                if weight.shape != (embed, width):
                    raise AssertionError(f"expecting {name} weights shape of {(embed, width)}, "
                                         f"but got {weight.shape}")
            return (F.linear(query, self.q_proj_weight, bias_q),
                    _project_rows(key, self.k_proj_weight, bias_k, key_rows),
                    _project_rows(value, self.v_proj_weight, bias_v, key_rows))
        weight = self.in_proj_weight
        if self_attention and key_rows is None:
            return F.linear(query, weight, self.in_proj_bias).chunk(3, dim=-1)
        weight_q, weight_k, weight_v = weight.chunk(3)
        if shared_kv:
            bias_kv = None if self.in_proj_bias is None else self.in_proj_bias[self.embed_dim:]
            k, v = _project_rows(key, weight[self.embed_dim:], bias_kv, key_rows).chunk(2, dim=-1)
            return F.linear(query, weight_q, bias_q), k, v
        return (F.linear(query, weight_q, bias_q), _project_rows(key, weight_k, bias_k, key_rows),
                _project_rows(value, weight_v, bias_v, key_rows))

    def _append_keys(self, k: Tensor, v: Tensor, bsz: int, seq_dim: int) -> Tuple[Tensor, Tensor]:
        """bias_k/bias_v, then a zero key/value, after the last position."""
        step = (1, bsz, self.embed_dim) if seq_dim == 0 else (bsz, 1, self.embed_dim)
        k_parts, v_parts = [k], [v]
        if self.bias_k is not None:
            k_parts.append(self.bias_k.reshape(1, 1, -1).expand(step))
            v_parts.append(self.bias_v.reshape(1, 1, -1).expand(step))
        if self.add_zero_attn:
            k_parts.append(k.new_zeros(step))
            v_parts.append(v.new_zeros(step))
        if len(k_parts) == 1:
            return k, v
        return torch.cat(k_parts, dim=seq_dim), torch.cat(v_parts, dim=seq_dim)

    def _split_heads(self, x: Tensor, seq_dim: int) -> Tensor:
        """(L, N, E) or (N, L, E) -> (N, H, L, E / H), a view: the kernel takes any strides."""
        if seq_dim == 0:
            return x.unflatten(-1, (self.num_heads, -1)).permute(1, 2, 0, 3)
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def _merge_heads(self, x: Tensor, seq_dim: int) -> Tensor:
        if seq_dim == 0:
            return x.permute(2, 0, 1, 3).flatten(2)
        return x.transpose(1, 2).flatten(2)

    def merge_masks(self, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                    query: Tensor) -> Tuple[Optional[Tensor], Optional[int]]:
        r"""The masks of a batch-first self-attention as one mask and its type,
        as torch's module returns them: ``key_padding_mask`` (N, S) alone is
        type 1; with an ``attn_mask`` ((L, S) or (N * num_heads, L, S)) the
        two become one (N, num_heads, L, S) mask, their sum, of type 2;
        (None, None) without masks.

        torch.nn.TransformerEncoderLayer calls this on its inference fast path
        (eval, no grad, batch_first, ...), then runs torch's fused encoder-layer
        kernel on this module's in_proj_weight, in_proj_bias and out_proj;
        forward is not called there. That path is supported, not avoided: it
        gives exactly the unpatched layer's results, while the only ways to
        turn it off (a false _qkv_same_embed_dim, a hook) would be lies, and
        would not stop torch.nn.TransformerEncoder from handing its layers
        NestedTensor input on the same path, which forward does not take. So a
        patched layer runs torch's kernel in inference without grad, and this
        module's everywhere else.
        """
        if attn_mask is None:
            if key_padding_mask is None:
                return None, None
            return key_padding_mask, 1
        # With an attn_mask query is a plain (N, L, E) tensor (torch's encoder
        # only nests its input when there is no attn_mask).
        batch, length = query.shape[0], query.shape[1]
        if attn_mask.dim() == 3:
            merged = attn_mask.view(batch, -1, length, length)
        else:
            merged = attn_mask.view(1, 1, length, length).expand(batch, self.num_heads, -1, -1)
        if key_padding_mask is not None:
            merged = merged + key_padding_mask.view(batch, 1, 1, length).expand(-1, self.num_heads, -1, -1)
        return merged, 2


# At most this share of the key positions real (not padding) for the key and
# value projections to be computed at the real positions only: below it the
# saved multiply-adds outweigh gathering those rows and scattering the results
# (measured on a 2-core CPU at B=8, T=256, E=768: 3/8 padding takes the
# module's forward+backward from 208 to 175 ms).
_SPARSE_KEY_PROJECTION_MAX_REAL = 0.75


def _real_key_rows(key_padding_mask: Optional[Tensor], bsz: int, src_len: int, seq_dim: int,
                   device: torch.device) -> Optional[Tensor]:
    """Indices of the real key positions in the key flattened to (rows, features),
    when the key and value projections are better computed there only; else None.

    Keys that a boolean key_padding_mask hides take part in nothing: their
    scores are masked for every query and their gradients are exactly 0, so
    their projections need not be computed (they are left 0). Eager CPU only:
    the indices are data-dependent (no graph capture under torch.compile, no
    batching rule under torch.func.vmap), and on a GPU the host sync would
    cost more than the projection saves.
    """
    if (key_padding_mask is None or key_padding_mask.dtype != torch.bool or device.type != "cpu"
            or key_padding_mask.shape != (bsz, src_len) or is_compiling() or in_function_transform()):
        return None
    real = ~key_padding_mask
    if seq_dim == 0:  # keys are (S, N, E): row s * N + n
        real = real.t()
    rows = real.reshape(-1).nonzero().squeeze(1)
    if rows.numel() > _SPARSE_KEY_PROJECTION_MAX_REAL * real.numel():
        return None
    return rows


def _project_rows(x: Tensor, weight: Tensor, bias: Optional[Tensor], rows: Optional[Tensor]) -> Tensor:
    """F.linear(x, weight, bias) for 3-D x, computed only at `rows` of x
    flattened to (-1, features) when given, 0 elsewhere."""
    if rows is None:
        return F.linear(x, weight, bias)
    # flatten and explicit sizes, not reshape/view with -1: x may have no
    # rows at all (a batch of 0, or no keys), where -1 is ambiguous.
    projected = F.linear(x.flatten(0, 1).index_select(0, rows), weight, bias)
    full = projected.new_zeros(x.shape[0] * x.shape[1], projected.shape[-1]).index_copy(0, rows, projected)
    return full.view(x.shape[0], x.shape[1], projected.shape[-1])


def _dtype_or_none(mask) -> Optional[torch.dtype]:
    if mask is None:
        return None
    if isinstance(mask, Tensor):
        return mask.dtype
    raise RuntimeError("input to _none_or_dtype() must be None or torch.Tensor")


def _check_mask_type(mask: Optional[Tensor], name: str, other_type: Optional[torch.dtype], other_name: str) -> None:
    if mask is None:
        return
    if mask.dtype != torch.bool and not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported")
    if other_type is not None and mask.dtype != other_type:
        warnings.warn(f"Support for mismatched {name} and {other_name} is deprecated. Use same type for both "
                      "instead.", stacklevel=3)


def _check_mask_dtypes(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], query_dtype: torch.dtype,
                       need_weights: bool, autocast: Optional[torch.dtype], projected_dtype: torch.dtype) -> None:
    """Refuses float masks whose dtype torch's module refuses, before any kernel runs.

    torch turns a boolean mask into a float one in query's dtype and adds the
    two masks, so their sum has the promoted dtype (float16 + float32 gives
    float32, which passes); the kernel then takes that sum in the projected
    query's dtype only with need_weights=True, and in that dtype or float32
    without (scaled_dot_product_attention). Under autocast (`autocast`: its
    dtype, else None) the kernel is handed the sum cast to the autocast dtype
    unless it is float64, and the projected query is in the autocast dtype
    (`projected_dtype`; query's own outside autocast). torch raises
    RuntimeError from inside those kernels; this raises the same type,
    naming the mask at fault.
    """
    masks = [(name, mask) for name, mask in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask))
             if mask is not None]
    if not masks:
        return
    dtypes = [query_dtype if mask.dtype == torch.bool else mask.dtype for _, mask in masks]
    merged = dtypes[0]
    for dtype in dtypes[1:]:
        merged = torch.promote_types(merged, dtype)
    handed = autocast if autocast is not None and merged != torch.float64 else merged
    allowed = (projected_dtype,) if need_weights else (projected_dtype, torch.float32)
    if handed in allowed:
        return
    floats = [(name, mask.dtype) for name, mask in masks if mask.dtype != torch.bool]
    # The float mask whose dtype the sum has is at fault; when none has it
    # (float16 + bfloat16 gives float32), every float mask is, and the sum's
    # dtype is named too.
    culprits = [(name, dtype) for name, dtype in floats if dtype == merged]
    note = ""
    if not culprits:
        culprits, note = floats, f" (the masks' sum: {merged})"
    names = " and ".join(name for name, _ in culprits)
    got = ", ".join(f"{name}.dtype: {dtype}" for name, dtype in culprits) + note
    expected = "bool or to match query dtype" if need_weights else "bool or float32 or to match query dtype"
    raise RuntimeError(f"Expected {names} dtype to be {expected}, but got {got} and query.dtype: "
                       f"{projected_dtype} instead.")


def _check_shapes(query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                  attn_mask: Optional[Tensor], num_heads: int) -> None:
    """Dimensions of the inputs and masks, with torch's messages."""
    if query.dim() == 3:
        if key.dim() != 3 or value.dim() != 3:
            raise AssertionError("For batched (3-D) `query`, expected `key` and `value` to be 3-D"
                                 f" but found {key.dim()}-D and {value.dim()}-D tensors respectively")
        if key_padding_mask is not None and key_padding_mask.dim() != 2:
            raise AssertionError("For batched (3-D) `query`, expected `key_padding_mask` to be `None` or 2-D"
                                 f" but found {key_padding_mask.dim()}-D tensor instead")
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise AssertionError("For batched (3-D) `query`, expected `attn_mask` to be `None`, 2-D or 3-D"
                                 f" but found {attn_mask.dim()}-D tensor instead")
    elif query.dim() == 2:
        if key.dim() != 2 or value.dim() != 2:
            raise AssertionError("For unbatched (2-D) `query`, expected `key` and `value` to be 2-D"
                                 f" but found {key.dim()}-D and {value.dim()}-D tensors respectively")
        if key_padding_mask is not None and key_padding_mask.dim() != 1:
            raise AssertionError("For unbatched (2-D) `query`, expected `key_padding_mask` to be `None` or 1-D"
                                 f" but found {key_padding_mask.dim()}-D tensor instead")
        if attn_mask is not None:
            if attn_mask.dim() not in (2, 3):
                raise AssertionError("For unbatched (2-D) `query`, expected `attn_mask` to be `None`, 2-D or 3-D"
                                     f" but found {attn_mask.dim()}-D tensor instead")
            expected = (num_heads, query.shape[0], key.shape[0])
            if attn_mask.dim() == 3 and attn_mask.shape != expected:
                raise AssertionError(f"Expected `attn_mask` shape to be {expected} but got {attn_mask.shape}")
    else:
        raise AssertionError("query should be unbatched 2D or batched 3D tensor but received "
                             f"{query.dim()}-D query tensor")


def _seq_first(shape: torch.Size, batch_first: bool) -> torch.Size:
    """A shape as torch's functional sees it (sequence first), for its messages."""
    return torch.Size((shape[1], shape[0], shape[2])) if batch_first else shape


def _kernel_masks(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], extra: int, bsz: int,
                  num_heads: int, tgt_len: int, dtype: torch.dtype) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """torch's masks (bool True = masked out, float added) as the kernel takes
    them (bool True = take part), widened by `extra` appended keys that every
    query sees. Boolean masks stay boolean so the kernel can skip what they
    hide; a float key_padding_mask is folded into the additive attn_mask."""
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask
            attn_mask = F.pad(attn_mask, (0, extra), value=True) if extra else attn_mask
        else:
            attn_mask = F.pad(attn_mask.to(dtype), (0, extra)) if extra else attn_mask.to(dtype)
        if attn_mask.dim() == 3:  # (N * H, L, S) -> (N, H, L, S); a 2-D mask broadcasts as it is
            # S spelled out: reshape cannot infer a -1 from a mask with no elements (N or L zero).
            attn_mask = attn_mask.reshape(bsz, num_heads, tgt_len, attn_mask.shape[-1])
    if key_padding_mask is None:
        return attn_mask, None
    if key_padding_mask.dtype == torch.bool:
        key_padding_mask = ~key_padding_mask
        return attn_mask, F.pad(key_padding_mask, (0, extra), value=True) if extra else key_padding_mask
    additive = key_padding_mask.to(dtype)
    additive = (F.pad(additive, (0, extra)) if extra else additive)[:, None, None, :]
    if attn_mask is None:
        return additive, None
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(
            ~attn_mask, float("-inf"))
    return attn_mask + additive, None
