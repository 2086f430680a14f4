"""Rows of structured dropout (``drop_path``, ``dropout1d``/``dropout2d``, the residual
``drop_path_add``) on a ViT-B token tensor (case a) and a ResNet feature map (case b), against
timm's drop_path formula (``timm_drop_path``), torch's channel dropout and yardsticks of the same
memory traffic."""

from __future__ import annotations

import torch

import fused_optim
from fused_optim.benchmark.rows.dropout import saved_bytes
from fused_optim.benchmark.timing import Bench, Row


def timm_drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """timm's drop_path formula: a per-sample bernoulli tensor in x's dtype, scaled, multiplied."""
    keep = 1 - drop_prob
    return x * x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)


# The two activations: a ViT-B token tensor and a ResNet stage-1 feature map (fp32).
STRUCTURED_CASES = {"a": (64, 197, 768), "b": (32, 256, 56, 56)}


def structured_dropout_rows(bench: Bench, case: str) -> list[Row]:
    """DropPath, channel dropout and the fused residual form on case (a) (64, 197, 768) or (b)
    (32, 256, 56, 56), against timm's / torch's forms and the memory-speed yardsticks of the same
    traffic: x * 2 (out of place), x.mul_(2) (in place), x + y (the residual)."""
    if case not in STRUCTURED_CASES:
        return []
    shape = STRUCTURED_CASES[case]
    label = "x".join(map(str, shape))
    p = 0.1
    g = torch.Generator(device=bench.device).manual_seed(0)
    x, branch = (torch.randn(shape, generator=g, device=bench.device) for _ in range(2))
    channel = fused_optim.dropout1d if len(shape) == 3 else fused_optim.dropout2d
    torch_channel = torch.nn.functional.dropout1d if len(shape) == 3 else torch.nn.functional.dropout2d
    rows = bench.rows(
        "drop_path fwd", label,
        fused=lambda: fused_optim.drop_path(x, p, True),
        references={"timm drop_path": lambda: timm_drop_path(x, p), "yardstick x * 2": lambda: x * 2},
    )
    rows += bench.rows(
        f"{channel.__name__} fwd", label,
        fused=lambda: channel(x, p),
        references={f"F.{channel.__name__}": lambda: torch_channel(x, p), "yardstick x * 2": lambda: x * 2},
    )
    y, z, w = x.clone(), x.clone(), x.clone()
    rows += bench.rows(
        f"{channel.__name__} fwd inplace", label,
        fused=lambda: channel(y, p, inplace=True),
        references={f"F.{channel.__name__} inplace": lambda: torch_channel(z, p, inplace=True),
                    "yardstick x.mul_(2)": lambda: w.mul_(2)},
    )
    leaf = x.clone().requires_grad_()
    grad = torch.ones_like(x)

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(leaf), leaf, grad)

    rows += bench.rows(
        "drop_path fwd+bwd", label,
        fused=fwd_bwd(lambda t: fused_optim.drop_path(t, p, True)),
        references={"timm drop_path": fwd_bwd(lambda t: timm_drop_path(t, p)), "yardstick x * 2": fwd_bwd(lambda t: t * 2)},
    )
    rows += bench.rows(
        "drop_path_add (x + drop_path(branch))", label,
        fused=lambda: fused_optim.drop_path_add(x, branch, p, True),
        references={"x + timm drop_path(branch)": lambda: x + timm_drop_path(branch, p), "yardstick x + y": lambda: x + branch},
    )
    saved = {
        name: saved_bytes(fn, leaf)
        for name, fn in [("fused", lambda t: fused_optim.drop_path(t, p, True)), ("timm", lambda t: timm_drop_path(t, p))]
    }
    bench.notes.append(f"drop_path {label}: bytes saved for backward: " + ", ".join(f"{k} {v:,}" for k, v in saved.items()))
    return rows
