"""pytest-benchmark: K=5 weight averaging (fused vs the seed's loop, torch._foreach_add_ and
torch.stack().mean(0)), the EMA update vs torch._foreach_lerp_, on the standard cases (a) and (b);
ModelEnsemble.predict of 8 small MLPs, vmap path vs loop.

    pytest benchmarks/bench_averaging.py --benchmark-group-by=group --benchmark-columns=median,rounds
"""

from __future__ import annotations

import pytest
import torch

import fused_optim
from fused_optim.benchmark.cases import make_case
from fused_optim.benchmark.rows.averaging import foreach_average, seed_average, stack_average

AVERAGE = {
    "fused": fused_optim.average_tensors,
    "seed loop": seed_average,
    "torch._foreach_add_": foreach_average,
    "torch.stack().mean(0)": stack_average,
}


@pytest.fixture(scope="module", params=["a", "b"])
def five_models(request):
    return request.param, [make_case(request.param, seed=m) for m in range(5)]


@pytest.mark.parametrize("impl", AVERAGE)
def test_average_k5(benchmark, five_models, impl):
    case, lists = five_models
    benchmark.group = f"average K=5 case {case}"
    benchmark(AVERAGE[impl], lists)


@pytest.mark.parametrize("impl", ["fused", "torch._foreach_lerp_"])
def test_ema_update(benchmark, five_models, impl):
    case, lists = five_models
    benchmark.group = f"ema_update_ case {case}"
    averaged = [t.clone() for t in lists[1]]
    if impl == "fused":
        benchmark(fused_optim.ema_update_, averaged, lists[0], 0.999)
    else:
        benchmark(torch._foreach_lerp_, averaged, lists[0], 0.001)


@pytest.mark.parametrize("vectorize", ["auto", False], ids=["vmap", "loop"])
@pytest.mark.parametrize("batch", [32, 1024])
def test_ensemble_predict(benchmark, vectorize, batch):
    benchmark.group = f"ensemble predict 8 MLPs batch {batch}"
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)) for _ in range(8)]
    ensemble = fused_optim.ModelEnsemble(models, vectorize=vectorize)
    benchmark(ensemble.predict, torch.randn(batch, 64))
