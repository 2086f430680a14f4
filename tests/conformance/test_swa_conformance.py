"""What PyTorch's own tests of torch.optim.swa_utils (test/optim/test_swa_utils.py) assert about
the averaging functions inside AveragedModel, checked with fused_optim's get_ema_multi_avg_fn /
get_swa_multi_avg_fn plugged in, on the native and the reference kernels. Each test names the
upstream test it mirrors; the facts are PyTorch's, the code is ours.

Upstream items for things fused_optim does not provide (listed, not tested here):
- test_update_bn_dnn, test_update_bn_cnn, test_bn_update_eval_momentum: update_bn (BatchNorm
  statistics recomputed over a loader) is torch's, used as is with fused_optim.
- test_averaged_model_default_avg_fn_picklable: AveragedModel's default average (no
  multi_avg_fn given) is torch's own. (fused_optim's SWA function is a module-level function and
  pickles; the EMA one is a closure over decay, as torch's is.)
"""

from __future__ import annotations

import itertools
import pickle

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

import fused_optim

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _dnn(device):
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 5, kernel_size=3),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(kernel_size=2),
        torch.nn.BatchNorm2d(5, momentum=0.3),
        torch.nn.Conv2d(5, 2, kernel_size=3),
        torch.nn.ReLU(),
        torch.nn.Linear(5, 5),
        torch.nn.ReLU(),
        torch.nn.Linear(5, 10),
    ).to(device)


def _run_averaged_steps(dnn, swa_device, ema, decay=0.999, n_updates=10):
    """_run_averaged_steps: 10 updates with random steps of the model; the expected average is
    the EMA written out (the first update copies) or the plain mean of the 10 models."""
    fn = fused_optim.get_ema_multi_avg_fn(decay) if ema else fused_optim.get_swa_multi_avg_fn()
    averaged_dnn = AveragedModel(dnn, device=swa_device, multi_avg_fn=fn)
    expected = [torch.zeros_like(p) for p in dnn.parameters()]
    for i in range(n_updates):
        for p, e in zip(dnn.parameters(), expected):
            p.detach().add_(torch.randn_like(p))
            if ema:
                e += p.detach() * decay ** (n_updates - i - 1) * ((1 - decay) if i > 0 else 1.0)
            else:
                e += p.detach() / n_updates
        averaged_dnn.update_parameters(dnn)
    return expected, averaged_dnn


# test_averaged_model_all_devices: the averages equal the formula, the averaged model lives on
# swa_device (and so does n_averaged), the model's parameters stay on theirs.
@pytest.mark.parametrize("ema", [True, False])
@pytest.mark.parametrize("net_device, swa_device", list(itertools.product(DEVICES, DEVICES)))
def test_averaged_model_all_devices(backend, ema, net_device, swa_device):
    dnn = _dnn(net_device)
    expected, averaged_dnn = _run_averaged_steps(dnn, torch.device(swa_device), ema)
    for e, p in zip(expected, averaged_dnn.parameters()):
        torch.testing.assert_close(p, e.to(p.device))
        assert p.device.type == swa_device
        assert e.device.type == net_device
    assert averaged_dnn.n_averaged.device.type == swa_device


# test_averaged_model_mixed_device: a model with layers on two devices (skipped without CUDA).
@pytest.mark.parametrize("ema", [True, False])
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_averaged_model_mixed_device(backend, ema):
    dnn = torch.nn.Sequential(torch.nn.Conv2d(1, 5, kernel_size=3), torch.nn.Linear(5, 10))
    dnn[0].cuda()
    dnn[1].cpu()
    expected, averaged_dnn = _run_averaged_steps(dnn, None, ema)
    for e, p in zip(expected, averaged_dnn.parameters()):
        torch.testing.assert_close(p, e)
        assert p.device == e.device


# test_averaged_model_state_dict: a second AveragedModel loading the first's state dict has the
# same parameters and n_averaged.
@pytest.mark.parametrize("ema", [True, False])
def test_averaged_model_state_dict(backend, ema):
    dnn = torch.nn.Sequential(torch.nn.Conv2d(1, 5, kernel_size=3), torch.nn.Linear(5, 10))
    fn = fused_optim.get_ema_multi_avg_fn(0.9) if ema else fused_optim.get_swa_multi_avg_fn()
    first, second = AveragedModel(dnn, multi_avg_fn=fn), AveragedModel(dnn, multi_avg_fn=fn)
    for _ in range(10):
        for p in dnn.parameters():
            p.detach().add_(torch.randn_like(p))
        first.update_parameters(dnn)
    second.load_state_dict(first.state_dict())
    for a, b in zip(first.parameters(), second.parameters()):
        torch.testing.assert_close(a, b)
    assert first.n_averaged == second.n_averaged


# test_averaged_model_exponential (use_multi_avg_fn=True, use_buffers True and False): 10 EMA
# updates with decay 0.9 equal the written-out EMA of every parameter, and with use_buffers of
# every floating, non-scalar buffer (BatchNorm statistics); without use_buffers the buffers are
# the model's own.
@pytest.mark.parametrize("use_buffers", [True, False])
def test_averaged_model_exponential(backend, use_buffers):
    dnn = torch.nn.Sequential(
        torch.nn.Conv2d(1, 5, kernel_size=3), torch.nn.BatchNorm2d(5, momentum=0.3), torch.nn.Linear(5, 10)
    )
    decay = 0.9
    averaged_dnn = AveragedModel(dnn, multi_avg_fn=fused_optim.get_ema_multi_avg_fn(decay), use_buffers=use_buffers)
    tracked = list(itertools.chain(dnn.parameters(), dnn.buffers())) if use_buffers else list(dnn.parameters())
    expected = [torch.zeros_like(p) for p in tracked if p.size() != torch.Size([])]
    for i in range(10):
        updated = []
        for p, e in zip([p for p in tracked if p.size() != torch.Size([])], expected):
            p.detach().add_(torch.randn_like(p))
            updated.append(p.clone() if i == 0 else (e * decay + p * (1 - decay)).clone())
        averaged_dnn.update_parameters(dnn)
        expected = updated
    if use_buffers:
        ours = [t for t in itertools.chain(averaged_dnn.module.parameters(), averaged_dnn.module.buffers())
                if t.size() != torch.Size([])]
        for e, t in zip(expected, ours):
            torch.testing.assert_close(t, e)
    else:
        for e, t in zip(expected, averaged_dnn.parameters()):
            torch.testing.assert_close(t, e)
        for b, ours in zip(dnn.buffers(), averaged_dnn.module.buffers()):
            torch.testing.assert_close(ours, b)


# test_averaged_model_default_avg_fn_picklable, for our SWA function: it pickles.
def test_swa_multi_avg_fn_pickles(backend):
    dnn = torch.nn.Sequential(torch.nn.Conv2d(1, 5, kernel_size=3), torch.nn.BatchNorm2d(5), torch.nn.Linear(5, 5))
    pickle.dumps(AveragedModel(dnn, multi_avg_fn=fused_optim.get_swa_multi_avg_fn()))
