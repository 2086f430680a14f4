"""pytest-benchmark: the glue on flat buffers (fused_optim.flatten_parameters) against the same
fused calls on the unflattened parameters and torch foreach, on the standard cases (a) and (b).

    pytest benchmarks/bench_flat.py --benchmark-group-by=group --benchmark-columns=median,iqr,rounds
"""

from __future__ import annotations

import pytest
import torch

import fused_optim
from fused_optim.benchmark.cases import L1, L2, params_with_grads


def _setups(grads):
    flat_params = params_with_grads(grads)
    flat = fused_optim.flatten_parameters(flat_params)
    plain = params_with_grads(grads)
    norm = float(torch.nn.utils.get_total_norm(grads))
    return {
        "flat": (lambda: flat.clip_grad_norm_(1e6 * norm), lambda: flat.l1l2_grad_(L1, L2)),
        "fused per-tensor": (
            lambda: fused_optim.clip_grad_norm_(plain, 1e6 * norm),
            lambda: fused_optim.l1l2_grad_(plain, L1, L2),
        ),
        "torch foreach=True": (
            lambda: torch.nn.utils.clip_grad_norm_(plain, 1e6 * norm, foreach=True),
            None,
        ),
    }


@pytest.mark.parametrize("impl", ["flat", "fused per-tensor", "torch foreach=True"])
def test_clip_grad_norm_no_clip(benchmark, case_tensors, impl):
    case, grads = case_tensors
    benchmark.group = f"clip_grad_norm_ no clip, flat buffers, case {case}"
    benchmark(_setups(grads)[impl][0])


@pytest.mark.parametrize("impl", ["flat", "fused per-tensor"])
def test_l1l2_grad_(benchmark, case_tensors, impl):
    case, grads = case_tensors
    benchmark.group = f"l1l2_grad_, flat buffers, case {case}"
    with torch.no_grad():
        benchmark(_setups(grads)[impl][1])
