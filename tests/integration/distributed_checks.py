"""Multi-process checks run by tests/api/test_training.py and tests/integration/test_distributed.py:
`python tests/integration/distributed_checks.py WORLD NAME [NAME ...]` spawns WORLD gloo processes on
localhost, runs the named checks on every rank and prints "ok" when every rank passed.

Sharded results are compared with the same computation done unsharded on each rank (the same
seed gives every rank the full tensors): a single-process run of the same model and data."""

from __future__ import annotations

import math
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

import fused_optim

NORM_TYPES = (2.0, 1.0, 3.5, math.inf, -math.inf, 0.0)
L1, L2 = 1e-3, 1e-2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def early_stopping(rank: int, world: int) -> None:
    # Rank 1 sees a nan at epoch 2; with check_finite every rank must stop there.
    stopper = fused_optim.EarlyStopping(patience=100, check_finite=True)
    losses = [1.0, 0.9, float("nan") if rank == 1 else 0.8, 0.7]
    stops = [stopper(v) for v in losses]
    assert stops == [False, False, True, True], (rank, stops)
    assert stopper.reason == "value nan is not finite", (rank, stopper.reason)
    # Values that differ by rank: every rank decides on their mean, so all agree.
    stopper = fused_optim.EarlyStopping(patience=1)
    losses = [1.0, 0.7 + 0.2 * rank, 1.5, 1.6]  # rank 2 alone would stop at epoch 1 (1.1 > 1.0)
    stops = [stopper(v) for v in losses]
    assert stops == [False, False, True, True], (rank, stops)
    assert abs(stopper.best_loss - (0.7 + 0.1 * (world - 1))) < 1e-12, (rank, stopper.best_loss)


def ddp_accumulation(rank: int, world: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    reference = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    reference.load_state_dict(model.state_dict())
    ddp = nn.parallel.DistributedDataParallel(model)
    g = torch.Generator().manual_seed(1)
    data = torch.randn(world, 3, 4, 6, generator=g)  # rank, micro-batch, sample, feature
    acc = fused_optim.GradientAccumulator(ddp, accumulation_steps=3)
    for micro in range(3):
        with acc.accumulate():
            ends = acc.step(ddp(data[rank, micro]).square().mean())
        grad = model[0].weight.grad.clone()
        gathered = [torch.empty_like(grad) for _ in range(world)]
        dist.all_gather(gathered, grad)
        same = all(torch.allclose(gathered[0], x) for x in gathered)
        assert ends == (micro == 2) and same == ends, (rank, micro, ends, same)  # no_sync before the end
    # One large batch of all ranks' data on one process gives the same gradient.
    reference(data.reshape(-1, 6)).square().mean().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def _mlp(seed: int = 0) -> nn.Module:
    # 10 and 3 output rows: uneven shards over 4 ranks, one of them empty.
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))


def _fsdp2(model: nn.Module, world: int) -> nn.Module:
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, torch.distributed.tensor.DTensor) else t


def fsdp2(rank: int, world: int) -> None:
    """FSDP2: the penalty's value and gradient, the global gradient norm of every order, clipping,
    shard-local EMA and averages, gradient accumulation: all equal to the unsharded model's."""
    model, reference = _fsdp2(_mlp(), world), _mlp()
    data = torch.randn(world, 3, 4, 6, generator=torch.Generator().manual_seed(1))  # rank, micro, sample, feature

    # Loss + penalty over the sharded parameters; FSDP2 averages the ranks' gradients.
    acc = fused_optim.GradientAccumulator(model, accumulation_steps=3)
    for micro in range(3):
        with acc.accumulate():
            loss = model(data[rank, micro]).square().mean() + fused_optim.l1l2_penalty(model.parameters(), L1, L2) / world
            acc.step(loss)
    penalty = fused_optim.l1l2_penalty(model.parameters(), L1, L2)
    ref_params = list(reference.parameters())
    ref_penalty = sum(L1 * p.abs().sum() + L2 * p.square().sum() for p in ref_params)
    torch.testing.assert_close(penalty, ref_penalty.detach())
    for micro in range(3):  # the same micro-batches, all ranks' data at once
        loss = reference(data[:, micro].reshape(-1, 6)).square().mean() + ref_penalty / world
        (loss / 3).backward(retain_graph=True)
    grads = [p.grad for p in model.parameters()]
    for g, p in zip(grads, ref_params):
        torch.testing.assert_close(g.full_tensor(), p.grad)

    # Norms and clipping from the same gradients, for every norm order.
    saved = [g.to_local().clone() for g in grads]
    for norm_type in NORM_TYPES:
        for g, s in zip(grads, saved):
            g.to_local().copy_(s)
        theirs = _as_params(ref_params, [p.grad.clone() for p in ref_params])
        expected = torch.nn.utils.get_total_norm([t.grad for t in theirs], norm_type)
        torch.testing.assert_close(fused_optim.get_total_norm(grads, norm_type), expected)
        total = fused_optim.clip_grad_norm_(model.parameters(), 0.05, norm_type)
        torch.testing.assert_close(total, torch.nn.utils.clip_grad_norm_(theirs, 0.05, norm_type))
        for g, t in zip(grads, theirs):
            torch.testing.assert_close(g.full_tensor(), t.grad)

    # EMA and averages of the sharded weights, shard-local.
    ema = [p.detach().clone() for p in model.parameters()]
    ref_ema = [p.detach().clone() for p in ref_params]
    fused_optim.ema_update_(ema, [p.detach() + 1.0 for p in model.parameters()], 0.9)
    torch._foreach_lerp_(ref_ema, [p.detach() + 1.0 for p in ref_params], 0.1)
    averaged = fused_optim.average_tensors([ema, list(model.parameters())], [1.0, 3.0])
    for e, r, a, p in zip(ema, ref_ema, averaged, ref_params):
        torch.testing.assert_close(e.full_tensor(), r)
        assert a.placements == e.placements
        torch.testing.assert_close(a.full_tensor(), 0.25 * r + 0.75 * p.detach())


def fsdp2_attach(rank: int, world: int) -> None:
    """attach(optimizer) on an FSDP2 model (pre_step_ on DTensors: the penalty into each rank's
    gradient shards, the global norm, the clip) gives the unsharded loop's weights."""
    model, reference = _fsdp2(_mlp(), world), _mlp()
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.5), torch.optim.SGD(reference.parameters(), lr=0.5)
    handle = fused_optim.attach(opt, l1=L1, l2=L2, max_norm=0.05)
    data = torch.randn(3, world, 4, 6, generator=torch.Generator().manual_seed(2))  # step, rank, sample, feature
    for step in range(3):
        opt.zero_grad()
        model(data[step, rank]).square().mean().backward()
        opt.step()
        ref_opt.zero_grad()
        reference(data[step].reshape(-1, 6)).square().mean().backward()
        params = list(reference.parameters())
        torch._foreach_add_([p.grad for p in params], [L1 * p.sign() + 2 * L2 * p for p in params])
        total = torch.nn.utils.clip_grad_norm_(params, 0.05)
        ref_opt.step()
        torch.testing.assert_close(_full(handle.total_norm), total)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.full_tensor(), q.detach())


def fsdp2_model_ema(rank: int, world: int) -> None:
    """ModelEMA of an FSDP2 model: built before sharding (FSDP2 refuses deepcopy, with a clear
    error here), its module sharded the same way, then updated shard-local."""
    model = _mlp()
    ema = fused_optim.ModelEMA(model, decay=0.5)
    _fsdp2(model, world)
    _fsdp2(ema.module, world)
    try:
        fused_optim.ModelEMA(model)
        raise AssertionError("ModelEMA of a sharded model did not raise")
    except ValueError as e:
        assert "before fully_shard" in str(e), e
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().add_(1.0)
    ema.update(model)
    for e, r in zip(ema.module.parameters(), _mlp().parameters()):
        torch.testing.assert_close(e.full_tensor(), r.detach() + 0.5)
    x = torch.randn(4, 6)
    torch.testing.assert_close(ema(x), ema.module(x))


def tensor_parallel(rank: int, world: int) -> None:
    """DTensors of every placement on a 1-D mesh (2 ranks) or a 2x2 mesh (4 ranks, replicated
    dims included): global norms, clipping, the penalty and its gradient, EMA."""
    shape = (world,) if world == 2 else (2, world // 2)
    mesh = init_device_mesh("cpu", shape)
    if mesh.ndim == 1:
        layouts = [[Shard(0)], [Shard(1)], [Replicate()], [Shard(0)]]
    else:
        layouts = [[Shard(0), Shard(1)], [Replicate(), Shard(0)], [Shard(1), Replicate()], [Replicate(), Replicate()]]
    g = torch.Generator().manual_seed(2)
    full = [torch.randn(7, 5, generator=g, dtype=torch.float64) for _ in layouts]
    full_grads = [torch.randn(7, 5, generator=g, dtype=torch.float64) for _ in layouts]
    params = [nn.Parameter(distribute_tensor(f, mesh, pl)) for f, pl in zip(full, layouts)]
    for p, fg, pl in zip(params, full_grads, layouts):
        p.grad = distribute_tensor(fg, mesh, pl)
    for norm_type in NORM_TYPES:
        torch.testing.assert_close(
            fused_optim.get_total_norm([p.grad for p in params], norm_type),
            torch.nn.utils.get_total_norm(full_grads, norm_type),
        )
    theirs = [fg.clone() for fg in full_grads]
    total = fused_optim.clip_grad_norm_(params, 1.0)
    torch.testing.assert_close(total, torch.nn.utils.clip_grad_norm_(_as_params(full, theirs), 1.0))
    for p, t in zip(params, theirs):
        torch.testing.assert_close(p.grad.full_tensor(), t)

    for p in params:
        p.grad = None
    penalty = fused_optim.l1l2_penalty(params, L1, L2)
    torch.testing.assert_close(penalty, sum(L1 * f.abs().sum() + L2 * f.square().sum() for f in full))
    penalty.backward()
    for p, f in zip(params, full):
        torch.testing.assert_close(p.grad.full_tensor(), L1 * f.sign() + 2 * L2 * f)

    ema = [p.detach().clone() for p in params]
    fused_optim.ema_update_(ema, [p.detach() * 2 for p in params], 0.75)
    for e, f in zip(ema, full):
        torch.testing.assert_close(e.full_tensor(), torch.lerp(f, 2 * f, 0.25))


def bad_sharded_input(rank: int, world: int) -> None:
    """Sharded inputs that cannot be handled raise before anything is written."""
    mesh = init_device_mesh("cpu", (world,))
    full = torch.randn(8, 3, generator=torch.Generator().manual_seed(4))
    partial = DTensor.from_local(full.clone(), mesh, [Partial()])
    param = nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
    param.grad = partial
    try:
        fused_optim.clip_grad_norm_([param], 0.1)
        raise AssertionError("a Partial gradient was accepted")
    except ValueError as e:
        assert "Partial" in str(e) or "partial" in str(e), e
    assert torch.equal(partial.to_local(), full)
    averaged = [distribute_tensor(full, mesh, [Shard(0)])]
    before = averaged[0].to_local().clone()
    try:
        fused_optim.ema_update_(averaged, [full.clone()], 0.9)
        raise AssertionError("a DTensor was averaged with a plain tensor")
    except RuntimeError as e:
        assert "same mesh and placements" in str(e), e
    assert torch.equal(averaged[0].to_local(), before)


def _as_params(values, grads):
    params = [nn.Parameter(v.detach().clone()) for v in values]
    for p, g in zip(params, grads):
        p.grad = g
    return params


def flat_shards(rank: int, world: int) -> None:
    """ZeRO-style: each rank holds a piece of two flat vectors as plain tensors; process_group=
    reduces the norm over the ranks, and every rank clips by the global coefficient."""
    g = torch.Generator().manual_seed(3)
    flats = [torch.randn(1001, generator=g), torch.randn(37, generator=g)]
    mine = [f.tensor_split(world)[rank].clone() for f in flats]  # uneven: 1001 = 4 * 250 + 1
    for norm_type in NORM_TYPES:
        torch.testing.assert_close(
            fused_optim.get_total_norm(mine, norm_type, process_group=dist.group.WORLD),
            torch.nn.utils.get_total_norm(flats, norm_type),
        )
    params = _as_params(mine, [m.clone() for m in mine])
    theirs = _as_params(flats, [f.clone() for f in flats])
    total = fused_optim.clip_grad_norm_(params, 2.0, process_group=dist.group.WORLD)
    torch.testing.assert_close(total, torch.nn.utils.clip_grad_norm_(theirs, 2.0))
    for p, t in zip(params, theirs):
        torch.testing.assert_close(p.grad, t.grad.tensor_split(world)[rank])


def fsdp2_early_stopping(rank: int, world: int) -> None:
    """EarlyStopping on an FSDP2 model: every rank stops at the same epoch and restores the same
    best weights (its own shards of them)."""
    model = _fsdp2(_mlp(), world)
    stopper = fused_optim.EarlyStopping(patience=1, restore_best_weights=True, model=model)
    best = [p.detach().full_tensor() + 1.0 for p in model.parameters()]  # the weights at epoch 1
    losses = [1.0, 0.8 + 0.1 * rank, 1.2, 1.3]  # the mean improves at epoch 1 (rank 3's own value does not)
    stops = []
    for loss in losses:
        stops.append(stopper(loss))
        with torch.no_grad():
            for p in model.parameters():
                p.to_local().add_(1.0)
    assert stops == [False, False, True, True], (rank, stops)
    stopper.restore()
    for p, b in zip(model.parameters(), best):
        torch.testing.assert_close(p.full_tensor(), b)


def ddp_flat(rank: int, world: int) -> None:
    """DDP over a flattened model, step for step against DDP over the same model unflattened (SGD
    with momentum, the flat penalty gradient and clipping), with zero_grad(set_to_none=True) and
    False; then gradient_as_bucket_view=True: a one-time warning, and the same steps per tensor."""
    import warnings

    g = torch.Generator().manual_seed(3)
    data = torch.randn(4, world, 5, 6, generator=g)  # step, rank, sample, feature
    for set_to_none, bucket_view in ((True, False), (False, False), (False, True)):
        flat_model, plain_model = _mlp(), _mlp()
        flat = fused_optim.flatten_parameters(flat_model)
        runs = []
        for model, use_flat in ((flat_model, True), (plain_model, False)):
            ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            norms = []
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for step in range(4):
                    opt.zero_grad(set_to_none=set_to_none)
                    ddp(data[step, rank]).square().mean().backward()
                    if use_flat:
                        flat.l1l2_grad_(L1, L2)
                        norms.append(flat.clip_grad_norm_(0.5))
                    else:
                        fused_optim.l1l2_grad_(model.parameters(), L1, L2)
                        norms.append(fused_optim.clip_grad_norm_(model.parameters(), 0.5))
                    opt.step()
            flat_warnings = [w for w in caught if "view of another buffer" in str(w.message)]
            # The warning that the one-call path is lost: only where the extension gives that path.
            native = fused_optim.backend_info()["extension"]["loaded"]
            assert len(flat_warnings) == (1 if use_flat and bucket_view and native else 0), (rank, [str(w.message) for w in caught])
            runs.append((norms, [p.detach().clone() for p in model.parameters()]))
        (flat_norms, flat_params), (plain_norms, plain_params) = runs
        for a, b in zip(flat_norms, plain_norms):
            torch.testing.assert_close(a, b)
        for a, b in zip(flat_params, plain_params):
            torch.testing.assert_close(a, b)


def fsdp2_flat(rank: int, world: int) -> None:
    """FSDP2 and flat buffers do not combine: flattening a sharded model is refused; a model
    sharded after flattening holds new (DTensor) parameters, and the public functions given them
    take the sharded path: the list given is the truth, the stale FlatParameters plays no part."""
    sharded = _fsdp2(_mlp(), world)
    try:
        fused_optim.flatten_parameters(sharded)
    except ValueError as e:
        assert "DTensor" in str(e), e
    else:
        raise AssertionError("flatten_parameters accepted an FSDP2 model")
    model, plain = _mlp(), _mlp()
    fused_optim.flatten_parameters(model)
    _fsdp2(model, world)
    x = torch.randn(4, 6)
    model(x).square().sum().backward()
    plain(x).square().sum().backward()
    total = fused_optim.clip_grad_norm_(model.parameters(), 1e-3)
    assert fused_optim.last_route() == ("clip_grad_norm_", "sharded"), fused_optim.last_route()
    torch.testing.assert_close(total, torch.nn.utils.clip_grad_norm_(plain.parameters(), 1e-3))


def _run(rank: int, world: int, names: list[str], port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for name in names:
            globals()[name](rank, world)
            print(f"rank {rank}: {name} passed", file=sys.stderr, flush=True)
        # Without it, a rank that tears down gloo while another still has work in flight is
        # sometimes aborted ("terminate called without an active exception") after all passed.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Every check passed and gloo is torn down; skip the interpreter's finalization, where gloo
    # can still abort the process (a known c10d exit problem) and fail a run that passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    world = int(sys.argv[1])
    mp.spawn(_run, args=(world, sys.argv[2:], _free_port()), nprocs=world, join=True)
    print("ok")
