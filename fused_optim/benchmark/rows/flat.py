"""Rows of the glue on flat buffers (``fused_optim.flatten_parameters``): the FlatParameters
methods and the public functions given a flattened module's parameters, against torch's best and
the same fused functions on the unflattened module, plus the host overhead of a flat call on 2000
one-element parameters."""

from __future__ import annotations

import torch

import fused_optim
from fused_optim.benchmark.cases import L1, L2, module_with_grads, nbytes
from fused_optim.benchmark.rows.clip_grad import clip_by_norm_each_call
from fused_optim.benchmark.rows.regularization import foreach_grad_, foreach_penalty
from fused_optim.benchmark.timing import Bench, Row


def flat_rows(bench: Bench, case: str) -> list[Row]:
    """The glue on flat buffers (fused_optim.flatten_parameters): the FlatParameters methods, and the
    public functions given a flattened module's parameters(), against torch's best and against the
    same fused functions on the unflattened module; plus the host overhead of a flat call on 2000
    one-element parameters (case (b) only)."""
    if case not in ("a", "b"):
        return []
    flat_model, plain, torch_model = (module_with_grads(case, bench.device, 0) for _ in range(3))
    flat = fused_optim.flatten_parameters(flat_model)
    size = nbytes(list(plain.parameters()))
    norm = float(fused_optim.get_total_norm([p.grad for p in plain.parameters()]))
    no_clip = 1e6 * norm
    rows = bench.rows(
        "flat clip_grad_norm_ clipping", case,
        fused=clip_by_norm_each_call(lambda _, m: flat.clip_grad_norm_(m), None, norm / 2),
        references={
            "torch foreach=True": clip_by_norm_each_call(
                lambda ps, m: torch.nn.utils.clip_grad_norm_(ps, m, foreach=True), list(torch_model.parameters()), norm / 2),
            "fused per-tensor": clip_by_norm_each_call(fused_optim.clip_grad_norm_, list(plain.parameters()), norm / 2),
        },
        bytes_moved=3 * size, yardstick="mul_", yardstick_bytes=size,
    )
    rows += bench.rows(
        "flat clip_grad_norm_ no clip", case,
        fused=lambda: flat.clip_grad_norm_(no_clip),
        references={
            "torch foreach=True": lambda: torch.nn.utils.clip_grad_norm_(torch_model.parameters(), no_clip, foreach=True),
            "fused per-tensor": lambda: fused_optim.clip_grad_norm_(plain.parameters(), no_clip),
        },
        bytes_moved=size, yardstick="sum", yardstick_bytes=size,
    )
    rows += bench.rows(
        "clip_grad_norm_(model.parameters()) no clip, flattened", case,
        fused=lambda: fused_optim.clip_grad_norm_(flat_model.parameters(), no_clip),
        references={
            "torch foreach=True": lambda: torch.nn.utils.clip_grad_norm_(torch_model.parameters(), no_clip, foreach=True),
            "fused, not flattened": lambda: fused_optim.clip_grad_norm_(plain.parameters(), no_clip),
        },
        bytes_moved=size, yardstick="sum", yardstick_bytes=size,
    )
    with torch.no_grad():
        rows += bench.rows(
            "flat l1l2_penalty", case,
            fused=lambda: flat.l1l2_penalty(L1, L2),
            references={
                "_foreach_norm p=1,2": lambda: foreach_penalty(list(torch_model.parameters())),
                "fused per-tensor": lambda: fused_optim.l1l2_penalty(plain.parameters(), L1, L2),
            },
            bytes_moved=size, yardstick="sum", yardstick_bytes=size,
        )
        rows += bench.rows(
            "flat l1l2_grad_", case,
            fused=lambda: flat.l1l2_grad_(L1, L2),
            references={
                "torch._foreach_*": lambda: foreach_grad_(list(torch_model.parameters())),
                "fused per-tensor": lambda: fused_optim.l1l2_grad_(plain.parameters(), L1, L2),
            },
            bytes_moved=3 * size, yardstick="mul_", yardstick_bytes=size,
        )
    ema_flat = fused_optim.ModelEMA(flat_model, decay=0.999, flat=True)
    ema_plain = fused_optim.ModelEMA(plain, decay=0.999)
    shadow = [p.detach().clone() for p in torch_model.parameters()]
    current = [p.detach() for p in torch_model.parameters()]
    rows += bench.rows(
        "ModelEMA.update, flat", case,
        fused=lambda: ema_flat.update(flat_model),
        references={
            "torch._foreach_lerp_": lambda: torch._foreach_lerp_(shadow, current, 0.001),
            "ModelEMA per-tensor": lambda: ema_plain.update(plain),
        },
        bytes_moved=3 * size, yardstick="lerp_", yardstick_bytes=size,
    )
    if case == "b":
        tiny_flat_model, tiny = (torch.nn.ParameterList([torch.nn.Parameter(torch.randn(1, device=bench.device)) for _ in range(2000)]) for _ in range(2))
        for p in [*tiny_flat_model.parameters(), *tiny.parameters()]:
            p.grad = torch.randn_like(p)
        tiny_flat = fused_optim.flatten_parameters(tiny_flat_model)
        rows += bench.rows(
            "host overhead: flat clip_grad_norm_", "2000 x 1",
            fused=lambda: tiny_flat.clip_grad_norm_(1e9),
            references={"fused per-tensor": lambda: fused_optim.clip_grad_norm_(tiny.parameters(), 1e9)},
        )
        rows += bench.rows(
            "host overhead: flat l1l2_grad_", "2000 x 1",
            fused=lambda: tiny_flat.l1l2_grad_(L1, L2),
            references={"fused per-tensor": lambda: fused_optim.l1l2_grad_(tiny.parameters(), L1, L2)},
        )
    return rows
