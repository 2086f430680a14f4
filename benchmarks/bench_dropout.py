"""pytest-benchmark: dropout on 16M elements (fp32 and bf16), fused vs torch.nn.functional.dropout
and the seed's bernoulli-mask CustomDropout, forward (out of place and in place) and forward+backward.

    pytest benchmarks/bench_dropout.py --benchmark-group-by=group --benchmark-columns=median,rounds
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_optim
from fused_optim.benchmark.rows.dropout import seed_dropout

P = 0.5
FORWARD = {"fused": fused_optim.dropout, "F.dropout": F.dropout, "seed CustomDropout": seed_dropout}


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def x(request):
    return torch.randn(16 * 2**20).to(request.param)


@pytest.mark.parametrize("impl", FORWARD)
def test_dropout_forward(benchmark, x, impl):
    benchmark.group = f"dropout fwd 16M {x.dtype}"
    benchmark(FORWARD[impl], x, P)


@pytest.mark.parametrize("impl", ["fused", "F.dropout"])
def test_dropout_forward_inplace(benchmark, x, impl):
    benchmark.group = f"dropout fwd inplace 16M {x.dtype}"
    y = x.clone()
    benchmark(FORWARD[impl], y, P, inplace=True)


@pytest.mark.parametrize("impl", FORWARD)
def test_dropout_forward_backward(benchmark, x, impl):
    benchmark.group = f"dropout fwd+bwd 16M {x.dtype}"
    leaf = x.clone().requires_grad_()
    grad = torch.ones_like(x)
    benchmark(lambda: torch.autograd.grad(FORWARD[impl](leaf, P), leaf, grad))
