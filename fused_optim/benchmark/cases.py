"""The standard inputs of the benchmark: the cases (a) a transformer's 144 parameter tensors, (b)
2000 tensors of 1000 elements, (c) one 1 GiB tensor, built by ``make_case``; the penalty strengths
L1 and L2 every suite uses; parameters and modules holding the case's tensors with gradients; and
``nbytes``, the bytes of a list of tensors."""

from __future__ import annotations

import torch

L1, L2 = 1e-5, 1e-4


def transformer_shapes(layers: int = 12, d: int = 768) -> list[tuple[int, ...]]:
    """Parameter shapes of a `layers`-layer, width-`d` transformer encoder (12 tensors a layer)."""
    per_layer = [
        (3 * d, d), (3 * d,), (d, d), (d,),  # attention in/out projections
        (d,), (d,),  # layer norm 1
        (4 * d, d), (4 * d,), (d, 4 * d), (d,),  # MLP
        (d,), (d,),  # layer norm 2
    ]
    return per_layer * layers


CASES = {
    "a": ("transformer 144 tensors / 85M", transformer_shapes),
    "b": ("2000 x 1000", lambda: [(1000,)] * 2000),
    "c": ("one 1 GiB tensor", lambda: [(2**28,)]),
}
# The 1 GiB case is run by default on GPUs only (a CPU run of it takes minutes for little news).
DEFAULT_CASES = {"cpu": "a,b", "cuda": "a,b,c"}


def make_case(case: str, dtype=torch.float32, device="cpu", seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype, device=device) for s in CASES[case][1]()]


def nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def params_with_grads(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Parameters and their gradients, each a copy of `grads` (initialized values: uninitialized
    weights hold NaNs and denormals that would time the penalty's slow paths); leaves even where
    `grads` require grad (the pytest-benchmark files share their case tensors)."""
    params = []
    for g in grads:
        g = g.detach()
        p = g.clone().requires_grad_()
        p.grad = g.clone()
        params.append(p)
    return params


def module_with_grads(case: str, device: str, seed: int) -> torch.nn.Module:
    """The case's tensors as the parameters of one module, each with a gradient."""
    module = torch.nn.ParameterList([torch.nn.Parameter(t) for t in make_case(case, device=device, seed=seed)])
    for p, g in zip(module.parameters(), make_case(case, device=device, seed=seed + 1)):
        p.grad = g
    return module
