"""L1+L2 weight penalty in one pass over all parameters: value, gradient, and the seed's
L1L2Regularizer."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from . import _distributed, _route
from ._route import ONE_VIEW, SHARDED
from ._utils import as_float, as_tensor_list, fill_missing_grads


def l1l2_penalty(tensors: Tensor | Iterable[Tensor], l1: float = 0.0, l2: float = 0.0) -> Tensor:
    """``l1 * sum|p| + l2 * sum p**2`` over every element of every tensor, reading each element once.

    Args:
        tensors: a tensor or an iterable of tensors (e.g. ``model.parameters()``), fp32, fp64,
            fp16 or bf16, mixed dtypes and any layout allowed, all on one device. Every tensor
            given is summed (filter by ``requires_grad`` yourself, or use :class:`L1L2Regularizer`).
        l1, l2: finite coefficients >= 0.

    Returns:
        A 0-dim tensor on the tensors' device. Its dtype is the promoted math type of the inputs:
        fp32 for fp16/bf16 (which are accumulated in fp32), fp64 if any input is fp64, else fp32.
        An empty input gives ``tensor(0.)``. Differentiable: the gradient of each tensor is
        ``grad * (l1 * sign(p) + 2 * l2 * p)``, computed by one fused kernel.

    Raises:
        TypeError: ``tensors`` is not a tensor or iterable of tensors; a tensor is not real
            floating; ``l1``/``l2`` is not a real number.
        ValueError: ``l1`` or ``l2`` is negative or not finite.
        RuntimeError: the tensors are on different devices.

    DTensors (FSDP2, tensor parallel): the penalty of the whole (unsharded) tensors, the same on
    every rank, from the local shards; gradients reach each rank's shards. Every rank must call it.
    """
    tensors = as_tensor_list(tensors, "tensors")
    l1, l2 = as_float(l1, "l1"), as_float(l2, "l2")
    penalty = torch.ops.fused_optim.l1l2_penalty.default
    # The buffers and one view of the tensors have no autograd history: taken when no gradient is wanted.
    graph = torch.is_grad_enabled()
    if not graph and (flat := _route.flat_for("l1l2_penalty", tensors, gradients=False)) is not None:
        return penalty(flat.data, l1, l2)
    route = _route.choose("l1l2_penalty", (tensors,), (False,), one_view_ok=not graph)
    if route.kind == ONE_VIEW:
        return penalty(list(route.views), l1, l2)
    if route.kind == SHARDED:
        return _distributed.sharded_penalty(tensors, l1, l2)
    return penalty(tensors, l1, l2)


@torch.no_grad()
def l1l2_grad_(params: Tensor | Iterable[Tensor], l1: float = 0.0, l2: float = 0.0) -> None:
    """Adds the penalty's gradient ``l1 * sign(p) + 2 * l2 * p`` into ``p.grad`` for every ``p`` in
    ``params`` that requires grad, in one pass and without building an autograd graph.

    The cheap form of ``(task_loss + l1l2_penalty(params, l1, l2)).backward()`` for training loops:
    call it after ``loss.backward()`` and before ``optimizer.step()``. A parameter whose ``.grad``
    is None gets one (zeros like the parameter, then the penalty's gradient), as an optimizer
    expects; parameters with ``requires_grad=False`` are skipped. Gradients are rounded once to
    their dtype (the math is fp32 for fp16/bf16).

    Raises:
        TypeError, ValueError, RuntimeError: as :func:`l1l2_penalty`, and RuntimeError when a
            ``.grad`` differs from its parameter in shape, dtype or device. Nothing is written
            (no ``.grad`` is created or changed) when an error is raised.

    DTensors (FSDP2, tensor parallel): each rank adds into its own shards of the gradients, which
    must have their parameters' mesh and placements.
    """
    given = as_tensor_list(params, "params")
    l1, l2, add = as_float(l1, "l1"), as_float(l2, "l2"), torch.ops.fused_optim.l1l2_grad_.default
    if (flat := _route.flat_for("l1l2_grad_", given, penalty=True)) is not None:
        add(flat.data_buffers(penalty=True), flat.grad_buffers(penalty=True), l1, l2)
        flat.gradients_written(penalty=True)
        return
    params = [p for p in given if p.requires_grad]
    grads = [p.grad for p in params]
    route = _route.choose("l1l2_grad_", (params, grads), (False, True), one_view_ok=all(g is not None for g in grads))
    if route.kind == ONE_VIEW:
        add([route.views[0]], [route.views[1]], l1, l2)
        _route.bump_versions(grads)
        return
    missing = fill_missing_grads(params, grads)
    # DTensors: element by element, so each rank adds into its gradients' shards.
    add(*(_distributed.local_lists(params, grads) if route.kind == SHARDED else (params, grads)), l1, l2)
    for i in missing:  # attached only once the op has succeeded
        params[i].grad = grads[i]


class L1L2Regularizer:
    """The seed's regularizer: ``regularizer(model)`` returns
    ``l1_lambda * sum|p| + l2_lambda * sum p**2`` over the model's parameters that require grad,
    as a differentiable 0-dim tensor computed by :func:`l1l2_penalty` in one pass.

    Unlike the seed, which returns the int 0 when no parameter requires grad, this returns
    ``tensor(0.)``, so ``task_loss + reg_loss`` works the same either way.
    """

    def __init__(self, l1_lambda: float = 0.0, l2_lambda: float = 0.0) -> None:
        for value, name in ((l1_lambda, "l1_lambda"), (l2_lambda, "l2_lambda")):
            if not math.isfinite(as_float(value, name)) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        self.l1_lambda = l1_lambda
        self.l2_lambda = l2_lambda

    def __call__(self, model: nn.Module) -> Tensor:
        params = [p for p in model.parameters() if p.requires_grad]
        return l1l2_penalty(params, self.l1_lambda, self.l2_lambda)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(l1_lambda={self.l1_lambda}, l2_lambda={self.l2_lambda})"
