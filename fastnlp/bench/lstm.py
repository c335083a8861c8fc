"""LSTM benchmark cases: fastnlp.nn.LSTM / LSTMCell against torch.nn.LSTM (padded
and packed input; oneDNN on the CPU, cuDNN on CUDA) and a Python loop over
torch.nn.LSTMCell.

Per shape (B = batch, T = padded length, I = input size, H = hidden size,
lengths drawn from [T/2, T]):

* "fwd+bwd padded": one training step of the layer on the padded batch, the
  gradient taken with respect to the input and every parameter;
* "fwd+bwd padded frozen-input" (the first shape): the same with an input
  that needs no gradient (a frozen embedding under the layer), the gradient
  taken with respect to the parameters only;
* "fwd+bwd packed": the same on a PackedSequence built from the batch (packing
  is part of the step, as in a training loop); nn.LSTM on the padded batch is
  a baseline too, since packed input should cost no more than padded input;
* "cell loop fwd+bwd": a Python loop over T steps of an LSTMCell (one
  direction), what users of a cell write for custom recurrences;
  these three also time "matrix products alone", a floor (see _products_alone);
* "inference": forward only, no autograd: serving, at B=1 (one sequence: latency)
  and, for the first shape, at its batch (throughput; float32 and bfloat16);
* "cell loop inference B=1": the same sequence through a Python loop over
  LSTMCell steps, no autograd: a greedy decoder's per-token step;
* "layer_norm fwd+bwd padded": LSTM(..., layer_norm=True) against the same
  model on the pure-PyTorch reference (F.layer_norm in a Python time loop,
  the obvious way to write a LayerNorm-LSTM), with fastnlp's plain LSTM as a
  baseline too: the cost of the normalisation itself.

The padded and packed cases run in bfloat16 too: on CUDA for every shape
(the issue's GPU targets are for float32 and bfloat16), on the CPU for the
first (a bfloat16 model against torch's bfloat16 LSTM, which runs oneDNN's
bfloat16 RNN there; no "matrix products alone" floor: fastnlp's bfloat16
kernel keeps its state in float32, which a floor of bfloat16 products would
not pay for); so do the "inference" cases (a bfloat16 model served). On CUDA
float32 is IEEE float32 on both sides: cuDNN's RNNs may use TF32 for
float32 by default (torch.backends.cudnn.allow_tf32), fastnlp's cuBLAS
products do not (torch.backends.cuda.matmul.allow_tf32 is off by default),
so the nn.LSTM runs here switch TF32 off.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.nn.utils.rnn import pack_padded_sequence

from .harness import Case

OP = "lstm"
SHAPES = [  # (B, T, I, H, bidirectional)
    (32, 64, 256, 256, True),
    (64, 128, 256, 512, False),
]
QUICK_SHAPES = SHAPES[:1]
LATENCY_SHAPE = (1, 64, 256, 256, True)

OURS = "fastnlp"
TORCH = "nn.LSTM"
TORCH_PACKED = "nn.LSTM packed"
TORCH_PADDED = "nn.LSTM padded"
OURS_PADDED = "fastnlp padded"
OURS_STEP_LOOP = "fastnlp step loop"  # CUDA: launching per step, not once per pass (see _with_step_loop)
TORCH_CELL = "nn.LSTMCell loop"
PRODUCTS = "matrix products alone"
OURS_LN = "fastnlp layer_norm"
REFERENCE_LN = "reference layer_norm"


def cases(device: str, quick: bool) -> List[Case]:
    import fastnlp.nn  # here, not at import time: see fastnlp/bench/crf.py

    out = []
    for shape in QUICK_SHAPES if quick else SHAPES:
        d = _Data(*shape, device=device, fastnlp_nn=fastnlp.nn)
        out.append(_padded_case(d))
        if shape == SHAPES[0]:
            out.append(_frozen_input_case(d))
            out.append(_latency_case(d))
        out.append(_packed_case(d))
        out.append(_cell_loop_case(d))
        out.append(_layer_norm_case(d))
    for shape in (QUICK_SHAPES if quick else SHAPES) if device == "cuda" else SHAPES[:1]:
        d = _Data(*shape, device=device, fastnlp_nn=fastnlp.nn, dtype=torch.bfloat16)
        out.append(_padded_case(d))
        out.append(_packed_case(d))
        if shape == SHAPES[0]:
            out.append(_latency_case(d))
    latency = _Data(*LATENCY_SHAPE, device=device, fastnlp_nn=fastnlp.nn)
    out.append(_latency_case(latency))
    out.append(_cell_inference_case(latency))
    out.append(_latency_case(_Data(*LATENCY_SHAPE, device=device, fastnlp_nn=fastnlp.nn, dtype=torch.bfloat16)))
    return out


class _Data:
    """Inputs and twin models (same weights) shared by all cases of one shape."""

    def __init__(self, B, T, I, H, bidirectional, device, fastnlp_nn, dtype=torch.float32):
        self.shape = f"B={B} T={T} I={I} H={H} {'bi' if bidirectional else 'uni'}"
        if dtype != torch.float32:
            self.shape += f" {str(dtype)[6:]}"
        self.dtype = dtype
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
        lengths[0] = T  # a collate function pads to the longest sequence
        self.lengths = lengths
        self.x = torch.randn(T, B, I, generator=g).to(device, dtype).requires_grad_(True)
        self.x_nograd = self.x.detach()

        torch.manual_seed(0)
        self.torch_lstm = torch.nn.LSTM(I, H, bidirectional=bidirectional).to(device, dtype)
        self.ours_lstm = fastnlp_nn.LSTM(I, H, bidirectional=bidirectional).to(device, dtype)
        self.ours_lstm.load_state_dict(self.torch_lstm.state_dict())
        self.ours_ln = fastnlp_nn.LSTM(I, H, bidirectional=bidirectional, layer_norm=True).to(device)
        self.ours_ln.load_state_dict(self.torch_lstm.state_dict(), strict=False)
        self.torch_cell = torch.nn.LSTMCell(I, H).to(device)
        self.ours_cell = fastnlp_nn.LSTMCell(I, H).to(device)
        self.ours_cell.load_state_dict(self.torch_cell.state_dict())


def _ieee_float32():
    """cuDNN without TF32 (see the module docstring), its other flags as they are.

    Through cudnn.flags(), which sets them all: PyTorch's test utilities
    forbid setting them one by one (torch.backends.disable_global_flags).
    (Whether allow_tf32=False is all it takes under the fp32_precision
    settings of torch >= 2.9 is not yet checked on a GPU.)
    """
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                       allow_tf32=False)


def _step(module, x, lengths=None):
    """Forward + backward with respect to the input (where it requires grad) and all parameters."""
    with _ieee_float32():
        if lengths is None:
            out, _ = module(x)
        else:
            out, _ = module(pack_padded_sequence(x, lengths, enforce_sorted=False))
            out = out.data
        loss = out.sum()
        return loss.detach(), torch.autograd.grad(loss, [x] * x.requires_grad + list(module.parameters()))


def _cell_loop(cell, x):
    h = c = x.new_zeros(x.size(1), cell.hidden_size)
    total = 0
    for x_t in x.unbind(0):  # not x[t]: each x[t]'s gradient would be a zero-filled copy of x
        h, c = cell(x_t, (h, c))
        total = total + h.sum()
    return total.detach(), torch.autograd.grad(total, [x] + list(cell.parameters()))


# Layer-norm LSTM gradients in float32 are poorly conditioned at these sizes
# (|grad| up to ~8e3 for a sum loss): against float64, the float32 reference
# is off by 2.3e-3 to 3.6e-3 and fastnlp by 3.5e-3 to 3.7e-3 of each tensor's
# largest entry (uni B=64 T=128 H=512, two measurements), so such results are
# compared relative to that.
SCALED_TOLERANCE = 1e-2


BFLOAT16_TOLERANCE = 5e-2


def _agree(a: torch.Tensor, b: torch.Tensor, scaled: bool, tolerance: float = SCALED_TOLERANCE) -> bool:
    a, b = a.float(), b.float()
    if scaled:
        return bool((a - b).abs().max() <= tolerance * b.abs().max().clamp_min(1.0))
    return torch.allclose(a, b, rtol=1e-3, atol=1e-3)


def _check_same(results: Dict[str, Any], scaled: bool = False) -> Optional[str]:
    """Loss and every gradient agree with the first implementation's."""
    names = list(results)
    ref_loss, ref_grads = results[names[0]]
    bad = []
    for name in names[1:]:
        loss, grads = results[name]
        for i, (a, b) in enumerate(zip((ref_loss,) + tuple(ref_grads), (loss,) + tuple(grads))):
            # bfloat16 (8 bits of mantissa) rounds differently in each implementation.
            tolerance = BFLOAT16_TOLERANCE if a.dtype == torch.bfloat16 else SCALED_TOLERANCE
            if not _agree(a, b, scaled or a.dtype == torch.bfloat16, tolerance):
                err = (a.float() - b.float()).abs().max().item()
                bad.append(f"{name} vs {names[0]}: tensor {i} max abs diff {err:.3g}")
    return "; ".join(bad) if bad else None


def _check_among(*names: str, scaled: bool = False) -> Callable[[Dict[str, Any]], Optional[str]]:
    """A case's check that compares only these implementations (with _check_same, the first as the reference):
    the rest compute something else (the products alone, padded against packed input, the plain LSTM)."""
    return lambda results: _check_same({name: results[name] for name in names}, scaled)


# "matrix products alone": the matrix products fastnlp's kernel must do for a
# case, with the same shapes on the same libraries (MKL or cuBLAS through
# ATen, oneDNN where the kernel uses it), and nothing else (no gate
# arithmetic, no autograd, no Python module). Not an alternative to measure
# against but a floor: a speed-up target that needs ours to beat it is out of
# reach of any kernel built on those products. (On a CPU with AVX-512 the
# kernel's float32 time loops multiply on panels of their own since dfc475f
# and 0d600ad, faster than oneDNN's per-step products at these row counts;
# the floor keeps oneDNN's, so there a kernel step can come in under it.)
def _products_alone(d: _Data, rows_per_step: List[int], directions: int, per_step_weight_grads: bool):
    """A callable that runs the products of one forward+backward step.

    rows_per_step: rows alive at each step of one direction. directions: 1,
    or 2 for a bi-LSTM, whose two directions are scheduled as fastnlp's
    lstm_forward_pair schedules them: with exactly two intra-op threads each
    runs on its own core, at the same time (two cores sharing the L3 and the
    memory bus run slower than one alone: the floor must pay that too),
    otherwise one after the other. per_step_weight_grads: a cell loop's
    autograd takes the input and weight gradients step by step; the layer
    takes them once over all rows.
    """
    per_direction = [_products_of_one_direction(d, rows_per_step, per_step_weight_grads, seed=1 + k)
                     for k in range(directions)]

    def run():
        if directions == 2 and torch.get_num_threads() == 2:
            _concurrently_on_one_thread_each(per_direction)
        else:
            for products in per_direction:
                products()

    return run


def _concurrently_on_one_thread_each(calls):
    """Runs calls[1:] on Python threads and calls[0] here, all at once, with
    one intra-op thread each (torch ops let go of the GIL while they run; the
    Python between them does not, which the kernel's C++ threads do not pay).
    An error in any call is raised here."""
    threads = torch.get_num_threads()
    errors = []

    def keeping_errors(call):
        try:
            call()
        except BaseException as error:  # noqa: BLE001  (raised again below, in this thread)
            errors.append(error)

    torch.set_num_threads(1)
    try:
        others = [threading.Thread(target=keeping_errors, args=(call,)) for call in calls[1:]]
        for thread in others:
            thread.start()
        try:
            calls[0]()
        finally:
            for thread in others:
                thread.join()
    finally:
        torch.set_num_threads(threads)
    if errors:
        raise errors[0]


def _products_of_one_direction(d: _Data, rows_per_step: List[int], per_step_weight_grads: bool, seed: int):
    I, H = d.x.size(-1), d.torch_cell.hidden_size
    N, dev, dtype = sum(rows_per_step), d.x.device, d.x.dtype
    g = torch.Generator().manual_seed(seed)
    x, h, grad_gates = (torch.randn(N, n, generator=g).to(dev, dtype) for n in (I, H, 4 * H))
    weight_ih = torch.randn(4 * H, I, generator=g).to(dev, dtype)
    weight_hh = torch.randn(4 * H, H, generator=g).to(dev, dtype)
    bias = torch.randn(4 * H, generator=g).to(dev, dtype)
    grad_x = torch.empty(N, I, device=dev, dtype=dtype)
    grad_h = torch.empty(max(rows_per_step), H, device=dev, dtype=dtype)
    grad_weight_ih, grad_weight_hh = torch.empty_like(weight_ih), torch.empty_like(weight_hh)
    offsets = [sum(rows_per_step[:t]) for t in range(len(rows_per_step))]
    steps = list(zip(offsets, rows_per_step))
    recurrent, recurrent_backward = _recurrent_products(weight_hh, rows_per_step, per_step_weight_grads)
    project, input_gradient = _input_products(weight_ih, bias)

    @torch.no_grad()  # (grad mode is per thread: here, not around the caller)
    def products():
        if not per_step_weight_grads:
            gates = project(x)
        for lo, n in steps:
            recurrent(project(x[lo:lo + n]) if per_step_weight_grads else gates[lo:lo + n], h[lo:lo + n])
        for lo, n in reversed(steps):
            recurrent_backward(grad_h[:n], grad_gates[lo:lo + n])
            if per_step_weight_grads:
                input_gradient(grad_x[lo:lo + n], grad_gates[lo:lo + n])
                grad_weight_ih.addmm_(grad_gates[lo:lo + n].t(), x[lo:lo + n])
                grad_weight_hh.addmm_(grad_gates[lo:lo + n].t(), h[lo:lo + n])
        if not per_step_weight_grads:
            input_gradient(grad_x, grad_gates)
            torch.mm(grad_gates.t(), x, out=grad_weight_ih)
            torch.mm(grad_gates.t(), h, out=grad_weight_hh)

    return products


def _onednn_applies(*tensors: torch.Tensor) -> bool:
    """Whether fastnlp's CPU kernel takes oneDNN's products for these tensors:
    float32 on the CPU, in a torch with oneDNN, turned on."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def _input_products(weight_ih: torch.Tensor, bias: torch.Tensor):
    """project(x) = x @ W_ih^T + bias as a new tensor, and input_gradient(out, g):
    out = g @ W_ih, as fastnlp's CPU kernel makes these products: through
    oneDNN's linear on the weight as it is (csrc/cpu/onednn_matmul.cpp)
    where it applies; otherwise, and for a projection of four rows or fewer
    (a cell step at a small batch, which the kernel gives its few-rows
    loops), ATen's addmm / mm."""
    def project(x):
        return torch.addmm(bias, x, weight_ih.t())

    def input_gradient(out, g):
        torch.mm(g, weight_ih, out=out)

    if not _onednn_applies(weight_ih):
        return project, input_gradient
    linear = torch.ops.mkldnn._linear_pointwise

    def project_onednn(x):
        if x.size(0) <= 4:
            return project(x)
        return linear(x, weight_ih, bias, "none", [], None)

    def input_gradient_onednn(out, g):
        out.copy_(linear(g, weight_ih.t(), None, "none", [], None))

    return project_onednn, input_gradient_onednn


def _recurrent_products(weight_hh: torch.Tensor, rows_per_step: List[int], per_step_weight_grads: bool):
    """The per-step products out += h @ W_hh^T and out = g @ W_hh, made as
    fastnlp's CPU kernel makes them in a layer call of float32 steps (a cell
    loop's calls are single steps): steps of more than four rows on oneDNN,
    with W_hh reordered once (csrc/cpu/onednn_matmul.cpp), where torch has
    oneDNN and it is on; otherwise, and for fewer rows, ATen's addmm / mm."""
    def forward(out, h):
        out.addmm_(h, weight_hh.t())

    def backward(out, g):
        torch.mm(g, weight_hh, out=out)

    if per_step_weight_grads or not _onednn_applies(weight_hh):
        return forward, backward
    linear = torch.ops.mkldnn._linear_pointwise
    reorder = torch.ops.mkldnn._reorder_linear_weight
    packed, packed_t = reorder(weight_hh, rows_per_step[0]), reorder(weight_hh.t().contiguous(), rows_per_step[0])

    def forward_onednn(out, h):
        if h.size(0) <= 4:
            return forward(out, h)
        out.add_(linear(h, packed, None, "none", [], None))

    def backward_onednn(out, g):
        if g.size(0) <= 4:
            return backward(out, g)
        out.copy_(linear(g, packed_t, None, "none", [], None))

    return forward_onednn, backward_onednn


def _rows_per_step(lengths: torch.Tensor) -> List[int]:
    return [int((lengths > t).sum()) for t in range(int(lengths.max()))]


def _with_floor(impls: Dict[str, Callable[[], Any]], d: _Data, rows_per_step: List[int]):
    """impls plus the matrix products alone, except in bfloat16 on the CPU (see the module docstring)."""
    if d.dtype == torch.bfloat16 and d.x.device.type == "cpu":
        return impls
    directions = 2 if d.torch_lstm.bidirectional else 1
    return {**impls, PRODUCTS: _products_alone(d, rows_per_step, directions, per_step_weight_grads=False)}


def _padded_case(d: _Data) -> Case:
    T, B = d.x.shape[:2]
    impls = _with_floor({OURS: lambda: _step(d.ours_lstm, d.x), TORCH: lambda: _step(d.torch_lstm, d.x)}, d,
                        [B] * T)
    impls = _with_step_loop(impls, d.x.device.type)
    return Case(op=OP, name=f"fwd+bwd padded {d.shape}", impls=impls, baselines=[TORCH, *_floor_in(impls)],
                ours=OURS, check=_check_among(OURS, TORCH, *_step_loop_in(impls)))


def _frozen_input_case(d: _Data) -> Case:
    impls = {OURS: lambda: _step(d.ours_lstm, d.x_nograd), TORCH: lambda: _step(d.torch_lstm, d.x_nograd)}
    return Case(op=OP, name=f"fwd+bwd padded frozen-input {d.shape}", impls=impls, baselines=[TORCH], ours=OURS,
                check=_check_among(OURS, TORCH))


def _packed_case(d: _Data) -> Case:
    impls = {
        OURS: lambda: _step(d.ours_lstm, d.x, d.lengths),
        TORCH_PACKED: lambda: _step(d.torch_lstm, d.x, d.lengths),
        TORCH_PADDED: lambda: _step(d.torch_lstm, d.x),
        OURS_PADDED: lambda: _step(d.ours_lstm, d.x),
    }
    impls = _with_step_loop(_with_floor(impls, d, _rows_per_step(d.lengths)), d.x.device.type)
    # Padded and packed runs compute different things: compare like with like.
    return Case(op=OP, name=f"fwd+bwd packed {d.shape}", impls=impls,
                baselines=[TORCH_PACKED, TORCH_PADDED, *_floor_in(impls)], ours=OURS,
                check=_check_among(OURS, TORCH_PACKED, *_step_loop_in(impls)))


def _cell_loop_case(d: _Data) -> Case:
    steps = [d.x.size(1)] * d.x.size(0)
    impls = {OURS: lambda: _cell_loop(d.ours_cell, d.x), TORCH_CELL: lambda: _cell_loop(d.torch_cell, d.x),
             PRODUCTS: _products_alone(d, steps, 1, per_step_weight_grads=True)}
    return Case(op=OP, name=f"cell loop fwd+bwd {d.shape.replace(' bi', ' uni')}", impls=impls,
                baselines=[TORCH_CELL, PRODUCTS], ours=OURS, check=_check_among(OURS, TORCH_CELL))


@contextlib.contextmanager
def _environment(name: str, value: str):
    """os.environ[name] = value inside, put back after (fastnlp reads these settings at every call)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _reference_step(module, x):
    with _environment("FASTNLP_BACKEND", "reference"):
        return _step(module, x)


def _with_step_loop(impls: Dict[str, Callable[[], Any]], device: str) -> Dict[str, Callable[[], Any]]:
    """On CUDA, impls plus ours with the whole-sequence kernels off (OURS_STEP_LOOP): what they gain."""
    if device != "cuda":
        return impls
    ours = impls[OURS]

    def step_loop():
        with _environment("FASTNLP_CUDA_LSTM_SEQUENCE_KERNEL", "0"):
            return ours()

    return {**impls, OURS_STEP_LOOP: step_loop}


def _step_loop_in(impls: Dict[str, Any]) -> Tuple[str, ...]:
    return (OURS_STEP_LOOP,) if OURS_STEP_LOOP in impls else ()


def _floor_in(impls: Dict[str, Any]) -> Tuple[str, ...]:
    return (PRODUCTS,) if PRODUCTS in impls else ()


def _layer_norm_case(d: _Data) -> Case:
    impls = {OURS_LN: lambda: _step(d.ours_ln, d.x), REFERENCE_LN: lambda: _reference_step(d.ours_ln, d.x),
             OURS: lambda: _step(d.ours_lstm, d.x)}
    return Case(op=OP, name=f"layer_norm fwd+bwd padded {d.shape}", impls=impls, baselines=[REFERENCE_LN, OURS],
                ours=OURS_LN, check=_check_among(OURS_LN, REFERENCE_LN, scaled=True))


def _latency_case(d: _Data) -> Case:
    def forward(module):
        with torch.no_grad(), _ieee_float32():
            return module(d.x_nograd)[0]

    impls = _with_step_loop({OURS: lambda: forward(d.ours_lstm), TORCH: lambda: forward(d.torch_lstm)},
                            d.x.device.type)

    def check(results):
        for name in (TORCH, *_step_loop_in(impls)):
            ours, theirs = results[OURS], results[name]
            if d.dtype == torch.bfloat16:
                # (bfloat16 rounds differently in each implementation)
                same = _agree(ours, theirs, scaled=True, tolerance=BFLOAT16_TOLERANCE)
            else:
                same = torch.allclose(ours, theirs, rtol=1e-3, atol=1e-4)
            if not same:
                return f"outputs differ from {name}'s by {(ours.float() - theirs.float()).abs().max().item():.3g}"
        return None

    return Case(op=OP, name=f"inference {d.shape}", impls=impls, baselines=[TORCH], ours=OURS, check=check)


def _cell_inference_case(d: _Data) -> Case:
    def loop(cell):
        with torch.no_grad():
            h = c = d.x_nograd.new_zeros(d.x_nograd.size(1), cell.hidden_size)
            for x_t in d.x_nograd.unbind(0):
                h, c = cell(x_t, (h, c))
            return h

    impls = {OURS: lambda: loop(d.ours_cell), TORCH_CELL: lambda: loop(d.torch_cell)}

    def check(results):
        if torch.allclose(results[OURS], results[TORCH_CELL], rtol=1e-3, atol=1e-4):
            return None
        return f"last states differ by {(results[OURS] - results[TORCH_CELL]).abs().max().item():.3g}"

    return Case(op=OP, name=f"cell loop inference {d.shape.replace(' bi', ' uni')}", impls=impls,
                baselines=[TORCH_CELL], ours=OURS, check=check)
