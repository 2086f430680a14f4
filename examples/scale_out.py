"""Sharded training with fused_optim: FSDP2 (fully_shard) or DDP, with the L1+L2 penalty, Dropout,
global-norm clipping, a shard-local EMA, gradient accumulation and early stopping.

    torchrun --nproc-per-node 2 examples/scale_out.py               # CPU, gloo
    torchrun --nproc-per-node 8 examples/scale_out.py --cuda        # one GPU per process, NCCL
    torchrun --nproc-per-node 2 examples/scale_out.py --ddp         # DDP instead of FSDP2
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import fused_optim


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--ddp", action="store_true")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if args.cuda else torch.device("cpu")
    if args.cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if args.cuda else "gloo")
    train(args, device)
    # The model, optimizer and their pending communication are gone (train returned) before the
    # process group is torn down: gloo can abort at exit when they outlive it.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def train(args: argparse.Namespace, device: torch.device) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), fused_optim.Dropout(0.1), nn.Linear(256, 10)).to(device)
    if args.ddp:
        model = nn.parallel.DistributedDataParallel(model)
    else:
        mesh = init_device_mesh(device.type, (world,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # EMA of the (sharded) parameters: updated shard by shard, no gather.
    ema = [p.detach().clone() for p in model.parameters()]
    accumulator = fused_optim.GradientAccumulator(model, accumulation_steps=2)
    stopper = fused_optim.EarlyStopping(patience=2)
    teacher = torch.Generator().manual_seed(1)
    w_true = torch.randn(32, 10, generator=teacher).to(device)
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own batches

    for epoch in range(args.epochs):
        model.train()
        for _ in range(20):
            x = torch.randn(64, 32, generator=data).to(device)
            with accumulator.accumulate():  # no gradient communication until the window ends
                loss = nn.functional.mse_loss(model(x), x @ w_true)
                loss = loss + fused_optim.l1l2_penalty(model.parameters(), 1e-6, 1e-5)
                if accumulator.step(loss):
                    norm = fused_optim.clip_grad_norm_(model.parameters(), 1.0)  # the global norm
                    opt.step()
                    opt.zero_grad()
                    fused_optim.ema_update_(ema, [p.detach() for p in model.parameters()], 0.99)
        model.eval()
        with torch.no_grad():
            x = torch.randn(256, 32, generator=data).to(device)
            val = nn.functional.mse_loss(model(x), x @ w_true).item()
        stop = stopper(val)  # every rank decides on the mean over ranks
        if rank == 0:
            print(f"epoch {epoch}: val loss {val:.4f} (rank 0), grad norm {float(norm):.3f}, stop={stop}")
        if stop:
            break


if __name__ == "__main__":
    main()
