"""Gradient clipping, drop-in for torch.nn.utils: the same signatures, return values and dtypes,
with every gradient read once for the norm and written at most once (not at all when no clipping
is needed)."""

from __future__ import annotations

import types
import warnings
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _distributed, checks
from ._utils import to_float
from .flat import flat_call, via_flat

_TensorOrTensors = Tensor | Iterable[Tensor]

def _as_list(tensors: _TensorOrTensors, name: str) -> list[Tensor]:
    if isinstance(tensors, Tensor):
        return [tensors]
    if not isinstance(tensors, Iterable):
        raise TypeError(f"{name} must be a tensor or an iterable of tensors, got {type(tensors).__name__}")
    return list(tensors)


def _grads(parameters: list[Tensor]) -> list[Tensor]:
    # One .grad read per parameter: each costs ~100 ns, a visible share for 2000 parameters. A
    # plain loop: as fast as a comprehension with a walrus, which torch.compile cannot trace. A
    # non-tensor is found only when the loop trips on it, so the usual call checks nothing more.
    grads = []
    try:
        for p in parameters:
            g = p.grad
            if g is not None:
                grads.append(g)
    except AttributeError:
        i, p = next((i, p) for i, p in enumerate(parameters) if not isinstance(p, Tensor))
        raise TypeError(f"parameters[{i}] must be a tensor, got {type(p).__name__}") from None
    return grads


@torch.no_grad()
def get_total_norm(
    tensors: _TensorOrTensors,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """The norm of order ``norm_type`` of all ``tensors`` viewed as one vector, as
    ``torch.nn.utils.get_total_norm``: 0-dim, in the tensors' promoted dtype (fp16 for fp16
    tensors, accumulated in fp32), ``tensor(0.)`` for no tensors. ``norm_type`` may be any float,
    ``inf`` or ``-inf``; for 0, like torch, the result counts the tensors that have a non-zero
    element.

    ``norm_type`` is read with ``float()``, as torch reads it (``"inf"`` is accepted).

    Raises RuntimeError (torch's message) when ``error_if_nonfinite`` and the norm is nan or inf,
    and for an empty tensor with ``norm_type`` inf, -inf or < 0 (no identity; torch raises too);
    TypeError/ValueError for a non-numeric or nan ``norm_type`` or non-floating tensors.

    Sharded tensors (see README, "Scaling out"): DTensors (FSDP2, tensor parallel) and, with
    ``process_group``, plain tensors that are each rank's shard of a larger vector (the others are
    taken as replicated). The result is then the **global** norm, a plain tensor with the same
    value on every rank (torch returns a DTensor there, to be ``.full_tensor()``-ed): the fused
    kernel reduces each rank's local shards, then one all-reduce per sharded mesh dimension (and
    per ``process_group``) combines the partial results. Every rank must call it.

    ``foreach`` is accepted for compatibility and ignored: the fused kernel always handles all
    tensors in one call.
    """
    norm_type = to_float(norm_type, "norm_type")
    tensors = _as_list(tensors, "tensors")

    def sharded() -> Tensor:
        checks.check_norm_type(norm_type)
        total = _distributed.sharded_norm(tensors, norm_type, process_group).to(checks.norm_dtype(tensors))
        if error_if_nonfinite and not torch.isfinite(total):  # a host read, as in torch
            raise RuntimeError(checks.nonfinite_norm_message(norm_type))
        return total

    if process_group is not None:
        return sharded()
    def fused() -> Tensor:
        def norm(ts: list[Tensor]) -> Tensor:
            return torch.ops.fused_optim.multi_tensor_norm.default(ts, norm_type, False, bool(error_if_nonfinite))[0]

        # Order 0 counts the tensors with a non-zero element: not a norm of their concatenation.
        done, total = flat_call((tensors,), (False,), lambda t: norm([t])) if norm_type != 0 else (False, None)
        return total if done else norm(tensors)

    return _distributed.fused_or_sharded(fused, sharded, tensors)


def _scale_by_clip_coefficient(grads: list[Tensor], max_norm: float, total_norm: Tensor) -> None:
    """grads *= min(1, max_norm / (total_norm + 1e-6)), local shards of DTensors included."""
    if not isinstance(total_norm, Tensor) or total_norm.numel() != 1:
        what = f"shape {list(total_norm.shape)}" if isinstance(total_norm, Tensor) else type(total_norm).__name__
        raise TypeError(f"total_norm must be a one-element tensor (get_total_norm's result), got {what}")
    if _distributed.is_dtensor(total_norm):
        total_norm = total_norm.full_tensor()  # torch's get_total_norm returns one for DTensors
    clip_coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)

    def fused() -> None:
        scale = torch.ops.fused_optim.multi_tensor_scale_.default
        if not flat_call((grads,), (True,), lambda g: scale([g], clip_coef))[0]:
            scale(grads, clip_coef)

    _distributed.fused_or_sharded(
        fused,
        lambda: torch.ops.fused_optim.multi_tensor_scale_.default(_distributed.local_lists(grads)[0], clip_coef),
        grads,
    )


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: _TensorOrTensors, max_norm: float, total_norm: Tensor, foreach: bool | None = None
) -> None:
    """Scales the gradients of ``parameters`` by ``min(1, max_norm / (total_norm + 1e-6))``, as
    ``torch.nn.utils.clip_grads_with_norm_``, in one pass; when that coefficient is 1, no gradient
    is written at all. Parameters without ``.grad`` are skipped.

    ``foreach`` is accepted for compatibility and ignored: the fused kernel always handles all
    tensors in one call.
    """
    max_norm = to_float(max_norm, "max_norm")
    grads = _grads(_as_list(parameters, "parameters"))
    if grads:
        _scale_by_clip_coefficient(grads, max_norm, total_norm)


@torch.no_grad()
def clip_grad_norm_(
    parameters: _TensorOrTensors,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Drop-in for ``torch.nn.utils.clip_grad_norm_``: computes the total norm of the gradients of
    ``parameters`` (see :func:`get_total_norm`), scales them by ``min(1, max_norm / (norm + 1e-6))``
    and returns the total norm from before clipping. One call does it all: every gradient is read
    once, and written only when clipping is needed.

    Non-finite norms: with ``error_if_nonfinite=True``, RuntimeError (torch's message) and every
    gradient is left unchanged; with ``False``, as torch, the gradients are scaled by the
    coefficient computed from the non-finite norm (nan for a nan norm: all gradients become nan;
    0 for an inf norm: finite entries become 0, infinite ones nan).

    Sharded gradients (DTensors, or plain shards with ``process_group``): the global norm, as
    :func:`get_total_norm`, and every rank scales its local shards by the same coefficient.

    ``foreach`` is accepted for compatibility and ignored: the fused kernel always handles all
    tensors in one call.
    """
    if process_group is None:
        done, total = via_flat(parameters, "clip_grad_norm_", max_norm, norm_type, error_if_nonfinite)
        if done:
            return total
    is_generator = isinstance(parameters, types.GeneratorType)
    parameters = _as_list(parameters, "parameters")
    if is_generator and not parameters:
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    grads = _grads(parameters)
    max_norm, norm_type = to_float(max_norm, "max_norm"), to_float(norm_type, "norm_type")

    def sharded() -> Tensor:
        total = get_total_norm(grads, norm_type, error_if_nonfinite, process_group=process_group)
        if grads:
            _scale_by_clip_coefficient(grads, max_norm, total)
        return total

    if process_group is not None:
        return sharded()
    def fused() -> Tensor:
        def clip(gs: list[Tensor]) -> Tensor:
            return torch.ops.fused_optim.clip_grad_norm_.default(gs, max_norm, norm_type, bool(error_if_nonfinite))

        # Order 0 counts the tensors with a non-zero element: not a norm of their concatenation.
        done, total = flat_call((grads,), (True,), lambda g: clip([g])) if norm_type != 0 else (False, None)
        return total if done else clip(grads)

    return _distributed.fused_or_sharded(fused, sharded, grads)


@torch.no_grad()
def clip_grad_value_(parameters: _TensorOrTensors, clip_value: float, foreach: bool | None = None) -> None:
    """Drop-in for ``torch.nn.utils.clip_grad_value_``: clamps every gradient to
    ``[-clip_value, clip_value]`` in one pass (torch makes two: clamp_min_ then clamp_max_). NaN
    gradients stay nan. Parameters without ``.grad`` are skipped. As torch's clamp: a negative
    ``clip_value`` gives every element ``-|clip_value|``, a NaN one makes every gradient NaN, and a
    finite one beyond a gradient's dtype range (1e5 for fp16) raises RuntimeError before anything
    is written.

    ``foreach`` is accepted for compatibility and ignored: the fused kernel always handles all
    tensors in one call.
    """
    clip_value = to_float(clip_value, "clip_value")
    if via_flat(parameters, "clip_grad_value_", clip_value)[0]:
        return
    grads = _grads(_as_list(parameters, "parameters"))
    clamp = torch.ops.fused_optim.clip_grad_value_.default
    if not flat_call((grads,), (True,), lambda g: clamp([g], clip_value))[0]:
        clamp(grads, clip_value)


def clip_gradients(model: nn.Module, clip_value: float = 1.0, clip_norm: float | None = None) -> Tensor | None:
    """The seed's helper: clips ``model``'s gradients by norm when ``clip_norm`` is given (returning
    the total 2-norm from before clipping), else by value (returning None)."""
    if clip_norm is not None:
        return clip_grad_norm_(model.parameters(), clip_norm)
    clip_grad_value_(model.parameters(), clip_value)
    return None
