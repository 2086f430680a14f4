"""fused_optim.convert(model): every dropout module of a model made ours in place (torch's
Dropout/Dropout1d/2d/3d, timm's DropPath, torchvision's StochasticDepth), everything else kept;
and attach through trainers' optimizer wrappers."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn

import fused_optim
from helpers import require


def _timm_like(name: str, module: str, **attrs) -> nn.Module:
    """An instance of a class named and placed as timm's / torchvision's (neither installed here,
    nor imported by convert), with their attributes."""
    cls = type(name, (nn.Module,), {"forward": lambda self, x: x})
    cls.__module__ = module
    m = cls()
    m.__dict__.update(attrs)
    return m


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 8),
        nn.Dropout(0.25, inplace=True),
        nn.Sequential(nn.Dropout1d(0.1), nn.Dropout2d(0.2), nn.Dropout3d(0.3)),
        _timm_like("DropPath", "timm.layers.drop", drop_prob=0.15, scale_by_keep=False),
        _timm_like("StochasticDepth", "torchvision.ops.stochastic_depth", p=0.4, mode="row"),
        nn.Linear(8, 2),
    )


def test_convert_makes_every_dropout_ours_in_place_keeping_the_rest(backend):
    model = _model().eval()
    modules = dict(model.named_modules())
    hooked = []
    model[1].register_forward_hook(lambda *args: hooked.append(1))
    keys, state = list(model.state_dict()), {k: v.clone() for k, v in model.state_dict().items()}
    converted = fused_optim.convert(model)
    assert converted == ["1", "2.0", "2.1", "2.2", "3", "4"]
    expected = [fused_optim.Dropout, fused_optim.Dropout1d, fused_optim.Dropout2d, fused_optim.Dropout3d,
                fused_optim.DropPath, fused_optim.StochasticDepth]
    assert [type(model.get_submodule(n)) for n in converted] == expected
    assert all(modules[n] is model.get_submodule(n) for n in modules)  # the same objects
    assert (model[1].p, model[1].inplace, model[2][2].p, model[3].drop_prob, model[3].scale_by_keep) == (0.25, True, 0.3, 0.15, False)
    assert (model[4].p, model[4].mode) == (0.4, "row")
    assert not any(m.training for m in model.modules())
    assert list(model.state_dict()) == keys and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    x = torch.randn(3, 8)
    model(x)
    assert hooked == [1]
    assert "fused_optim.Dropout(p=0.25, inplace=True)" in repr(model)
    assert fused_optim.convert(model) == []  # idempotent


def test_converted_model_trains_as_ours(backend):
    # In training mode the converted modules draw from fused_optim's stream: equal to the same
    # model built from fused_optim's modules directly, under the same seed.
    theirs, ours = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)), nn.Sequential(nn.Linear(8, 8), fused_optim.Dropout(0.5))
    ours.load_state_dict(theirs.state_dict())
    fused_optim.convert(theirs)
    x = torch.randn(4, 8)
    torch.manual_seed(5)
    a = theirs(x)
    torch.manual_seed(5)
    torch.testing.assert_close(a, ours(x), rtol=0, atol=0)


def test_convert_leaves_subclasses_and_other_modules_alone():
    class MyDropout(nn.Dropout):
        def forward(self, x):
            return x * 2

    model = nn.Sequential(MyDropout(0.5), nn.ReLU(), nn.Linear(2, 2), nn.AlphaDropout(0.2))
    before = [type(m) for m in model.modules()]
    assert fused_optim.convert(model) == []
    assert [type(m) for m in model.modules()] == before
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fused_optim.convert([nn.Dropout()])


def test_convert_the_model_itself_and_a_copy():
    single = nn.Dropout(0.1)
    assert fused_optim.convert(single) == [""] and type(single) is fused_optim.Dropout
    twin = copy.deepcopy(single)
    assert type(twin) is fused_optim.Dropout and twin.p == 0.1


# ---------------------------------------------------------------- attach through wrappers


class _AcceleratedLike(torch.optim.Optimizer):
    """As accelerate's AcceleratedOptimizer: an Optimizer subclass that never ran Optimizer's
    __init__ (no hook tables of its own), holding the real one as .optimizer."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none)

    def step(self, closure=None):
        self.optimizer.step(closure)


def _train(model, step_opt, hook_opt, glue):
    torch.manual_seed(1)
    for _ in range(3):
        hook_opt.zero_grad()
        model(torch.randn(4, 8)).square().sum().backward()
        if glue:
            fused_optim.pre_step_(model.parameters(), 1e-3, 1e-2, max_norm=0.1)
        step_opt.step()


@pytest.mark.parametrize("wrapper", ["accelerate-like", "lightning"])
def test_attach_through_a_trainers_optimizer_wrapper(wrapper):
    ours, theirs = (nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)) for _ in range(2))
    theirs.load_state_dict(ours.state_dict())
    inner = torch.optim.SGD(ours.parameters(), lr=0.1)
    if wrapper == "lightning":
        require("lightning")
        from lightning.pytorch.core.optimizer import LightningOptimizer

        wrapped = LightningOptimizer(inner)
    else:
        wrapped = _AcceleratedLike(inner)
    handle = fused_optim.attach(wrapped, l1=1e-3, l2=1e-2, max_norm=0.1)
    # A LightningOptimizer steps only inside a Trainer (its strategy calls the inner step, where
    # the hooks are); accelerate's wrapper steps on its own.
    _train(ours, inner if wrapper == "lightning" else wrapped, inner, glue=False)
    plain = torch.optim.SGD(theirs.parameters(), lr=0.1)
    _train(theirs, plain, plain, glue=True)
    assert handle.steps == 3
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="already"):
        fused_optim.attach(inner)  # the hooks went on the real optimizer


def test_attach_refuses_what_holds_no_optimizer():
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer, or a wrapper .* got SimpleNamespace"):
        fused_optim.attach(types.SimpleNamespace(optimizer=None))
