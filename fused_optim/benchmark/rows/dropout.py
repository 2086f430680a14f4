"""Rows of element-wise dropout (forward, in place, forward + backward) on 16M elements (256M on a
GPU) against ``F.dropout`` and the seed's CustomDropout (``seed_dropout``); ``saved_bytes``, the
bytes autograd saves for backward, which the structured dropout suite reports too."""

from __future__ import annotations

from collections.abc import Callable

import torch

import fused_optim
from fused_optim.benchmark.cases import nbytes
from fused_optim.benchmark.timing import Bench, Row


def seed_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """The seed's CustomDropout.forward."""
    mask = torch.bernoulli(torch.ones_like(x) * (1 - p))
    return x * mask / (1 - p)


def saved_bytes(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward when running fn(x)."""
    sizes: list[int] = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(sizes)


def dropout_rows(bench: Bench, case: str) -> list[Row]:
    """Dropout on 16M elements (256M on a GPU); the suite's own cases replace (a) and (b): fp32 for
    (a), bf16 for (b); none for (c)."""
    if case not in ("a", "b"):
        return []
    dtype = {"a": torch.float32, "b": torch.bfloat16}[case]
    millions = 256 if bench.on_gpu else 16
    label = f"{millions}M {'fp32' if dtype == torch.float32 else 'bf16'}"
    p = 0.5
    x = torch.randn(millions * 2**20, device=bench.device).to(dtype)
    size = nbytes([x])
    rows = bench.rows(
        "dropout fwd", label,
        fused=lambda: fused_optim.dropout(x, p),
        references={"F.dropout": lambda: torch.nn.functional.dropout(x, p), "seed CustomDropout": lambda: seed_dropout(x, p)},
        bytes_moved=2 * size, yardstick="mul_", yardstick_bytes=size,
    )
    y, z = x.clone(), x.clone()
    rows += bench.rows(
        "dropout fwd inplace", label,
        fused=lambda: fused_optim.dropout(y, p, inplace=True),
        references={"F.dropout inplace": lambda: torch.nn.functional.dropout(z, p, inplace=True)},
        bytes_moved=2 * size, yardstick="mul_", yardstick_bytes=size,
    )
    leaf = x.clone().requires_grad_()
    grad = torch.ones_like(x)

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(leaf, p), leaf, grad)

    rows += bench.rows(
        "dropout fwd+bwd", label,
        fused=fwd_bwd(fused_optim.dropout),
        references={"F.dropout": fwd_bwd(torch.nn.functional.dropout), "seed CustomDropout": fwd_bwd(seed_dropout)},
        bytes_moved=4 * size,  # forward read + write, backward read + write
    )
    saved = {
        name: saved_bytes(lambda t, fn=fn: fn(t, p), leaf)
        for name, fn in [("fused", fused_optim.dropout), ("F.dropout", torch.nn.functional.dropout), ("seed", seed_dropout)]
    }
    bench.notes.append(
        f"dropout {label}: bytes saved for backward: " + ", ".join(f"{k} {v:,}" for k, v in saved.items())
    )
    return rows
