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

from . import _distributed, _route, checks
from ._route import ONE_VIEW, SHARDED
from ._utils import as_float, as_tensor_list

_TensorOrTensors = Tensor | Iterable[Tensor]


def _grads(parameters: list[Tensor]) -> list[Tensor]:
    """The gradients of `parameters` that exist. One .grad read per parameter (~100 ns each, a
    visible share for 2000 parameters), in a plain loop: as fast as a comprehension with a walrus,
    which torch.compile cannot trace."""
    grads = []
    for p in parameters:
        g = p.grad
        if g is not None:
            grads.append(g)
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

    Sharded tensors (see docs/distributed.md): DTensors (FSDP2, tensor parallel) and, with
    ``process_group``, plain tensors that are each rank's shard of a larger vector (the others are
    taken as replicated). The result is then the **global** norm, a plain tensor with the same
    value on every rank (torch returns a DTensor there, to be ``.full_tensor()``-ed): the fused
    kernel reduces each rank's local shards, then one all-reduce per sharded mesh dimension (and
    per ``process_group``) combines the partial results. Every rank must call it.

    ``foreach`` is accepted for compatibility and ignored: the fused kernel always handles all
    tensors in one call.
    """
    norm_type = as_float(norm_type, "norm_type", like_torch=True)
    tensors = as_tensor_list(tensors, "tensors")
    # Order 0 counts the tensors with a non-zero element: not a norm of their concatenation.
    route = _route.choose("get_total_norm", (tensors,), (False,), process_group=process_group, one_view_ok=norm_type != 0)
    if route.kind == SHARDED:
        checks.check_norm_type(norm_type)
        total = _distributed.sharded_norm(tensors, norm_type, process_group).to(checks.norm_dtype(tensors))
        if error_if_nonfinite and not torch.isfinite(total):  # a host read, as in torch
            raise RuntimeError(checks.nonfinite_norm_message(norm_type))
        return total
    tensors = list(route.views) if route.kind == ONE_VIEW else tensors
    return torch.ops.fused_optim.multi_tensor_norm.default(tensors, norm_type, False, bool(error_if_nonfinite))[0]


def _clip_coefficient(max_norm: float, total_norm: Tensor) -> Tensor:
    """min(1, max_norm / (total_norm + 1e-6)), as torch computes it."""
    if not isinstance(total_norm, Tensor) or total_norm.numel() != 1:
        what = f"shape {list(total_norm.shape)}" if isinstance(total_norm, Tensor) else type(total_norm).__name__
        raise TypeError(f"total_norm must be a one-element tensor (get_total_norm's result), got {what}")
    if _distributed.is_dtensor(total_norm):
        total_norm = total_norm.full_tensor()  # torch's get_total_norm returns one for DTensors
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


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
    max_norm = as_float(max_norm, "max_norm", like_torch=True)
    parameters = as_tensor_list(parameters, "parameters")
    scale = torch.ops.fused_optim.multi_tensor_scale_.default
    if (flat := _route.flat_for("clip_grads_with_norm_", parameters)) is not None:
        scale(flat.grad_buffers(), _clip_coefficient(max_norm, total_norm))
        flat.gradients_written()
        return
    grads = _grads(parameters)
    if not grads:
        return
    route, coefficient = _route.choose("clip_grads_with_norm_", (grads,), (True,)), _clip_coefficient(max_norm, total_norm)
    if route.kind == ONE_VIEW:
        scale(list(route.views), coefficient)
        _route.bump_versions(grads)
    elif route.kind == SHARDED:
        scale(_distributed.local_lists(grads)[0], coefficient)
    else:
        scale(grads, coefficient)


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
    is_generator = isinstance(parameters, types.GeneratorType)
    parameters = as_tensor_list(parameters, "parameters")
    if is_generator and not parameters:
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    max_norm, norm_type = as_float(max_norm, "max_norm", like_torch=True), as_float(norm_type, "norm_type", like_torch=True)
    clip = torch.ops.fused_optim.clip_grad_norm_.default
    flat = _route.flat_for("clip_grad_norm_", parameters, norm_type=norm_type) if process_group is None else None
    if flat is not None:
        total = clip(flat.grad_buffers(), max_norm, norm_type, bool(error_if_nonfinite))
        flat.gradients_written()
        return total
    grads = _grads(parameters)
    # Order 0 counts the tensors with a non-zero element: not a norm of their concatenation.
    route = _route.choose("clip_grad_norm_", (grads,), (True,), process_group=process_group, one_view_ok=norm_type != 0)
    if route.kind == ONE_VIEW:
        total = clip(list(route.views), max_norm, norm_type, bool(error_if_nonfinite))
        _route.bump_versions(grads)
        return total
    if route.kind == SHARDED:
        total = get_total_norm(grads, norm_type, error_if_nonfinite, process_group=process_group)
        if grads:
            scale = torch.ops.fused_optim.multi_tensor_scale_.default
            scale(_distributed.local_lists(grads)[0], _clip_coefficient(max_norm, total))
        _route.record("clip_grad_norm_", SHARDED)
        return total
    return clip(grads, max_norm, norm_type, bool(error_if_nonfinite))


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
    clip_value = as_float(clip_value, "clip_value", like_torch=True)
    parameters = as_tensor_list(parameters, "parameters")
    clamp = torch.ops.fused_optim.clip_grad_value_.default
    if (flat := _route.flat_for("clip_grad_value_", parameters)) is not None:
        clamp(flat.grad_buffers(), clip_value)
        flat.gradients_written()
        return
    grads = _grads(parameters)
    route = _route.choose("clip_grad_value_", (grads,), (True,))
    if route.kind == ONE_VIEW:
        clamp(list(route.views), clip_value)
        _route.bump_versions(grads)
    else:  # per tensor; DTensors clamp their local shards through DTensor's own dispatch
        clamp(grads, clip_value)


def clip_gradients(model: nn.Module, clip_value: float = 1.0, clip_norm: float | None = None) -> Tensor | None:
    """The seed's helper: clips ``model``'s gradients by norm when ``clip_norm`` is given (returning
    the total 2-norm from before clipping), else by value (returning None)."""
    if clip_norm is not None:
        return clip_grad_norm_(model.parameters(), clip_norm)
    clip_grad_value_(model.parameters(), clip_value)
    return None
