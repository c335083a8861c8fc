"""Autocast, applied by the ops themselves: their kernels call ATen products
that the autocast dispatch key would otherwise cast again half-way through,
so each op casts its arguments once, as autocast casts the torch function it
stands in for, and runs with autocast off (see fastnlp.ops.lstm and
fastnlp.ops.attention)."""

from typing import Optional

import torch
from torch import Tensor


def autocast_dtype(input: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast runs matrix products in on input's device, or None where autocast is off there.

    torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype are
    torch >= 2.4 APIs; is_autocast_enabled raises for a device type autocast
    does not know (meta), hence is_autocast_available first, but only for
    other devices than the CPU and CUDA, which autocast always knows:
    torch.compile before torch 2.6 cannot trace is_autocast_available (a
    graph break, so fullgraph=True fails).
    """
    # is_cpu / is_cuda first: input.device.type builds a torch.device, a
    # cost an LSTMCell step loop at batch 1 pays every step.
    if input.is_cpu:
        device_type = "cpu"
    elif input.is_cuda:
        device_type = "cuda"
    else:
        device_type = input.device.type
        if not torch.amp.is_autocast_available(device_type):
            return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """What autocast does to a matrix product's argument: floating tensors to dtype, float64 ones left alone."""
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)
