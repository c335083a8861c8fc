"""Drop-in torch.nn.LSTM and torch.nn.LSTMCell on fastnlp's fused, length-aware kernels.

Same constructor arguments, parameter names, shapes and initialisation (in the
same order, so a given torch seed gives the same weights), same inputs and
outputs, same errors. What they add:

- a PackedSequence is consumed as it is: each sequence stops at its own
  length inside the kernel, so packed input costs less than padded input
  rather than several times more;
- the modules are plain nn.Modules over registered ops, so torch.compile
  captures them (it refuses torch.nn.LSTM) with fullgraph=True;
- LSTM(..., recurrent_dropout=p): dropout on the recurrent input h_{t-1}
  with one mask per sequence for all time steps (Gal & Ghahramani, 2016);
- LSTM(..., zoneout=p): each unit of h and c keeps its previous value with
  probability p at each step (Krueger et al., 2017), its expectation at
  evaluation.
Both are applied inside the fused layer op, in training mode, and draw from
torch's default generator, so a torch seed makes them deterministic.
- LSTM(..., layer_norm=True), LSTMCell(..., layer_norm=True): the
  LayerNorm-LSTM of Ba et al. (2016), fused in the kernels:
  gates = LN_ih(x W_ih^T) + LN_hh(h W_hh^T) + bias_ih + bias_hh and
  h = o * tanh(LN_cell(c)), each LN with its own gain and bias (eps 1e-5);
  the cell state itself, and what zoneout mixes, stays un-normalised.

They deliberately do not subclass torch.nn.LSTM: TorchDynamo graph-breaks on
every torch.nn.RNNBase instance.
"""

import math
import numbers
import warnings
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from fastnlp.ops import lstm as lstm_ops
from fastnlp.ops._autocast import autocast_dtype
from fastnlp.ops._backend import use_reference

__all__ = ["LSTM", "LSTMCell"]

HiddenState = Tuple[Tensor, Tensor]


def _check_constructor_args(input_size, hidden_size, num_layers, bias, batch_first, dropout, proj_size) -> None:
    """torch.nn.LSTM's argument checks, with its messages."""
    float(dropout)  # as torch stores it, first: a None or a list fails here, with TypeError
    if not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1 or isinstance(dropout, bool):
        raise ValueError("dropout should be a number in range [0, 1] representing the probability of an "
                         "element being zeroed")
    if dropout > 0 and num_layers == 1:
        warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                      f"expects num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
                      stacklevel=3)
    if not isinstance(bias, bool):
        raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
    if not isinstance(batch_first, bool):
        raise TypeError(f"batch_first should be of type bool, got: {type(batch_first).__name__}")
    if not isinstance(input_size, int):
        raise TypeError(f"input_size should be of type int, got: {type(input_size).__name__}")
    if input_size <= 0:
        raise ValueError("input_size must be greater than zero")
    if not isinstance(hidden_size, int):
        raise TypeError(f"hidden_size should be of type int, got: {type(hidden_size).__name__}")
    if hidden_size <= 0:
        raise ValueError("hidden_size must be greater than zero")
    if num_layers <= 0:
        raise ValueError("num_layers must be greater than zero")
    if proj_size < 0:
        raise ValueError("proj_size should be a positive integer or zero to disable projections")
    if proj_size >= hidden_size:
        raise ValueError("proj_size has to be smaller than hidden_size")


def _index_hx_pair(hx, module: str) -> Tuple[Tensor, Tensor]:
    """hx[0] and hx[1], read as torch.nn.LSTM first reads them: an hx with no
    hx[1] (a tuple of one, a tensor of one row) is torch's IndexError."""
    try:
        return hx[0], hx[1]
    except IndexError:
        raise IndexError(f"{module}: hx must be a tuple of two Tensors (h_0, c_0); it has no hx[1]") from None


def _check_hx_pair(hx, module: str, op: str) -> None:
    """hx must be (h_0, c_0), a tuple or list of two, as torch's _VF.lstm / lstm_cell take it."""
    if not isinstance(hx, (tuple, list)):
        # torch's argument parser raises TypeError for anything but a sequence
        # of tensors (for a tensor hx, if indexing it has not failed first).
        raise TypeError(f"{module}: hx must be a tuple of two Tensors (h_0, c_0), not {type(hx).__name__}")
    if len(hx) != 2:
        # torch raises this for most lengths (some code paths index hx[0],
        # hx[1] first, or ignore a third entry); one error for all of them.
        raise RuntimeError(f"{op} expects two hidden states (hx = (h_0, c_0)), got {len(hx)}")


def _check_devices(input: Tensor, hx: Sequence[Tensor], parameters) -> None:
    """ATen's RNN check (check_attributes): hidden states, then parameters, on input's device."""
    device = input.device  # read once: each .device builds a new torch.device, a cost per LSTMCell step
    for value in hx:
        if value.device != device:
            raise RuntimeError("Input and hidden tensors are not at the same device, found input tensor at "
                               f"{device} and hidden tensor at {value.device}")
    for parameter in parameters:
        if parameter is not None and parameter.device != device:
            raise RuntimeError("Input and parameter tensors are not at the same device, found input tensor at "
                               f"{device} and parameter tensor at {parameter.device}")


def _check_dtype(input: Tensor, value: Tensor, kind: str) -> None:
    """A hidden state or parameter in another dtype than input: torch fails in its matrix products (RuntimeError);
    the kernels would instead compute half-precision input in float32 without a word. Not under autocast, which
    casts them (see fastnlp.ops.lstm)."""
    if value.dtype != input.dtype and autocast_dtype(input) is None:
        raise RuntimeError(f"Input and {kind} tensors are not the same dtype, found input tensor with "
                           f"{input.dtype} and {kind} tensor with {value.dtype}")


# LSTMCell's weights, in lstm_ops.lstm_cell's order.
_CELL_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
# The dtypes the paired-direction op's kernels take, per device type.
_PAIR_KERNEL_DTYPES = {"cpu": (torch.float32, torch.float64, torch.bfloat16),
                       "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16)}

# The functional API's argument names, in the order parameters are registered.
_LAYER_NORM_KINDS = ("layer_norm_ih_weight", "layer_norm_ih_bias", "layer_norm_hh_weight", "layer_norm_hh_bias",
                     "layer_norm_cell_weight", "layer_norm_cell_bias")


def _register_layer_norm(module: nn.Module, suffix: str, hidden_size: int, factory) -> List[str]:
    names = []
    for kind in _LAYER_NORM_KINDS:
        size = hidden_size if kind.startswith("layer_norm_cell") else 4 * hidden_size
        module.register_parameter(kind + suffix, nn.Parameter(torch.empty(size, **factory)))
        names.append(kind + suffix)
    return names


def _init_layer_norm(name: str, weight: Tensor) -> bool:
    """Gain 1, bias 0 (LayerNorm's init) for a layer-norm parameter; False for any other."""
    if not name.startswith("layer_norm_"):
        return False
    with torch.no_grad():
        weight.fill_(1.0 if "_weight" in name else 0.0)
    return True


class LSTM(nn.Module):
    """Multi-layer LSTM, a drop-in for torch.nn.LSTM (see the module docstring).

    Args are torch.nn.LSTM's: input_size, hidden_size, num_layers=1, bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, proj_size=0, device,
    dtype. Parameters: weight_ih_l{k}, weight_hh_l{k}, bias_ih_l{k},
    bias_hh_l{k}, weight_hr_l{k} and their _reverse twins, gates i, f, g, o.
    Keyword-only: recurrent_dropout, zoneout, and layer_norm (adds
    layer_norm_{ih,hh}_{weight,bias}_l{k} (4H) and
    layer_norm_cell_{weight,bias}_l{k} (H), and _reverse twins, after torch's
    parameters).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None, *, recurrent_dropout: float = 0.0, zoneout: float = 0.0,
                 layer_norm: bool = False) -> None:
        super().__init__()
        _check_constructor_args(input_size, hidden_size, num_layers, bias, batch_first, dropout, proj_size)
        if not isinstance(layer_norm, bool):
            raise TypeError(f"layer_norm should be of type bool, got: {type(layer_norm).__name__}")
        self.layer_norm = layer_norm
        for name, p in (("recurrent_dropout", recurrent_dropout), ("zoneout", zoneout)):
            if isinstance(p, bool) or not isinstance(p, numbers.Number) or not 0 <= p < 1:
                raise ValueError(f"{name} must be a number in [0, 1), got {p!r}")
        self.recurrent_dropout = float(recurrent_dropout)
        self.zoneout = float(zoneout)
        self.mode = "LSTM"
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        factory = {"device": device, "dtype": dtype}
        directions = 2 if bidirectional else 1
        real_hidden = proj_size if proj_size > 0 else hidden_size
        # Same parameters, created and registered in the same order as torch's,
        # so reset_parameters() draws the same numbers from the same seed.
        self._flat_weights_names: List[str] = []
        self._all_weights: List[List[str]] = []
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else real_hidden * directions
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = [("weight_ih", (4 * hidden_size, layer_input)), ("weight_hh", (4 * hidden_size, real_hidden))]
                if bias:
                    shapes += [("bias_ih", (4 * hidden_size,)), ("bias_hh", (4 * hidden_size,))]
                if proj_size > 0:
                    shapes += [("weight_hr", (proj_size, hidden_size))]
                names = []
                for kind, shape in shapes:
                    setattr(self, kind + suffix, nn.Parameter(torch.empty(shape, **factory)))
                    names.append(kind + suffix)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        # After all of torch's parameters, so that the order (and what a seed
        # draws for them) is torch's: layer_norm_{ih,hh,cell}_{weight,bias}_l{k}.
        self._layer_norm_names: List[List[str]] = []
        if layer_norm:
            for layer in range(num_layers):
                for direction in range(directions):
                    suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                    self._layer_norm_names.append(_register_layer_norm(self, suffix, hidden_size, factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for name, weight in self.named_parameters():
            if not _init_layer_norm(name, weight):
                nn.init.uniform_(weight, -stdv, stdv)

    def flatten_parameters(self) -> None:
        """A no-op kept for compatibility: fastnlp's kernels need no flat weight buffer."""

    @property
    def all_weights(self) -> List[List[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    @property
    def _flat_weights(self) -> List[Tensor]:
        """torch.nn.LSTM's list of the weights in _flat_weights_names order,
        which weight-drop style wrappers read. Read fresh on every access, so
        it is always what forward uses (torch keeps it up to date in
        __setattr__); assigning to it is refused rather than ignored."""
        return [getattr(self, name) for name in self._flat_weights_names]

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        if self.recurrent_dropout != 0:
            s += ", recurrent_dropout={recurrent_dropout}"
        if self.zoneout != 0:
            s += ", zoneout={zoneout}"
        if self.layer_norm:
            s += ", layer_norm=True"
        return s.format(**self.__dict__)

    # -- input checks, as torch.nn.LSTM makes them ----------------------------
    # torch's public helpers, with their signatures: forward goes through them
    # as torch's does, so a subclass that overrides one (or calls one from a
    # forward of its own) gets what it gets from torch.nn.LSTM.

    def check_input(self, input: Tensor, batch_sizes: Optional[Tensor]) -> None:
        weight = self.weight_ih_l0
        # Under autocast for input's device the op casts (torch skips this
        # check when any autocast is on; then its kernels fail instead).
        if input.dtype != weight.dtype and autocast_dtype(input) is None:
            raise ValueError(
                f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight.dtype}). "
                f"Convert input: input.to({weight.dtype}), or convert model: model.to({input.dtype})")
        expected_dim = 2 if batch_sizes is not None else 3
        if input.dim() != expected_dim:
            raise RuntimeError(f"input must have {expected_dim} dimensions, got {input.dim()}")
        if self.input_size != input.size(-1):
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {input.size(-1)}")

    def _mini_batch(self, input: Tensor, batch_sizes: Optional[Tensor]) -> int:
        if batch_sizes is not None:
            return int(batch_sizes[0])
        return input.size(0) if self.batch_first else input.size(1)

    def get_expected_hidden_size(self, input: Tensor, batch_sizes: Optional[Tensor]) -> Tuple[int, int, int]:
        directions = 2 if self.bidirectional else 1
        real_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
        return self.num_layers * directions, self._mini_batch(input, batch_sizes), real_hidden

    def get_expected_cell_size(self, input: Tensor, batch_sizes: Optional[Tensor]) -> Tuple[int, int, int]:
        directions = 2 if self.bidirectional else 1
        return self.num_layers * directions, self._mini_batch(input, batch_sizes), self.hidden_size

    def check_hidden_size(self, hx: Tensor, expected_hidden_size: Tuple[int, int, int],
                          msg: str = "Expected hidden size {}, got {}") -> None:
        if hx.size() != expected_hidden_size:
            raise RuntimeError(msg.format(expected_hidden_size, list(hx.size())))

    def check_forward_args(self, input: Tensor, hidden: HiddenState, batch_sizes: Optional[Tensor]) -> None:
        self.check_input(input, batch_sizes)
        self.check_hidden_size(hidden[0], self.get_expected_hidden_size(input, batch_sizes),
                               "Expected hidden[0] size {}, got {}")
        self.check_hidden_size(hidden[1], self.get_expected_cell_size(input, batch_sizes),
                               "Expected hidden[1] size {}, got {}")

    def permute_hidden(self, hx: HiddenState, permutation: Optional[Tensor]) -> HiddenState:
        """hx's batch entries (dim 1) in `permutation`'s order, as torch's does it."""
        if permutation is None:
            return hx
        return hx[0].index_select(1, permutation), hx[1].index_select(1, permutation)

    def _check_run(self, input: Tensor, hx: HiddenState, steps: int) -> None:
        """The checks torch's kernel (_VF.lstm) makes before it runs: devices, the hidden states' dtype, length."""
        _check_devices(input, hx, self._parameters.values())  # the module's own (absent biases: None)
        for value in hx:
            _check_dtype(input, value, "hidden")
        if steps == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

    def _zero_state(self, input: Tensor, batch: int) -> HiddenState:
        directions = 2 if self.bidirectional else 1
        real_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
        h = torch.zeros(self.num_layers * directions, batch, real_hidden, dtype=input.dtype, device=input.device)
        c = torch.zeros(self.num_layers * directions, batch, self.hidden_size, dtype=input.dtype,
                        device=input.device)
        return h, c

    # -- forward --------------------------------------------------------------

    def forward(self, input: Union[Tensor, PackedSequence], hx: Optional[HiddenState] = None):
        """Same inputs and outputs as torch.nn.LSTM.forward: returns output, (h_n, c_n)."""
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            if hx is not None:
                _check_hx_pair(hx, "LSTM", "lstm")
            given = hx is not None
            if given:
                self.check_forward_args(data, hx, batch_sizes)
            else:
                self.check_input(data, batch_sizes)
                hx = self._zero_state(data, int(batch_sizes[0]))
            self._check_run(data, hx, batch_sizes.numel())  # before hx meets sorted_indices
            if given:  # hx follows the user's order
                hx = self.permute_hidden(hx, sorted_indices)
            output, h_n, c_n = self._run(data, batch_sizes, hx)
            h_n, c_n = self.permute_hidden((h_n, c_n), unsorted_indices)
            return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), (h_n, c_n)

        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if hx is not None:
            # torch's dims check reads hx[0] and hx[1] before anything checks
            # that hx is a pair, so a tensor hx (h_0 alone, say) or a tuple of
            # one fails in it, an IndexError or RuntimeError: the same order here.
            h0, c0 = _index_hx_pair(hx, "LSTM")
            dims, kind = (3, "batched 3-D") if batched else (2, "unbatched 2-D")
            if h0.dim() != dims or c0.dim() != dims:
                raise RuntimeError(f"For {kind} input, hx and cx should also be {dims}-D but got "
                                   f"({h0.dim()}-D, {c0.dim()}-D) tensors")
            _check_hx_pair(hx, "LSTM", "lstm")
        if not batched:
            input = input.unsqueeze(batch_dim)
            if hx is not None:
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        batch = input.size(batch_dim)
        if hx is None:
            hx = self._zero_state(input, batch)
        self.check_forward_args(input, hx, None)
        time_major = input.transpose(0, 1) if self.batch_first else input
        steps = time_major.size(0)
        self._check_run(input, hx, steps)

        rows = time_major.reshape(steps * batch, self.input_size)
        output, h_n, c_n = self._run(rows, None, hx)
        output = output.view(steps, batch, output.size(-1))
        if self.batch_first:
            output = output.transpose(0, 1)
        if not batched:
            return output.squeeze(batch_dim), (h_n.squeeze(1), c_n.squeeze(1))
        return output, (h_n, c_n)

    def _run(self, rows: Tensor, batch_sizes: Optional[Tensor], hx: HiddenState) -> Tuple[Tensor, Tensor, Tensor]:
        """All layers and directions over time-major packed rows (N, I)."""
        directions = 2 if self.bidirectional else 1
        h0, c0 = hx
        h_n: List[Tensor] = []
        c_n: List[Tensor] = []
        layer_input = rows
        for layer in range(self.num_layers):
            if directions == 2 and self._run_pair(layer_input):
                layer_input = self._layer_pair(layer, layer_input, batch_sizes, h0, c0, h_n, c_n)
            else:
                outputs = []
                for direction in range(directions):
                    index = layer * directions + direction
                    args = self._direction_args(index, layer_input, h0[index], c0[index])
                    out, h, c = lstm_ops.lstm_layer(layer_input, batch_sizes, reverse=direction == 1, **args)
                    outputs.append(out)
                    h_n.append(h)
                    c_n.append(c)
                layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = nn.functional.dropout(layer_input, self.dropout, training=True)
        return layer_input, torch.stack(h_n), torch.stack(c_n)

    @staticmethod
    def _run_pair(rows: Tensor) -> bool:
        """Both directions in one op (lstm_layer_pair: on two CPU threads, or two CUDA streams)?

        Where its kernels take the input (the CPU's take float32, float64 and bfloat16).
        Not under torch.jit.trace, which cannot record the pair op's lists of
        optional tensors; two lstm_layer ops compute the same.
        """
        return (rows.dtype in _PAIR_KERNEL_DTYPES.get(rows.device.type, ()) and not use_reference(None)
                and not torch.jit.is_tracing())

    def _direction_args(self, index: int, rows: Tensor, h0: Tensor, c0: Tensor) -> dict:
        """lstm_layer's arguments for layer-direction `index`, by name."""
        weights = self.all_weights[index]
        recurrent_mask, zoneout_cell, zoneout_hidden = self._regularisers(rows, h0, c0)
        args = dict(h0=h0, c0=c0, weight_ih=weights[0], weight_hh=weights[1],
                    bias_ih=weights[2] if self.bias else None, bias_hh=weights[3] if self.bias else None,
                    weight_hr=weights[-1] if self.proj_size > 0 else None, recurrent_mask=recurrent_mask,
                    zoneout_cell=zoneout_cell, zoneout_hidden=zoneout_hidden)
        if self.layer_norm:
            args.update({kind: getattr(self, name)
                         for kind, name in zip(_LAYER_NORM_KINDS, self._layer_norm_names[index])})
        return args

    def _layer_pair(self, layer: int, rows: Tensor, batch_sizes: Optional[Tensor], h0: Tensor, c0: Tensor,
                    h_n: List[Tensor], c_n: List[Tensor]) -> Tensor:
        """Both directions of `layer` through lstm_layer_pair; appends their final states."""
        forward = self._direction_args(2 * layer, rows, h0[2 * layer], c0[2 * layer])
        reverse = self._direction_args(2 * layer + 1, rows, h0[2 * layer + 1], c0[2 * layer + 1])
        (out_f, h_f, c_f), (out_r, h_r, c_r) = lstm_ops.lstm_layer_pair(rows, batch_sizes, forward, reverse)
        h_n.extend((h_f, h_r))
        c_n.extend((c_f, c_r))
        return torch.cat((out_f, out_r), dim=1)

    def _regularisers(self, rows: Tensor, h0: Tensor, c0: Tensor
                      ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """This layer direction's recurrent-dropout mask and zoneout weights (see the module docstring)."""
        recurrent_mask = zoneout_cell = zoneout_hidden = None
        if self.recurrent_dropout > 0 and self.training:
            keep = 1.0 - self.recurrent_dropout
            recurrent_mask = torch.bernoulli(torch.full_like(h0, keep)) / keep
        if self.zoneout > 0:
            cell_shape = (rows.size(0), c0.size(1))
            hidden_shape = (rows.size(0), h0.size(1))
            if self.training:
                zoneout_cell = torch.bernoulli(h0.new_full(cell_shape, self.zoneout))
                zoneout_hidden = torch.bernoulli(h0.new_full(hidden_shape, self.zoneout))
            else:  # the expectation of the training-time update
                zoneout_cell = h0.new_full(cell_shape, self.zoneout)
                zoneout_hidden = h0.new_full(hidden_shape, self.zoneout)
        return recurrent_mask, zoneout_cell, zoneout_hidden


class LSTMCell(nn.Module):
    """One LSTM step, a drop-in for torch.nn.LSTMCell on the fused kernel.

    Args are torch.nn.LSTMCell's: input_size, hidden_size, bias=True, device,
    dtype; parameters weight_ih (4H, I), weight_hh (4H, H), bias_ih, bias_hh.
    layer_norm=True (keyword-only) adds layer_norm_{ih,hh}_{weight,bias} (4H)
    and layer_norm_cell_{weight,bias} (H), as in LSTM.
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 layer_norm: bool = False) -> None:
        super().__init__()
        if not isinstance(layer_norm, bool):
            raise TypeError(f"layer_norm should be of type bool, got: {type(layer_norm).__name__}")
        self.layer_norm = layer_norm
        factory = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.weight_ih = nn.Parameter(torch.empty((4 * hidden_size, input_size), **factory))
        self.weight_hh = nn.Parameter(torch.empty((4 * hidden_size, hidden_size), **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        if layer_norm:
            _register_layer_norm(self, "", hidden_size, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for name, weight in self.named_parameters():
            if not _init_layer_norm(name, weight):
                nn.init.uniform_(weight, -stdv, stdv)

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.layer_norm:
            s += ", layer_norm=True"
        return s.format(**self.__dict__)

    def forward(self, input: Tensor, hx: Optional[HiddenState] = None) -> HiddenState:
        """Same as torch.nn.LSTMCell.forward: returns (h', c')."""
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        batched = input.dim() == 2
        if hx is not None:
            # torch's order, so that a malformed hx raises what torch raises:
            # the rank of each entry of whatever hx is (a 4-D tensor's rows
            # too), then hx[1] for unbatched input, then the pair itself.
            for index, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{index}] to be 1D or 2D, got {value.dim()}D instead")
            if not batched and isinstance(hx, (tuple, list)):
                _index_hx_pair(hx, "LSTMCell")
            _check_hx_pair(hx, "LSTMCell", "lstm_cell")
        if not batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            hx = (zeros, zeros)
        elif not batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        weight_ih, weight_hh, bias_ih, bias_hh = self._weights(_CELL_WEIGHTS)
        self._check_step(input, hx, weight_ih)
        layer_norm = dict(zip(_LAYER_NORM_KINDS, self._weights(_LAYER_NORM_KINDS))) if self.layer_norm else {}
        h, c = lstm_ops.lstm_cell(input, hx[0], hx[1], weight_ih, weight_hh, bias_ih, bias_hh, **layer_norm)
        if not batched:
            return h.squeeze(0), c.squeeze(0)
        return h, c

    def _check_sizes(self, input: Tensor, hx: HiddenState) -> None:
        """The size checks of _check_step one by one. hx need not be 2-D: size(1) of a 1-D
        one fails as torch's check does, and only the first two sizes of a 3-D one are read."""
        if input.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {self.input_size}")
        for index, value in enumerate(hx):
            if value.size(0) != input.size(0):
                raise RuntimeError(
                    f"Input batch size {input.size(0)} doesn't match hidden{index} batch size {value.size(0)}")
            if value.size(1) != self.hidden_size:
                raise RuntimeError(
                    f"hidden{index} has inconsistent hidden_size: got {value.size(1)}, expected {self.hidden_size}")

    def _weights(self, names: Sequence[str]) -> List[Optional[Tensor]]:
        """The named weights, read from _parameters where all of them are there.

        nn.Module.__getattr__ costs microseconds a name, which a step loop at
        batch 1 pays every step. A parametrization (torch.nn.utils.parametrize)
        or the old weight_norm turns a weight into a property or a plain
        attribute, found only by getattr.
        """
        parameters = self._parameters
        try:
            return [parameters[name] for name in names]
        except KeyError:
            return [getattr(self, name) for name in names]

    def _check_step(self, input: Tensor, hx: HiddenState, weight_ih: Tensor) -> None:
        """torch's checks for one cell step (ATen's check_rnn_cell_forward_*), with its messages."""
        batch, features = input.shape  # 2-D here
        expected = (batch, self.hidden_size)
        # One comparison of whole shapes first: each size() read costs a step
        # loop at batch 1 microseconds. Only when it fails are they checked
        # one by one, in torch's order and with its messages.
        if features != self.input_size or hx[0].shape != expected or hx[1].shape != expected:
            self._check_sizes(input, hx)
        _check_devices(input, hx, self._parameters.values())  # the module's own (absent biases: None)
        # input and h enter matrix products with the weights, so must share
        # their dtype; c need not (lstm_ops.lstm_cell promotes, as torch does).
        _check_dtype(input, weight_ih, "parameter")
        _check_dtype(input, hx[0], "hidden")
