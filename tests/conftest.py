"""Shared fixtures: every op test runs on each backend (native kernels, reference kernels) and
device (cpu, and cuda when present). What tests share besides fixtures is in helpers.py."""

from __future__ import annotations

import pytest

from fused_optim import _library
from helpers import EXT_DISABLED, HAS_CUDA, reference_kernels


@pytest.fixture(params=["native", "reference"])
def backend(request):
    if request.param == "native":
        if EXT_DISABLED:
            pytest.skip("native extension disabled by FUSED_OPTIM_DISABLE_EXT=1")
        if _library._C is None:
            pytest.fail(f"native extension failed to load: {_library.EXTENSION_ERROR}")
        yield "native"
    else:
        with reference_kernels():
            yield "reference"


@pytest.fixture(
    params=[
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")],
        ),
    ]
)
def device(request):
    return request.param
