"""Rows of weight averaging (``average_tensors`` of K=5 copies, ``ema_update_``) against the seed's
average_model_weights loop, torch's ``_foreach_*`` ops and the merge tools' ``stack().mean(0)``,
with those baselines (``seed_average``, ``foreach_average``, ``stack_average``)."""

from __future__ import annotations

import torch

import fused_optim
from fused_optim.benchmark.cases import make_case, nbytes
from fused_optim.benchmark.timing import Bench, Row


def seed_average(lists: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """The seed's average_model_weights arithmetic: clone the first, add the others, divide."""
    out = []
    for i in range(len(lists[0])):
        acc = lists[0][i].clone()
        for tl in lists[1:]:
            acc += tl[i]
        out.append(acc / len(lists))
    return out


def foreach_average(lists: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    out = torch._foreach_mul(lists[0], 1.0 / len(lists))
    for tl in lists[1:]:
        torch._foreach_add_(out, tl, alpha=1.0 / len(lists))
    return out


def stack_average(lists: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """What merge tools do: stack the K copies of each tensor, then mean."""
    return [torch.stack([tl[i] for tl in lists]).mean(0) for i in range(len(lists[0]))]


def averaging_rows(bench: Bench, case: str) -> list[Row]:
    k = 5
    lists = [make_case(case, device=bench.device, seed=m) for m in range(k)]
    size = nbytes(lists[0])
    rows = bench.rows(
        f"average K={k}", case,
        fused=lambda: fused_optim.average_tensors(lists),
        references={
            "seed loop": lambda: seed_average(lists),
            "torch._foreach_add_": lambda: foreach_average(lists),
            "torch.stack().mean(0)": lambda: stack_average(lists),
        },
        bytes_moved=(k + 1) * size, yardstick="mul_", yardstick_bytes=size,  # K reads, one write
    )
    ema, theirs, current = make_case(case, device=bench.device, seed=k), make_case(case, device=bench.device, seed=k), lists[0]
    rows += bench.rows(
        "ema_update_", case,
        fused=lambda: fused_optim.ema_update_(ema, current, 0.999),
        references={"torch._foreach_lerp_": lambda: torch._foreach_lerp_(theirs, current, 0.001)},
        bytes_moved=3 * size, yardstick="mul_", yardstick_bytes=size,  # read both, write one
    )
    return rows
