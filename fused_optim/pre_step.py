"""The glue of a training step in one call: the penalty's gradient and the gradient norm in one
pass (:func:`pre_step_`), and :func:`attach`, which hangs it (and an EMA update) on an
optimizer's step hooks so that any loop or trainer calling ``optimizer.step()`` runs it."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from torch import Tensor, nn

from . import _distributed, _route, checks
from ._route import ONE_VIEW
from ._utils import as_float, as_tensor_list, fill_missing_grads
from .clip_grad import clip_grad_norm_, clip_grad_value_, get_total_norm
from .checks import check_coefficient, check_norm_type, check_one_clip
from .regularization import l1l2_grad_

T = TypeVar("T")


def _options(l1, l2, max_norm, norm_type, clip_value) -> tuple[float, float, float | None, float, float | None]:
    """The glue's arguments as floats (names in the errors); at most one way of clipping."""
    l1, l2, norm_type = as_float(l1, "l1"), as_float(l2, "l2"), as_float(norm_type, "norm_type", like_torch=True)
    max_norm = None if max_norm is None else as_float(max_norm, "max_norm", like_torch=True)
    clip_value = None if clip_value is None else as_float(clip_value, "clip_value", like_torch=True)
    check_norm_type(norm_type)
    check_one_clip(max_norm, clip_value)
    return l1, l2, max_norm, norm_type, clip_value


def _check_before_writing(
    penalized: list[Tensor], grads: list[Tensor], max_norm: float | None, norm_type: float, clip_value: float | None
) -> None:
    """Raises what the separate calls would raise, writing nothing: l1l2_grad_'s checks of the
    `penalized` parameters and their gradients, and the norm's and the clip's of `grads` (every
    gradient there will be). A penalized parameter without a gradient gets a fresh zeros_like one,
    of which only its size (a norm without identity) and dtype (the clamp's bound) can be refused."""
    check = checks.check_pre_step_args
    created = [p for p in penalized if p.grad is None]
    penalized = [p for p in penalized if p.grad is not None]
    pairs = [penalized, [p.grad for p in penalized]]
    if _distributed.any_dtensor(grads) or _distributed.any_dtensor(penalized):
        pairs, grads = _distributed.local_lists(*pairs), _distributed.local_lists(grads)[0]
        # An empty local shard has no max or min, the whole tensor may: the sharded norm decides.
        norm_type = 2.0
    check(*pairs, 0.0, 0.0, None, 2.0, None)  # l1l2_grad_'s checks; the norm's and the clip's below
    checks.check_norm_defined(created, norm_type)
    if clip_value is not None:
        checks.check_clip_value(created, clip_value)
    if max_norm is not None or clip_value is not None:  # written: the op's checks of the gradients alone
        check(grads, grads, 0.0, 0.0, max_norm, norm_type, clip_value)
    else:
        checks.check_norm_defined(grads, norm_type)


def _in_separate_calls(
    penalties: list[tuple[list[Tensor], float, float]],
    params: list[Tensor],
    max_norm: float | None,
    norm_type: float,
    clip_value: float | None,
    error_if_nonfinite: bool,
) -> Tensor:
    """pre_step_ as its sequence of public calls, each with its DTensor path: l1l2_grad_(ps, l1, l2)
    for each (ps, l1, l2) of `penalties` with a coefficient, then clip_grad_norm_ over `params`
    (or their gradients' norm, then clip_grad_value_). For what one op call cannot take: a
    parameter with a gradient that does not require grad, DTensors, param groups with their own
    coefficients. Everything the calls could refuse is checked first, and with error_if_nonfinite
    the gradients are restored when the norm is refused: a refused call writes nothing."""
    penalties = [(ps, a, b) for ps, a, b in penalties if a != 0.0 or b != 0.0]
    penalized = [p for ps, _, _ in penalties for p in ps if p.requires_grad]
    _check_before_writing(penalized, [p.grad for p in params if p.grad is not None], max_norm, norm_type, clip_value)

    def in_order() -> Tensor:
        for ps, a, b in penalties:
            l1l2_grad_(ps, a, b)
        if max_norm is not None:
            return clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite)
        total = get_total_norm([p.grad for p in params if p.grad is not None], norm_type, error_if_nonfinite)
        if clip_value is not None:
            clip_grad_value_(params, clip_value)
        return total

    return _grads_restored_on_error(params, in_order) if penalties and error_if_nonfinite else in_order()


def _grads_restored_on_error(params: list[Tensor], run: Callable[[], T]) -> T:
    """run(), which writes the parameters' gradients (creating missing ones); if it raises, every
    gradient is put back as it was (its values, or None), so that a refused call wrote nothing.
    For the separate calls with error_if_nonfinite, which add the penalty before the norm."""
    before = [(p, p.grad, None if p.grad is None else p.grad.clone()) for p in params]
    try:
        return run()
    except BaseException:
        for p, grad, values in before:
            if grad is not None:
                grad.copy_(values)
            p.grad = grad
        raise


@torch.no_grad()
def pre_step_(
    parameters: Tensor | Iterable[Tensor],
    l1: float = 0.0,
    l2: float = 0.0,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    clip_value: float | None = None,
    error_if_nonfinite: bool = False,
) -> Tensor:
    """The glue before ``optimizer.step()`` in one call; the same as, in order,

    1. ``l1l2_grad_(parameters, l1, l2)`` (skipped when both are 0): the penalty's gradient added
       into ``p.grad`` of each parameter that requires grad, creating missing gradients,
    2. the total norm of order ``norm_type`` of the resulting gradients (returned, 0-dim, as
       :func:`get_total_norm` returns it),
    3. with ``max_norm``, ``clip_grad_norm_``'s scaling by ``min(1, max_norm / (norm + 1e-6))``
       (no write when that is 1, no host synchronization on CUDA); with ``clip_value``,
       ``clip_grad_value_``'s clamp; with neither, no clipping.

    Steps 1 and 2 are one pass over the gradients: 3 passes' worth of memory traffic when no
    clipping is needed instead of the separate calls' 4. The gradients equal the separate calls'
    bit for bit, and the norm equals theirs on the native CPU and CUDA kernels.

    ``error_if_nonfinite=True``: a nan or inf norm raises RuntimeError (torch's message) and
    nothing is written: no penalty added, no gradient created (the separate calls would have added
    the penalty first). Bad arguments raise TypeError/ValueError/RuntimeError naming them, before
    anything is written.

    A flattened model's ``model.parameters()`` (see :func:`flatten_parameters`) runs as one call
    on its buffers. DTensors (FSDP2, tensor parallel) and a parameter that has a gradient but does
    not require grad (it gets no penalty) take the separate calls, each with its sharded path; their
    arguments are all checked before the first writes (with ``error_if_nonfinite``, the gradients
    are snapshotted and restored on the error). A parameter listed twice gets the penalty twice (a
    missing gradient is created once and shared), as the separate calls give it.
    """
    l1, l2, max_norm, norm_type, clip_value = _options(l1, l2, max_norm, norm_type, clip_value)
    params = as_tensor_list(parameters, "parameters")
    penalized = l1 != 0.0 or l2 != 0.0
    op = torch.ops.fused_optim.pre_step_.default
    args = (l1, l2, max_norm, norm_type, clip_value, bool(error_if_nonfinite))
    if (flat := _route.flat_for("pre_step_", params, norm_type=norm_type, penalty=penalized)) is not None:
        total = op(flat.data_buffers(penalty=penalized), flat.grad_buffers(penalty=penalized), *args)
        flat.gradients_written(penalty=penalized)
        return total

    # What each step sees: the penalty goes to parameters that require grad (a missing gradient is
    # created), the norm and the clip to every gradient; the op pairs them, so a frozen parameter
    # with a gradient (rare) takes the separate calls. One loop: for 2000 parameters each pass over
    # them costs ~0.1 ms.
    held, grads, frozen_with_grad = [], [], False
    for p in params:
        g = p.grad
        if penalized and not p.requires_grad:
            frozen_with_grad = frozen_with_grad or g is not None
        elif g is not None or penalized:
            held.append(p)
            grads.append(g)
    if frozen_with_grad:
        total = _in_separate_calls([(params, l1, l2)], params, max_norm, norm_type, clip_value, error_if_nonfinite)
        _route.record("pre_step_", _route.PER_TENSOR)
        return total
    # Order 0 counts the tensors with a non-zero element: not a norm of their concatenation.
    route = _route.choose(
        "pre_step_", (held, grads), (False, True), one_view_ok=norm_type != 0 and all(g is not None for g in grads)
    )
    if route.kind == ONE_VIEW:
        total = op([route.views[0]], [route.views[1]], *args)
        _route.bump_versions(grads)
        return total
    if route.kind == _route.SHARDED:
        total = _in_separate_calls([(params, l1, l2)], params, max_norm, norm_type, clip_value, error_if_nonfinite)
        _route.record("pre_step_", _route.SHARDED)
        return total
    missing = fill_missing_grads(held, grads)
    total = op(held, grads, *args)
    for i in missing:  # attached only once the op has succeeded
        held[i].grad = grads[i]
    return total


def _real_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer behind a trainer's wrapper (accelerate's AcceleratedOptimizer,
    Lightning's LightningOptimizer: anything holding it as ``.optimizer``; their ``step`` calls
    its ``step``, where the hooks run), or `optimizer` itself."""
    real = optimizer
    while isinstance(getattr(real, "optimizer", None), torch.optim.Optimizer) and real.optimizer is not real:
        real = real.optimizer
    if not isinstance(real, torch.optim.Optimizer):
        raise TypeError(
            "optimizer must be a torch.optim.Optimizer, or a wrapper holding one as .optimizer "
            f"(accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer), got {type(optimizer).__name__}"
        )
    return real


class AttachHandle:
    """What :func:`attach` returns: ``total_norm`` is the last step's total gradient norm (from
    before clipping; a 0-dim tensor on the gradients' device, read without a host
    synchronization; None before the first step), ``steps`` the number of optimizer steps the glue
    ran on (a step GradScaler skipped is not one), ``remove()`` detaches the hooks."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.total_norm: Tensor | None = None
        self.steps = 0
        self._optimizer = weakref.ref(optimizer)
        self._hooks: list = []

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        optimizer = self._optimizer()
        if optimizer is not None and _attached.get(optimizer) is self:
            del _attached[optimizer]

    def __enter__(self) -> AttachHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "attached" if self._hooks else "removed"
        return f"AttachHandle({state}, steps={self.steps})"


_attached: weakref.WeakKeyDictionary[torch.optim.Optimizer, AttachHandle] = weakref.WeakKeyDictionary()


def attach(
    optimizer: torch.optim.Optimizer,
    *,
    l1: float = 0.0,
    l2: float = 0.0,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    clip_value: float | None = None,
    error_if_nonfinite: bool = False,
    ema: nn.Module | None = None,
    model: nn.Module | None = None,
) -> AttachHandle:
    """Runs the whole glue of a training step inside ``optimizer.step()``, so that a loop or a
    trainer needs no other change:

    - before each step (a step pre-hook): :func:`pre_step_` over every parameter of every param
      group: the penalty's gradient (``l1``, ``l2``), then clipping by the total norm
      (``max_norm``, ``norm_type``) or by value (``clip_value``), in one call. A param group's own
      ``"l1"``/``"l2"`` entries (so named: an optimizer whose own hyperparameters bear these names
      would have them read as the penalty's) override them for its parameters; groups that differ
      take two passes: each group's ``l1l2_grad_``, then one clip of all;
    - after each step (a post-hook): ``ema.update(model)`` for a :class:`ModelEMA`, or
      ``ema.update_parameters(model)`` for torch's ``AveragedModel`` (``model`` is then required:
      the model the optimizer trains).

    When ``step`` gets a closure (LBFGS, PyTorch Lightning's automatic optimization, which runs
    the forward and backward inside it), the closure is wrapped so that the glue runs on the
    gradients it produces (the loss it returns is the closure's, without the penalty: a line
    search such as LBFGS's strong Wolfe sees gradients of a loss it is not given). With ``torch.amp.GradScaler``, ``scaler.step(optimizer)`` unscales the
    gradients before calling ``step`` (clipping sees unscaled gradients), and a step it skips for
    inf/nan gradients runs no hook: no penalty, no clip, no EMA update. (Optimizers that unscale
    inside their step, such as ``Adam(fused=True)``, get still-scaled gradients from
    ``scaler.step``: call ``scaler.unscale_(optimizer)`` first, else the hook raises RuntimeError;
    the glue then reads the scaler's skip decision, one host synchronization.) With
    :class:`GradientAccumulator` the glue runs once per optimizer step, on the accumulated
    gradients. When the optimizer's parameters are exactly a flattened model's (see
    :func:`flatten_parameters`; before or after ``attach``), the glue is one call on its buffers.

    ``l1``/``l2`` are a coupled penalty, ``grad += l1 * sign(p) + 2 * l2 * p``: not AdamW's decoupled
    decay, and twice SGD's ``weight_decay=l2`` (``l2=wd / 2`` matches SGD's ``weight_decay=wd``).

    ``optimizer`` may be a trainer's wrapper holding the torch optimizer as ``.optimizer``
    (accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``): the hooks go on
    the optimizer inside, whose ``step`` the wrapper calls.

    Returns an :class:`AttachHandle` (``.total_norm``, ``.steps``, ``.remove()``). Attaching twice
    to one optimizer raises RuntimeError (the penalty would be added twice): remove the first.
    """
    optimizer = _real_optimizer(optimizer)
    if optimizer in _attached:
        raise RuntimeError("attach: this optimizer already has the glue attached; call .remove() on its handle first")
    l1, l2, max_norm, norm_type, clip_value = _options(l1, l2, max_norm, norm_type, clip_value)
    check_coefficient(l1, "l1")
    check_coefficient(l2, "l2")
    if ema is not None:
        if model is None:
            raise ValueError("attach: ema needs model, the model the optimizer trains")
        if not (hasattr(ema, "update") or hasattr(ema, "update_parameters")):
            raise TypeError(f"ema must be a ModelEMA or an AveragedModel, got {type(ema).__name__}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    handle = AttachHandle(optimizer)
    model_ref = weakref.ref(model) if model is not None else None
    skipped = [False]
    def glue() -> None:
        if getattr(optimizer, "grad_scale", None) is not None:
            raise RuntimeError(
                "attach: GradScaler is stepping this optimizer on still-scaled gradients (an optimizer "
                "that unscales inside its step, such as fused=True); call scaler.unscale_(optimizer) "
                "before scaler.step(optimizer) so that the penalty and the clip see unscaled gradients"
            )
        found_inf = getattr(optimizer, "found_inf", None)  # such an optimizer's on-device skip
        skipped[0] = found_inf is not None and bool(found_inf.item())
        if skipped[0]:
            return
        groups = optimizer.param_groups
        params = [p for g in groups for p in g["params"]]
        coefficients = [group_coefficients(i, g) for i, g in enumerate(groups)]  # all checked before any write
        clip = dict(max_norm=max_norm, norm_type=norm_type, clip_value=clip_value, error_if_nonfinite=error_if_nonfinite)
        if len(set(coefficients)) == 1:
            a, b = coefficients[0]
            handle.total_norm = pre_step_(params, a, b, **clip)
            return
        # Groups with their own coefficients: each group's penalty (groups without one create no
        # gradients), then one clip of all: two passes, every argument checked before the first.
        penalties = [(g["params"], a, b) for g, (a, b) in zip(groups, coefficients)]
        handle.total_norm = _in_separate_calls(penalties, params, **clip)

    def refusals_leave_no_scaler_state() -> None:
        try:
            glue()
        except BaseException:
            # GradScaler deletes these after step returns, not when it raises: left behind, they
            # would make every later step, with or without the scaler, read a stale skip decision
            # (or be refused as still scaled).
            for name in ("grad_scale", "found_inf"):
                optimizer.__dict__.pop(name, None)
            raise

    def group_coefficients(i: int, group: dict) -> tuple[float, float]:
        """A param group's own "l1"/"l2" (checked, named in the errors), or attach's."""
        if "l1" not in group and "l2" not in group:
            return l1, l2
        values = []
        for name, default in (("l1", l1), ("l2", l2)):
            value = as_float(group.get(name, default), f'param_groups[{i}]["{name}"]')
            check_coefficient(value, f'param_groups[{i}]["{name}"]')
            values.append(value)
        return values[0], values[1]

    def wrapped(closure):
        def closure_with_glue():
            loss = closure()  # the optimizer calls it under enable_grad
            refusals_leave_no_scaler_state()
            return loss

        return closure_with_glue

    def pre_hook(opt, args, kwargs):
        # args: (optimizer, *step's positional arguments), as torch's step wrapper passes them.
        if len(args) > 1 and callable(args[1]):
            return (args[0], wrapped(args[1]), *args[2:]), kwargs
        if kwargs.get("closure") is not None:
            return args, {**kwargs, "closure": wrapped(kwargs["closure"])}
        refusals_leave_no_scaler_state()
        return None

    def post_hook(opt, args, kwargs):
        if skipped[0]:
            return
        handle.steps += 1  # here, not in the glue, which a closure may run several times a step
        if ema is None:
            return
        source = model_ref()
        if source is None:
            raise RuntimeError("attach: the model given for the EMA no longer exists")
        (ema.update if hasattr(ema, "update") else ema.update_parameters)(source)

    handle._hooks = [optimizer.register_step_pre_hook(pre_hook), optimizer.register_step_post_hook(post_hook)]
    _attached[optimizer] = handle
    return handle
