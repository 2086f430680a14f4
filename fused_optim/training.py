"""Training helpers with the seed's semantics, built on the fused ops."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .clip_grad import clip_gradients


def train_with_gradient_clipping(
    model: nn.Module,
    train_loader: Iterable[tuple[Tensor, Tensor]],
    criterion: Callable[[Tensor, Tensor], Tensor],
    optimizer: torch.optim.Optimizer,
    device: torch.device | str,
    clip_value: float = 1.0,
    clip_norm: float | None = None,
) -> float | tuple[float, float]:
    """One epoch of the seed's loop: for each ``(data, target)`` batch, moves it to ``device``,
    zeroes the gradients, backpropagates ``criterion(model(data), target)``, clips the gradients
    (by norm when ``clip_norm`` is given, else by value, see :func:`clip_gradients`) and steps the
    optimizer. The model is put in training mode first.

    Returns the epoch's mean loss; when clipping by norm, ``(mean loss, mean pre-clip gradient
    norm)``. An empty loader gives ``nan`` means.
    """
    model.train()
    # Running sums stay on the device, so the loop adds no host synchronization.
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    total_norm = torch.zeros((), dtype=torch.float64, device=device)
    batches = 0
    for data, target in train_loader:
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        loss = criterion(model(data), target)
        loss.backward()
        norm = clip_gradients(model, clip_value, clip_norm)
        optimizer.step()
        total_loss += loss.detach().double()
        if norm is not None:
            total_norm += norm.double()
        batches += 1
    mean_loss = (total_loss / batches).item() if batches else float("nan")
    if clip_norm is None:
        return mean_loss
    return mean_loss, (total_norm / batches).item() if batches else float("nan")
