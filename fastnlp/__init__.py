"""fastnlp: fused CRF, LSTM and attention kernels, as drop-in PyTorch layers.

Importing fastnlp loads the compiled kernels (fastnlp._C), registers the ops
under torch.ops.fastnlp, and exposes:

- fastnlp.ops: the functional API (batch first);
- fastnlp.nn: drop-in modules (CRF, ...);
- fastnlp.reference: pure-PyTorch oracles for every op;
- fastnlp.patch / fastnlp.unpatch: swap fastnlp's layers into an existing model.
"""

__version__ = "0.1.0"

from fastnlp._extension import load_extension

_C = load_extension()

from fastnlp import nn, ops, reference  # noqa: E402  (the ops need _C loaded first)
from fastnlp.patching import PatchReport, patch, unpatch  # noqa: E402


def build_info() -> dict:
    """Which backends this build holds (cpu, cuda) and what it was built from."""
    return dict(_C.build_info())


__all__ = ["PatchReport", "__version__", "build_info", "nn", "ops", "patch", "reference", "unpatch"]
