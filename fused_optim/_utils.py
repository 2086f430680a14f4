"""Argument handling shared by the public API modules.

The public functions call ops through their overload (``torch.ops.fused_optim.op.default``):
the overload packet resolves the overload on every call, ~180 us for a list of 2000 tensors."""

from __future__ import annotations

import numbers
from collections.abc import Iterable

from torch import Tensor


def as_tensor_list(tensors: Tensor | Iterable[Tensor], name: str) -> list[Tensor]:
    """A list from a tensor or an iterable of tensors (a module's parameters() included), as
    torch.nn.utils accepts them."""
    if isinstance(tensors, Tensor):
        return [tensors]
    if not isinstance(tensors, Iterable):
        raise TypeError(f"{name} must be a tensor or an iterable of tensors, got {type(tensors).__name__}")
    result = list(tensors)
    # Checking the distinct types keeps the per-element work in C: ~30 us for 2000 tensors, not ~70.
    if not all(issubclass(cls, Tensor) for cls in set(map(type, result))):
        i, t = next((i, t) for i, t in enumerate(result) if not isinstance(t, Tensor))
        raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
    return result


def as_float(value: float, name: str) -> float:
    """A Python float from a real number (not bool); the op checks its range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)
