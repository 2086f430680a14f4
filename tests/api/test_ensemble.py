"""ModelEnsemble against the seed's loop, every reduce mode, the vmap path and its fallback."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn

import fused_optim


class SeedModelEnsemble:
    """The seed's class, verbatim in behaviour."""

    def __init__(self, models):
        self.models = models

    def predict(self, x):
        predictions = []
        for model in self.models:
            model.eval()
            with torch.no_grad():
                predictions.append(model(x))
        return torch.mean(torch.stack(predictions), dim=0)


def mlps(k, seed=0):
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4)) for _ in range(k)]


@pytest.mark.parametrize("vectorize", ["auto", True, False])
def test_mean_matches_seed(vectorize):
    models = mlps(5)
    x = torch.randn(7, 8)
    ours = fused_optim.ModelEnsemble(models, vectorize=vectorize)
    assert (ours._base is not None) == (vectorize is not False)
    torch.testing.assert_close(ours.predict(x), SeedModelEnsemble(models).predict(x))


@pytest.mark.parametrize("vmap_cost, loop_cost", [(1.0, 2.0), (2.0, 1.0)])
def test_auto_keeps_the_path_it_measured_faster_for_each_input_signature(monkeypatch, vmap_cost, loop_cost):
    models = mlps(4)
    ensemble = fused_optim.ModelEnsemble(models)
    clock, calls = [0.0], []
    monkeypatch.setattr(fused_optim.ensemble, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    for name, cost in (("_vmapped", vmap_cost), ("_looped", loop_cost)):
        real = getattr(ensemble, name)

        def timed(x, real=real, name=name, cost=cost):
            clock[0] += cost
            calls.append(name)
            return real(x)

        monkeypatch.setattr(ensemble, name, timed)
    faster = "_vmapped" if vmap_cost < loop_cost else "_looped"
    x = torch.randn(5, 8)
    torch.testing.assert_close(ensemble.predict(x), SeedModelEnsemble(models).predict(x))
    rounds = fused_optim.ensemble._ROUNDS
    assert calls == ["_vmapped", "_looped"] * (1 + rounds) + [faster]  # a warm-up, then timed rounds
    calls.clear()
    ensemble.predict(x)
    assert calls == [faster]  # kept for this signature
    calls.clear()
    ensemble.predict(torch.randn(6, 8))
    assert len(calls) == 2 * (1 + rounds) + 1  # a new shape is measured again


def test_softmax_mean_and_vote():
    models = mlps(6)
    x = torch.randn(50, 8)
    outputs = torch.stack([m.eval()(x) for m in models]).detach()
    torch.testing.assert_close(fused_optim.ModelEnsemble(models, reduce="softmax_mean").predict(x), outputs.softmax(-1).mean(0))
    votes = fused_optim.ModelEnsemble(models, reduce="vote").predict(x)
    assert votes.dtype == torch.int64
    for row in range(50):
        counts = torch.bincount(outputs[:, row].argmax(-1), minlength=4)
        assert votes[row].item() == int(torch.nonzero(counts == counts.max())[0])  # ties: smaller class


def test_restores_training_modes_and_needs_no_grad():
    models = mlps(3)
    models[1].eval()
    before = [m.training for m in models]
    out = fused_optim.ModelEnsemble(models).predict(torch.randn(4, 8))
    assert [m.training for m in models] == before
    assert not out.requires_grad


def test_falls_back_to_the_loop_for_different_architectures():
    models = mlps(2) + [nn.Sequential(nn.Linear(8, 4))]
    ensemble = fused_optim.ModelEnsemble(models)
    assert ensemble._base is None
    x = torch.randn(3, 8)
    torch.testing.assert_close(ensemble.predict(x), SeedModelEnsemble(models).predict(x))
    with pytest.raises(ValueError, match="vectorize=True"):
        fused_optim.ModelEnsemble(models, vectorize=True)


def test_vmap_sees_weight_updates():
    models = mlps(3)
    ensemble = fused_optim.ModelEnsemble(models, vectorize=True)
    x = torch.randn(4, 8)
    before = ensemble.predict(x)
    with torch.no_grad():
        models[0][0].weight.add_(1.0)
    assert not torch.allclose(ensemble.predict(x), before)
    torch.testing.assert_close(ensemble.predict(x), SeedModelEnsemble(models).predict(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="reduce must be one of"):
        fused_optim.ModelEnsemble(mlps(2), reduce="median")
    with pytest.raises(ValueError, match="at least one model"):
        fused_optim.ModelEnsemble([])


def _force_vmap(ensemble, monkeypatch):
    """Makes "auto" pick vmap whenever the models allow it; returns the list of vmap calls."""
    calls = []
    vmapped = ensemble._vmapped
    monkeypatch.setattr(ensemble, "_vmap_is_faster", lambda x: True)
    monkeypatch.setattr(ensemble, "_vmapped", lambda x: calls.append(x) or vmapped(x))
    return calls


def _change_first_weight(models, how):
    with torch.no_grad():
        w = models[1][0].weight
        if how == "data.mul_":
            w.data.mul_(3)  # bumps no version counter of w
        elif how == "data.copy_":
            w.data.copy_(torch.randn_like(w))
        elif how == "data=":
            w.data = torch.randn_like(w)
        else:
            models[1][0].weight = nn.Parameter(torch.randn_like(w))


@pytest.mark.parametrize("how", ["data.mul_", "data.copy_", "data=", "new Parameter"])
@pytest.mark.parametrize("vectorize", [True, "auto"])
def test_vmap_uses_the_current_weights(monkeypatch, vectorize, how):
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)) for _ in range(3)]
    ensemble = fused_optim.ModelEnsemble(models, vectorize=vectorize)
    calls = _force_vmap(ensemble, monkeypatch)
    x = torch.randn(5, 4)
    ensemble.predict(x)
    _change_first_weight(models, how)
    torch.testing.assert_close(ensemble.predict(x), SeedModelEnsemble(models).predict(x))
    assert len(calls) == 2  # both answers came from vmap


class Shift(nn.Module):
    def __init__(self, offset):
        super().__init__()
        self.offset = torch.tensor(offset)  # a plain attribute: neither a parameter nor a buffer

    def forward(self, x):
        return x + self.offset


SETTINGS = {  # submodule 1 of each model, built from the setting of that model
    "LeakyReLU.negative_slope": (nn.LeakyReLU, [0.01, 0.9, 0.01], "negative_slope=0.9"),
    "LayerNorm.eps": (lambda eps: nn.LayerNorm(8, eps=eps), [1e-5, 1e-5, 10.0], "eps=10.0"),
    "plain tensor attribute": (Shift, [0.0, 0.0, 1.0], "offset=tensor"),
}


def _models_with(setting, values):
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(4, 8), setting(v), nn.Linear(8, 3)) for v in values]


@pytest.mark.parametrize("name", list(SETTINGS))
def test_vmap_only_for_models_with_the_same_settings(monkeypatch, name):
    setting, values, fragment = SETTINGS[name]
    models = _models_with(setting, values)
    x = torch.randn(5, 4)
    ensemble = fused_optim.ModelEnsemble(models)  # "auto", told that vmap is faster: the loop still
    calls = _force_vmap(ensemble, monkeypatch)
    torch.testing.assert_close(ensemble.predict(x), SeedModelEnsemble(models).predict(x))
    assert calls == []
    with pytest.raises(ValueError, match=rf"models\[\d\] differs from models\[0\]: submodule '1' .*{fragment}"):
        fused_optim.ModelEnsemble(models, vectorize=True)


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("changed", [0, 2])
def test_vmap_sees_settings_changed_after_the_ensemble_was_built(monkeypatch, name, changed):
    setting, values, fragment = SETTINGS[name]
    models = _models_with(setting, [values[0]] * 3)
    x = torch.randn(5, 4)
    auto, forced = fused_optim.ModelEnsemble(models), fused_optim.ModelEnsemble(models, vectorize=True)
    calls = _force_vmap(auto, monkeypatch)
    torch.testing.assert_close(auto.predict(x), SeedModelEnsemble(models).predict(x))
    assert len(calls) == 1  # the same settings: vmap
    models[changed][1] = setting(max(values, key=lambda v: v != values[0]))
    torch.testing.assert_close(auto.predict(x), SeedModelEnsemble(models).predict(x))
    assert len(calls) == 1  # the loop answered
    with pytest.raises(ValueError, match=rf"models\[{changed}\] differs from models\[0\] as it was .*{fragment}"):
        forced.predict(x)


def _hooked_mlp() -> nn.Module:
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    m.register_forward_hook(_double_output)  # one hook, registered on each model (handles differ)
    return m


def _double_output(module, inputs, output):
    return output * 2


class _PartialActivation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.act = functools.partial(nn.functional.leaky_relu, negative_slope=0.1)  # a new object per model

    def forward(self, x):
        return self.act(self.linear(x))


@pytest.mark.parametrize(
    "make",
    [_hooked_mlp, _PartialActivation, lambda: nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))],
    ids=["same hook", "partial attribute", "weight_norm"],
)
def test_vmap_for_identical_models_with_hooks_partials_and_parametrizations(make):
    """Models that compute the same function are not told apart by what differs only in identity:
    a hook's handle id, a partial rebuilt per model, a parametrization's class made per module.
    vectorize=True takes the vmap path (it raises where it cannot) and gives the loop's outputs."""
    torch.manual_seed(0)
    models = [make() for _ in range(3)]
    x = torch.randn(5, 4)
    loop = fused_optim.ModelEnsemble(models, vectorize=False).predict(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # weight_norm has no batching rule: a vmap fallback
        torch.testing.assert_close(fused_optim.ModelEnsemble(models, vectorize=True).predict(x), loop)
