"""Device and toolchain skip markers: the one place that decides what runs where.

Nothing here initialises CUDA: torch.cuda.is_available() only asks the driver.
"""

import importlib
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
NVCC = shutil.which("nvcc")

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
requires_nvcc = pytest.mark.skipif(NVCC is None, reason="needs nvcc")


def cuda_include_dir():
    """The CUDA toolkit's include directory (the headers the .cu files include), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    candidates.append("/usr/local/cuda")
    for home in filter(None, candidates):
        if (Path(home) / "include" / "cuda_runtime_api.h").is_file():
            return Path(home) / "include"
    return None


CUDA_INCLUDE = cuda_include_dir()

# Parametrize over these to run a test on every device, CUDA skipped without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]

# fastnlp's drop-in modules raise the errors of torch 2.13, the torch CI pins.
# Older releases (fastnlp supports torch >= 2.5) word some of those messages
# differently and accept a few constructor arguments 2.13 refuses; there the
# error tests compare exception types only, and skip what that torch accepts.
TORCH_RELEASE = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
ERRORS_FOLLOW_TORCH = (2, 13)


def assert_same_error(ours, theirs):
    """ours, theirs: (exception type, message) from the same call, or None when it succeeded."""
    older = TORCH_RELEASE < ERRORS_FOLLOW_TORCH
    if theirs is None and older:
        assert ours is not None, "fastnlp accepts this call, which torch >= 2.13 refuses"
        pytest.skip(f"torch {torch.__version__} accepts this call; torch >= 2.13 and fastnlp refuse it")
    assert theirs is not None, "torch accepts this call: not an error case"
    assert ours is not None, f"fastnlp accepts what torch refuses with {theirs}"
    if older:
        assert ours[0] is theirs[0], (ours, theirs)
    else:
        assert ours == theirs


def float64_attention_runs(device_type: str, dtype: torch.dtype) -> bool:
    """False for float64 attention on CUDA where Triton is too old to compile it (see FLOAT64_DOT)."""
    if device_type != "cuda" or dtype != torch.float64:
        return True
    from fastnlp.triton.attention import FLOAT64_DOT

    return FLOAT64_DOT


def skip_unless_float64_attention_runs(device_type: str, dtype: torch.dtype) -> None:
    if not float64_attention_runs(device_type, dtype):
        pytest.skip("float64 attention on CUDA needs Triton >= 3.9")


def import_transformers_bridge():
    """fastnlp.integrations.transformers, or a skip without a transformers it can use.

    transformers 5 imports under torch < 2.6 but fails there (fastnlp itself
    supports torch 2.5), so on such a torch any ImportError skips; on a newer
    one only a missing transformers does, and a broken bridge fails the tests.
    """
    pytest.importorskip("transformers")
    if TORCH_RELEASE < (2, 6):
        return pytest.importorskip("fastnlp.integrations.transformers", exc_type=ImportError)
    return importlib.import_module("fastnlp.integrations.transformers")
