"""pytest-benchmark: gradient clipping, fused vs torch.nn.utils (foreach=True and False), on the
standard cases (a) transformer 144 tensors / 85M elements and (b) 2000 x 1000, when clipping
happens and when it does not, and clipping by value.

    pytest benchmarks/bench_clip_grad.py --benchmark-group-by=group --benchmark-columns=median,iqr,rounds
"""

from __future__ import annotations

import functools

import pytest
import torch

import fused_optim
from fused_optim.benchmark.cases import params_with_grads
from fused_optim.benchmark.rows.clip_grad import clip_by_norm_each_call

NORM = {
    "fused": fused_optim.clip_grad_norm_,
    "torch foreach=True": functools.partial(torch.nn.utils.clip_grad_norm_, foreach=True),
    "torch foreach=False": functools.partial(torch.nn.utils.clip_grad_norm_, foreach=False),
}
VALUE = {
    "fused": fused_optim.clip_grad_value_,
    "torch foreach=True": functools.partial(torch.nn.utils.clip_grad_value_, foreach=True),
    "torch foreach=False": functools.partial(torch.nn.utils.clip_grad_value_, foreach=False),
}


@pytest.mark.parametrize("impl", NORM)
@pytest.mark.parametrize("clipping", [True, False], ids=["clipping", "no-clip"])
def test_clip_grad_norm_(benchmark, case_tensors, impl, clipping):
    case, grads = case_tensors
    benchmark.group = f"clip_grad_norm_ {'clipping' if clipping else 'no clip'} case {case}"
    params = params_with_grads(grads)
    norm = torch.nn.utils.get_total_norm(grads).item()
    if clipping:
        benchmark(clip_by_norm_each_call(NORM[impl], params, norm / 2))
    else:
        benchmark(NORM[impl], params, 1e6 * norm)


@pytest.mark.parametrize("impl", VALUE)
def test_clip_grad_value_(benchmark, case_tensors, impl):
    case, grads = case_tensors
    benchmark.group = f"clip_grad_value_ case {case}"
    benchmark(VALUE[impl], params_with_grads(grads), 0.5)
