"""torch.compile(fullgraph=True): every public op and module traces without a graph break and gives
eager's results; a whole training step (penalty, Dropout, clip_grad_norm_, EMA) under the default
backend (Inductor) matches eager, the dropout masks included."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fused_optim


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: cached graphs of other tests would count toward Dynamo's
    recompile limit, which fullgraph=True turns into an error."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), fused_optim.Dropout(0.3), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 4))


def _run_training(compiled: bool, steps: int = 3):
    model = _model()
    ema = fused_optim.ModelEMA(model, decay=0.95, warmup=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    regularizer = fused_optim.L1L2Regularizer(1e-4, 1e-3)

    def forward(x, y):
        return nn.functional.mse_loss(model(x), y) + regularizer(model)

    def after_backward():
        norm = fused_optim.clip_grad_norm_(model.parameters(), 0.5)
        fused_optim.clip_grad_value_(model.parameters(), 0.05)
        return norm

    def after_step():
        ema.update(model)

    if compiled:
        forward, after_backward, after_step = (
            torch.compile(f, fullgraph=True) for f in (forward, after_backward, after_step)
        )
    data = torch.Generator().manual_seed(1)
    torch.manual_seed(2)  # the dropout masks
    record = []
    for _ in range(steps):
        x, y = torch.randn(16, 8, generator=data), torch.randn(16, 4, generator=data)
        opt.zero_grad()
        loss = forward(x, y)
        loss.backward()
        norm = after_backward()
        opt.step()
        after_step()
        record.append((loss.detach(), norm))
    return record, list(model.parameters()), list(ema.module.parameters())


def test_training_step_inductor_matches_eager(backend):
    eager, compiled = _run_training(False), _run_training(True)
    for (loss_e, norm_e), (loss_c, norm_c) in zip(eager[0], compiled[0]):
        torch.testing.assert_close(loss_c, loss_e)
        torch.testing.assert_close(norm_c, norm_e)
    for group_e, group_c in zip(eager[1:], compiled[1:]):
        for a, b in zip(group_c, group_e):
            torch.testing.assert_close(a, b)


def test_dropout_inductor_keeps_the_eager_mask(backend):
    # The (seed, offset) draw stays an ATen randint call on the default generator (Inductor does
    # not replace a draw with an explicit generator argument), so a seed gives eager's mask.
    x = torch.randn(64, 33, requires_grad=True)
    forms = {
        "functional": lambda t: fused_optim.dropout(t, 0.4),
        "module": fused_optim.Dropout(0.4),
        "in-place on a non-leaf": lambda t: fused_optim.dropout(t * 1.0, 0.4, inplace=True),
        "drop_path_add": lambda t: fused_optim.drop_path_add(t, t * 2.0, 0.4, True),
        "Dropout1d in place": lambda t: fused_optim.dropout1d(t * 1.0, 0.4, inplace=True),
    }
    for name, f in forms.items():
        compiled = torch.compile(f, fullgraph=True)
        for seed in (0, 7):
            torch.manual_seed(seed)
            eager = f(x)
            (grad_e,) = torch.autograd.grad(eager.sum(), x)
            torch.manual_seed(seed)
            out = compiled(x)
            (grad_c,) = torch.autograd.grad(out.sum(), x)
            assert torch.equal(out, eager), name
            assert torch.equal(grad_c, grad_e), name  # backward regenerated the same mask
        torch.manual_seed(0)
        assert not torch.equal(compiled(x), compiled(x)), name  # each call draws a new mask


def _public_calls():
    """name -> fn(state) over a dict of tensors/modules; fn may mutate the state and return a result."""
    return {
        "l1l2_penalty": lambda s: fused_optim.l1l2_penalty(s["model"].parameters(), 0.1, 0.2),
        "L1L2Regularizer": lambda s: fused_optim.L1L2Regularizer(0.1, 0.2)(s["model"]),
        "l1l2_grad_": lambda s: fused_optim.l1l2_grad_(s["model"].parameters(), 0.1, 0.2),
        "dropout": lambda s: fused_optim.dropout(s["x"], 0.3),
        "dropout(inplace)": lambda s: fused_optim.dropout(s["x"], 0.3, inplace=True),
        "dropout(return_mask)": lambda s: fused_optim.dropout(s["x"], 0.3, return_mask=True),
        "dropout(eval)": lambda s: fused_optim.dropout(s["x"], 0.3, training=False) * 2,
        "Dropout": lambda s: fused_optim.Dropout(0.3)(s["x"]),
        "CustomDropout": lambda s: fused_optim.CustomDropout(0.3)(s["x"]),
        "clip_grad_norm_": lambda s: fused_optim.clip_grad_norm_(s["model"].parameters(), 0.1, 3.0),
        "clip_grad_norm_(inf, error_if_nonfinite)": lambda s: fused_optim.clip_grad_norm_(
            s["model"].parameters(), 0.1, float("inf"), error_if_nonfinite=True
        ),
        "get_total_norm(error_if_nonfinite)": lambda s: fused_optim.get_total_norm(s["grads"], 2.0, True),
        "clip_grads_with_norm_": lambda s: fused_optim.clip_grads_with_norm_(
            s["model"].parameters(), 0.1, fused_optim.get_total_norm(s["grads"])
        ),
        "clip_grad_value_": lambda s: fused_optim.clip_grad_value_(s["model"].parameters(), 0.01),
        "clip_gradients": lambda s: fused_optim.clip_gradients(s["model"], 0.01),
        "average_tensors": lambda s: fused_optim.average_tensors([s["avg"], s["grads"]], [1.0, 3.0]),
        "average_tensors(out)": lambda s: fused_optim.average_tensors([s["avg"], s["grads"]], out=s["avg"]),
        "ema_update_": lambda s: fused_optim.ema_update_(s["avg"], s["grads"], 0.9),
        "swa_update_": lambda s: fused_optim.swa_update_(s["avg"], s["grads"], s["n_averaged"]),
        "ModelEMA.update": lambda s: s["ema"].update(s["model"]),
        "ModelEMA.forward": lambda s: s["ema"](s["x"]),
        "ModelEnsemble.predict": lambda s: s["ensemble"].predict(s["x"]),
        "pre_step_": lambda s: fused_optim.pre_step_(s["model"].parameters(), 0.01, 0.02, max_norm=0.1),
        "pre_step_(clip_value)": lambda s: fused_optim.pre_step_(list(s["model"].parameters()), 0.01, 0.0, clip_value=0.01),
        "drop_path": lambda s: fused_optim.drop_path(s["x"], 0.3, True),
        "DropPath": lambda s: fused_optim.DropPath(0.3)(s["x"]),
        "drop_path_add": lambda s: fused_optim.drop_path_add(s["x"], s["x"] * 2, 0.3, True),
        "stochastic_depth": lambda s: fused_optim.stochastic_depth(s["x"], 0.3, "row"),
        "StochasticDepth(batch)": lambda s: fused_optim.StochasticDepth(0.3, "batch")(s["x"]),
        "dropout1d": lambda s: fused_optim.dropout1d(s["x"], 0.3),
        "Dropout1d(inplace)": lambda s: fused_optim.Dropout1d(0.3, inplace=True)(s["x"].view(2, 3, 8)),
        "dropout2d": lambda s: fused_optim.dropout2d(s["x"].view(3, 2, 4, 2), 0.3),
        "Dropout3d": lambda s: fused_optim.Dropout3d(0.3)(s["x"].view(3, 2, 2, 2, 2)),
    }


def _state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    model(torch.randn(6, 8)).square().sum().backward()
    members = [copy.deepcopy(model).eval() for _ in range(3)]
    for i, m in enumerate(members):
        nn.init.normal_(m[2].weight, std=i + 1.0)
    return {
        "model": model,
        "x": torch.randn(6, 8),
        "grads": [p.grad for p in model.parameters()],
        "avg": [torch.randn_like(p) for p in model.parameters()],
        "n_averaged": torch.tensor(3),
        "ema": fused_optim.ModelEMA(model, decay=0.9, warmup=True),
        "ensemble": fused_optim.ModelEnsemble(members, "softmax_mean"),
    }


def _tensors(value):
    """Every tensor reachable in a result or state, in a fixed order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, nn.Module):
        return [t for t in value.state_dict().values()] + [p.grad for p in value.parameters() if p.grad is not None]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


@pytest.mark.parametrize("name", list(_public_calls()))
def test_public_api_compiles_fullgraph_and_matches_eager(backend, name):
    fn = _public_calls()[name]
    eager_state, compiled_state = _state(), _state()
    torch.manual_seed(3)
    eager = fn(eager_state)
    torch.manual_seed(3)
    # aot_eager traces exactly as Inductor does (Dynamo, then AOT autograd and functionalization)
    # at a fraction of the compile time; the Inductor tests above run the whole training step.
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(compiled_state)
    for a, b in zip(_tensors((compiled, compiled_state)), _tensors((eager, eager_state)), strict=True):
        torch.testing.assert_close(a, b)


def test_compiled_get_total_norm_raises_for_a_nonfinite_norm(backend):
    grads = [torch.randn(5), torch.tensor([1.0, float("nan")])]
    compiled = torch.compile(lambda g: fused_optim.get_total_norm(g, 2.0, True), fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="non-finite"):
        compiled(grads)
