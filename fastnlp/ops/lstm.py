"""LSTM: registration of torch.ops.fastnlp.lstm_forward/lstm_backward (fake
kernels and the reference backward; autograd is in csrc/lstm_autograd.cpp)
and the functional API.

The op runs one layer in one direction over a *time-major packed* batch, the
layout of torch.nn.utils.rnn.PackedSequence: `input` (N, I) holds the rows of
step 0 for the batch_sizes[0] sequences alive then, then those of step 1, and
so on, with batch_sizes non-increasing. Each sequence stops at its own length
and no work is spent on padding. An empty `batch_sizes` means padded input:
all B = h0.size(0) sequences run N / B steps (a (T, B, I) tensor viewed as
(T * B, I)). fastnlp.nn.LSTM stacks layers and directions on top of it.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastnlp import _C
from fastnlp.ops._autocast import autocast_cast, autocast_dtype
from fastnlp.ops._backend import is_compiling, use_reference
from fastnlp.ops._double_backward import register_reference_backward
from fastnlp.ops._fake import register_fake
from fastnlp.reference import lstm as reference

__all__ = ["lstm_cell", "lstm_layer", "lstm_layer_pair"]


def _ln_stats_dtype(input):
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _saved_dtype(input):
    """The dtype of what lstm_forward saves for the backward pass (gates, cells, the layer norm's): the input's,
    but float32 for bfloat16 on the CPU, whose kernel keeps all but its products' operands in float32."""
    return torch.float32 if input.dtype == torch.bfloat16 and input.device.type == "cpu" else input.dtype


@register_fake("fastnlp::lstm_forward", "fastnlp.lstm", host_tensors=("batch_sizes",))
def _lstm_forward_fake(input, batch_sizes, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, reverse,
                       recurrent_mask=None, zoneout_cell=None, zoneout_hidden=None, layer_norm_ih_weight=None,
                       layer_norm_ih_bias=None, layer_norm_hh_weight=None, layer_norm_hh_bias=None,
                       layer_norm_cell_weight=None, layer_norm_cell_bias=None):
    rows, hidden = input.shape[0], c0.shape[1]
    saved = _saved_dtype(input)
    if layer_norm_ih_weight is not None:
        norm_ih, norm_hh = (input.new_empty(rows, 4 * hidden, dtype=saved) for _ in range(2))
        ln_stats = input.new_empty(rows, 4, dtype=_ln_stats_dtype(input))
    else:
        norm_ih, norm_hh, ln_stats = (input.new_empty(0, dtype=saved) for _ in range(3))
    # The kernels return contiguous tensors whatever the inputs' strides:
    # new_empty, not empty_like (which keeps a transposed h0's strides).
    return (input.new_empty(rows, h0.shape[1]), h0.new_empty(h0.shape), c0.new_empty(c0.shape),
            input.new_empty(rows, 4 * hidden, dtype=saved), input.new_empty(rows, hidden, dtype=saved), norm_ih,
            norm_hh, ln_stats)


@register_fake("fastnlp::lstm_backward", "fastnlp.lstm", host_tensors=("batch_sizes",))
def _lstm_backward_fake(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, weight_ih, weight_hh,
                        weight_hr, has_bias, reverse, output, gates, cells, recurrent_mask=None, zoneout_cell=None,
                        zoneout_hidden=None, layer_norm_ih_weight=None, layer_norm_hh_weight=None,
                        layer_norm_cell_weight=None, layer_norm_cell_bias=None, norm_ih=None, norm_hh=None,
                        ln_stats=None, input_grad=True, weight_grads=True):
    def wanted(wanted, tensor, shape):  # what the kernel skips is empty
        return tensor.new_empty(shape if wanted else (0,))

    grad_bias = wanted(weight_grads and has_bias, input, weight_ih.shape[0])
    grad_weight_hr = wanted(weight_grads and weight_hr is not None, input, weight_hr.shape if weight_hr is not None
                            else 0)
    if layer_norm_ih_weight is not None and weight_grads:
        gates_size, hidden = weight_ih.shape[0], c0.shape[1]
        grad_ln = (input.new_empty(gates_size), input.new_empty(gates_size), input.new_empty(gates_size),
                   input.new_empty(hidden), input.new_empty(hidden))
    else:
        grad_ln = tuple(input.new_empty(0) for _ in range(5))
    return (wanted(input_grad, input, input.shape), h0.new_empty(h0.shape), c0.new_empty(c0.shape),
            wanted(weight_grads, weight_ih, weight_ih.shape), wanted(weight_grads, weight_hh, weight_hh.shape),
            grad_bias, grad_weight_hr) + grad_ln


@register_fake("fastnlp::lstm_forward_pair", "fastnlp.lstm", host_tensors=("batch_sizes",))
def _lstm_forward_pair_fake(input, batch_sizes, forward_args, reverse_args):
    def one(args, reverse):
        h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr = args[:7]
        return list(_lstm_forward_fake(input, batch_sizes, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                                       reverse, *args[7:]))
    return one(forward_args, False), one(reverse_args, True)


@register_fake("fastnlp::lstm_backward_pair", "fastnlp.lstm", host_tensors=("batch_sizes",))
def _lstm_backward_pair_fake(input, batch_sizes, has_bias, forward_args, reverse_args, input_grad=True,
                             weight_grads=True):
    def one(args, reverse):
        grad_output, grad_h_n, grad_c_n, h0, c0, weight_ih, weight_hh, weight_hr = args[:8]
        return list(_lstm_backward_fake(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, weight_ih,
                                        weight_hh, weight_hr, has_bias, reverse, *args[8:], input_grad=input_grad,
                                        weight_grads=weight_grads))
    return one(forward_args, False), one(reverse_args, True)


def _reference_forward(input, batch_sizes, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, reverse,
                       recurrent_mask, zoneout_cell, zoneout_hidden, *layer_norm):
    """lstm_forward's differentiable outputs (output, h_n, c_n), from its arguments, by the reference."""
    return reference.lstm_layer(input, batch_sizes, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                                reverse, recurrent_mask, zoneout_cell, zoneout_hidden,
                                layer_norm if layer_norm[0] is not None else None)


# With create_graph=True, csrc/lstm_autograd.cpp's backward passes (of
# lstm_forward and, a direction at a time, lstm_forward_pair) call this.
register_reference_backward("lstm_forward", _reference_forward)

# The CPU kernel takes float32, float64 and bfloat16 (whose products it runs in
# bfloat16 where oneDNN has them, all else in float32: csrc/cpu/lstm.cpp);
# float16 input is widened to float32 around it (and autograd narrows the
# gradients back).
_CPU_WIDENED = (torch.float16,)

# The op's one overload, looked up once: the packet's __call__ is a Python
# frame more on every step of an LSTMCell loop.
_LSTM_FORWARD = torch.ops.fastnlp.lstm_forward.default

# "Padded input": an empty batch_sizes, made once rather than on every call.
_PADDED = torch.empty(0, dtype=torch.long)


def _autocast_result_dtypes(device_type: str, compute: torch.dtype, c0_dtype: torch.dtype,
                            projected: bool) -> Tuple[torch.dtype, torch.dtype]:
    """(dtype of output and h_n, dtype of c_n) that torch.nn.LSTM / LSTMCell give under autocast."""
    if device_type == "cpu":
        # On the CPU autocast casts only torch's matrix products (linear), so
        # the new cell f * c + i * g is promoted with c0's dtype (float32 c0:
        # float32 states), and so is h = o * tanh(c), unless the projection
        # (another matrix product) makes h.
        cell = torch.promote_types(compute, c0_dtype)
        return (compute if projected else cell), cell
    # On CUDA autocast casts all of cuDNN's RNN (and lstm_cell's) arguments,
    # c0 included, so every result is in the autocast dtype.
    return compute, compute


def lstm_layer(input: Tensor, batch_sizes: Optional[Tensor], h0: Tensor, c0: Tensor, weight_ih: Tensor,
               weight_hh: Tensor, bias_ih: Optional[Tensor] = None, bias_hh: Optional[Tensor] = None,
               weight_hr: Optional[Tensor] = None, reverse: bool = False, *,
               recurrent_mask: Optional[Tensor] = None, zoneout_cell: Optional[Tensor] = None,
               zoneout_hidden: Optional[Tensor] = None, layer_norm_ih_weight: Optional[Tensor] = None,
               layer_norm_ih_bias: Optional[Tensor] = None, layer_norm_hh_weight: Optional[Tensor] = None,
               layer_norm_hh_bias: Optional[Tensor] = None, layer_norm_cell_weight: Optional[Tensor] = None,
               layer_norm_cell_bias: Optional[Tensor] = None,
               backend: Optional[str] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer, one direction, over a time-major packed batch.

    Args:
        input: (N, I) rows, time-major (see the module docstring).
        batch_sizes: (T,) int64 CPU tensor, non-increasing, or None / empty for
            padded input (N / B steps of all B sequences).
        h0: (B, P) initial hidden state; c0: (B, H) initial cell state.
        weight_ih (4H, I), weight_hh (4H, P), bias_ih (4H,), bias_hh (4H,):
            as in torch.nn.LSTM, gates in the order i, f, g, o.
        weight_hr: (P, H) projection (torch.nn.LSTM's proj_size), or None.
        reverse: run from the last step to the first.
        recurrent_mask: (B, P) or None: h_{t-1} enters the recurrent product
            as h_{t-1} * recurrent_mask (per-sequence recurrent dropout).
        zoneout_cell (N, H), zoneout_hidden (N, P): per-row weights z of the
            previous state, state_t = z * state_{t-1} + (1 - z) * new_t
            (zoneout); zoneout_hidden needs zoneout_cell. The three are
            constants to autograd: the kernels give them no gradient, and
            refuse one that requires grad (where grad mode is on).
        layer_norm_{ih,hh}_{weight,bias} (4H,), layer_norm_cell_{weight,bias}
            (H,): all six or none. Layer normalisation (Ba et al., 2016) of
            both gate products and of the new cell before its tanh:
            gates = LN_ih(x W_ih^T) + LN_hh(h W_hh^T) + bias_ih + bias_hh,
            h~ = o * tanh(LN_cell(c~)), eps 1e-5, zoneout applied after.

    Returns:
        output (N, P), h_n (B, P), c_n (B, H): each sequence's state after its
        own last step (its first, when reverse).
    """
    if input is None or h0 is None or c0 is None or weight_ih is None or weight_hh is None:
        # Identity tests, cheap enough for every step of an LSTMCell loop;
        # the dispatcher's own error ("tensor does not have a device") names none.
        _refuse_missing(input=input, h0=h0, c0=c0, weight_ih=weight_ih, weight_hh=weight_hh)
    if batch_sizes is None:
        batch_sizes = _PADDED
    if zoneout_hidden is not None and zoneout_cell is None:
        raise ValueError("zoneout_hidden needs zoneout_cell (pass zeros to zone out the hidden state only)")
    layer_norm = (layer_norm_ih_weight, layer_norm_ih_bias, layer_norm_hh_weight, layer_norm_hh_bias,
                  layer_norm_cell_weight, layer_norm_cell_bias)
    _check_layer_norm(layer_norm)
    if use_reference(backend):
        if not is_compiling():  # dynamo cannot trace this pybind call: a compiled reference runs unchecked
            _C.lstm_check_arguments(input, batch_sizes, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                                    recurrent_mask, zoneout_cell, zoneout_hidden, *layer_norm)
        return reference.lstm_layer(input, batch_sizes, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                                    reverse, recurrent_mask, zoneout_cell, zoneout_hidden,
                                    layer_norm if layer_norm[0] is not None else None)
    autocast = autocast_dtype(input)
    if autocast is not None:
        # The kernels call ATen's matrix products, which the autocast dispatch
        # key would cast again, half-way through ("self and mat2 must have the
        # same dtype"). So autocast is applied once, to the whole op: its matrix
        # product operands are cast as autocast casts them (float64 left alone,
        # so a float64 operand among cast ones fails, as torch's matrix product
        # does), everything else to that dtype, and the op runs with autocast
        # off. The results are cast to the dtypes torch.nn.LSTM's have.
        # (torch.library.register_autocast would fix one cast dtype for all
        # calls and give c_n in it, unlike torch's CPU LSTM.)
        compute = autocast_cast(input, autocast).dtype
        cast = [autocast_cast(t, autocast) for t in (input, h0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr)]
        for name, t in zip(("h0", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"), cast[1:]):
            # Checked here: the CPU kernel's half-precision path would widen
            # a float64 operand to float32 without a word.
            if t is not None and t.dtype != compute:
                raise RuntimeError(f"fastnlp.lstm: under autocast, input is {compute} but {name} is {t.dtype} "
                                   "(autocast leaves float64 tensors as they are: all float64 or none)")
        rest = [t.to(compute) if t is not None else None
                for t in (c0, recurrent_mask, zoneout_cell, zoneout_hidden) + layer_norm]
        with torch.autocast(input.device.type, enabled=False):
            output, h_n, c_n = lstm_layer(cast[0], batch_sizes, cast[1], rest[0], *cast[2:], reverse=reverse,
                                          recurrent_mask=rest[1], zoneout_cell=rest[2], zoneout_hidden=rest[3],
                                          **dict(zip(_LAYER_NORM_NAMES, rest[4:])))
        h_dtype, c_dtype = _autocast_result_dtypes(input.device.type, compute, c0.dtype, weight_hr is not None)
        return output.to(h_dtype), h_n.to(h_dtype), c_n.to(c_dtype)
    if input.is_cpu and input.dtype in _CPU_WIDENED:
        if not is_compiling():  # before widening, which would make a float64 h0 or an int64 bias float32
            _C.lstm_check_arguments(input, batch_sizes, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                                    recurrent_mask, zoneout_cell, zoneout_hidden, *layer_norm)
        dtype = input.dtype
        widen = [t.float() if t is not None else None
                 for t in (input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, recurrent_mask,
                           zoneout_cell, zoneout_hidden) + layer_norm]
        output, h_n, c_n = lstm_layer(widen[0], batch_sizes, *widen[1:8], reverse=reverse,
                                      recurrent_mask=widen[8], zoneout_cell=widen[9], zoneout_hidden=widen[10],
                                      **dict(zip(_LAYER_NORM_NAMES, widen[11:])))
        return output.to(dtype), h_n.to(dtype), c_n.to(dtype)
    output, h_n, c_n = _LSTM_FORWARD(
        input, batch_sizes, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, reverse, recurrent_mask,
        zoneout_cell, zoneout_hidden, *layer_norm)[:3]
    return output, h_n, c_n


def _refuse_missing(**required: Optional[Tensor]) -> None:
    for name, value in required.items():
        if value is None:
            raise TypeError(f"fastnlp.lstm: {name} must be a tensor, got None")


_LAYER_NORM_NAMES = ("layer_norm_ih_weight", "layer_norm_ih_bias", "layer_norm_hh_weight", "layer_norm_hh_bias",
                     "layer_norm_cell_weight", "layer_norm_cell_bias")


def _check_layer_norm(layer_norm) -> None:
    # The common case first, by identity only: a tuple comparison with
    # (None,) * 6 would be cheaper, but TorchDynamo before torch 2.6 traces it
    # as tensor != None, which it cannot (a graph break, so fullgraph fails).
    if all(t is None for t in layer_norm):
        return
    given = [t is not None for t in layer_norm]  # at least one, past the return above
    if not all(given):
        missing = [name for name, g in zip(_LAYER_NORM_NAMES, given) if not g]
        raise ValueError(f"layer normalisation needs all six layer_norm_* tensors; missing: {', '.join(missing)}")


def lstm_cell(input: Tensor, h: Tensor, c: Tensor, weight_ih: Tensor, weight_hh: Tensor,
              bias_ih: Optional[Tensor] = None, bias_hh: Optional[Tensor] = None, *,
              layer_norm_ih_weight: Optional[Tensor] = None, layer_norm_ih_bias: Optional[Tensor] = None,
              layer_norm_hh_weight: Optional[Tensor] = None, layer_norm_hh_bias: Optional[Tensor] = None,
              layer_norm_cell_weight: Optional[Tensor] = None, layer_norm_cell_bias: Optional[Tensor] = None,
              backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """One LSTM step for a batch: input (B, I), h (B, H), c (B, H) -> (h', c').

    The same fused kernel as lstm_layer, run for a single step (layer_norm_*
    as there). As in torch.nn.LSTMCell, c may have another dtype than input:
    the results are promoted with it.
    """
    result_dtype = None
    if c.dtype != input.dtype and autocast_dtype(input) is None:
        # torch.nn.LSTMCell forms f * c + i * g in c's dtype promoted with the
        # gates', and h = o * tanh(c) with it (a float64 c: float64 results).
        # The kernel takes one dtype: it runs in input's, its results promoted.
        # (Under autocast lstm_layer casts c and promotes the results itself.)
        result_dtype = torch.promote_types(input.dtype, c.dtype)
        c = c.to(input.dtype)
    _output, h_new, c_new = lstm_layer(
        input, _PADDED, h, c, weight_ih, weight_hh, bias_ih, bias_hh, backend=backend,
        layer_norm_ih_weight=layer_norm_ih_weight, layer_norm_ih_bias=layer_norm_ih_bias,
        layer_norm_hh_weight=layer_norm_hh_weight, layer_norm_hh_bias=layer_norm_hh_bias,
        layer_norm_cell_weight=layer_norm_cell_weight, layer_norm_cell_bias=layer_norm_cell_bias)
    if result_dtype is not None:
        return h_new.to(result_dtype), c_new.to(result_dtype)
    return h_new, c_new


# The regularisers and layer-norm tensors of one direction, in the op's order.
_PAIR_OPTIONAL_NAMES = ("recurrent_mask", "zoneout_cell", "zoneout_hidden") + _LAYER_NORM_NAMES
_PAIR_REQUIRED_NAMES = ("h0", "c0", "weight_ih", "weight_hh")
_PAIR_NAMES = _PAIR_REQUIRED_NAMES + ("bias_ih", "bias_hh", "weight_hr") + _PAIR_OPTIONAL_NAMES


def lstm_layer_pair(input: Tensor, batch_sizes: Optional[Tensor], forward: dict, reverse: dict
                    ) -> Tuple[Tuple[Tensor, Tensor, Tensor], Tuple[Tensor, Tensor, Tensor]]:
    """Both directions of one bidirectional layer, run concurrently.

    `forward` and `reverse` hold lstm_layer's arguments for each direction by
    name (h0, c0, weight_ih, weight_hh, and optionally bias_ih, bias_hh,
    weight_hr, recurrent_mask, zoneout_cell, zoneout_hidden, layer_norm_*).
    Returns (output, h_n, c_n) of each: the same as two lstm_layer calls
    (reverse=False, then True), in one autograd node. On the CPU (float32 and
    float64 only), with two intra-op threads each direction gets one (see
    csrc/cpu/lstm.cpp), otherwise they run one after the other; on CUDA each
    direction runs on a stream of its own (csrc/cuda/torch_cuda.h).
    """
    for which, direction in (("forward", forward), ("reverse", reverse)):
        # lstm_layer's keyword arguments would refuse a misspelt name; so does this.
        unknown = sorted(set(direction) - set(_PAIR_NAMES))
        missing = [name for name in _PAIR_REQUIRED_NAMES if direction.get(name) is None]
        if unknown or missing:
            raise TypeError(f"lstm_layer_pair: {which} " + (f"has unknown keys {unknown}" if unknown else
                                                             f"is missing {missing}")
                            + f"; the keys are {list(_PAIR_NAMES)}")
    if autocast_dtype(input) is not None:
        # lstm_layer handles autocast (casting, then running with it off), so
        # under autocast the directions run one at a time.
        return (lstm_layer(input, batch_sizes, reverse=False, **forward),
                lstm_layer(input, batch_sizes, reverse=True, **reverse))
    if batch_sizes is None:
        batch_sizes = _PADDED
    args = []
    for direction in (forward, reverse):
        if direction.get("zoneout_hidden") is not None and direction.get("zoneout_cell") is None:
            raise ValueError("zoneout_hidden needs zoneout_cell (pass zeros to zone out the hidden state only)")
        _check_layer_norm(tuple(direction.get(name) for name in _LAYER_NORM_NAMES))
        args.append([direction["h0"], direction["c0"], direction["weight_ih"], direction["weight_hh"],
                     direction.get("bias_ih"), direction.get("bias_hh"), direction.get("weight_hr")]
                    + [direction.get(name) for name in _PAIR_OPTIONAL_NAMES])
    forward_out, reverse_out = torch.ops.fastnlp.lstm_forward_pair(input, batch_sizes, args[0], args[1])
    return (forward_out[0], forward_out[1], forward_out[2]), (reverse_out[0], reverse_out[1], reverse_out[2])
