"""Which path a public function's call takes, decided in one place, by inspection only.

Each public function (``clip_grad_norm_``, ``l1l2_grad_``, ``ema_update_``, ...) asks
:func:`flat_for` (functions given parameters), then :func:`choose`, and runs the path named; an error raised inside a path propagates (no path
is retried on another). The paths, in the order they are looked for:

``sharded``     a ``process_group`` was given, or the lists hold DTensors (FSDP2, tensor
                parallel): the op on each rank's local shards, with the collectives it needs.
``flat``        the parameters given are exactly those of a :class:`~fused_optim.FlatParameters`
                (same objects, in the order flattened) and their views are intact: one op call
                on its buffers, one per dtype. Gradients that backward made as new tensors
                (``zero_grad(set_to_none=True)``) are first copied into their slots, once.
``one_view``    every list is exactly the consecutive views of one buffer, in order (anyone's
                buffer): one op call on one 1-D tensor per list.
``per_tensor``  the op over the lists as given.

``flat`` and ``one_view`` exist for the native kernels, outside torch.compile (which traces the
per-tensor call); they give the per-tensor results (bit for bit for elementwise ops, within
rounding for sums, whose order differs). :func:`last_route` tells which path the calling
thread's last public call took.

This module imports no public module: FlatParameters register themselves here.
"""

from __future__ import annotations

import operator
import threading
import weakref
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ._distributed import any_dtensor
from ._library import _C
from .checks import non_overlapping_and_dense

SHARDED, FLAT, ONE_VIEW, PER_TENSOR = "sharded", "flat", "one_view", "per_tensor"


class Route(NamedTuple):
    """A path for one call; ``views`` (one 1-D tensor per list) on ``one_view``."""

    kind: str
    views: tuple[Tensor, ...] | None = None


class Taken(NamedTuple):
    function: str
    path: str


_last = threading.local()


def last_route() -> Taken | None:
    """``(function, path)`` of the calling thread's last public call (outside torch.compile), e.g.
    ``Taken(function='clip_grad_norm_', path='flat')``; None before the first. For tests, and for
    finding out why a call is slower than expected."""
    return getattr(_last, "taken", None)


def record(function: str, path: str) -> None:
    """Notes the path a public call took (the outer call, for calls made of others)."""
    if not torch.compiler.is_compiling():
        _last.taken = Taken(function, path)


# ---------------------------------------------------------------- flat parameters

# id(first parameter) -> (its weak reference, the FlatParameters' weak reference). By id: tensors
# compare elementwise, so they cannot be dictionary keys.
_flat_of_first: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def register_flat(flat) -> None:
    """Makes `flat` (a FlatParameters) findable from the list of its parameters."""
    for key in [k for k, (p, f) in list(_flat_of_first.items()) if p() is None or f() is None]:
        del _flat_of_first[key]
    first = flat.listed[0]
    _flat_of_first[id(first)] = (weakref.ref(first), weakref.ref(flat))


def flat_holding(params: list) -> object | None:
    """The FlatParameters whose parameters are exactly `params` (the same objects, in the order
    they were flattened), or None. A cached structure only makes a call faster: the list given is
    the truth, so a parameter added, removed or replaced since flattening means None."""
    if not params or type(params[0]) not in (Tensor, nn.Parameter):
        return None
    first, flat = _flat_of_first.get(id(params[0]), (None, None))
    flat = flat() if first is not None and first() is params[0] else None
    if flat is None or len(flat.listed) != len(params) or not all(map(operator.is_, params, flat.listed)):
        return None
    return flat


# ---------------------------------------------------------------- one view of many tensors


def _one_run(tensors: list[Tensor], written: bool) -> tuple[Tensor, int, int] | None:
    """(first tensor, first element, number of elements) of the storage run `tensors` cover, when
    they are dense, non-empty views of one storage, in one dtype, each starting where the previous
    ends; a written list also needs tensors autograd lets us write. csrc/flat_views.cpp holds the
    same rule, run when the extension is loaded."""
    if not tensors:
        return None
    first, begin, numel = tensors[0], tensors[0].storage_offset(), 0
    for i, t in enumerate(tensors):
        if (
            type(t) not in (Tensor, nn.Parameter)
            or t.layout != torch.strided
            or t.is_neg()
            or t.is_conj()
            or t.numel() == 0
            or not non_overlapping_and_dense(t)
        ):
            return None
        if written and (t.requires_grad or t.is_inference()):
            return None
        same_storage = t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        if i > 0 and (not same_storage or t.dtype != first.dtype or t.storage_offset() != begin + numel):
            return None
        numel += t.numel()
    return first, begin, numel


def _python_one_view(lists: tuple[list[Tensor], ...], written: tuple[bool, ...]) -> tuple[Tensor, ...] | None:
    runs = [_one_run(tl, w) for tl, w in zip(lists, written)]
    if any(r is None for r in runs):
        return None
    if any(
        len(tl) != len(lists[0]) or any(a.shape != b.shape or a.stride() != b.stride() for a, b in zip(tl, lists[0]))
        for tl in lists[1:]
    ):
        return None
    for a in range(len(runs)):
        for b in range(a + 1, len(runs)):
            (ta, ba, na), (tb, bb, nb) = runs[a], runs[b]
            if ta.untyped_storage().data_ptr() != tb.untyped_storage().data_ptr():
                continue
            sa, sb = ta.element_size(), tb.element_size()
            overlap = ba * sa < (bb + nb) * sb and bb * sb < (ba + na) * sa
            if overlap and (ba, na, ta.dtype) != (bb, nb, tb.dtype):
                return None
    with torch.no_grad():
        return tuple(
            torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), begin, (numel,))
            for t, begin, numel in runs
        )


def one_view(lists, written) -> tuple[Tensor, ...] | None:
    """For lists that pair up position by position (same shapes and strides), one 1-D tensor per
    list over the memory its tensors cover, when each list is exactly the consecutive views of one
    buffer, in order; None otherwise (a list that skips, reorders or repeats a view, mixes dtypes or
    storages, holds an empty, non-dense or (for a `written` list) grad-requiring or inference
    tensor, or a tensor subclass such as a DTensor; lists that overlap without covering the same
    run). The returned tensors have no autograd history: after writing one, call
    :func:`bump_versions` on the list it stands for.

    A run that covers only part of a buffer is still exact: an elementwise op or a sum over it
    equals the op on the list."""
    lists, written = tuple(lists), tuple(bool(w) for w in written)
    if _C is not None:
        return _C.one_view(lists, written)
    return _python_one_view(lists, written)


def bump_versions(tensors: list[Tensor]) -> None:
    """Bumps the version counter of each tensor (as the per-tensor op would have)."""
    if _C is not None:
        _C.bump_versions(tensors)
    else:
        torch.autograd.graph.increment_version(tensors)


# ---------------------------------------------------------------- the choice


def flat_for(function: str, params: list[Tensor], **needs) -> object | None:
    """The FlatParameters a call of the public `function` on `params` runs on (``flat`` path, then
    recorded for :func:`last_route`), or None: when `params` are exactly its parameters and its
    buffers can take the call now (`needs`: what the op needs of them, see
    ``FlatParameters.ready``). Asked first: it needs no gradient list."""
    if _C is None or torch.compiler.is_compiling():
        return None
    flat = flat_holding(params)
    if flat is None or not flat.ready(**needs):
        return None
    record(function, FLAT)
    return flat


def choose(
    function: str,
    lists: tuple[list[Tensor], ...],
    written: tuple[bool, ...],
    *,
    process_group=None,
    one_view_ok: bool = True,
) -> Route:
    """The path of a call of the public `function` on `lists` (`written`: which of them the op
    writes) that :func:`flat_for` did not take, recorded for :func:`last_route`.
    `one_view_ok`: False where a flat pass is not the op on the list (a norm of order 0 counts
    tensors; a penalty with an autograd graph; a list with a missing gradient)."""
    fast = _C is not None and not torch.compiler.is_compiling()
    if process_group is not None:
        route = Route(SHARDED)
    elif fast and one_view_ok and (views := one_view(lists, written)) is not None:
        route = Route(ONE_VIEW, views=views)
    elif any(any_dtensor(ts) for ts in lists):
        route = Route(SHARDED)
    else:
        route = Route(PER_TENSOR)
    record(function, route.kind)
    return route
