"""Choosing between the compiled kernels and the pure-PyTorch reference."""

import os
from typing import Optional

import torch
from torch._C import _functorch
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

from fastnlp import _C

BACKENDS = ("auto", "reference")


def use_reference(backend: Optional[str]) -> bool:
    """True when the reference path is asked for, by `backend=` or FASTNLP_BACKEND,
    or the call is differentiated by a torch.func transform (see
    in_differentiating_transform).

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
    return choice == "reference" or in_differentiating_transform()


# torch.func's transforms that differentiate: grad, vjp, jacrev, hessian
# (Grad) and jvp, jacfwd (Jvp).
_DIFFERENTIATING = (_functorch.TransformType.Grad, _functorch.TransformType.Jvp)


def in_function_transform() -> bool:
    """True inside any torch.func transform (vmap, grad, jvp, ...), outside torch.compile."""
    return not is_compiling() and _functorch.peek_interpreter_stack() is not None


def in_differentiating_transform() -> bool:
    """True inside a torch.func transform that differentiates, at any level of nesting.

    The kernels' autograd cannot serve those transforms: the LSTM's and CRF's
    is a C++ torch::autograd::Function, which they refuse, and with the
    attention op's (torch.library.register_autograd) jvp gave zero tangents
    without a word. The references are plain differentiable torch ops, which
    they differentiate exactly (to any order), so the ops run those there.
    """
    if not in_function_transform():  # the cheap test first (a fraction of a microsecond)
        return False
    return any(interpreter.key() in _DIFFERENTIATING for interpreter in retrieve_all_functorch_interpreters())


def is_compiling() -> bool:
    """True while torch.compile traces: data-dependent checks must wait for the kernel then."""
    if not torch.jit.is_scripting():
        return torch.compiler.is_compiling()
    return False
