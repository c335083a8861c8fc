"""Triton kernels: the CUDA implementations of fastnlp's ops, one file per op.

Importing this package never imports triton itself; `register(op)` does, and a
machine without triton still imports fastnlp. There the op's CUDA entry points
raise an error that says why, instead of a dispatcher error that names no cause.

Without a GPU the kernels run through Triton's interpreter on CPU tensors when
TRITON_INTERPRET=1 is set before the op's module is imported (the tests do so).
"""

import importlib
from typing import Dict, Sequence

import torch

# op -> why its Triton module could not be imported (absent when it could)
IMPORT_ERRORS: Dict[str, str] = {}


def register(op: str, names: Sequence[str]) -> bool:
    """Make fastnlp.triton.<op> the CUDA kernels of torch.ops.fastnlp.<name> for each name.

    Returns whether the Triton kernels were registered; when triton is missing
    (or fails to import) each name gets a CUDA kernel that raises instead.
    """
    try:
        module = importlib.import_module(f"fastnlp.triton.{op}")
    except ImportError as error:
        IMPORT_ERRORS[op] = f"{type(error).__name__}: {error}"
        for name in names:
            torch.library.register_kernel(f"fastnlp::{name}", "cuda", _missing(name, IMPORT_ERRORS[op]))
        return False
    for name in names:
        torch.library.register_kernel(f"fastnlp::{name}", "cuda", getattr(module, name))
    return True


def _missing(name: str, why: str):
    def kernel(*args, **kwargs):
        raise NotImplementedError(
            f"fastnlp::{name} on CUDA runs Triton kernels, but triton could not be imported ({why}); install "
            "triton (pip install triton) or pass backend='reference' for the pure-PyTorch version")

    return kernel
