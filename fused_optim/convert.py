"""One line for a whole model: :func:`convert` makes every dropout module of a model ours, in
place, keeping everything else about it."""

from __future__ import annotations

from torch import nn

from .dropout import Dropout
from .structured_dropout import Dropout1d, Dropout2d, Dropout3d, DropPath, StochasticDepth

__all__ = ["convert"]

# The modules convert() makes ours: torch's exact classes, and timm's DropPath and torchvision's
# StochasticDepth, known by their module and class name (so neither package is imported). Each of
# ours keeps the attributes of the class it replaces (p/inplace, drop_prob/scale_by_keep, p/mode).
_TORCH = {nn.Dropout: Dropout, nn.Dropout1d: Dropout1d, nn.Dropout2d: Dropout2d, nn.Dropout3d: Dropout3d}
_BY_NAME = {("timm", "DropPath"): DropPath, ("torchvision", "StochasticDepth"): StochasticDepth}


def _ours_for(module: nn.Module) -> type[nn.Module] | None:
    cls = type(module)
    if cls in _TORCH:
        return _TORCH[cls]
    return _BY_NAME.get((cls.__module__.split(".")[0], cls.__name__))


def convert(model: nn.Module) -> list[str]:
    """Makes every ``nn.Dropout``, ``nn.Dropout1d/2d/3d``, timm ``DropPath`` and torchvision
    ``StochasticDepth`` in `model` (itself included) ours, in place: each keeps its identity,
    ``p``/``inplace`` (``drop_prob``/``scale_by_keep``, ``p``/``mode``), training flag, hooks and
    state-dict keys; only its class changes, to the fused_optim module of the same name (its repr
    then reads ``fused_optim.Dropout(p=0.1, inplace=False)``). Subclasses of those classes (a
    ``forward`` of their own) and every other module are left alone; converting twice changes
    nothing. Returns the qualified names of the modules converted ("" for `model` itself).

    Run it again after ``from_pretrained`` or any code that builds new dropout modules. The
    dropout inside attention kernels (``scaled_dot_product_attention``'s ``dropout_p``) is not a
    module and stays torch's."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    converted = []
    for name, module in model.named_modules(remove_duplicate=True):
        ours = _ours_for(module)
        if ours is not None:
            module.__class__ = ours
            converted.append(name)
    return converted
