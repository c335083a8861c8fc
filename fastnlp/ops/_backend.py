"""Choosing between the compiled kernels and the pure-PyTorch reference."""

import os
from typing import Optional

import torch

from fastnlp import _C

BACKENDS = ("auto", "reference")


def use_reference(backend: Optional[str]) -> bool:
    """True when the reference path is asked for, by `backend=` or FASTNLP_BACKEND.

    `backend=None` defers to the FASTNLP_BACKEND environment variable (default
    "auto": the compiled kernel for the tensors' device), read on every call.
    """
    if backend is not None:
        choice = backend
    elif is_compiling():
        choice = os.environ.get("FASTNLP_BACKEND", "auto")  # what dynamo traces; _C's reader it cannot
    else:
        from_environment = _C.backend_from_environment()
        choice = "auto" if from_environment is None else from_environment
    if choice not in BACKENDS:
        source = "backend" if backend is not None else "FASTNLP_BACKEND"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {choice!r}")
    return choice == "reference"


def is_compiling() -> bool:
    """True while torch.compile traces: data-dependent checks must wait for the kernel then."""
    if not torch.jit.is_scripting():
        return torch.compiler.is_compiling()
    return False
