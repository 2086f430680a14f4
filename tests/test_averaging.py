"""Weight averaging and EMA/SWA updates against plain fp64 references, the seed's
average_model_weights and torch.optim.swa_utils."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_multi_avg_fn

import fused_optim
from conftest import DTYPES, HALF_DTYPES, assert_close_to_fp64

SIZES = (1000, 70001, 3, 1, 0)


def make_lists(k, dtype, device, sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(n, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for n in sizes] for _ in range(k)]


def fp64_average(lists, weights):
    total = sum(weights)
    return [sum(w / total * tl[i].double() for w, tl in zip(weights, lists)) for i in range(len(lists[0]))]


@pytest.mark.parametrize("k", [1, 2, 5, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_average_tensors_matches_fp64(backend, device, dtype, k):
    lists = make_lists(k, dtype, device)
    weights = [float(m + 1) for m in range(k)]  # sum != 1: normalized
    out = fused_optim.average_tensors(lists, weights)
    expected = fp64_average(lists, weights)
    for i, (o, e) in enumerate(zip(out, expected)):
        assert o.dtype == dtype and o.shape == lists[0][i].shape
        plain = sum(w / sum(weights) * tl[i] for w, tl in zip(weights, lists))  # same dtype, torch
        assert_close_to_fp64(o, e, plain, dtype)


def test_average_tensors_uniform_mixed_dtypes_views_and_aliasing(backend, device):
    base = [torch.randn(30, 20, device=device, dtype=torch.float64) for _ in range(3)]
    lists = [[b.t(), b[::2].to(torch.float32), b[:, 0].to(torch.bfloat16)] for b in base]
    expected = fp64_average(lists, [1, 1, 1])
    into_first = fused_optim.average_tensors(lists, out=lists[0])
    assert into_first[0] is lists[0][0]
    for o, e in zip(into_first, expected):
        tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[o.dtype]
        torch.testing.assert_close(o.double(), e, rtol=tol, atol=tol)
    assert torch.equal(base[0].t(), lists[0][0])  # the transposed view wrote through


def test_ops_opcheck(backend, device):
    lists = make_lists(3, torch.float32, device, sizes=(7, 5))
    out = [torch.empty_like(t) for t in lists[0]]
    torch.library.opcheck(torch.ops.fused_optim.multi_tensor_weighted_sum_, ([t for tl in lists for t in tl], [0.2, 0.3, 0.5], out))
    torch.library.opcheck(torch.ops.fused_optim.multi_tensor_weighted_sum, ([t for tl in lists for t in tl], [0.2, 0.3, 0.5]))
    torch.library.opcheck(torch.ops.fused_optim.multi_tensor_lerp_, ([t.clone() for t in lists[0]], lists[1], 0.1))


# ---------------------------------------------------------------- state dicts and models


def seed_average_model_weights(models):
    """The seed's function, verbatim in behaviour."""
    avg_model = copy.deepcopy(models[0])
    avg_dict = avg_model.state_dict()
    for key in avg_dict.keys():
        avg_dict[key] = avg_dict[key].clone()
        for model in models[1:]:
            avg_dict[key] += model.state_dict()[key]
        avg_dict[key] = avg_dict[key] / len(models)
    avg_model.load_state_dict(avg_dict)
    return avg_model


def make_models(k):
    models = []
    for m in range(k):
        torch.manual_seed(m)
        model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
        model.train()
        model(torch.randn(8, 6))  # BatchNorm running stats and num_batches_tracked move
        for _ in range(m):
            model(torch.randn(8, 6))
        models.append(model)
    return models


def test_average_model_weights_matches_seed(backend):
    models = make_models(4)
    ours = fused_optim.average_model_weights(models)
    seed = seed_average_model_weights(models)
    for (key, a), b in zip(ours.state_dict().items(), seed.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b)
        else:  # documented rule: integer buffers come from the first model
            assert torch.equal(a, models[0].state_dict()[key]), key
    assert ours is not models[0] and type(ours) is type(models[0])


def test_average_state_dicts_weighted_and_tied(backend):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.embed.weight

    models = []
    for m in range(3):
        torch.manual_seed(m)
        models.append(Tied())
    sds = [m.state_dict() for m in models]
    averaged = fused_optim.average_state_dicts(sds, weights=[1, 2, 3])
    expected = sum(w / 6 * sd["embed.weight"].double() for w, sd in zip([1, 2, 3], sds))
    torch.testing.assert_close(averaged["embed.weight"].double(), expected)
    assert averaged["out.weight"] is averaged["embed.weight"]  # tied: averaged once, shared
    model = fused_optim.average_model_weights(models, weights=[1, 2, 3])
    assert model.out.weight is model.embed.weight


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda sd: sd.pop("0.bias"), "first differing key '0.bias'"),
        (lambda sd: sd.__setitem__("3.weight", torch.zeros(2, 16)), r"\['3.weight'\] is torch.float32\[2, 16\]"),
        (lambda sd: sd.__setitem__("0.weight", sd["0.weight"].double()), r"\['0.weight'\] is torch.float64"),
    ],
    ids=["missing-key", "shape", "dtype"],
)
def test_mismatched_state_dicts_raise_before_anything(backend, mutate, fragment):
    models = make_models(2)
    sds = [m.state_dict() for m in models]
    mutate(sds[1])
    before = [{k: v.clone() for k, v in sd.items()} for sd in sds]
    with pytest.raises(ValueError, match=fragment):
        fused_optim.average_state_dicts(sds)
    for sd, b in zip(sds, before):
        assert all(torch.equal(sd[k], b[k]) for k in sd)


@pytest.mark.parametrize("weights, fragment", [([1.0], "one weight per model"), ([1.0, -1.0], ">= 0"), ([0, 0], "not all 0"), ([1.0, float("nan")], "finite")])
def test_bad_weights_raise(backend, weights, fragment):
    with pytest.raises(ValueError, match=fragment):
        fused_optim.average_tensors(make_lists(2, torch.float32, "cpu"), weights)


def test_op_rejects_mismatched_inputs_and_writes_nothing(backend):
    lists = make_lists(2, torch.float32, "cpu", sizes=(5, 6))
    out = [torch.zeros(5), torch.zeros(7)]
    with pytest.raises(RuntimeError, match=r"inputs \(list 0\)\[1\] must match out\[1\]"):
        torch.ops.fused_optim.multi_tensor_weighted_sum_.default([t for tl in lists for t in tl], [0.5, 0.5], out)
    assert all(torch.equal(o, torch.zeros_like(o)) for o in out)
    with pytest.raises(ValueError, match="len\\(weights\\) \\* len\\(out\\)"):
        torch.ops.fused_optim.multi_tensor_weighted_sum_.default(lists[0], [0.5, 0.5], lists[1])


# ---------------------------------------------------------------- EMA and SWA


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", [0.999, 0.9, 0.3])
def test_ema_update_matches_torch_swa_utils(backend, device, dtype, decay):
    averaged, current = make_lists(2, dtype, device)
    theirs = [t.clone() for t in averaged]
    fused_optim.ema_update_(averaged, current, decay)
    get_ema_multi_avg_fn(decay)(theirs, current, torch.tensor(3))
    for a, b, cur, t0 in zip(averaged, theirs, current, make_lists(2, dtype, device)[0]):
        expected = decay * t0.double() + (1 - decay) * cur.double()
        assert_close_to_fp64(a, expected, b, dtype)


@pytest.mark.parametrize("num_averaged", [0, 1, 7, torch.tensor(4)])
def test_swa_update_matches_torch_swa_utils(backend, device, num_averaged):
    averaged, current = make_lists(2, torch.float32, device)
    theirs = [t.clone() for t in averaged]
    fused_optim.swa_update_(averaged, current, num_averaged)
    get_swa_multi_avg_fn()(theirs, current, torch.as_tensor(num_averaged))
    for a, b in zip(averaged, theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["ema", "swa"])
def test_plugs_into_averaged_model(backend, kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 2))
    if kind == "ema":
        ours = AveragedModel(model, multi_avg_fn=fused_optim.get_ema_multi_avg_fn(0.8))
        theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    else:
        ours = AveragedModel(model, multi_avg_fn=fused_optim.get_swa_multi_avg_fn())
        theirs = AveragedModel(model, multi_avg_fn=get_swa_multi_avg_fn())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(4, 5)).square().mean().backward()
        opt.step()
        ours.update_parameters(model)
        theirs.update_parameters(model)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b)


def test_ema_bad_decay_and_mismatch_change_nothing(backend):
    averaged, current = make_lists(2, torch.float32, "cpu", sizes=(4, 5))
    before = [t.clone() for t in averaged]
    with pytest.raises(ValueError, match="decay must be in"):
        fused_optim.ema_update_(averaged, current, 1.5)
    with pytest.raises(RuntimeError, match=r"end\[1\] must match self\[1\]"):
        fused_optim.ema_update_(averaged, [current[0], torch.zeros(6)], 0.9)
    assert all(torch.equal(a, b) for a, b in zip(averaged, before))
