"""What the tests share: the dtypes, whether the extension and CUDA are there, the reference
kernels' switch, comparisons with fp64, opcheck's utilities, markers, and the runners of optional
peers and of distributed checks. Fixtures are in conftest.py; no test imports another test file."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import warnings

import pytest
import torch

from fused_optim import _library, reference

HAS_CUDA = torch.cuda.is_available()
EXT_DISABLED = os.environ.get("FUSED_OPTIM_DISABLE_EXT", "0") == "1"

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HALF_DTYPES = [torch.float16, torch.bfloat16]


@contextlib.contextmanager
def reference_kernels():
    """Routes every fused_optim op to its reference kernel on CPU and CUDA, as when _C is absent.

    Registering a kernel for a dispatch key shadows the C++ one until the library is closed."""
    with warnings.catch_warnings(), torch.library._scoped_library("fused_optim", "IMPL") as lib:
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        for name in _library.SCHEMAS:
            for key in ("CPU", "CUDA"):
                lib.impl(name, getattr(reference, name), key)
        yield


def assert_close_to_fp64(actual, expected64, plain, dtype):
    """Compares a result with its fp64 reference.

    fp32/fp64: torch.testing.assert_close defaults at `dtype`. fp16/bf16 (flash-attention's rule):
    the error against fp64 is at most twice that of `plain`, the same computation done plainly by
    PyTorch in `dtype`, plus fp32 rounding of the reference."""
    assert actual.shape == expected64.shape
    if dtype in HALF_DTYPES and actual.numel() > 0:
        err = (actual.double() - expected64).abs().max().item()
        plain_err = (plain.double() - expected64).abs().max().item()
        floor = torch.finfo(torch.float32).eps * expected64.abs().max().item()
        assert err <= 2 * plain_err + floor, f"error {err} > 2 x plain {dtype} error {plain_err}"
    else:
        torch.testing.assert_close(actual, expected64.to(actual.dtype))


# Every check opcheck has: schema, autograd registration, fake tensor, AOT dispatch static and
# dynamic (its default leaves out the static one).
OPCHECK_UTILS = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_static",
    "test_aot_dispatch_dynamic",
)


def opcheck(op, args) -> None:
    torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS)


def native_cuda_test(test):
    """Marks a test of the native CUDA kernels' own properties (no host sync, launch counts, graph
    capture): skipped without CUDA or with the extension disabled (the reference has none of them)."""
    test = pytest.mark.skipif(EXT_DISABLED, reason="a property of the native CUDA kernels")(test)
    test = pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")(test)
    return pytest.mark.cuda(test)


def require(module: str):
    """The installed module's spec; a skip where it is not installed, a failure in CI (where
    .ci/run installs it, so a missing one is a broken setup, not a reason to skip)."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed, but .ci/run installs it")
        pytest.skip(f"{module} is not installed (.ci/run installs it)")
    return spec


HERE = os.path.dirname(os.path.abspath(__file__))  # tests/


def run_distributed(*names: str, world: int = 2) -> None:
    """Runs checks of tests/integration/distributed_checks.py on `world` gloo processes (bounded in time)."""
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "integration", "distributed_checks.py"), str(world), *names],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
