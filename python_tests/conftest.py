"""Shared test set-up. Markers live in markers.py; this file applies them."""

import os

import pytest
from hypothesis import HealthCheck, settings

from markers import DEVICES, HAS_CUDA

# Triton kernels must run through the interpreter on a GPU-less machine; the
# variable is read when fastnlp's Triton modules are imported, so set it first.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "fastnlp",
    deadline=None,
    max_examples=30,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fastnlp"))


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
