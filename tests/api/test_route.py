"""The path each public function takes (fused_optim/_route.py), asserted for every kind of input,
read back with fused_optim.last_route(): flattened parameters, the views of one buffer, a plain
list, DTensors and a process group. The results themselves are compared with torch elsewhere
(test_flat.py, test_clip_grad.py, ...); here the path, and that an error inside a path propagates
instead of being retried on another."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import fused_optim
from fused_optim import _library

# Without the extension (or on the reference kernels' subprocess run) the fast paths do not exist.
NATIVE = _library._C is not None


def fast(path: str) -> str:
    return path if NATIVE else "per_tensor"


def _model(dtypes=(torch.float32,)) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Linear(4, 4).to(d) for d in dtypes])
    x = torch.randn(3, 4)
    for layer in m:
        layer(x.to(layer.weight.dtype)).float().square().sum().backward()
    return m


def _buffer_views(n=4, size=6):
    """Leaves of 1 buffer: the parameters and the gradients as consecutive views."""
    data, grad = torch.randn(n * size), torch.randn(n * size)
    params = [nn.Parameter(data[i * size:(i + 1) * size]) for i in range(n)]
    for i, p in enumerate(params):
        p.grad = grad[i * size:(i + 1) * size]
    return params


def _plain(n=4, size=6):
    params = [nn.Parameter(torch.randn(size)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(size)
    return params


CALLS = {
    "clip_grad_norm_": lambda ps: fused_optim.clip_grad_norm_(ps, 1e-3),
    "clip_grad_value_": lambda ps: fused_optim.clip_grad_value_(ps, 1e-3),
    "clip_grads_with_norm_": lambda ps: fused_optim.clip_grads_with_norm_(ps, 1e-3, torch.tensor(2.0)),
    "get_total_norm": lambda ps: fused_optim.get_total_norm([p.grad for p in ps]),
    "l1l2_penalty": lambda ps: fused_optim.l1l2_penalty(ps, 1e-3, 1e-2),
    "l1l2_grad_": lambda ps: fused_optim.l1l2_grad_(ps, 1e-3, 1e-2),
    "pre_step_": lambda ps: fused_optim.pre_step_(ps, 1e-3, 1e-2, max_norm=1e-3),
}

# What each function is given: flattened parameters; views of one buffer not flattened by us;
# a plain list. get_total_norm takes gradients, not parameters: never the flat path, but the
# flattened parameters' gradients are views of one buffer.
EXPECTED = {
    "flattened": {name: "flat" for name in CALLS} | {"get_total_norm": "one_view"},
    "one buffer": {name: "one_view" for name in CALLS},
    "plain": {name: "per_tensor" for name in CALLS},
}


@pytest.mark.parametrize("kind", EXPECTED)
@pytest.mark.parametrize("name", CALLS)
def test_path_of_each_public_function(backend, kind, name):
    if kind == "flattened":
        m = _model()
        fused_optim.flatten_parameters(m)
        params = list(m.parameters())
    else:
        params = _buffer_views() if kind == "one buffer" else _plain()
    with torch.no_grad() if name == "l1l2_penalty" else torch.enable_grad():
        CALLS[name](params)
    assert fused_optim.last_route() == (name, fast(EXPECTED[kind][name]))


@pytest.mark.parametrize("name", ["l1l2_penalty"])
def test_a_penalty_with_an_autograd_graph_runs_per_tensor(backend, name):
    m = _model()
    fused_optim.flatten_parameters(m)
    fused_optim.l1l2_penalty(m.parameters(), 1e-3, 1e-2).backward()
    assert fused_optim.last_route() == ("l1l2_penalty", "per_tensor")


def test_generator_of_a_flattened_model_takes_the_flat_path(backend):
    m = _model()
    fused_optim.flatten_parameters(m)
    fused_optim.clip_grad_norm_(m.parameters(), 1e-3)
    assert fused_optim.last_route() == ("clip_grad_norm_", fast("flat"))
    fused_optim.clip_grad_norm_(list(m.parameters())[1:], 1e-3)  # a part: its views, not the flat object
    assert fused_optim.last_route() == ("clip_grad_norm_", fast("one_view"))
    fused_optim.clip_grad_norm_(list(m.parameters())[::-1], 1e-3)  # another order: per tensor
    assert fused_optim.last_route() == ("clip_grad_norm_", "per_tensor")


def test_default_zero_grad_loop_takes_the_flat_path(backend):
    # torch's default optimizer.zero_grad() (set_to_none=True): backward makes new gradients,
    # which the call brings into the buffer once, then runs on it.
    m = _model()
    fused_optim.flatten_parameters(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(3, 4)).square().sum().backward()
        fused_optim.pre_step_(m.parameters(), 1e-3, 1e-2, max_norm=1.0)
        assert fused_optim.last_route() == ("pre_step_", fast("flat"))
        grad_buffer = m[0].weight.grad._base
        assert NATIVE is (grad_buffer is not None and all(p.grad._base is grad_buffer for p in m.parameters()))
        opt.step()


def test_mixed_dtypes_and_the_model_ema(backend):
    m = _model((torch.float32, torch.float64))
    fused_optim.flatten_parameters(m)
    fused_optim.clip_grad_norm_(m.parameters(), 1e-3)
    assert fused_optim.last_route() == ("clip_grad_norm_", fast("flat"))  # one buffer per dtype
    ema = fused_optim.ModelEMA(m, flat=True)
    ema.update(m)
    assert fused_optim.last_route() == ("ModelEMA.update", "flat")  # its own buffers: one lerp call, any backend


def test_order_zero_and_frozen_gradients_run_per_tensor(backend):
    m = _model()
    fused_optim.flatten_parameters(m)
    fused_optim.clip_grad_norm_(m.parameters(), 1e-3, norm_type=0)  # counts tensors: not a flat norm
    assert fused_optim.last_route() == ("clip_grad_norm_", "per_tensor")
    m[0].weight.requires_grad_(False)  # a gradient on a frozen parameter: the penalty skips it
    fused_optim.pre_step_(m.parameters(), 1e-3, 1e-2, max_norm=1.0)
    assert fused_optim.last_route() == ("pre_step_", "per_tensor")


@pytest.mark.skipif(not NATIVE, reason="the one-view path exists with the extension")
def test_an_error_inside_a_path_propagates_without_a_retry(monkeypatch):
    # The fast paths are chosen by inspection; an error raised on one is the call's error (the
    # per-tensor path is not tried behind it).
    params = _buffer_views()
    calls = []
    real = torch.ops.fused_optim.clip_grad_norm_.default

    def failing(grads, *args):
        calls.append(len(grads))
        raise RuntimeError("inside the path")

    monkeypatch.setattr(torch.ops.fused_optim.clip_grad_norm_, "default", failing)
    with pytest.raises(RuntimeError, match="inside the path"):
        fused_optim.clip_grad_norm_(params, 1e-3)
    assert calls == [1]  # one call, on the one view
    monkeypatch.setattr(torch.ops.fused_optim.clip_grad_norm_, "default", real)


def test_last_route_is_per_thread():
    import threading

    fused_optim.clip_grad_value_(_plain(), 1.0)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(fused_optim.last_route()))
    thread.start(), thread.join()
    assert seen == [None] and fused_optim.last_route() == ("clip_grad_value_", "per_tensor")


SHARDED_SCRIPT = textwrap.dedent(
    """
    import torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    import fused_optim

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    mesh = init_device_mesh("cpu", (1,))
    params = [torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)])) for _ in range(3)]
    for p in params:
        p.grad = distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)])
    routes = []
    for name, call in [
        ("clip_grad_norm_", lambda: fused_optim.clip_grad_norm_(params, 1e-3)),
        ("get_total_norm", lambda: fused_optim.get_total_norm([p.grad for p in params])),
        ("l1l2_grad_", lambda: fused_optim.l1l2_grad_(params, 1e-3, 1e-2)),
        ("pre_step_", lambda: fused_optim.pre_step_(params, 1e-3, 1e-2, max_norm=1.0)),
        ("l1l2_penalty", lambda: fused_optim.l1l2_penalty(params, 1e-3, 1e-2)),
    ]:
        call()
        routes.append(tuple(fused_optim.last_route()))
    plain = [torch.nn.Parameter(torch.randn(5)) for _ in range(2)]
    for p in plain:
        p.grad = torch.randn(5)
    fused_optim.clip_grad_norm_(plain, 1e-3, process_group=dist.group.WORLD)
    routes.append(tuple(fused_optim.last_route()))
    print(routes)
    dist.destroy_process_group()
    """
)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_dtensors_and_a_process_group_take_the_sharded_path():
    out = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True, timeout=300, env=dict(os.environ)
    )
    assert out.returncode == 0, out.stderr[-3000:]
    expected = [(name, "sharded") for name in ("clip_grad_norm_", "get_total_norm", "l1l2_grad_", "pre_step_", "l1l2_penalty")]
    assert eval(out.stdout.strip().splitlines()[-1]) == expected + [("clip_grad_norm_", "sharded")]
