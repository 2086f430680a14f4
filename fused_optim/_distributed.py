"""Sharded tensors: DTensors (FSDP2's fully_shard, tensor parallel) and plain shards with a
process group (ZeRO-style flat shards). The fused kernels run on each rank's local shards; partial
results are combined by all-reduces over the mesh dimensions a tensor is sharded along (a
replicated dimension holds copies: it is not summed)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate
except ImportError:  # torch built without distributed support
    DTensor = None


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def any_dtensor(tensors) -> bool:
    # A DTensor lives on a device mesh, which needs an initialized process group: without one the
    # ~30 us type scan of 2000 tensors is skipped (it looks at the distinct types, not every one).
    if DTensor is None or not dist.is_initialized():
        return False
    return any(issubclass(cls, DTensor) for cls in set(map(type, tensors)))


def _sharded_dims(t: Tensor) -> tuple[int, ...]:
    """The mesh dims along which t's local shards hold different parts of it."""
    if any(p.is_partial() for p in t.placements):
        raise ValueError(
            f"a DTensor with placements {t.placements} holds unreduced partial values; "
            "redistribute it to Shard or Replicate placements first"
        )
    return tuple(i for i, p in enumerate(t.placements) if p.is_shard())


def shard_groups(tensors: Sequence[Tensor], process_group=None) -> list[tuple[list, list[Tensor], list[Tensor]]]:
    """The tensors grouped by how their partial results combine: a list of (process groups to
    all-reduce over, the tensors, their local shards). DTensors group by (mesh, sharded dims);
    plain tensors reduce over ``process_group``, or not at all when it is None. ``to_local()``
    keeps autograd's graph."""
    groups: dict[tuple, tuple[list, list[Tensor], list[Tensor]]] = {}
    for t in tensors:
        if is_dtensor(t):
            dims = _sharded_dims(t)
            key = (t.device_mesh, dims)
            if key not in groups:
                groups[key] = ([t.device_mesh.get_group(d) for d in dims], [], [])
            local = t.to_local()
        else:
            key = None
            if key not in groups:
                groups[key] = ([process_group] if process_group is not None else [], [], [])
            local = t
        groups[key][1].append(t)
        groups[key][2].append(local)
    return list(groups.values())


def sharded_norm(tensors: list[Tensor], norm_type: float, process_group) -> Tensor:
    """get_total_norm's value over sharded tensors. Per group of shards, one accumulator: the sum
    of |x|**p over the local elements (the local norm to the power p), their max for inf, min for
    -inf; for p = 0 (torch counts the tensors holding a non-zero), each tensor's count of non-zeros.
    Accumulators are all-reduced (sum, max or min) in fp64 over the group's process groups."""
    op = dist.ReduceOp.MAX if norm_type == math.inf else dist.ReduceOp.MIN if norm_type == -math.inf else dist.ReduceOp.SUM
    device = tensors[0].device if tensors else None
    accumulated = []
    for process_groups, _, local in shard_groups(tensors, process_group):
        nonempty = [t for t in local if t.numel()]
        if norm_type == 0.0:
            _, acc = torch.ops.fused_optim.multi_tensor_norm.default(local, 0.0, True)
            acc = acc.double()
        elif not nonempty:  # the reduction's identity (norms are >= 0)
            identity = math.inf if op == dist.ReduceOp.MIN else 0.0
            acc = torch.full((1,), identity, dtype=torch.float64, device=device)
        else:
            local_norm, _ = torch.ops.fused_optim.multi_tensor_norm.default(nonempty, norm_type, False)
            acc = local_norm.double().reshape(1)
            if op == dist.ReduceOp.SUM:
                acc = acc.pow(norm_type)
        for group in process_groups:
            dist.all_reduce(acc, op=op, group=group)
        accumulated.append(acc)
    if not accumulated:
        return torch.zeros((), dtype=torch.float64)
    acc = torch.cat(accumulated)
    if norm_type == 0.0:
        return (acc != 0).sum().double()
    if op == dist.ReduceOp.MAX:
        return acc.max()
    if op == dist.ReduceOp.MIN:
        return acc.min()
    return acc.sum().pow(1.0 / norm_type)


def sharded_penalty(tensors: list[Tensor], l1: float, l2: float) -> Tensor:
    """l1l2_penalty over sharded tensors: the fused penalty of each group's local shards, summed
    over the group's sharded mesh dims by DTensor (Partial -> Replicate), which is differentiable:
    each shard receives the gradient of its own elements."""
    total = None
    for _, group, local in shard_groups(tensors):
        part = torch.ops.fused_optim.l1l2_penalty.default(local, l1, l2)
        if is_dtensor(group[0]):
            mesh, placements = group[0].device_mesh, group[0].placements
            pending = [Partial() if p.is_shard() else Replicate() for p in placements]
            part = DTensor.from_local(part, mesh, pending, run_check=False).full_tensor()
        total = part if total is None else total + part
    return total


def local_lists(*lists: Sequence[Tensor]) -> list[list[Tensor]]:
    """The local shards of position-aligned lists, for ops that work element by element (averages,
    EMA): sharded weights are updated shard-local, with no gather. A DTensor must meet DTensors of
    the same mesh and placements at its position in every list."""
    lists = [list(ts) for ts in lists]
    if not any(any_dtensor(ts) for ts in lists):
        return lists
    for ts in lists[1:]:
        for i, (a, b) in enumerate(zip(lists[0], ts)):
            same = is_dtensor(a) == is_dtensor(b) and (
                not is_dtensor(a) or (a.device_mesh == b.device_mesh and a.placements == b.placements)
            )
            if not same:
                raise RuntimeError(
                    f"tensor {i}: a DTensor is combined only with DTensors of the same mesh and placements, got "
                    f"{getattr(a, 'placements', 'a plain tensor')} and {getattr(b, 'placements', 'a plain tensor')}"
                )
    return [[t.to_local() if is_dtensor(t) else t for t in ts] for ts in lists]


def like(local: Tensor, model: Tensor) -> Tensor:
    """`local` as a shard of a tensor laid out as `model` (a DTensor), or itself."""
    if not is_dtensor(model):
        return local
    return DTensor.from_local(
        local, model.device_mesh, model.placements, run_check=False, shape=model.shape, stride=model.stride()
    )
