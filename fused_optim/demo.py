"""python -m fused_optim.demo: trains a small MLP on a synthetic classification task with every
feature of the package (fused Dropout, gradient accumulation, and the L1+L2 penalty, norm clipping
and EMA weights run by fused_optim.attach inside the optimizer's step, early stopping with
best-weight restoration), then a 3-model ensemble and a uniform soup;
and the same training on the plain-PyTorch path with the same seeds, to compare epoch times.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import fused_optim


def make_data(n: int, dim: int, classes: int, seed: int, device: str):
    """Gaussian blobs: `classes` centers in `dim` dimensions, overlapping under unit noise."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 0.25
    labels = torch.randint(0, classes, (n,), generator=g)
    x = centers[labels] + torch.randn(n, dim, generator=g)
    return x.to(device), labels.to(device)


def make_model(dim: int, classes: int, fused: bool) -> nn.Module:
    dropout = fused_optim.Dropout(0.2) if fused else nn.Dropout(0.2)
    return nn.Sequential(nn.Linear(dim, 256), nn.ReLU(), dropout, nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, classes))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    mode = model.training
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    model.train(mode)
    return acc


def seed_penalty(model: nn.Module, l1: float, l2: float):
    reg = 0
    for p in model.parameters():
        if p.requires_grad:
            reg += l1 * torch.sum(torch.abs(p)) + l2 * torch.sum(p**2)
    return reg


def train(model, train_data, val_data, args, fused: bool, seed: int, progress):
    """Trains `model`; returns (EMA model, seconds per epoch). The fused and plain paths do the
    same arithmetic with the package's ops or with plain PyTorch."""
    torch.manual_seed(seed)
    x, y = train_data
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    steps = args.accumulation
    micro = args.batch // steps
    batches_per_epoch = x.shape[0] // args.batch
    accumulator = fused_optim.GradientAccumulator(model, steps)
    stopper = fused_optim.EarlyStopping(patience=3, mode="max", restore_best_weights=True, model=model)
    ema = fused_optim.ModelEMA(model, decay=0.98) if fused else copy.deepcopy(model)
    if fused:  # the glue in the optimizer's step: penalty gradient + clip before it, the EMA after
        fused_optim.attach(opt, l1=1e-6, l2=1e-5, max_norm=1.0, ema=ema, model=model)
    epoch_times = []
    for _ in range(args.epochs):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(x.shape[0], device=x.device)
        for b in range(batches_per_epoch):
            idx = order[b * args.batch : (b + 1) * args.batch]
            for m in range(steps):
                xi, yi = x[idx[m * micro : (m + 1) * micro]], y[idx[m * micro : (m + 1) * micro]]
                if fused:  # the window is the whole batch: the optimizer steps after it
                    accumulator.step(F.cross_entropy(model(xi), yi))
                else:
                    (F.cross_entropy(model(xi), yi) + seed_penalty(model, 1e-6, 1e-5)).div(steps).backward()
            if not fused:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            if not fused:
                with torch.no_grad():
                    for e, p in zip(ema.parameters(), model.parameters()):
                        e.mul_(0.98).add_(p, alpha=0.02)
        epoch_times.append(time.perf_counter() - start)
        progress.update(1)
        progress.set_postfix(path="fused" if fused else "plain", val_acc=f"{accuracy(model, *val_data):.3f}")
        if stopper(accuracy(model, *val_data)):
            break
    return (ema.module if fused else ema), sum(epoch_times) / len(epoch_times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m fused_optim.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args(argv)
    classes = 5
    x, y = make_data(args.samples + 4096, args.dim, classes, 0, args.device)
    train_data = x[: args.samples], y[: args.samples]
    val_data = x[args.samples : args.samples + 2048], y[args.samples : args.samples + 2048]
    test_data = x[args.samples + 2048 :], y[args.samples + 2048 :]

    torch.manual_seed(0)
    init = make_model(args.dim, classes, fused=True).to(args.device)
    models, emas, times = [], [], {"fused": [], "plain": []}
    with tqdm(total=4 * args.epochs, desc="training", unit="epoch") as progress:
        for seed in range(3):  # three fine-tunes of one start: what soups and ensembles combine
            model = copy.deepcopy(init)
            ema, seconds = train(model, train_data, val_data, args, fused=True, seed=seed, progress=progress)
            models.append(model)
            emas.append(ema)
            times["fused"].append(seconds)
        plain = make_model(args.dim, classes, fused=False).to(args.device)
        plain.load_state_dict(init.state_dict())
        _, seconds = train(plain, train_data, val_data, args, fused=False, seed=0, progress=progress)
        times["plain"].append(seconds)

    soup = fused_optim.uniform_soup(models)
    ensemble = fused_optim.ModelEnsemble(models, reduce="softmax_mean")
    with torch.no_grad():
        ensemble_acc = (ensemble.predict(test_data[0]).argmax(-1) == test_data[1]).float().mean().item()
    results = {
        "single model": accuracy(models[0], *test_data),
        "EMA weights": accuracy(emas[0], *test_data),
        "uniform soup (3)": accuracy(soup, *test_data),
        "ensemble (3)": ensemble_acc,
    }
    fused_s, plain_s = times["fused"][0], times["plain"][0]
    print()
    print("| model | test accuracy |")
    print("|---|---|")
    for name, acc in results.items():
        print(f"| {name} | {acc:.4f} |")
    print()
    print("| path | time per epoch | speedup |")
    print("|---|---|---|")
    print(f"| plain PyTorch | {plain_s * 1e3:.1f} ms | 1.00x |")
    print(f"| fused_optim | {fused_s * 1e3:.1f} ms | {plain_s / fused_s:.2f}x |")
    return {"accuracy": results, "seconds_per_epoch": {"fused": fused_s, "plain": plain_s}}


if __name__ == "__main__":
    main()
