"""Rows of the glue on flat buffers (``fused_optim.flatten_parameters``): the FlatParameters
methods and the public functions given a flattened module's parameters, against torch's best and
the same fused functions on the unflattened module, plus the host overhead of a flat call on 2000
one-element parameters."""

from __future__ import annotations

import statistics
import time

import torch

import fused_optim
from fused_optim.benchmark.cases import L1, L2, module_with_grads, nbytes
from fused_optim.benchmark.rows.clip_grad import clip_by_norm_each_call
from fused_optim.benchmark.rows.regularization import foreach_grad_, foreach_penalty
from fused_optim.benchmark.rows.pre_step import torch_glue
from fused_optim.benchmark.timing import Bench, Row, sync


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
    rows += default_zero_grad_rows(bench, case, size, norm)
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


def default_zero_grad_rows(bench: Bench, case: str, size: int, norm: float) -> list[Row]:
    """The loop most users write: torch's default ``optimizer.zero_grad()`` (set_to_none=True), a
    backward, which makes every gradient a new tensor, then the glue. A flattened model's backward
    copies each new gradient into the buffer as it is made (a hook per parameter: the row
    "backward" counts that copy); the glue call then runs one op on the buffer. Timed here: the
    glue call alone and the backward alone, steps of the two models interleaved, medians."""
    rounds = bench.rounds * (5 if case == "b" else 1)
    ours, theirs = (module_with_grads(case, bench.device, 0) for _ in range(2))
    fused_optim.flatten_parameters(ours)
    scale = torch.tensor(1e-3, device=bench.device)

    def backward(model) -> float:
        model.zero_grad()  # set_to_none=True, torch's default
        loss = torch.stack([(p * scale).square().sum() for p in model.parameters()]).sum()
        sync(bench.device)
        start = time.perf_counter()
        loss.backward()
        sync(bench.device)
        return (time.perf_counter() - start) * 1e3

    def timed(fn) -> float:
        sync(bench.device)
        start = time.perf_counter()
        fn()
        sync(bench.device)
        return (time.perf_counter() - start) * 1e3

    backward(ours), backward(theirs)
    grad_norm = float(fused_optim.get_total_norm([p.grad for p in theirs.parameters()]))
    params = {id(m): list(m.parameters()) for m in (ours, theirs)}  # `params = list(model.parameters())`
    glue = {
        "clip_grad_norm_(params) clipping": (
            lambda m: fused_optim.clip_grad_norm_(params[id(m)], grad_norm / 2),
            lambda m: torch.nn.utils.clip_grad_norm_(params[id(m)], grad_norm / 2, foreach=True),
        ),
        "clip_grad_norm_(params) no clip": (
            lambda m: fused_optim.clip_grad_norm_(params[id(m)], 1e6 * grad_norm),
            lambda m: torch.nn.utils.clip_grad_norm_(params[id(m)], 1e6 * grad_norm, foreach=True),
        ),
        "clip_grad_norm_(model.parameters()) no clip": (
            lambda m: fused_optim.clip_grad_norm_(m.parameters(), 1e6 * grad_norm),
            lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 1e6 * grad_norm, foreach=True),
        ),
        "pre_step_(params) clipping (attach's glue)": (
            lambda m: fused_optim.pre_step_(params[id(m)], L1, L2, max_norm=grad_norm / 2),
            lambda m: torch_glue(params[id(m)], grad_norm / 2),
        ),
    }
    samples: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in ["backward", *glue]}
    for _ in range(rounds):
        for name, (fused, reference) in glue.items():
            for side, (model, fn) in enumerate(((ours, fused), (theirs, reference))):
                spent = backward(model)
                samples["backward"][side].append(spent)
                samples[name][side].append(timed(lambda: fn(model)))
    rows = []
    for name, (fused_ms, ref_ms) in samples.items():
        reference = "plain model's backward" if name == "backward" else "torch foreach=True"
        rows.append(Row(f"default zero_grad loop: {name}", case, reference, statistics.median(ref_ms), statistics.median(fused_ms)))
    return rows
