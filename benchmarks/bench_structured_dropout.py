"""pytest-benchmark: DropPath and the fused residual form against timm's formula and the same-traffic
yardsticks (x * 2, x + y) on a (64, 197, 768) fp32 activation; python -m fused_optim.benchmark
--suites structured_dropout gives every row side by side, both activations included.

    pytest benchmarks/bench_structured_dropout.py --benchmark-group-by=group --benchmark-columns=median,iqr,rounds
"""

from __future__ import annotations

import functools

import pytest
import torch

import fused_optim
from fused_optim.benchmark.rows.structured_dropout import timm_drop_path


@functools.cache
def _tensors():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 197, 768, generator=g), torch.randn(64, 197, 768, generator=g)


@pytest.mark.parametrize("impl", ["fused drop_path", "timm drop_path", "yardstick x * 2"])
def test_drop_path_fwd(benchmark, impl):
    x, _ = _tensors()
    benchmark.group = "drop_path fwd (64, 197, 768) fp32"
    calls = {
        "fused drop_path": lambda: fused_optim.drop_path(x, 0.1, True),
        "timm drop_path": lambda: timm_drop_path(x, 0.1),
        "yardstick x * 2": lambda: x * 2,
    }
    benchmark(calls[impl])


@pytest.mark.parametrize("impl", ["fused drop_path_add", "x + timm drop_path(branch)", "yardstick x + y"])
def test_drop_path_add(benchmark, impl):
    x, branch = _tensors()
    benchmark.group = "x + drop_path(branch) (64, 197, 768) fp32"
    calls = {
        "fused drop_path_add": lambda: fused_optim.drop_path_add(x, branch, 0.1, True),
        "x + timm drop_path(branch)": lambda: x + timm_drop_path(branch, 0.1),
        "yardstick x + y": lambda: x + branch,
    }
    benchmark(calls[impl])
