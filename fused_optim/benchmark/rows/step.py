"""Rows of a whole training step of a small transformer (forward, loss, backward, the glue, AdamW),
plain PyTorch with foreach glue against ``fused_optim.attach`` per-tensor and on flat buffers; the
glue's share of each step goes in the run's notes."""

from __future__ import annotations

import torch

import fused_optim
from fused_optim.benchmark.cases import L1, L2
from fused_optim.benchmark.rows.regularization import foreach_grad_
from fused_optim.benchmark.timing import Bench, Row


def _transformer_step_setups(device: str):
    """A training step of a small transformer block stack (4 layers, width 256, dropout 0.1; a
    batch of 16 x 64 tokens): forward, loss, backward, the glue (L1+L2 penalty gradient, clip by
    norm, EMA), AdamW. Three ways to write the glue: torch's foreach ops, fused_optim.attach on the
    per-tensor model, attach on a flattened model (EMA flat too). Returns {name: (step, glue)}."""
    torch.manual_seed(0)
    x = torch.randn(16, 64, 256, device=device)

    def build():
        torch.manual_seed(0)
        layer = torch.nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.1, batch_first=True)
        return torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False).to(device).train()

    setups = {}
    plain = build()
    plain_params = list(plain.parameters())
    plain_opt = torch.optim.AdamW(plain_params, lr=1e-4, foreach=True)
    shadow = [p.detach().clone() for p in plain_params]

    def plain_glue():
        with torch.no_grad():
            foreach_grad_(plain_params)
            torch.nn.utils.clip_grad_norm_(plain_params, 1.0, foreach=True)

    def plain_ema():
        with torch.no_grad():
            torch._foreach_lerp_(shadow, [p.detach() for p in plain_params], 1e-3)

    def plain_step():
        plain_opt.zero_grad(set_to_none=False)
        plain(x).square().mean().backward()
        plain_glue()
        plain_opt.step()
        plain_ema()

    setups["plain PyTorch (foreach)"] = (plain_step, lambda: (plain_glue(), plain_ema()))
    for name, flat in (("fused attach, per-tensor", False), ("fused attach, flat", True)):
        model = build()
        if flat:
            fused_optim.flatten_parameters(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        ema = fused_optim.ModelEMA(model, decay=0.999, flat=flat)
        fused_optim.attach(opt, l1=L1, l2=L2, max_norm=1.0, ema=ema, model=model)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=False)
            model(x).square().mean().backward()
            opt.step()

        def glue(model=model, ema=ema, flat=flat):  # what attach's hooks call
            params = model.parameters() if flat else list(model.parameters())
            fused_optim.pre_step_(params, L1, L2, max_norm=1.0)
            ema.update(model)

        setups[name] = (step, glue)
    return setups


def step_rows(bench: Bench, case: str) -> list[Row]:
    """End to end: the transformer step of _transformer_step_setups, plain PyTorch against attach
    per-tensor and flat; the glue's share of each step goes in the notes."""
    if case != "a":
        return []
    setups = _transformer_step_setups(bench.device)
    for step, _ in setups.values():  # gradients and optimizer state exist before the glue is timed
        step()
    steps = bench.time({name: step for name, (step, _) in setups.items()})
    glues = bench.time({name: glue for name, (_, glue) in setups.items()})
    reference = "plain PyTorch (foreach)"
    rows = [Row("transformer training step", "4 x 256, 16 x 64 tokens", reference, steps[reference], steps[name])
            for name in setups if name != reference]
    for row, name in zip(rows, [n for n in setups if n != reference]):
        row.reference = f"{reference} vs {name}"
    bench.notes.append("glue (penalty + clip + EMA) share of the transformer step: " + "; ".join(
        f"{name} {glues[name]:.2f} of {steps[name]:.2f} ms ({100 * glues[name] / steps[name]:.1f}%)" for name in setups))
    return rows
