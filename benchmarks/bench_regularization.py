"""pytest-benchmark: the L1+L2 penalty, fused vs the seed's loop vs torch._foreach_*, on the standard
cases (a) transformer 144 tensors / 85M elements and (b) 2000 x 1000.

    pytest benchmarks/bench_regularization.py --benchmark-group-by=group --benchmark-columns=median,iqr,rounds
"""

from __future__ import annotations

import pytest
import torch

import fused_optim
from fused_optim.benchmark.cases import L1, L2
from fused_optim.benchmark.rows.regularization import foreach_grad_, foreach_penalty, seed_grad_, seed_penalty

PENALTY = {
    "fused": lambda ps: fused_optim.l1l2_penalty(ps, L1, L2),
    "seed loop": seed_penalty,
    "_foreach_norm p=1,2": foreach_penalty,
}

GRAD = {
    "fused": lambda ps: fused_optim.l1l2_grad_(ps, L1, L2),
    "seed loop": seed_grad_,
    "torch._foreach_*": foreach_grad_,
}


@pytest.mark.parametrize("impl", PENALTY)
def test_l1l2_penalty(benchmark, case_tensors, impl):
    case, params = case_tensors
    benchmark.group = f"l1l2_penalty case {case}"
    benchmark(PENALTY[impl], params)


@pytest.mark.parametrize("impl", GRAD)
def test_l1l2_grad_(benchmark, case_tensors, impl):
    case, params = case_tensors
    benchmark.group = f"l1l2_grad_ case {case}"
    for p in params:
        p.requires_grad_()
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    with torch.no_grad():
        benchmark(GRAD[impl], params)
