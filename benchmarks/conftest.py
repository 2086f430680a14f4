"""Inputs for the pytest-benchmark files, built once per session and case."""

from __future__ import annotations

import functools

import pytest

from fused_optim.benchmark.cases import make_case


@functools.cache
def _case(case: str):
    return make_case(case)


@pytest.fixture(params=["a", "b"])
def case_tensors(request):
    return request.param, _case(request.param)
