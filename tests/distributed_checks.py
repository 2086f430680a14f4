"""Multi-process checks run by tests/test_training.py: `python tests/distributed_checks.py NAME`
spawns 2 gloo processes on localhost and exits 0 when every rank passed."""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fused_optim


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
    assert stopper.reason == ("value nan is not finite" if rank == 1 else "another rank decided to stop")


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


def _run(rank: int, world: int, name: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        globals()[name](rank, world)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(_run, args=(2, sys.argv[1], _free_port()), nprocs=2, join=True)
    print("ok")
