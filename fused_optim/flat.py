"""Flat parameter and gradient buffers: the parameters of each dtype re-homed into one contiguous
buffer (they become views of it, keeping their identity), their gradients into a matching one, and
every glue op run as one call on one tensor per dtype, whatever the number of parameters.

Two ways in:

- :func:`flatten_parameters` returns a :class:`FlatParameters` whose methods (``clip_grad_norm_``,
  ``l1l2_grad_``, ...) each make one op call; every call first checks, in one C++ pass over the
  parameters, that they and their gradients still are the views (:meth:`FlatParameters.check`).
- The public functions (``clip_grad_norm_``, ``l1l2_grad_``, ``ema_update_``, ...) take the same
  one-call path when the tensors they are given are exactly the views of one buffer, in order
  (:func:`as_one_view`), a buffer of ours or anyone's.
"""

from __future__ import annotations

import inspect
import math
import types
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

from . import _distributed, checks
from ._library import _C
from ._utils import as_float, to_float

__all__ = ["FlatParameters", "as_one_view", "flatten_parameters", "flat_parameters_of"]

T = TypeVar("T")


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
            or not checks.non_overlapping_and_dense(t)
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


def as_one_view(lists: Sequence[list[Tensor]], written: Sequence[bool]) -> tuple[Tensor, ...] | None:
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


def flat_call(lists: tuple[list[Tensor], ...], written: tuple[bool, ...], op: Callable[..., T]) -> tuple[bool, T | None]:
    """The public functions' fast path: (True, op(*views)) when every list is one view
    (:func:`as_one_view`) and the op succeeds on the views, the written lists' versions then
    bumped; (False, None) otherwise, having written nothing (an op checks everything before
    writing; the per-tensor call that follows then raises its own, per-tensor error). Taken on the
    native path only, outside torch.compile (which traces the per-tensor call, and cannot trace the
    check): on the reference path the per-tensor call gives the same results."""
    if _C is None or torch.compiler.is_compiling():
        return False, None
    views = _C.one_view(lists, written)
    if views is None:
        return False, None
    try:
        result = op(*views)
    except (RuntimeError, TypeError, ValueError):
        return False, None
    for tensors, w in zip(lists, written):
        if w:
            _C.bump_versions(tensors)
    return True, result


def via_flat(parameters: object, method: str, *args) -> tuple[bool, object]:
    """The public functions' path for ``f(module.parameters(), ...)``: (True, the result of the
    FlatParameters method) when `parameters` is an unstarted ``module.parameters()`` generator
    (recurse=True) of a flattened module, so that no module walk is needed (walking 2000
    parameters costs ~0.4 ms, more than the op); (False, None) otherwise, the generator untouched.
    A FlatParameters found broken warns once, and the call runs per tensor."""
    if (
        not isinstance(parameters, types.GeneratorType)
        or parameters.gi_code is not _PARAMETERS_CODE
        or inspect.getgeneratorstate(parameters) != inspect.GEN_CREATED
        or _C is None
        or torch.compiler.is_compiling()
    ):
        return False, None
    args_of = parameters.gi_frame.f_locals
    flat = _flat_of.get(args_of.get("self")) if args_of.get("recurse") is True else None
    if flat is None:
        return False, None
    return call_flat(flat, method, *args)


def call_flat(flat: FlatParameters, method: str, *args, **kwargs) -> tuple[bool, object]:
    """(True, the FlatParameters method's result), or (False, None) when `flat` is found broken:
    it warns once, and the caller runs the call per tensor."""
    try:
        return True, getattr(flat, method)(*args, **kwargs)
    except FlatBuffersBroken as e:
        if not flat._warned_broken:
            warnings.warn(f"{e}; until then, the per-tensor path runs", stacklevel=4)
            flat._warned_broken = True
        return False, None


_PARAMETERS_CODE = nn.Module.parameters.__code__


# ---------------------------------------------------------------- structure watch

# Bumped whenever any module registers a parameter or a submodule (setattr, register_parameter,
# load_state_dict(assign=True), replacing a child): a FlatParameters built from a module then
# re-checks, once, that the module still holds exactly its parameters.
_structure_generation = 0
_watching = False


def _structure_changed(*args) -> None:
    global _structure_generation
    _structure_generation += 1


def _watch_structure() -> None:
    global _watching
    if not _watching:
        nn.modules.module.register_module_parameter_registration_hook(_structure_changed)
        nn.modules.module.register_module_module_registration_hook(_structure_changed)
        _watching = True


_flat_of: weakref.WeakKeyDictionary[nn.Module, FlatParameters] = weakref.WeakKeyDictionary()


def flat_parameters_of(module: nn.Module) -> FlatParameters | None:
    """The FlatParameters last built from `module` by :func:`flatten_parameters`, or None."""
    return _flat_of.get(module)


# ---------------------------------------------------------------- FlatParameters


class _Group:
    """The parameters of one dtype: their buffers, their views of them, and what each .grad is
    expected to be (its view, or None for a parameter without a gradient, whose slot is zero)."""

    def __init__(self, params: list[Tensor]) -> None:
        p0 = params[0]
        self.dtype, self.params = p0.dtype, params
        total = sum(p.numel() for p in params)
        self.data = torch.empty(total, dtype=p0.dtype, device=p0.device)
        self.grad = torch.zeros(total, dtype=p0.dtype, device=p0.device)
        self.views, self.grad_views, self.expected = [], [], []
        offset = 0
        with torch.no_grad():
            for p in params:
                # A dense parameter keeps its strides (channels_last included): the optimizer's and
                # autograd's gradients then have the same layout as the view they land in.
                stride = p.stride() if checks.non_overlapping_and_dense(p) else _contiguous_strides(p.shape)
                view = self.data.as_strided(p.shape, stride, offset)
                grad_view = self.grad.as_strided(p.shape, stride, offset)
                view.copy_(p)
                if p.grad is not None:
                    grad_view.copy_(p.grad)
                self.views.append(view)
                self.grad_views.append(grad_view)
                offset += p.numel()
        for p, view, grad_view in zip(params, self.views, self.grad_views):
            had_grad = p.grad is not None
            p.data = view
            p.grad = grad_view if had_grad else None
            self.expected.append(grad_view if had_grad else None)
        self.has_empty = any(p.numel() == 0 for p in params)
        # What csrc/flat_views.cpp's flat_check compares each parameter with, packed (see there).
        self.storage = self.data.untyped_storage()._cdata
        self.places = torch.tensor(
            [[v.storage_offset(), v.numel(), _geometry(v)] for v in self.views], dtype=torch.int64
        ).reshape(-1, 3)
        self._grad_addresses = [v._cdata for v in self.grad_views]
        self.expectations_changed()

    def expectations_changed(self) -> None:
        """Caches what the calls need of `expected` (kept off the per-call path: a Python loop over
        2000 parameters costs ~50 us)."""
        self.requires_grad = bytes(p.requires_grad for p in self.params)
        self.expected_table = torch.tensor(
            [[a if e is not None else 0, r] for a, e, r in zip(self._grad_addresses, self.expected, self.requires_grad)],
            dtype=torch.int64,
        ).reshape(-1, 2)
        self.missing = [v for v, e in zip(self.grad_views, self.expected) if e is None]  # kept zero
        # A parameter that does not require grad but has a gradient: a penalty on the buffer would reach it.
        self.frozen_with_grad = any(e is not None and not r for e, r in zip(self.expected, self.requires_grad))
        self.to_attach = [i for i, (e, r) in enumerate(zip(self.expected, self.requires_grad)) if e is None and r]


def _geometry(t: Tensor) -> int:
    """A fingerprint of t's sizes and strides, as csrc/flat_views.cpp's geometry() (int64)."""
    mask = (1 << 64) - 1
    h = t.dim()
    for size, stride in zip(t.shape, t.stride()):
        h = ((h * 1000003) & mask) ^ size
        h = ((h * 1000003) & mask) ^ stride
    return h - (1 << 64) if h >= 1 << 63 else h


class FlatBuffersBroken(RuntimeError):
    """A flattened parameter left its buffer or its module (see :class:`FlatParameters`)."""


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


class FlatParameters:
    """Parameters re-homed into one contiguous buffer per dtype, with a matching gradient buffer.

    Build it with :func:`flatten_parameters`. The parameters keep their identity (optimizers built
    before or after, ``state_dict()``, ``load_state_dict()``, checkpoints and
    ``named_parameters()`` see the same objects and values); each becomes a view of its dtype's
    ``data`` buffer, and its ``.grad``, when it has one, a view of the ``grad`` buffer, so autograd
    accumulates into the buffer in place.

    The methods mirror the per-tensor functions over :meth:`parameters` (same arguments, same
    results: bitwise where the arithmetic is the same, within rounding for sums) with one op call
    each. Before each, :meth:`check` verifies in one pass that nothing broke the views:

    - a ``.grad`` that is a new tensor (``zero_grad(set_to_none=True)``, then backward) is copied into
      its slot and replaced by its view (one copy); a ``.grad`` that is None keeps its slot zero and
      stays None (as the per-tensor functions skip it);
    - a ``.grad`` that is a view of another buffer (DDP's ``gradient_as_bucket_view``) is left alone:
      that call runs the per-tensor functions on the actual gradients, with a one-time warning;
    - a parameter whose data left its view (``model.to(...)``, ``.half()``, assigning ``.data``),
      or that its module no longer holds (FSDP2's ``fully_shard``, assigning a new Parameter,
      ``load_state_dict(assign=True)``, replacing a submodule), raises RuntimeError: flatten again.
    """

    def __init__(self, params: list[Tensor], module: nn.Module | None) -> None:
        if not params:
            raise ValueError("flatten_parameters: no parameters to flatten")
        device = params[0].device
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        seen: set[int] = set()
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"parameters[{i}] must be a tensor, got {type(p).__name__}")
            if _distributed.is_dtensor(p):
                raise ValueError(
                    f"parameters[{i}] is a DTensor: FSDP2 and tensor parallelism keep their own flat "
                    "shards; flatten_parameters takes plain tensors (see README, Flat buffers)"
                )
            if id(p) in seen:
                raise ValueError(f"parameters[{i}] appears twice: each parameter can be flattened once")
            if not p.is_leaf:
                raise ValueError(f"parameters[{i}] is not a leaf tensor: only parameters can be re-homed")
            if p.device != device:
                raise ValueError(f"parameters[{i}] is on {p.device}, parameters[0] on {device}: one device only")
            if not p.is_floating_point():
                raise TypeError(f"parameters[{i}] is {p.dtype}: flat buffers hold floating parameters")
            if p.grad is not None and (p.grad.layout != torch.strided or p.grad._base is not None):
                raise ValueError(f"parameters[{i}].grad is sparse or a view of another buffer: cannot re-home it")
            seen.add(id(p))
            by_dtype.setdefault(p.dtype, []).append(p)
        storages = {}
        for i, p in enumerate(params):
            key = p.untyped_storage().data_ptr()
            if key in storages and p.numel() and params[storages[key]].numel():
                raise ValueError(
                    f"parameters[{i}] shares memory with parameters[{storages[key]}]: flattening would "
                    "separate them"
                )
            storages[key] = i
        self.device = device
        self._groups = [_Group(ps) for ps in by_dtype.values()]
        self._params = [p for g in self._groups for p in g.params]
        self._module = weakref.ref(module) if module is not None else None
        self._modules = list(module.modules()) if module is not None else []
        self._types = [type(m) for m in self._modules]
        self._generation = _structure_generation
        self._warned = self._warned_broken = False

    # ------------------------------------------------------------ views and their check

    def parameters(self) -> list[Tensor]:
        """The flattened parameters, grouped by dtype, in their order within each group."""
        return list(self._params)

    @property
    def data(self) -> list[Tensor]:
        """The parameter buffers, one 1-D tensor per dtype."""
        return [g.data for g in self._groups]

    @property
    def grad(self) -> list[Tensor]:
        """The gradient buffers, one 1-D tensor per dtype, after :meth:`check` (a parameter without
        a gradient has a zero slot)."""
        self.check()
        return [g.grad for g in self._groups]

    def _check_structure(self) -> None:
        if self._module is None:
            return
        module = self._module()
        if module is None:
            raise FlatBuffersBroken("FlatParameters: the module it was built from no longer exists")
        for m, cls in zip(self._modules, self._types):
            if type(m) is not cls:
                raise FlatBuffersBroken(
                    f"FlatParameters: a submodule changed class ({cls.__name__} -> {type(m).__name__}, as "
                    "FSDP2's fully_shard does): its parameters are no longer these; flat buffers and "
                    "FSDP2 do not combine (README, Flat buffers)"
                )
        held = list(module.parameters())
        mine = {id(p) for p in self._params}
        if len(held) != len(mine) or any(id(p) not in mine for p in held):
            raise FlatBuffersBroken(
                "FlatParameters: the module no longer holds exactly the flattened parameters (a "
                "Parameter was assigned, a submodule replaced, load_state_dict(assign=True) or a "
                "module conversion made new ones): call flatten_parameters(module) again"
            )
        self._generation = _structure_generation

    def _moved(self, p: Tensor) -> FlatBuffersBroken:
        return FlatBuffersBroken(
            f"FlatParameters: a parameter of shape {list(p.shape)} no longer lives in the flat buffer "
            "(its data was replaced: model.to(), .half(), an assignment to .data): call "
            "flatten_parameters(model) again after converting the model"
        )

    def check(self) -> bool:
        """Verifies the views (see the class docstring); re-homes new gradients into their slots.
        Returns True when every gradient is (or is None and has a zero slot in) the buffer, False
        when some are views of another buffer (the methods then run per tensor). FlatBuffersBroken
        (a RuntimeError) when a parameter left the buffer or its module."""
        if (
            self._module is not None
            and (self._generation != _structure_generation or torch.__future__.get_overwrite_module_params_on_conversion())
        ):
            self._check_structure()
        fine = True
        for g in self._groups:
            kind, index = self._check_group(g)
            if kind == 1:
                raise self._moved(g.params[index])
            if kind == 2:
                self._check_structure()
            if kind == 3:
                fine = self._rehome(g) and fine
        return fine

    def _check_group(self, g: _Group) -> tuple[int, int]:
        # The module classes are checked with the first group only (they are the same for all).
        modules, types = (self._modules, self._types) if g is self._groups[0] else ([], [])
        if _C is not None:
            return _C.flat_check(g.params, g.places, g.expected_table, g.storage, modules, types)
        for i, (p, view) in enumerate(zip(g.params, g.views)):
            same = (
                type(p) in (Tensor, nn.Parameter)
                and p.untyped_storage().data_ptr() == view.untyped_storage().data_ptr()
                and p.storage_offset() == view.storage_offset()
                and p.shape == view.shape
                and p.stride() == view.stride()
                and p.dtype == view.dtype
            )
            if not same:
                return 1, i
        for i, (m, cls) in enumerate(zip(modules, types)):
            if type(m) is not cls:
                return 2, i
        for i, (p, e, r) in enumerate(zip(g.params, g.expected, g.requires_grad)):
            if p.grad is not e or p.requires_grad != bool(r):
                return 3, i
        return 0, -1

    def _rehome(self, g: _Group) -> bool:
        """Brings the group's gradients back into its buffer: new ones are copied into their slots
        (and replaced by their views), the slots of missing ones zeroed. False, touching nothing,
        when a gradient is a view of another buffer."""
        grads = [p.grad for p in g.params]
        for grad, v in zip(grads, g.grad_views):
            if grad is not None and grad is not v and (grad._base is not None or grad.layout != torch.strided):
                if not self._warned:
                    warnings.warn(
                        "FlatParameters: a gradient is a view of another buffer (DDP's "
                        "gradient_as_bucket_view?) or sparse: the flat methods run per tensor on the "
                        "actual gradients (README, Flat buffers)",
                        stacklevel=4,
                    )
                    self._warned = True
                return False
        copies = [(v, grad) for v, grad in zip(g.grad_views, grads) if grad is not None and grad is not v]
        zeros = [v for v, grad in zip(g.grad_views, grads) if grad is None]
        with torch.no_grad():
            if copies:
                torch._foreach_copy_([v for v, _ in copies], [grad for _, grad in copies])
            if len(zeros) == len(grads):
                g.grad.zero_()
            elif zeros:
                torch._foreach_zero_(zeros)
        for p, v, grad in zip(g.params, g.grad_views, grads):
            if grad is not None and grad is not v:
                p.grad = v
        g.expected = [v if grad is not None else None for v, grad in zip(g.grad_views, grads)]
        g.expectations_changed()
        return True

    def _rezero_missing(self) -> None:
        """Zeroes the slots of parameters without a gradient after an op wrote the whole buffer."""
        zeros = [v for g in self._groups for v in g.missing]
        if zeros:
            with torch.no_grad():
                torch._foreach_zero_(zeros)

    def _attach_missing(self) -> None:
        """After the penalty's gradient was added into the buffers: parameters that require grad
        and had no gradient get their view (which now holds the penalty's gradient)."""
        for g in self._groups:
            if g.to_attach:
                for i in g.to_attach:
                    g.params[i].grad = g.expected[i] = g.grad_views[i]
                g.expectations_changed()

    def _grads(self) -> list[Tensor] | None:
        """The gradient buffers, or None when the call must run per tensor."""
        return [g.grad for g in self._groups] if self.check() else None

    def _params_with_grads(self) -> list[Tensor]:
        """The parameters that have a gradient: what the per-tensor functions see, when a call
        runs per tensor."""
        return [p for p in self._params if p.grad is not None]

    # ------------------------------------------------------------ the glue, one call each

    @torch.no_grad()
    def zero_grad(self) -> None:
        """Zeroes every gradient in place, keeping them in the buffer (what
        ``optimizer.zero_grad(set_to_none=False)`` does, in one fill); parameters without a
        gradient keep None."""
        if self._grads() is None:
            torch._foreach_zero_([p.grad for p in self._params_with_grads()])
            return
        for g in self._groups:
            g.grad.zero_()

    def get_total_norm(self, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """:func:`fused_optim.get_total_norm` of the parameters' gradients, one call."""
        from .clip_grad import get_total_norm

        grads = self._norm_grads(to_float(norm_type, "norm_type"))
        if grads is None:
            return get_total_norm([p.grad for p in self._params_with_grads()], norm_type, error_if_nonfinite)
        with torch.no_grad():
            return torch.ops.fused_optim.multi_tensor_norm.default(
                grads, float(norm_type), False, bool(error_if_nonfinite)
            )[0]

    def _norm_grads(self, norm_type: float) -> list[Tensor] | None:
        """The buffers for a norm, or None where the norm of the buffer is not the norm of the
        gradients: order 0 counts tensors, not elements; orders without an identity (< 0, -inf, inf)
        must see neither a zero slot nor skip an empty tensor."""
        grads = self._grads()
        if grads is None or norm_type == 0.0:
            return None
        if norm_type < 0 and any(g.missing for g in self._groups):
            return None
        if (norm_type < 0 or math.isinf(norm_type)) and any(g.has_empty for g in self._groups):
            return None
        return grads

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """:func:`fused_optim.clip_grad_norm_` of the parameters, one call: the total norm from
        before clipping; gradients scaled only when needed; nothing written on an error."""
        from .clip_grad import clip_grad_norm_

        norm_type, max_norm = to_float(norm_type, "norm_type"), to_float(max_norm, "max_norm")
        grads = self._norm_grads(norm_type)
        if grads is None:
            return clip_grad_norm_(self._params_with_grads(), max_norm, norm_type, error_if_nonfinite)
        with torch.no_grad():
            total = torch.ops.fused_optim.clip_grad_norm_.default(grads, max_norm, norm_type, bool(error_if_nonfinite))
        self._rezero_missing()  # a nan or inf norm scales zero slots to nan
        return total

    def clip_grad_value_(self, clip_value: float) -> None:
        """:func:`fused_optim.clip_grad_value_` of the parameters, one call."""
        from .clip_grad import clip_grad_value_

        clip_value = to_float(clip_value, "clip_value")
        grads = self._grads()
        if grads is None:
            clip_grad_value_(self._params_with_grads(), clip_value)
            return
        with torch.no_grad():
            torch.ops.fused_optim.clip_grad_value_.default(grads, clip_value)
        if not clip_value >= 0:  # a nan or negative clip value fills every element, zero slots too
            self._rezero_missing()

    def l1l2_penalty(self, l1: float = 0.0, l2: float = 0.0) -> Tensor:
        """:func:`fused_optim.l1l2_penalty` of the parameters: one call on the buffers when no
        gradient is wanted (``torch.no_grad()``, or no parameter requires grad); under grad mode
        the differentiable per-tensor op (use :meth:`l1l2_grad_` in a training step)."""
        from .regularization import l1l2_penalty

        self.check()
        if torch.is_grad_enabled() and any(r for g in self._groups for r in g.requires_grad):
            return l1l2_penalty(self._params, l1, l2)
        return torch.ops.fused_optim.l1l2_penalty.default(self.data, as_float(l1, "l1"), as_float(l2, "l2"))

    def l1l2_grad_(self, l1: float = 0.0, l2: float = 0.0) -> None:
        """:func:`fused_optim.l1l2_grad_` of the parameters, one call: parameters that require grad
        and have none get one (their view of the buffer)."""
        from .regularization import l1l2_grad_

        l1, l2 = as_float(l1, "l1"), as_float(l2, "l2")
        grads = self._grads()
        if grads is None or any(g.frozen_with_grad for g in self._groups):
            l1l2_grad_(self._params, l1, l2)
            return
        with torch.no_grad():
            torch.ops.fused_optim.l1l2_grad_.default(self.data, grads, l1, l2)
        self._attach_missing()
        self._rezero_missing()  # what is still missing does not require grad: it gets no gradient

    def pre_step_(
        self,
        l1: float = 0.0,
        l2: float = 0.0,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        clip_value: float | None = None,
        error_if_nonfinite: bool = False,
    ) -> Tensor:
        """:func:`fused_optim.pre_step_` of the parameters, one call on the buffers: parameters that
        require grad and have none get one (their view). Per tensor where a buffer's norm is not the
        gradients' (see :meth:`get_total_norm`) or where the penalty would reach the slot of a
        parameter that does not require grad (it gets no penalty, and no gradient)."""
        from .step import _options, pre_step_

        l1, l2, max_norm, norm_type, clip_value = _options(l1, l2, max_norm, norm_type, clip_value)
        grads = self._norm_grads(norm_type)
        penalized = l1 != 0.0 or l2 != 0.0
        if grads is None or (
            penalized and any(g.frozen_with_grad or len(g.missing) > len(g.to_attach) for g in self._groups)
        ):
            return pre_step_(self._params, l1, l2, max_norm, norm_type, clip_value, error_if_nonfinite)
        with torch.no_grad():
            total = torch.ops.fused_optim.pre_step_.default(
                self.data, grads, l1, l2, max_norm, norm_type, clip_value, bool(error_if_nonfinite)
            )
        if penalized:
            self._attach_missing()
        self._rezero_missing()  # a nan or inf norm, a nan or negative clip value fill zero slots too
        return total

    def __repr__(self) -> str:
        groups = ", ".join(f"{g.dtype}: {len(g.params)} tensors / {g.data.numel()} elements" for g in self._groups)
        return f"FlatParameters({groups}, device={self.device})"


def flatten_parameters(model_or_params: nn.Module | Iterable[Tensor]) -> FlatParameters:
    """Re-homes the parameters of a module (all of them, once each: tied weights once) or of an
    iterable of parameters into one contiguous buffer per dtype, and their gradients into a
    matching one; returns the :class:`FlatParameters` that runs the glue ops on them in one call
    each. Flatten after moving the model to its device and dtype, and before wrapping it in DDP or
    compiling a step.

    Raises ValueError for an empty set, a parameter given twice, on another device than the first,
    sharing memory with another, not a leaf, a DTensor (FSDP2), or a gradient that is sparse or a
    view of another buffer; TypeError for non-tensors and non-floating parameters."""
    if isinstance(model_or_params, nn.Module):
        module, params = model_or_params, list(model_or_params.parameters())
    elif isinstance(model_or_params, Tensor):
        module, params = None, [model_or_params]
    elif isinstance(model_or_params, Iterable):
        module, params = None, list(model_or_params)
    else:
        raise TypeError(f"model_or_params must be an nn.Module or an iterable of tensors, got {type(model_or_params).__name__}")
    _watch_structure()
    flat = FlatParameters(params, module)
    if module is not None:
        _flat_of[module] = flat
    return flat
