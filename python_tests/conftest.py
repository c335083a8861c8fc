"""Shared test set-up. Markers live in markers.py; this file applies them."""

import os
import sys

import pytest
from hypothesis import HealthCheck, settings

from markers import DEVICES, HAS_CUDA

# The examples (examples/tagging.py and the scripts) are imported by the tests.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

# Triton kernels must run through the interpreter on a GPU-less machine; the
# variable is read when fastnlp's Triton modules are imported, so set it first.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# PyTorch's test utilities (imported by the tests that use PyTorch's own module
# inputs) load a hypothesis profile of their own on first import, which would
# then hold for every test decorated after that import, in whatever file order
# pytest collects. Imported first, so that ours below is the one in force.
try:
    import torch.testing._internal.common_utils  # noqa: F401
except ImportError:  # it needs expecttest
    pass

settings.register_profile(
    "fastnlp",
    deadline=None,
    max_examples=30,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Three examples a test: for slow runs such as .ci/gpu_check's compute-sanitizer step.
settings.register_profile("short", parent=settings.get_profile("fastnlp"), max_examples=3)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fastnlp"))


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
