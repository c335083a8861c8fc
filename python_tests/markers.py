"""Device and toolchain skip markers: the one place that decides what runs where.

Nothing here initialises CUDA: torch.cuda.is_available() only asks the driver.
"""

import shutil

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
NVCC = shutil.which("nvcc")

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
requires_nvcc = pytest.mark.skipif(NVCC is None, reason="needs nvcc")

# Parametrize over these to run a test on every device, CUDA skipped without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
