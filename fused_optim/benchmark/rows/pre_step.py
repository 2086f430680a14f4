"""Rows of the fused pre-step (``pre_step_``: penalty gradient and norm in one pass, then the clip),
per-tensor and on flat buffers, against its baselines: the separate fused calls
(``fused_separate``), torch's foreach sequence (``torch_glue``) and the seed's autograd penalty
(``seed_glue``)."""

from __future__ import annotations

import torch

import fused_optim
from fused_optim.benchmark.cases import L1, L2, module_with_grads, nbytes
from fused_optim.benchmark.rows.clip_grad import clip_by_norm_each_call
from fused_optim.benchmark.rows.regularization import foreach_grad_, seed_penalty
from fused_optim.benchmark.timing import Bench, Row


def torch_glue(params: list[torch.Tensor], max_norm: float) -> None:
    """torch's best way to the pre-step: the penalty's gradient with foreach ops, then
    clip_grad_norm_(foreach=True)."""
    foreach_grad_(params)
    torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)


def seed_glue(params: list[torch.Tensor], max_norm: float) -> None:
    """The seed's way: the penalty through autograd (its L1L2Regularizer loop, backward), then
    torch's clip_grad_norm_."""
    seed_penalty(params).backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)


def fused_separate(params: list[torch.Tensor], max_norm: float) -> None:
    fused_optim.l1l2_grad_(params, L1, L2)
    fused_optim.clip_grad_norm_(params, max_norm)


def pre_step_rows(bench: Bench, case: str) -> list[Row]:
    """The fused pre-step (penalty gradient + norm in one pass, then the clip) against the separate
    fused calls, torch's foreach sequence and the seed's autograd penalty; on flat buffers against
    the foreach sequence. Bytes: params and grads read, grads written (3 passes' worth), plus a
    read and a write of the grads when clipping (5); the separate calls move 4 and 6."""
    if case not in ("a", "b"):
        return []
    names = ["fused", "fused separate", "torch", "seed", "flat"]
    models = {name: module_with_grads(case, bench.device, 0) for name in names}
    flat = fused_optim.flatten_parameters(models["flat"])
    params = {name: list(m.parameters()) for name, m in models.items()}
    size = nbytes(params["fused"])
    norm = float(fused_optim.get_total_norm([p.grad for p in params["fused"]]))
    no_clip = 1e30
    rows = []
    for clipping in (False, True):
        def each(fn, name):
            if clipping:
                return clip_by_norm_each_call(fn, params[name], norm / 2)
            return lambda: fn(params[name], no_clip)

        label = "clipping" if clipping else "no clip"
        references = {
            "fused l1l2_grad_ + clip_grad_norm_": each(fused_separate, "fused separate"),
            "torch _foreach_* + clip foreach=True": each(torch_glue, "torch"),
        }
        if case == "a":  # the seed's autograd loop over 2000 tensors takes seconds a round
            references["seed: autograd penalty + clip"] = each(seed_glue, "seed")
        rows += bench.rows(
            f"pre_step_ {label}", case,
            fused=each(lambda ps, m: fused_optim.pre_step_(ps, L1, L2, max_norm=m), "fused"),
            references=references,
            bytes_moved=(5 if clipping else 3) * size, yardstick="mul_", yardstick_bytes=size,
        )
        rows += bench.rows(
            f"flat pre_step_ {label}", case,
            fused=each(lambda _, m: flat.pre_step_(L1, L2, max_norm=m), "flat"),
            references={"torch _foreach_* + clip foreach=True": references["torch _foreach_* + clip foreach=True"]},
            bytes_moved=(5 if clipping else 3) * size, yardstick="mul_", yardstick_bytes=size,
        )
    return rows
