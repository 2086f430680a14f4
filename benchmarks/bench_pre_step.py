"""pytest-benchmark: the fused pre-step (penalty gradient + norm in one pass, then the clip) against
the separate fused calls and torch's foreach sequence, on the standard cases (a) and (b), and on
flat buffers; python -m fused_optim.benchmark --suites pre_step,step gives the same rows side by
side with memory-speed fractions, and the end-to-end transformer step.

    pytest benchmarks/bench_pre_step.py --benchmark-group-by=group --benchmark-columns=median,iqr,rounds
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import fused_optim
from fused_optim.benchmark.cases import L1, L2, params_with_grads
from fused_optim.benchmark.rows.clip_grad import clip_by_norm_each_call
from fused_optim.benchmark.rows.pre_step import fused_separate, torch_glue

IMPLS = ["pre_step_", "pre_step_ flat", "fused l1l2_grad_ + clip_grad_norm_", "torch _foreach_* + clip foreach=True"]


def _call(impl: str, grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], Callable[[float], object]]:
    """Fresh parameters holding copies of `grads` (flattened for the flat row, so the others stay
    per tensor) and the implementation as fn(max_norm) on them."""
    params = params_with_grads(grads)
    if impl == "pre_step_ flat":
        flat = fused_optim.flatten_parameters(params)
        return params, lambda m: flat.pre_step_(L1, L2, max_norm=m)
    return params, {
        "pre_step_": lambda m: fused_optim.pre_step_(params, L1, L2, max_norm=m),
        "fused l1l2_grad_ + clip_grad_norm_": lambda m: fused_separate(params, m),
        "torch _foreach_* + clip foreach=True": lambda m: torch_glue(params, m),
    }[impl]


@pytest.mark.parametrize("impl", IMPLS)
def test_pre_step_no_clip(benchmark, case_tensors, impl):
    case, grads = case_tensors
    benchmark.group = f"pre-step (penalty gradient + norm), no clip, case {case}"
    _, call = _call(impl, grads)
    with torch.no_grad():
        benchmark(lambda: call(1e30))


@pytest.mark.parametrize("impl", IMPLS)
def test_pre_step_clipping(benchmark, case_tensors, impl):
    case, grads = case_tensors
    benchmark.group = f"pre-step (penalty gradient + norm + scale), clipping, case {case}"
    params, call = _call(impl, grads)
    norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
    with torch.no_grad():
        benchmark(clip_by_norm_each_call(lambda _, m: call(m), params, norm / 2))
