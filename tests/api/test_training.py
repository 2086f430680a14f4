"""GradientAccumulator and EarlyStopping: the seed's semantics, the added options, and their
behaviour across processes (2 gloo ranks on localhost)."""

from __future__ import annotations

import copy
import os
import random

import pytest
import torch
from torch import nn

import fused_optim
from helpers import run_distributed

# ---------------------------------------------------------------- GradientAccumulator


def _model_and_data(n_micro, batch=4, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1))
    data = torch.randn(n_micro, batch, 5)
    return model, data


def _big_batch_grads(model, batches):
    ref = copy.deepcopy(model)
    ref.zero_grad()
    ref(batches.reshape(-1, 5)).square().mean().backward()
    return [p.grad.clone() for p in ref.parameters()]


def test_accumulated_gradients_equal_one_large_batch():
    model, data = _model_and_data(8)
    acc = fused_optim.GradientAccumulator(model, accumulation_steps=8)
    results = [acc.step(model(x).square().mean()) for x in data]
    assert results == [False] * 7 + [True]
    for p, g in zip(model.parameters(), _big_batch_grads(model, data)):
        torch.testing.assert_close(p.grad, g)


def test_final_partial_window_with_total_steps():
    model, data = _model_and_data(10)
    acc = fused_optim.GradientAccumulator(model, accumulation_steps=4, total_steps=10)
    windows, steps = [], []
    for i, x in enumerate(data):
        with acc.accumulate():  # a plain module: no no_sync, no change
            if acc.step(model(x).square().mean()):
                steps.append(i)
                windows.append([p.grad.clone() for p in model.parameters()])
                model.zero_grad()
    assert steps == [3, 7, 9]
    for got, expected in zip(windows[2], _big_batch_grads(model, data[8:])):
        torch.testing.assert_close(got, expected)  # scaled by 1/2, not 1/4
    assert acc.step(model(data[0]).square().mean()) is False  # the next epoch starts a new window


def test_flush_rescales_a_partial_window():
    model, data = _model_and_data(6)
    acc = fused_optim.GradientAccumulator(model, accumulation_steps=4)
    for x in data:
        if acc.step(model(x).square().mean()):
            model.zero_grad()
    assert acc.flush() is True
    for p, g in zip(model.parameters(), _big_batch_grads(model, data[4:])):
        torch.testing.assert_close(p.grad, g)
    assert acc.flush() is False


def test_grad_scaler_and_state_dict():
    model, data = _model_and_data(2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    acc = fused_optim.GradientAccumulator(model, accumulation_steps=2)
    acc.step(model(data[0]).square().mean(), scaler=scaler)
    state = acc.state_dict()
    resumed = fused_optim.GradientAccumulator(model, accumulation_steps=5)
    resumed.load_state_dict(state)
    assert resumed.step(model(data[1]).square().mean(), scaler=scaler) is True
    for p, g in zip(model.parameters(), _big_batch_grads(model, data)):
        torch.testing.assert_close(p.grad, 1024.0 * g)
    resumed.reset()
    assert resumed.current_step == 0


def test_accumulation_under_ddp_matches_one_large_batch():
    run_distributed("ddp_accumulation")


# ---------------------------------------------------------------- EarlyStopping


class SeedEarlyStopping:
    """The seed's class, verbatim in behaviour."""

    def __init__(self, patience=7, min_delta=0):
        self.patience = patience
        self.min_delta = min_delta
        self.counter = 0
        self.best_loss = None
        self.early_stop = False

    def __call__(self, val_loss):
        if self.best_loss is None:
            self.best_loss = val_loss
        elif val_loss > self.best_loss - self.min_delta:
            self.counter += 1
            if self.counter >= self.patience:
                self.early_stop = True
        else:
            self.best_loss = val_loss
            self.counter = 0
        return self.early_stop


@pytest.mark.parametrize("seed", range(20))
def test_seed_semantics_kept_exactly(seed):
    rng = random.Random(seed)
    patience, min_delta = rng.randint(1, 5), rng.choice([0, 0.01, 0.1])
    ours, theirs = fused_optim.EarlyStopping(patience, min_delta), SeedEarlyStopping(patience, min_delta)
    losses = [round(rng.uniform(0, 1), 2) for _ in range(30)]
    losses[5] = losses[4]  # equal values: the seed counts them as improvements
    for v in losses:
        if theirs.early_stop:
            break
        assert ours(v) == theirs(v)
        assert (ours.counter, ours.best_loss, ours.early_stop) == (theirs.counter, theirs.best_loss, theirs.early_stop)


def test_mode_max():
    stopper = fused_optim.EarlyStopping(patience=2, mode="max")
    assert [stopper(v) for v in [0.5, 0.6, 0.6, 0.55, 0.58]] == [False, False, False, False, True]
    assert stopper.best_loss == 0.6 and "no improvement" in stopper.reason


@pytest.mark.parametrize(
    "kwargs, values, stop_at, fragment",
    [
        ({"check_finite": True}, [1.0, float("inf")], 1, "not finite"),
        ({"stopping_threshold": 0.1}, [1.0, 0.5, 0.05], 2, "stopping threshold"),
        ({"divergence_threshold": 5.0}, [1.0, 6.0], 1, "divergence threshold"),
        ({"baseline": 0.5, "patience": 2}, [0.7, 0.6, 0.4], 1, "no improvement over 0.5"),
        ({"start_from_epoch": 3, "check_finite": True}, [float("nan"), float("nan"), 1.0, float("nan")], 3, "not finite"),
    ],
    ids=["check-finite", "stopping-threshold", "divergence", "baseline", "start-from-epoch"],
)
def test_options(kwargs, values, stop_at, fragment):
    stopper = fused_optim.EarlyStopping(**kwargs)
    results = [stopper(v) for v in values]
    assert results.index(True) == stop_at
    assert fragment in stopper.reason


def test_restore_best_weights_and_resume():
    model = nn.Linear(3, 1)
    stopper = fused_optim.EarlyStopping(patience=2, restore_best_weights=True, model=model)
    best = None
    for v in [1.0, 0.5, 0.7, 0.8]:
        with torch.no_grad():
            model.weight.add_(1.0)
        if v == 0.5:
            best = copy.deepcopy(model.state_dict())
        stopper(v)
    assert stopper.early_stop
    for k, t in model.state_dict().items():
        assert torch.equal(t, best[k])  # restored on stop
    assert all(t.device.type == "cpu" for t in stopper.best_state_dict.values())
    resumed = fused_optim.EarlyStopping(patience=2)
    resumed.load_state_dict(stopper.state_dict())
    assert resumed.early_stop and resumed.best_loss == 0.5
    with pytest.raises(ValueError, match="needs the model"):
        fused_optim.EarlyStopping(restore_best_weights=True)


def test_same_decision_on_every_rank():
    run_distributed("early_stopping")


def test_demo_runs_end_to_end():
    from fused_optim import demo

    result = demo.main(["--epochs", "2", "--samples", "2048"])
    assert set(result["accuracy"]) == {"single model", "EMA weights", "uniform soup (3)", "ensemble (3)"}
    assert all(0.2 < a <= 1.0 for a in result["accuracy"].values())  # 5 classes: above chance
    assert result["seconds_per_epoch"]["fused"] > 0 and result["seconds_per_epoch"]["plain"] > 0
