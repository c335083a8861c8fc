"""Pure-PyTorch LSTM: a plain loop over time steps, the oracle for the kernels.

Same contract as fastnlp.ops.lstm_layer: one layer in one direction over a
time-major packed batch (input (N, I) rows; step t holds the batch_sizes[t]
sequences still alive; an empty batch_sizes means padded input, N / B steps
for every one of the B = h0.size(0) sequences). Gates are in torch's order
i, f, g, o.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def step_sizes(batch_sizes: Tensor, rows: int, batch: int) -> List[int]:
    if batch_sizes.numel() > 0:
        return [int(size) for size in batch_sizes.tolist()]
    return [batch] * (rows // batch) if batch > 0 else []


LAYER_NORM_EPS = 1e-5


def lstm_cell(x: Tensor, h: Tensor, c: Tensor, weight_ih: Tensor, weight_hh: Tensor,
              bias_ih: Optional[Tensor] = None, bias_hh: Optional[Tensor] = None,
              weight_hr: Optional[Tensor] = None,
              layer_norm: Optional[Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]] = None
              ) -> Tuple[Tensor, Tensor]:
    """One step: returns (h', c').

    layer_norm: (ih_weight, ih_bias, hh_weight, hh_bias, cell_weight,
    cell_bias) for the LayerNorm-LSTM of Ba et al.: each gate product is
    normalised over its 4H pre-activations before the LSTM biases are added,
    and the new cell over its H units before its tanh (c' itself is not
    normalised).
    """
    if layer_norm is None:
        gates = x @ weight_ih.t() + h @ weight_hh.t()
    else:
        ih_w, ih_b, hh_w, hh_b, _, _ = layer_norm
        size = (weight_ih.shape[0],)
        gates = (F.layer_norm(x @ weight_ih.t(), size, ih_w, ih_b, LAYER_NORM_EPS)
                 + F.layer_norm(h @ weight_hh.t(), size, hh_w, hh_b, LAYER_NORM_EPS))
    if bias_ih is not None:
        gates = gates + bias_ih
    if bias_hh is not None:
        gates = gates + bias_hh
    i, f, g, o = gates.chunk(4, dim=1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    c_out = c_new
    if layer_norm is not None:
        c_out = F.layer_norm(c_new, (c_new.shape[1],), layer_norm[4], layer_norm[5], LAYER_NORM_EPS)
    h_new = torch.sigmoid(o) * torch.tanh(c_out)
    if weight_hr is not None:
        h_new = h_new @ weight_hr.t()
    return h_new, c_new


def lstm_layer(input: Tensor, batch_sizes: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
               bias_ih: Optional[Tensor] = None, bias_hh: Optional[Tensor] = None,
               weight_hr: Optional[Tensor] = None, reverse: bool = False, recurrent_mask: Optional[Tensor] = None,
               zoneout_cell: Optional[Tensor] = None,
               zoneout_hidden: Optional[Tensor] = None,
               layer_norm: Optional[Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]] = None
               ) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (output (N, P), h_n (B, P), c_n (B, H)).

    recurrent_mask (B, P) multiplies h_{t-1} where it enters the recurrent
    product; zoneout_cell (N, H) and zoneout_hidden (N, P) hold, per row, the
    weight z of the previous state: state_t = z * state_{t-1} + (1 - z) * new.
    layer_norm as in lstm_cell (zoneout mixes the un-normalised new cell).
    """
    steps = step_sizes(batch_sizes, input.shape[0], h0.shape[0])
    offsets = [sum(steps[:t]) for t in range(len(steps))]
    order = range(len(steps) - 1, -1, -1) if reverse else range(len(steps))
    h, c = h0, c0
    outputs: List[Optional[Tensor]] = [None] * len(steps)
    for t in order:
        alive, rows = steps[t], slice(offsets[t], offsets[t] + steps[t])
        h_prev, c_prev = h[:alive], c[:alive]
        h_in = h_prev * recurrent_mask[:alive] if recurrent_mask is not None else h_prev
        h_new, c_new = lstm_cell(input[rows], h_in, c_prev, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                                 layer_norm)
        if zoneout_cell is not None:
            c_new = zoneout_cell[rows] * c_prev + (1 - zoneout_cell[rows]) * c_new
        if zoneout_hidden is not None:
            h_new = zoneout_hidden[rows] * h_prev + (1 - zoneout_hidden[rows]) * h_new
        outputs[t] = h_new
        # Sequences that are not alive at this step keep their state.
        h = torch.cat([h_new, h[alive:]])
        c = torch.cat([c_new, c[alive:]])
    if steps:
        return torch.cat([o for o in outputs if o is not None]), h, c
    # No step to run (no rows, or no sequences): the results are computed
    # from nothing, but are tied into the graph of every argument, as the
    # kernels' are, so that a backward pass through them works and gives zero
    # gradients. Only empty results are tied: 0 * a sum that is inf or NaN
    # would be NaN, but adding it to an empty tensor adds nothing.
    arguments = [input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr] + list(layer_norm or [])
    anchor = 0 * sum(t.sum() for t in arguments if t is not None)

    def tied(result: Tensor) -> Tensor:
        return result + anchor if result.numel() == 0 else result

    return tied(input.new_empty(0, h0.shape[1])), tied(h), tied(c)
