"""fastnlp.patch / fastnlp.unpatch: swap fastnlp's layers into a model you already have.

patch(model) walks the model and replaces, in place, each submodule whose
class is exactly torch.nn.MultiheadAttention, torch.nn.LSTM, torch.nn.LSTMCell
or torchcrf.CRF with the fastnlp module of the same configuration. The
replacement takes over the original's Parameter objects themselves (not
copies), so weights, device, dtype and requires_grad are kept, and an
optimizer built before the patch goes on updating the same tensors. The
train/eval mode is kept too. It returns a PatchReport: what was swapped, and
what was left alone and why.

Left alone, with the reason in the report:
- subclasses (including parametrized modules, whose class torch rewrites):
  their forward may do something the fastnlp module does not;
- modules with hooks registered, on them or on a submodule (out_proj), or
  with a parametrized submodule: the hooks and parametrizations belong to
  those objects;
- attention modules whose head dim is above what fastnlp's kernels take;
- modules on a device this build of fastnlp has no kernel for;
- the model itself, when it is one of those layers: a module cannot replace
  itself in place (build the fastnlp module directly instead).

Every replacement is built before any is put in, so a failure leaves the
model as it was. Building draws no random numbers from the caller's stream.

unpatch(model) puts the originals back, handing them the current parameters
of the fastnlp modules (so training done while patched is kept).
"""

import dataclasses
import importlib.util
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Type, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

import fastnlp.nn as fastnlp_nn
from fastnlp.ops.attention import MAX_HEAD_DIM

LAYERS = ("attention", "lstm", "crf")

# Where a patched module keeps the module it replaced. Set with
# object.__setattr__, so it is neither a submodule nor in the state_dict.
_ORIGINAL = "_fastnlp_patched_from"


@dataclasses.dataclass(frozen=True)
class _Swap:
    layer: str  # one of LAYERS
    original_class: Type[nn.Module]
    kernel_op: str  # the op whose kernels the replacement runs on
    build: Callable[[nn.Module], nn.Module]  # a fastnlp module of the same configuration, on meta


def _lstm(module: nn.LSTM) -> nn.Module:
    return fastnlp_nn.LSTM(module.input_size, module.hidden_size, module.num_layers, module.bias, module.batch_first,
                           module.dropout, module.bidirectional, module.proj_size, device="meta")


def _lstm_cell(module: nn.LSTMCell) -> nn.Module:
    return fastnlp_nn.LSTMCell(module.input_size, module.hidden_size, module.bias, device="meta")


def _multihead_attention(module: nn.MultiheadAttention) -> nn.Module:
    return fastnlp_nn.MultiheadAttention(module.embed_dim, module.num_heads, module.dropout,
                                         bias=module.in_proj_bias is not None, add_bias_kv=module.bias_k is not None,
                                         add_zero_attn=module.add_zero_attn, kdim=module.kdim, vdim=module.vdim,
                                         batch_first=module.batch_first, device="meta")


def _crf(module: nn.Module) -> nn.Module:
    # fastnlp's CRF takes no device, so it is built on the CPU: its initial
    # draw must not move the caller's random stream (the parameters are
    # replaced below anyway).
    with torch.random.fork_rng(devices=[]):
        return fastnlp_nn.CRF(module.num_tags, module.batch_first)


def _swaps() -> List[_Swap]:
    swaps = [
        _Swap("attention", nn.MultiheadAttention, "attention_forward", _multihead_attention),
        _Swap("lstm", nn.LSTM, "lstm_forward", _lstm),
        _Swap("lstm", nn.LSTMCell, "lstm_forward", _lstm_cell),
    ]
    if importlib.util.find_spec("torchcrf") is not None:  # pytorch-crf is optional
        import torchcrf

        swaps.append(_Swap("crf", torchcrf.CRF, "crf_log_partition", _crf))
    return swaps


@dataclasses.dataclass
class PatchReport:
    """What patch() did: `swapped` holds (name, original class, fastnlp class),
    `skipped` holds (name, class, reason) for each layer it recognised the
    kind of but left alone."""

    swapped: List[Tuple[str, str, str]] = dataclasses.field(default_factory=list)
    skipped: List[Tuple[str, str, str]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fastnlp.patch: {len(self.swapped)} swapped, {len(self.skipped)} left alone"]
        lines += [f"  swapped  {name or '<model>'}: {old} -> {new}" for name, old, new in self.swapped]
        lines += [f"  skipped  {name or '<model>'} ({cls}): {why}" for name, cls, why in self.skipped]
        return "\n".join(lines)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _has_hooks(module: nn.Module) -> bool:
    hook_dicts = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(len(getattr(module, attribute, {})) > 0 for attribute in hook_dicts)


def _altered_child(module: nn.Module) -> Optional[str]:
    """The name of a submodule (MultiheadAttention's out_proj) with hooks or a
    parametrization (old and new weight_norm): the replacement builds its own."""
    for name, child in module.named_modules():
        if name and (_has_hooks(child) or parametrize.is_parametrized(child)):
            return name
    return None


def _device(module: nn.Module) -> Optional[torch.device]:
    for tensor in module.parameters():
        return tensor.device
    return None


# Dispatch keys are not all the upper-cased device type ("Meta").
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}


def _has_kernel(op: str, device: torch.device) -> bool:
    key = _DISPATCH_KEYS.get(device.type, device.type.upper())
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastnlp::{op}", key)
    except RuntimeError:  # a key this torch does not know
        return False


def _why_not(name: str, module: nn.Module, swap: _Swap) -> Optional[str]:
    if type(module) is not swap.original_class:
        return (f"a subclass of {_qualified(swap.original_class)}, not the class itself: its forward may differ "
                "from what fastnlp's module does")
    if name == "":
        return "the model itself; a module cannot be replaced in place (use the fastnlp.nn module directly)"
    if _has_hooks(module):
        return "it has hooks registered on it, which a new module object would not run"
    child = _altered_child(module)
    if child is not None:
        return f"its submodule {child} has hooks or a parametrization, which a new module object would not have"
    if isinstance(module, nn.MultiheadAttention) and module.head_dim > MAX_HEAD_DIM:
        return f"its head dim {module.head_dim} is above the {MAX_HEAD_DIM} fastnlp's attention kernels take"
    device = _device(module)
    if device is not None and not _has_kernel(swap.kernel_op, device):
        return f"this build of fastnlp has no {device.type} kernel for it"
    return None


def _move_parameters(source: nn.Module, target: nn.Module) -> None:
    """Hand source's Parameter objects to target under the same names, through
    setattr so that modules which track their parameters (nn.LSTM's flat
    weights) see the change."""
    for name, parameter in source.named_parameters():
        owner_name, _, leaf = name.rpartition(".")
        setattr(target.get_submodule(owner_name), leaf, parameter)


def _build_replacement(module: nn.Module, swap: _Swap) -> nn.Module:
    replacement = swap.build(module)
    _move_parameters(module, replacement)
    device = _device(module)
    if device is not None:  # buffers the replacement made itself (CRF constraints)
        replacement.to(device)
        tensors = (*replacement.named_parameters(), *replacement.named_buffers())
        left_on_meta = [name for name, tensor in tensors if tensor.is_meta and device.type != "meta"]
        if left_on_meta:  # a parameter the original lacks: a bug in the _Swap table, not the user's
            raise RuntimeError(f"fastnlp.patch: {_qualified(type(module))} gave no value for {left_on_meta}")
    replacement.train(module.training)
    object.__setattr__(replacement, _ORIGINAL, module)
    return replacement


def _replace(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, replacement)  # ModuleList's "0" included


def _normalise_layers(layers: Union[str, Iterable[str]]) -> Tuple[str, ...]:
    if isinstance(layers, str):
        layers = (layers,)
    layers = tuple(layers)
    unknown = [layer for layer in layers if layer not in LAYERS]
    if unknown:
        raise ValueError(f"layers must be a subset of {LAYERS}, got unknown {unknown}")
    return layers


def patch(model: nn.Module, layers: Union[str, Iterable[str]] = LAYERS) -> PatchReport:
    """Replace, in place, the model's nn.MultiheadAttention ("attention"),
    nn.LSTM and nn.LSTMCell ("lstm") and torchcrf.CRF ("crf") submodules
    with fastnlp's; returns a PatchReport. See the module docstring."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = _normalise_layers(layers)
    swaps = [swap for swap in _swaps() if swap.layer in layers]
    report = PatchReport()
    # Collect first: the tree must not change while named_modules walks it. A
    # module reachable under several names gets one replacement, used at each.
    found: List[Tuple[str, nn.Module, _Swap]] = []
    for name, module in model.named_modules(remove_duplicate=False):
        for swap in swaps:
            if isinstance(module, swap.original_class):
                found.append((name, module, swap))
                break
    # Every replacement is built before any is put in: should one fail, the
    # model is left as it was, not half patched.
    replacements: Dict[int, nn.Module] = {}
    chosen: List[Tuple[str, nn.Module]] = []
    for name, module, swap in found:
        reason = _why_not(name, module, swap)
        if reason is not None:
            report.skipped.append((name, _qualified(type(module)), reason))
            continue
        if id(module) not in replacements:
            replacements[id(module)] = _build_replacement(module, swap)
        chosen.append((name, module))
    for name, module in chosen:
        replacement = replacements[id(module)]
        _replace(model, name, replacement)
        report.swapped.append((name, _qualified(type(module)), _qualified(type(replacement))))
    return report


def unpatch(model: nn.Module) -> List[str]:
    """Put back every module patch() replaced, with the fastnlp module's
    current parameters and train/eval mode; returns the names restored."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    restored: List[str] = []
    patched = [(name, module) for name, module in model.named_modules(remove_duplicate=False)
               if hasattr(module, _ORIGINAL)]
    for name, replacement in patched:
        original = getattr(replacement, _ORIGINAL)
        _move_parameters(replacement, original)
        original.train(replacement.training)
        _replace(model, name, original)
        restored.append(name)
    return restored
