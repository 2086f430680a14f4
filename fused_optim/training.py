"""Training helpers with the seed's semantics, built on the fused ops."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from ._utils import as_float, as_int
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


class GradientAccumulator:
    """The seed's gradient accumulation: ``step(loss)`` backpropagates ``loss / window`` and returns
    True when the optimizer should step; ``reset()`` starts over.

    - ``window`` is ``accumulation_steps``, except for a final partial window when ``total_steps``
      (micro-batches per epoch) is given: with 10 micro-batches and 4 steps, the last 2 are each
      scaled by 1/2, not 1/4, and ``step`` returns True at micro-batch 10. Without
      ``total_steps``, call ``flush()`` at the end: it returns True if a partial window holds
      gradients and rescales them by ``accumulation_steps / filled`` so they are a mean too.
    - ``with acc.accumulate(): acc.step(loss)`` skips the gradient communication on micro-steps
      that do not end a window: ``model.no_sync()`` for a ``DistributedDataParallel``,
      ``model.set_requires_gradient_sync(False)`` for an FSDP2 (``fully_shard``) model; nothing on
      a plain module.
    - ``step(loss, scaler=scaler)`` backpropagates ``scaler.scale(loss / window)`` for
      ``torch.amp.GradScaler`` users.
    - ``state_dict()`` / ``load_state_dict()`` resume mid-window.
    """

    def __init__(self, model: nn.Module, accumulation_steps: int, total_steps: int | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        accumulation_steps = as_int(accumulation_steps, "accumulation_steps", 1)
        if total_steps is not None:
            total_steps = as_int(total_steps, "total_steps", 1)
        self.model = model
        self.accumulation_steps = accumulation_steps
        self.total_steps = total_steps
        self.current_step = 0

    def _window(self) -> int:
        """The size of the window the next micro-step belongs to."""
        if self.total_steps is None:
            return self.accumulation_steps
        start = (self.current_step % self.total_steps) // self.accumulation_steps * self.accumulation_steps
        return min(self.accumulation_steps, self.total_steps - start)

    def _ends_window(self) -> bool:
        """Whether the next micro-step ends its window (then the optimizer steps)."""
        step = self.current_step + 1
        if self.total_steps is not None and step % self.total_steps == 0:
            return True
        position = step % self.total_steps if self.total_steps is not None else step
        return position % self.accumulation_steps == 0

    def step(self, loss: Tensor, scaler: torch.amp.GradScaler | None = None) -> bool:
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss must be a tensor, got {type(loss).__name__}")
        ends = self._ends_window()
        loss = loss / self._window()
        (scaler.scale(loss) if scaler is not None else loss).backward()
        self.current_step += 1
        return ends

    def flush(self) -> bool:
        """Ends a partial window (no total_steps given): rescales its gradients to a mean and
        returns True if there is one to step on."""
        filled = self.current_step % self.accumulation_steps
        if self.total_steps is not None or filled == 0:
            return False
        with torch.no_grad():
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(self.accumulation_steps / filled)
        self.current_step += self.accumulation_steps - filled
        return True

    def reset(self) -> None:
        self.current_step = 0

    @contextlib.contextmanager
    def accumulate(self):
        """Skips the gradient communication inside, unless the next micro-step ends a window:
        DDP's all-reduce (``no_sync()``), FSDP2's reduce-scatter (``set_requires_gradient_sync``)."""
        no_sync = getattr(self.model, "no_sync", None)
        set_sync = getattr(self.model, "set_requires_gradient_sync", None)
        if self._ends_window() or (no_sync is None and set_sync is None):
            yield
        elif no_sync is not None:
            with no_sync():
                yield
        else:
            set_sync(False)
            try:
                yield
            finally:
                set_sync(True)

    def state_dict(self) -> dict:
        return {"accumulation_steps": self.accumulation_steps, "total_steps": self.total_steps, "current_step": self.current_step}

    def load_state_dict(self, state: dict) -> None:
        self.accumulation_steps = state["accumulation_steps"]
        self.total_steps = state["total_steps"]
        self.current_step = state["current_step"]


def _collective_device() -> torch.device:
    """Where the default process group's backend takes tensors: the current GPU for NCCL."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class EarlyStopping:
    """The seed's early stopping: call with each epoch's validation loss; returns True (and sets
    ``early_stop``) once it has not improved by more than ``min_delta`` for ``patience`` calls.
    ``counter`` and ``best_loss`` are the seed's attributes; with the defaults the seed's decisions
    are kept exactly for finite values (a value equal to the best counts as an improvement, as in
    the seed). A NaN is never an improvement (as Keras and Lightning decide): it counts towards
    ``patience``, never becomes ``best_loss`` and never has its weights kept.

    ``rule="lightning"``: decisions as Lightning's and Keras' ``EarlyStopping`` take them: an
    improvement must be strictly better than ``best - min_delta`` (``best + min_delta`` for
    ``mode="max"``), ``best_loss`` starts at inf (-inf for ``"max"``) or ``baseline``, so a run that
    plateaus exactly (``[6, 5, 5, 5, 5, 5]``, ``patience=3``) stops at epoch 4 as theirs do, and
    ``reason`` holds Lightning's message (``monitor`` names the metric in it). ``stopped_epoch``
    (both rules) is the epoch, counted from 0, of the call that stopped, as Lightning reports it.

    Options, as in Lightning's and Keras' callbacks:
    - ``mode="max"`` for metrics that should grow (accuracy).
    - ``check_finite``: stop at once on nan/inf.
    - ``stopping_threshold``: stop once the value is better than it; ``divergence_threshold``:
      stop once the value is worse than it.
    - ``baseline``: the value to beat from the start (the first value must improve on it).
    - ``start_from_epoch``: calls before this epoch (counted from 0) are ignored.
    - ``restore_best_weights`` with ``model``: a CPU copy of the best weights is kept
      (``best_state_dict``) and loaded back into the model on stop, or by ``restore()``.
    - ``state_dict()`` / ``load_state_dict()`` to resume; ``reason`` says why it stopped.
    - Under ``torch.distributed``, each call first averages the value over the ranks (one
      all-reduce), so every rank takes the same decisions on the same value: all stop at the same
      epoch, and ``restore_best_weights`` keeps the same epoch's weights everywhere (with FSDP2,
      each rank its own shards). A nan on any rank makes the mean nan.
    """

    def __init__(
        self,
        patience: int = 7,
        min_delta: float = 0,
        mode: str = "min",
        check_finite: bool = False,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        baseline: float | None = None,
        start_from_epoch: int = 0,
        restore_best_weights: bool = False,
        model: nn.Module | None = None,
        rule: str = "seed",
        monitor: str = "val_loss",
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if rule not in ("seed", "lightning"):
            raise ValueError(f"rule must be 'seed' or 'lightning', got {rule!r}")
        patience, start_from_epoch = as_int(patience, "patience", 0), as_int(start_from_epoch, "start_from_epoch", 0)
        self._given_thresholds = (stopping_threshold, divergence_threshold)  # as given, for Lightning's messages
        min_delta = as_float(min_delta, "min_delta")
        if not math.isfinite(min_delta):
            raise ValueError(f"min_delta must be finite, got {min_delta}")
        stopping_threshold, divergence_threshold, baseline = (
            None if v is None else as_float(v, name)
            for v, name in (
                (stopping_threshold, "stopping_threshold"),
                (divergence_threshold, "divergence_threshold"),
                (baseline, "baseline"),
            )
        )
        if restore_best_weights and model is None:
            raise ValueError("restore_best_weights=True needs the model")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.patience, self.min_delta, self.mode = patience, min_delta, mode
        self.check_finite = check_finite
        self.stopping_threshold, self.divergence_threshold = stopping_threshold, divergence_threshold
        self.baseline, self.start_from_epoch = baseline, start_from_epoch
        self.restore_best_weights, self.model = restore_best_weights, model
        self.rule, self.monitor = rule, str(monitor)
        self.counter = 0
        if baseline is None and rule == "lightning":
            baseline = math.inf if mode == "min" else -math.inf
        self.best_loss = baseline
        self.early_stop = False
        self.reason = ""
        self.epoch = 0
        self.stopped_epoch = 0
        self.best_state_dict: dict[str, Tensor] | None = None

    def _sign(self) -> float:
        return 1.0 if self.mode == "min" else -1.0  # compare sign * value: lower is better

    def _decide(self, value: float) -> str:
        """The reason to stop now, or ''."""
        s, lightning = self._sign(), self.rule == "lightning"
        order = "<" if self.mode == "min" else ">"
        shown = torch.tensor(value)  # Lightning's messages format the logged (fp32) tensor
        if self.check_finite and not math.isfinite(value):
            if lightning:
                return (f"Monitored metric {self.monitor} = {shown} is not finite. Previous best value was "
                        f"{self.best_loss:.3f}. Signaling Trainer to stop.")
            return f"value {value} is not finite"
        if self.stopping_threshold is not None and s * value < s * self.stopping_threshold:
            if lightning:
                return (f"Stopping threshold reached: {self.monitor} = {shown} {order} {self._given_thresholds[0]}. "
                        "Signaling Trainer to stop.")
            return f"value {value} reached the stopping threshold {self.stopping_threshold}"
        if self.divergence_threshold is not None and s * value > s * self.divergence_threshold:
            if lightning:
                return (f"Divergence threshold reached: {self.monitor} = {shown} {order} {self._given_thresholds[1]}. "
                        "Signaling Trainer to stop.")
            return f"value {value} crossed the divergence threshold {self.divergence_threshold}"
        # An improvement: the seed's test unless value > best - min_delta (a value equal to the
        # best is one); Lightning's and Keras' value < best - min_delta, strictly. (Mirrored for
        # mode="max".) A NaN, for which every comparison is False, is never one.
        if math.isnan(value):
            improved = False
        elif self.best_loss is None:
            improved = True
        elif lightning:
            improved = s * value + self.min_delta < s * self.best_loss
        else:
            improved = not s * value > s * self.best_loss - self.min_delta
        if improved:
            self._improved(value)
            return ""
        self.counter += 1
        if self.counter >= self.patience:
            if lightning:
                return (f"Monitored metric {self.monitor} did not improve in the last {self.counter} records. "
                        f"Best score: {self.best_loss:.3f}. Signaling Trainer to stop.")
            return f"no improvement over {self.best_loss} by more than {self.min_delta} for {self.counter} epochs"
        return ""

    def _improved(self, value: float) -> None:
        self.best_loss = value
        self.counter = 0
        if self.restore_best_weights:
            self.best_state_dict = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def __call__(self, val_loss: float | Tensor) -> bool:
        value = as_float(val_loss, "val_loss", like_torch=True)
        epoch, self.epoch = self.epoch, self.epoch + 1
        if self.early_stop or epoch < self.start_from_epoch:
            return self.early_stop
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            mean = torch.tensor([value], dtype=torch.float64, device=_collective_device())
            torch.distributed.all_reduce(mean)
            value = mean.item() / torch.distributed.get_world_size()
        reason = self._decide(value)
        if reason:
            self.early_stop, self.reason, self.stopped_epoch = True, reason, epoch
            if self.restore_best_weights:
                self.restore()
        return self.early_stop

    def restore(self) -> None:
        """Loads the best weights seen into the model."""
        if self.best_state_dict is not None:
            self.model.load_state_dict(self.best_state_dict)

    def state_dict(self) -> dict:
        keys = ("counter", "best_loss", "early_stop", "reason", "epoch", "stopped_epoch", "best_state_dict")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
