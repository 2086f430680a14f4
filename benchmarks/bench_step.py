"""pytest-benchmark: the fused pre-step (penalty gradient + norm in one pass, then the clip) against
the separate fused calls and torch's foreach sequence, on the standard cases (a) and (b), and on
flat buffers; python -m fused_optim.benchmark --suites pre_step,step gives the same rows side by
side with memory-speed fractions, and the end-to-end transformer step.

    pytest benchmarks/bench_step.py --benchmark-group-by=group --benchmark-columns=median,iqr,rounds
"""

from __future__ import annotations

import pytest
import torch

import fused_optim
from fused_optim.benchmark import L1, L2, _fused_separate, _torch_glue, params_with_grads

IMPLS = ["pre_step_", "pre_step_ flat", "fused l1l2_grad_ + clip_grad_norm_", "torch _foreach_* + clip foreach=True"]


@pytest.mark.parametrize("impl", IMPLS)
def test_pre_step_no_clip(benchmark, case_tensors, impl):
    case, grads = case_tensors
    benchmark.group = f"pre-step (penalty gradient + norm), no clip, case {case}"
    params = params_with_grads(grads)
    calls = {
        "pre_step_": lambda: fused_optim.pre_step_(params, L1, L2, max_norm=1e30),
        "fused l1l2_grad_ + clip_grad_norm_": lambda: _fused_separate(params, 1e30),
        "torch _foreach_* + clip foreach=True": lambda: _torch_glue(params, 1e30),
    }
    if impl == "pre_step_ flat":
        flat = fused_optim.flatten_parameters(params)
        calls[impl] = lambda: flat.pre_step_(L1, L2, max_norm=1e30)
    with torch.no_grad():
        benchmark(calls[impl])
