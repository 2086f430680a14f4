"""Rows of gradient clipping (``clip_grad_norm_`` clipping and not, ``clip_grad_value_``) against
torch's ``clip_grad_norm_``/``clip_grad_value_`` with and without foreach; and
``clip_by_norm_each_call``, the callable that clips on every call, which the flat and pre-step
suites use too."""

from __future__ import annotations

from collections.abc import Callable

import torch

import fused_optim
from fused_optim.benchmark.cases import make_case, nbytes, params_with_grads
from fused_optim.benchmark.timing import Bench, Row


def clip_by_norm_each_call(clip: Callable, params: list[torch.Tensor], max_norm: float) -> Callable[[], object]:
    """A callable that clips `params` by norm on every call: max_norm shrinks by 2^-16 a call, so the
    norm left by the last call is always just above it (a fixed max_norm would stop clipping after
    the first call), while gradients stay far from denormal numbers."""
    state = [max_norm]

    def call():
        state[0] *= 1 - 2**-16
        return clip(params, state[0])

    return call


def clip_rows(bench: Bench, case: str) -> list[Row]:
    grads = make_case(case, device=bench.device)
    size = nbytes(grads)
    norm = torch.nn.utils.get_total_norm(grads).item()
    torch_clip = {
        "torch foreach=True": lambda ps, m: torch.nn.utils.clip_grad_norm_(ps, m, foreach=True),
        "torch foreach=False": lambda ps, m: torch.nn.utils.clip_grad_norm_(ps, m, foreach=False),
    }
    copies = {name: params_with_grads(grads) for name in ["fused", *torch_clip]}
    del grads
    rows = bench.rows(
        "clip_grad_norm_ clipping", case,
        fused=clip_by_norm_each_call(fused_optim.clip_grad_norm_, copies["fused"], norm / 2),
        references={name: clip_by_norm_each_call(fn, copies[name], norm / 2) for name, fn in torch_clip.items()},
        bytes_moved=3 * size, yardstick="mul_", yardstick_bytes=size,  # read; read + write
    )
    no_clip = 1e6 * norm
    rows += bench.rows(
        "clip_grad_norm_ no clip", case,
        fused=lambda: fused_optim.clip_grad_norm_(copies["fused"], no_clip),
        references={name: (lambda fn=fn, ps=copies[name]: fn(ps, no_clip)) for name, fn in torch_clip.items()},
        bytes_moved=size, yardstick="sum", yardstick_bytes=size,  # read only: nothing to write
    )
    torch_value = {
        "torch foreach=True": lambda ps: torch.nn.utils.clip_grad_value_(ps, 0.5, foreach=True),
        "torch foreach=False": lambda ps: torch.nn.utils.clip_grad_value_(ps, 0.5, foreach=False),
    }
    rows += bench.rows(
        "clip_grad_value_", case,
        fused=lambda: fused_optim.clip_grad_value_(copies["fused"], 0.5),
        references={name: (lambda fn=fn, ps=copies[name]: fn(ps)) for name, fn in torch_value.items()},
        bytes_moved=2 * size, yardstick="mul_", yardstick_bytes=size,
    )
    return rows
