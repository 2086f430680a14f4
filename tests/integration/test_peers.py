"""The same numbers as the libraries users come from, checked against the real libraries (installed
by .ci/run): timm's ModelEmaV3 against ModelEMA(style="timm"), Lightning's EarlyStopping driven by a
real Trainer against EarlyStopping(rule="lightning"), and Keras's documented plateau case.

timm's ModelEmaV3 is loaded from timm's own file (timm/utils/model_ema.py, which needs only torch):
importing the timm package imports torchvision, and the only torchvision the package index has
for this torch is a CUDA build that cannot load with the CPU build of torch used here.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
from torch import nn

import fused_optim
from helpers import require


def _timm_model_ema_v3():
    root = require("timm").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("timm_model_ema", os.path.join(root, "utils", "model_ema.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ModelEmaV3


def _model():
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("use_warmup", [False, True])
@pytest.mark.parametrize("update_after_step", [0, 5])
@pytest.mark.parametrize("exclude_buffers", [False, True])
def test_model_ema_timm_style_gives_timms_weights(backend, use_warmup, update_after_step, exclude_buffers):
    ModelEmaV3 = _timm_model_ema_v3()
    torch.manual_seed(0)
    model = _model()
    kwargs = dict(decay=0.999, min_decay=0.1, update_after_step=update_after_step, use_warmup=use_warmup,
                  warmup_gamma=1.5, warmup_power=0.75, exclude_buffers=exclude_buffers)
    theirs = ModelEmaV3(model, **kwargs)
    ours = fused_optim.ModelEMA(model, style="timm", **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(50):
        loss = model(torch.randn(32, 8)).pow(2).mean()  # train mode: BatchNorm's statistics move too
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert ours.get_decay(step) == theirs.get_decay(step)
        theirs.update(model, step=step)
        ours.update(model, step=step)
    theirs_sd = theirs.module.state_dict()
    for key, value in ours.module.state_dict().items():
        torch.testing.assert_close(value, theirs_sd[key], msg=lambda m: f"{key}: {m}")
    theirs.update(model)  # no step: the plain decay
    ours.update(model)
    torch.testing.assert_close(ours.module[0].weight, theirs.module[0].weight)


class _TiedWithRunningMax(nn.Module):
    """A weight tied under two state-dict keys (emb.weight, head.weight) and a non-persistent
    buffer that training changes."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
        self.head.weight = self.emb.weight
        self.bn = nn.BatchNorm1d(8)
        self.register_buffer("running_max", torch.zeros(8), persistent=False)

    def forward(self, x):
        y = self.head(torch.tanh(self.bn(self.emb(x))))
        if self.training:
            self.running_max.copy_(torch.maximum(self.running_max, y.detach().abs().amax(0)))
        return y


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("exclude_buffers", [False, True])
def test_model_ema_timm_style_follows_the_state_dict_as_timm(backend, flat, exclude_buffers):
    # timm lerps along the state dicts: the tied weight twice per update, the non-persistent
    # buffer never (its EMA copy stays); with exclude_buffers, parameters once, every buffer copied.
    ModelEmaV3 = _timm_model_ema_v3()
    torch.manual_seed(0)
    model = _TiedWithRunningMax()
    if flat:
        fused_optim.flatten_parameters(model)
    theirs = ModelEmaV3(model, decay=0.9, exclude_buffers=exclude_buffers)
    ours = fused_optim.ModelEMA(model, style="timm", decay=0.9, exclude_buffers=exclude_buffers, flat=flat)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(30):
        opt.zero_grad()
        model(torch.randn(16, 8)).pow(2).mean().backward()
        opt.step()
        theirs.update(model, step=step)
        ours.update(model, step=step)
    assert torch.equal(theirs.module.running_max, model.running_max) == exclude_buffers  # the case is exercised
    theirs_state = dict(theirs.module.named_buffers(), **dict(theirs.module.named_parameters()))
    for key, value in dict(ours.module.named_buffers(), **dict(ours.module.named_parameters())).items():
        torch.testing.assert_close(value, theirs_state[key], msg=lambda m: f"{key}: {m}")


def test_model_ema_timm_style_decay_schedule_edges():
    ModelEmaV3 = _timm_model_ema_v3()
    model = nn.Linear(2, 2)
    for kwargs in (dict(decay=0.9, min_decay=0.95, use_warmup=True), dict(decay=0.99, update_after_step=3)):
        theirs = ModelEmaV3(model, **kwargs)
        ours = fused_optim.ModelEMA(model, style="timm", **kwargs)
        assert [ours.get_decay(s) for s in range(12)] + [ours.get_decay(None)] == (
            [theirs.get_decay(s) for s in range(12)] + [theirs.get_decay(None)]
        )


def test_model_ema_default_style_refuses_timms_arguments():
    with pytest.raises(ValueError, match="style='timm'"):
        fused_optim.ModelEMA(nn.Linear(2, 2), update_after_step=3)
    with pytest.raises(ValueError, match="style"):
        fused_optim.ModelEMA(nn.Linear(2, 2), style="keras")


def _lightning_run(values: list[float], **kwargs) -> tuple[bool, int, str | None, int]:
    """Lightning's EarlyStopping in a real Trainer, the validation metric of epoch e being
    values[e]: (stopped, stopped_epoch, its message, epochs run)."""
    require("lightning")
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EarlyStopping

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=4)

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", values[self.current_epoch])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    callback = EarlyStopping(monitor="val_loss", **kwargs)
    trainer = pl.Trainer(
        max_epochs=len(values), callbacks=[callback], accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(Tiny(), train_dataloaders=data, val_dataloaders=data)
    stopped = callback.stopping_reason_message is not None
    return stopped, callback.stopped_epoch, callback.stopping_reason_message, trainer.current_epoch


def _ours(values: list[float], **kwargs) -> tuple[bool, int, str | None, int]:
    es = fused_optim.EarlyStopping(rule="lightning", **kwargs)
    epochs = 0
    for v in values:
        epochs += 1
        if es(torch.tensor(v).item()):  # the value Lightning logs: fp32
            break
    return es.early_stop, es.stopped_epoch, es.reason or None, epochs


NAN = math.nan
LIGHTNING_CASES = [
    ([6, 5, 5, 5, 5, 5], dict(patience=3)),  # an exact plateau: Lightning stops at epoch 4
    ([10, 9.6, 9.2, 8.0, 7.9, 7.8, 7.7, 7.6], dict(patience=2, min_delta=0.5)),
    ([0.1, 0.5, 0.5, 0.4, 0.6, 0.6, 0.6, 0.6], dict(patience=2, mode="max")),
    ([0.1, 0.5, 0.7, 0.6, 0.9, 0.95, 0.96], dict(patience=2, mode="max", min_delta=0.05)),
    ([1, 0.5, 0.2, 0.1], dict(patience=3, stopping_threshold=0.3)),
    ([1, 2, 6, 1], dict(patience=3, divergence_threshold=5)),
    ([3, 2, NAN, 1], dict(patience=3, check_finite=True)),
    ([3, NAN, NAN, NAN, 1], dict(patience=3, check_finite=False)),
    ([NAN, 3, 2, 2, 2, 2], dict(patience=2, check_finite=False)),
    ([5, 4, 3, 2, 1], dict(patience=1)),  # never stops
]


@pytest.mark.parametrize("values, kwargs", LIGHTNING_CASES, ids=[str(i) for i in range(len(LIGHTNING_CASES))])
def test_early_stopping_lightning_rule_decides_as_lightnings_trainer(values, kwargs):
    kwargs = {"check_finite": False, **kwargs}  # ours defaults to False, Lightning's to True: set it
    theirs = _lightning_run(values, **kwargs)
    ours = _ours(values, **kwargs)
    stopped, stopped_epoch, message, epochs = theirs
    assert ours[0] == stopped
    if stopped:
        assert ours[1] == stopped_epoch and ours[3] == stopped_epoch + 1
        assert ours[2] == message
    else:
        assert ours[3] == len(values) == epochs


def test_early_stopping_lightning_rule_keras_documented_plateau():
    # Keras's EarlyStopping documentation: with patience=3, a loss that never improves after the
    # first epoch runs 4 epochs (its example: `len(history.history['loss'])  # Only 4 epochs are run.`).
    assert _ours([0.0] * 10, patience=3)[3] == 4
    # The seed's rule counts an equal value as an improvement: it never stops there (unchanged).
    seed = fused_optim.EarlyStopping(patience=3)
    assert not any(seed(0.0) for _ in range(10))


def test_early_stopping_rule_is_checked():
    with pytest.raises(ValueError, match="rule"):
        fused_optim.EarlyStopping(rule="keras")
