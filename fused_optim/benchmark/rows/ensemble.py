"""Rows of ``ModelEnsemble.predict`` over 8 small MLPs, its "auto" and vmap paths against the loop
over the models, at batch sizes 32 and 256 (case a) and 1024 (case b)."""

from __future__ import annotations

import torch

import fused_optim
from fused_optim.benchmark.timing import Bench, Row


def ensemble_rows(bench: Bench, case: str) -> list[Row]:
    """ModelEnsemble.predict of 8 small MLPs (64 -> 256 -> 10): "auto" (which measures both paths
    on its first call for a shape) and the vmap path, each against the loop; the suite's cases are
    batch sizes, 32 and 256 for (a) and 1024 for (b); none for (c)."""
    if case not in ("a", "b"):
        return []
    torch.manual_seed(0)
    models = [
        torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).to(bench.device)
        for _ in range(8)
    ]
    auto = fused_optim.ModelEnsemble(models)
    loop = fused_optim.ModelEnsemble(models, vectorize=False)
    vmapped = fused_optim.ModelEnsemble(models, vectorize=True)
    rows = []
    for batch in {"a": (32, 256), "b": (1024,)}[case]:
        x = torch.randn(batch, 64, device=bench.device)
        # Each path against the loop in its own interleaving: a run right after a vmap run finds
        # the caches cold (its 8x larger intermediates), which would tax whichever path comes next.
        for name, ensemble in (("auto", auto), ("vmap", vmapped)):
            rows += bench.rows(
                f"ensemble predict 8 MLPs, {name}", f"batch {batch}",
                fused=lambda x=x, ensemble=ensemble: ensemble.predict(x),
                references={"loop over models": lambda x=x: loop.predict(x)},
            )
    return rows
