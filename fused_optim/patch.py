"""A scoped, reversible patch for scripts left unmodified: torch's gradient clipping functions
become ours, and dropout modules built meanwhile become ours (:func:`fused_optim.convert`).
Nothing is patched at import."""

from __future__ import annotations

import threading

import torch.nn.utils
import torch.nn.utils.clip_grad
from torch import nn

from . import clip_grad
from .convert import convert

__all__ = ["Patch", "patch"]

_CLIP_FUNCTIONS = ("clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_")
_NAMESPACES = (torch.nn.utils, torch.nn.utils.clip_grad)
_DROPOUT_CLASSES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_lock = threading.Lock()
_NONE = object()  # an attribute the owner did not hold itself


def _converting_init(init):
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        convert(self)  # a no-op for our own modules (subclasses), which call this __init__ too

    __init__.__wrapped__ = init
    return __init__


class Patch:
    """What :func:`patch` returns: ``unpatch()`` puts back exactly what it replaced (calling it
    twice does nothing); usable as a context manager (``with fused_optim.patch(): ...``)."""

    def __init__(self, clip: bool, dropout: bool) -> None:
        self._saved: list[tuple[object, str, object]] = []
        with _lock:
            if clip:
                for namespace in _NAMESPACES:
                    for name in _CLIP_FUNCTIONS:
                        if hasattr(namespace, name):  # torch.nn.utils.clip_grad has two of them
                            self._replace(namespace, name, getattr(clip_grad, name))
            if dropout:
                for cls in _DROPOUT_CLASSES:
                    self._replace(cls, "__init__", _converting_init(cls.__init__))

    def _replace(self, owner: object, name: str, value: object) -> None:
        # What `owner` itself holds (a class may inherit the attribute: then it holds none).
        self._saved.append((owner, name, vars(owner).get(name, _NONE)))
        setattr(owner, name, value)

    def unpatch(self) -> None:
        with _lock:
            for owner, name, value in reversed(self._saved):
                if value is _NONE:
                    delattr(owner, name)
                else:
                    setattr(owner, name, value)
            self._saved.clear()

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        return f"Patch({'active' if self._saved else 'undone'}, {len(self._saved)} attributes)"


def patch(*, clip: bool = True, dropout: bool = True) -> Patch:
    """Speeds up a script without editing it, until ``unpatch()`` (or the end of a ``with``):

    - ``clip``: ``torch.nn.utils.clip_grad_norm_``, ``clip_grad_value_``, ``get_total_norm`` and
      ``clip_grads_with_norm_`` (in ``torch.nn.utils`` and ``torch.nn.utils.clip_grad``) are
      fused_optim's, with torch's signatures and results within docs/numerics.md's tolerances;
    - ``dropout``: every ``nn.Dropout``, ``nn.Dropout1d/2d/3d`` constructed meanwhile is made
      ours as it is built (:func:`fused_optim.convert`; models built before: call ``convert``).

    Code that imported a function by name before the patch (``from torch.nn.utils import
    clip_grad_norm_``) keeps torch's: patch first, or convert the model. Patches nest; undo
    them in reverse order (``with`` blocks do)."""
    return Patch(clip, dropout)
