"""Flat parameter and gradient buffers: the parameters of each dtype re-homed into one contiguous
buffer (they become views of it, keeping their identity), their gradients into a matching one, so
that every glue op runs as one call on one tensor per dtype, whatever the number of parameters.

:func:`flatten_parameters` returns a :class:`FlatParameters`. Its methods are the public
functions over its parameters; the public functions themselves, given exactly the flattened
parameters (``model.parameters()``, an optimizer's list), take the ``flat`` path of
``fused_optim/_route.py``: one op call on the buffers. Nothing here is global: the list a call is
given is the truth, and a FlatParameters only makes a call on that list faster.
"""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from . import _distributed, _route
from ._library import _C
from .clip_grad import clip_grad_norm_, clip_grad_value_, get_total_norm
from .checks import non_overlapping_and_dense
from .regularization import l1l2_grad_, l1l2_penalty
from .pre_step import pre_step_

__all__ = ["FlatBuffersBroken", "FlatParameters", "flatten_parameters"]


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
                stride = p.stride() if non_overlapping_and_dense(p) else _contiguous_strides(p.shape)
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
        # A parameter without a gradient that does not require grad: a penalty would reach its slot.
        self.frozen_without_grad = len(self.missing) > len(self.to_attach)
        self.has_grad = len(self.missing) < len(self.params)
        self.trainable = any(self.requires_grad)


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

    The methods are the public functions over :meth:`parameters` (same arguments, same results:
    bitwise where the arithmetic is the same, within rounding for sums); they, and the public
    functions given exactly these parameters in the order flattened, run one op call on the
    buffers when the views are intact (see docs/flat-buffers.md):

    - a ``.grad`` that backward makes as a new tensor (after ``zero_grad(set_to_none=True)``) is
      copied into its slot by a post-accumulate-grad hook of the parameter, as it is made, and
      replaced by its view (one copy, while the gradient is in cache); one assigned by hand is
      copied there by the next call; a ``.grad`` that is None keeps its slot zero and
      stays None (as the per-tensor functions skip it); a dtype none of whose parameters has a
      gradient takes no part in a call on gradients;
    - a ``.grad`` that is a view of another buffer (DDP's ``gradient_as_bucket_view``) is left alone:
      the call runs per tensor on the actual gradients, with a one-time warning;
    - a parameter whose data left its view (``model.to(...)``, ``.half()``, assigning ``.data``):
      the calls run per tensor, with a one-time warning, and :meth:`check` raises
      :class:`FlatBuffersBroken`; ``flatten_parameters`` again restores the one-call path.

    A FlatParameters built from a module registers state-dict hooks on its submodules, so that the
    state dict of a part (``model[0].state_dict()``) holds copies of that part's weights, not views
    of the whole buffer (which ``torch.save`` would write whole).
    """

    def __init__(self, params: list[Tensor]) -> None:
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
                    "shards; flatten_parameters takes plain tensors (see docs/flat-buffers.md)"
                )
            if id(p) in seen:
                raise ValueError(f"parameters[{i}] appears twice: each parameter can be flattened once")
            if not p.is_leaf:
                raise ValueError(f"parameters[{i}] is not a leaf tensor: only parameters can be re-homed")
            if p.device != device:
                raise ValueError(f"parameters[{i}] is on {p.device}, parameters[0] on {device}: one device only")
            if not p.is_floating_point():
                raise TypeError(f"parameters[{i}] is {p.dtype}: flat buffers hold floating parameters")
            if p.grad is not None and (p.grad.layout != torch.strided or _foreign_view(p.grad)):
                raise ValueError(f"parameters[{i}].grad is sparse or a view of another buffer: cannot re-home it")
            seen.add(id(p))
            by_dtype.setdefault(p.dtype, []).append(p)
        _refuse_shared_memory(params)
        self.device = device
        self.listed = list(params)  # the order given: the public functions' lists are matched with it
        self.groups = [_Group(ps) for ps in by_dtype.values()]  # one per dtype: buffers, views, params
        for g in self.groups:
            _grad_buffers[g.grad.untyped_storage().data_ptr()] = g.grad
        # Backward puts the gradients it makes straight into the buffer (csrc/flat_views.cpp's
        # land_gradients): with torch's default zero_grad(set_to_none=True) too.
        if _C is not None:
            for g in self.groups:
                _C.land_gradients(g.params, g.grad_views)
        self._params = [p for g in self.groups for p in g.params]
        self._warned_foreign = self._warned_broken = False

    # ------------------------------------------------------------ views and their check

    def parameters(self) -> list[Tensor]:
        """The flattened parameters, in the order they were given."""
        return list(self.listed)

    @property
    def data(self) -> list[Tensor]:
        """The parameter buffers, one 1-D tensor per dtype."""
        return [g.data for g in self.groups]

    @property
    def grad(self) -> list[Tensor]:
        """The gradient buffers, one 1-D tensor per dtype, after :meth:`check` (a parameter without
        a gradient has a zero slot)."""
        self.check()
        return [g.grad for g in self.groups]

    @staticmethod
    def _check_group(g: _Group) -> tuple[int, int]:
        """(kind, index) of the group's first break: csrc/flat_views.cpp's flat_check, or its
        Python twin without the extension."""
        if _C is not None:
            return _C.flat_check(g.params, g.places, g.expected_table, g.storage)
        return _python_flat_check(g)

    def intact(self) -> bool:
        """True when every parameter's data still is its view of the buffer."""
        return all(self._check_group(g)[0] != 1 for g in self.groups)

    def check(self) -> bool:
        """Verifies the views (see the class docstring) and re-homes new gradients into their slots.
        True when every gradient is (or is None and has a zero slot in) the buffer, False when some
        are views of another buffer (the calls then run per tensor). Raises FlatBuffersBroken (a
        RuntimeError) when a parameter's data left the buffer."""
        fine = True
        for g in self.groups:
            kind, index = self._check_group(g)
            if kind == 1:
                p = g.params[index]
                raise FlatBuffersBroken(
                    f"FlatParameters: a parameter of shape {list(p.shape)} no longer lives in the flat buffer "
                    "(its data was replaced: model.to(), .half(), an assignment to .data): call "
                    "flatten_parameters again after converting the model"
                )
            if kind == 3:
                fine = self._rehome(g) and fine
        return fine

    def ready(self, norm_type: float | None = None, penalty: bool = False, gradients: bool = True) -> bool:
        """Whether a call can run on the buffers now (``fused_optim/_route.py`` asks, after the
        views' check and the re-homing of new gradients): `norm_type` for a call that takes the
        gradients' norm (the norm of the buffers is not the gradients' for order 0, which counts
        tensors, and for orders without an identity (< 0, inf, -inf) over zero slots or empty
        tensors); `penalty` for a call that adds the penalty's gradient (a parameter with a
        gradient that does not require grad gets none). Warns once when it cannot because the
        views broke or gradients live in another buffer."""
        try:
            if not self.check():
                return False
        except FlatBuffersBroken as e:
            if not self._warned_broken:
                warnings.warn(f"{e}; until then, the per-tensor path runs", stacklevel=4)
                self._warned_broken = True
            return False
        groups = self._taking_part(penalty)
        if not groups or (penalty and any(g.frozen_with_grad for g in self.groups)):
            return False
        # The slots of gradients that are None must be zero: backward may have landed a gradient
        # there since (a step whose gradients no call read, then zero_grad(set_to_none=True)).
        missing = [v for g in groups for v in g.missing]
        if missing:
            with torch.no_grad():
                torch._foreach_zero_(missing)
        if norm_type is None:
            return True
        if norm_type == 0.0 or (penalty and any(g.frozen_without_grad for g in groups)):
            return False
        if norm_type < 0 and any(g.missing for g in groups):
            return False
        return not ((norm_type < 0 or math.isinf(norm_type)) and any(g.has_empty for g in groups))

    def _taking_part(self, penalty: bool) -> list[_Group]:
        """The groups a call writes or reads gradients of: those with a gradient, or, for a
        penalty, those with a parameter that requires grad (it gets one)."""
        return [g for g in self.groups if (g.trainable if penalty else g.has_grad)]

    def grad_buffers(self, penalty: bool = False) -> list[Tensor]:
        """The gradient buffers of the groups a call on gradients takes (after :meth:`ready`)."""
        return [g.grad for g in self._taking_part(penalty)]

    def data_buffers(self, penalty: bool = False) -> list[Tensor]:
        """The parameter buffers matching :meth:`grad_buffers`."""
        return [g.data for g in self._taking_part(penalty)]

    def gradients_written(self, penalty: bool = False) -> None:
        """After an op wrote the gradient buffers: parameters that require grad and had no gradient
        get their view (with `penalty`: it holds the penalty's gradient), and the slots of the
        others are zeroed again (a nan or inf norm, a nan or negative clip value fill them too)."""
        if penalty:
            for g in self.groups:
                if g.to_attach:
                    for i in g.to_attach:
                        g.params[i].grad = g.expected[i] = g.grad_views[i]
                    g.expectations_changed()
        zeros = [v for g in self.groups for v in g.missing]
        if zeros:
            with torch.no_grad():
                torch._foreach_zero_(zeros)

    def _rehome(self, g: _Group) -> bool:
        """Brings the group's gradients back into its buffer: new ones are copied into their slots
        (and replaced by their views), the slots of missing ones zeroed. False, touching nothing,
        when a gradient is a view of another buffer (warned once)."""
        if _C is not None:
            changed = _C.flat_rehome(g.params, g.grad_views, g.expected_table)
            if changed is not None and not changed and self._check_group(g)[0] == 0:
                return True  # the usual step: every gradient new, copied; nothing else changed
        else:
            changed = self._python_rehome(g)
        if changed is None:
            if not self._warned_foreign:
                warnings.warn(
                    "FlatParameters: a gradient is a view of another buffer (DDP's "
                    "gradient_as_bucket_view?) or sparse: the flat calls run per tensor on the "
                    "actual gradients (docs/flat-buffers.md)",
                    stacklevel=5,
                )
                self._warned_foreign = True
            return False
        g.expected = [v if p.grad is not None else None for p, v in zip(g.params, g.grad_views)]
        g.expectations_changed()
        return True

    @staticmethod
    def _python_rehome(g: _Group) -> bool | None:
        """csrc/flat_views.cpp's flat_rehome in Python."""
        grads = [p.grad for p in g.params]
        if any(
            grad is not None and grad is not v and (grad._base is not None or grad.layout != torch.strided or grad.requires_grad)
            for grad, v in zip(grads, g.grad_views)
        ):
            return None
        with torch.no_grad():
            for p, v, grad, e in zip(g.params, g.grad_views, grads, g.expected):
                if grad is None and e is not None:
                    v.zero_()
                elif grad is not None and grad is not v:
                    v.copy_(grad)
                    p.grad = v
        return True


    # ------------------------------------------------------------ the glue: the public functions

    @torch.no_grad()
    def zero_grad(self) -> None:
        """Zeroes every gradient in place, keeping them in the buffer (what
        ``optimizer.zero_grad(set_to_none=False)`` does, in one fill); parameters without a
        gradient keep None."""
        if self.ready():
            for g in self.groups:
                g.grad.zero_()
        else:
            torch._foreach_zero_([p.grad for p in self.listed if p.grad is not None])

    def get_total_norm(self, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """:func:`fused_optim.get_total_norm` of the parameters' gradients."""
        norm_type = float(norm_type)
        if self.ready(norm_type=norm_type):
            return get_total_norm(self.grad_buffers(), norm_type, error_if_nonfinite)
        return get_total_norm([p.grad for p in self.listed if p.grad is not None], norm_type, error_if_nonfinite)

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """:func:`fused_optim.clip_grad_norm_` over :meth:`parameters`."""
        return clip_grad_norm_(self.listed, max_norm, norm_type, error_if_nonfinite)

    def clip_grad_value_(self, clip_value: float) -> None:
        """:func:`fused_optim.clip_grad_value_` over :meth:`parameters`."""
        clip_grad_value_(self.listed, clip_value)

    def l1l2_penalty(self, l1: float = 0.0, l2: float = 0.0) -> Tensor:
        """:func:`fused_optim.l1l2_penalty` over :meth:`parameters`: one call on the buffers when no
        gradient is wanted (``torch.no_grad()``); under grad mode the differentiable per-tensor op
        (use :meth:`l1l2_grad_` in a training step)."""
        return l1l2_penalty(self.listed, l1, l2)

    def l1l2_grad_(self, l1: float = 0.0, l2: float = 0.0) -> None:
        """:func:`fused_optim.l1l2_grad_` over :meth:`parameters`."""
        l1l2_grad_(self.listed, l1, l2)

    def pre_step_(
        self,
        l1: float = 0.0,
        l2: float = 0.0,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        clip_value: float | None = None,
        error_if_nonfinite: bool = False,
    ) -> Tensor:
        """:func:`fused_optim.pre_step_` over :meth:`parameters`."""
        return pre_step_(self.listed, l1, l2, max_norm, norm_type, clip_value, error_if_nonfinite)

    def __repr__(self) -> str:
        groups = ", ".join(f"{g.dtype}: {len(g.params)} tensors / {g.data.numel()} elements" for g in self.groups)
        return f"FlatParameters({groups}, device={self.device})"


def _python_flat_check(g: _Group) -> tuple[int, int]:
    """csrc/flat_views.cpp's flat_check in Python: (kind, index) of the first break; kind 0 none,
    1 a parameter's data left its view, 3 a .grad or requires_grad is not as expected."""
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
    for i, (p, e, r) in enumerate(zip(g.params, g.expected, g.requires_grad)):
        if p.grad is not e or p.requires_grad != bool(r):
            return 3, i
    return 0, -1


# The gradient buffers of the FlatParameters alive, by storage address: their views may be re-homed
# by flattening again, unlike a view of another buffer (DDP's gradient buckets).
_grad_buffers: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()


def _foreign_view(grad: Tensor) -> bool:
    return grad._base is not None and _grad_buffers.get(grad.untyped_storage().data_ptr()) is not grad._base


def _refuse_shared_memory(params: list[Tensor]) -> None:
    """ValueError when two parameters overlap in memory (tied weights are one parameter): flattening
    would separate them. Views of one buffer that do not overlap (a model flattened before) are
    fine: they are re-homed into new buffers."""
    spans = sorted(
        (p.untyped_storage().data_ptr(), p.storage_offset() * p.element_size(), _extent(p) * p.element_size(), i)
        for i, p in enumerate(params)
        if p.numel()
    )
    for (s0, b0, n0, i0), (s1, b1, _, i1) in zip(spans, spans[1:]):
        if s0 == s1 and b1 < b0 + n0:
            first, second = sorted((i0, i1))
            raise ValueError(
                f"parameters[{second}] shares memory with parameters[{first}]: flattening would separate them"
            )


def _extent(p: Tensor) -> int:
    """The number of elements from p's first element to its last, inclusive."""
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(p.shape, p.stride()))


_keep_vars = threading.local()  # the outermost state_dict() call's keep_vars, per thread


class _PartsCopiedInStateDicts:
    """The state-dict hooks of a flattened module's submodules (a pre-hook and a post-hook, as one
    picklable object each): the state dict of a part of the model (``model[0].state_dict()``)
    gets copies of the flattened weights it holds, since views would make ``torch.save`` write
    the whole buffer. The outermost ``state_dict()`` call decides (its prefix is "", a nested
    one's names the submodule); a state dict that covers a whole buffer keeps its views, and
    ``keep_vars=True`` the parameters themselves."""

    def __init__(self, buffer_sizes: dict[int, int], pre: bool) -> None:
        self.buffer_sizes, self.pre = buffer_sizes, pre  # storage address -> number of elements

    def __call__(self, module: nn.Module, *args) -> None:
        if self.pre:  # args: prefix, keep_vars
            if args[0] == "":
                _keep_vars.value = args[1]
        elif args[1] == "" and not getattr(_keep_vars, "value", False):  # args: state_dict, prefix, metadata
            self._copy_parts(args[0])

    def __reduce__(self):
        # A copy of the module (deepcopy, pickling) holds other buffers: its hooks do nothing.
        return type(self), ({}, self.pre)

    def _copy_parts(self, state_dict: dict) -> None:
        covered: dict[int, set[tuple[int, int]]] = {}
        for t in state_dict.values():
            address = t.untyped_storage().data_ptr() if type(t) in (Tensor, nn.Parameter) else None
            if address in self.buffer_sizes:
                covered.setdefault(address, set()).add((t.storage_offset(), t.numel()))
        partial = {a for a, spans in covered.items() if sum(n for _, n in spans) < self.buffer_sizes[a]}
        copies: dict[tuple, Tensor] = {}  # tied entries stay one tensor
        for key, t in state_dict.items():
            if type(t) in (Tensor, nn.Parameter) and t.untyped_storage().data_ptr() in partial:
                alias = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
                if alias not in copies:
                    copies[alias] = t.clone()
                state_dict[key] = copies[alias]


# A module's FlatParameters (kept alive as long as the module: `flatten_parameters(model)` is
# often called without keeping its result) and its state-dict hooks, removed when it is flattened
# again.
_of_module: weakref.WeakKeyDictionary[nn.Module, tuple[FlatParameters, list]] = weakref.WeakKeyDictionary()


def _keep_with(module: nn.Module, flat: FlatParameters) -> None:
    _, old_hooks = _of_module.pop(module, (None, []))
    for handle in old_hooks:
        handle.remove()
    sizes = {g.data.untyped_storage().data_ptr(): g.data.numel() for g in flat.groups}
    pre, post = _PartsCopiedInStateDicts(sizes, pre=True), _PartsCopiedInStateDicts(sizes, pre=False)
    hooks = [h for m in module.modules() for h in (m.register_state_dict_pre_hook(pre), m.register_state_dict_post_hook(post))]
    _of_module[module] = (flat, hooks)


def flatten_parameters(model_or_params: nn.Module | Iterable[Tensor]) -> FlatParameters:
    """Re-homes the parameters of a module (all of them, once each: tied weights once) or of an
    iterable of parameters into one contiguous buffer per dtype, and their gradients into a
    matching one; returns the :class:`FlatParameters` that runs the glue ops on them in one call
    each. Flatten after moving the model to its device and dtype, and before wrapping it in DDP or
    compiling a step; flatten again after changing which parameters the model holds or converting
    it (the public functions give correct results either way; flattening again makes them fast).
    A module's FlatParameters lives as long as the module; one built from a list of parameters,
    as long as you keep it.

    Raises ValueError for an empty set, a parameter given twice, on another device than the first,
    overlapping another in memory, not a leaf, a DTensor (FSDP2), or a gradient that is sparse or a
    view of another buffer; TypeError for non-tensors and non-floating parameters."""
    if isinstance(model_or_params, nn.Module):
        module, params = model_or_params, list(model_or_params.parameters())
    elif isinstance(model_or_params, Tensor):
        module, params = None, [model_or_params]
    elif isinstance(model_or_params, Iterable):
        module, params = None, list(model_or_params)
    else:
        raise TypeError(f"model_or_params must be an nn.Module or an iterable of tensors, got {type(model_or_params).__name__}")
    flat = FlatParameters(params)
    _route.register_flat(flat)
    if module is not None:
        _keep_with(module, flat)
    return flat
