"""Weight averaging and EMA/SWA updates against plain fp64 references, the seed's
average_model_weights and torch.optim.swa_utils."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_multi_avg_fn

import fused_optim
from helpers import DTYPES, assert_close_to_fp64, native_cuda_test, opcheck

SIZES = (1000, 70001, 3, 1, 0)


def make_lists(k, dtype, device, sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(n, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for n in sizes] for _ in range(k)]


def fp64_average(lists, weights):
    total = sum(weights)
    return [sum(w / total * tl[i].double() for w, tl in zip(weights, lists)) for i in range(len(lists[0]))]


@pytest.mark.parametrize("k", [1, 2, 5, 8, 11])  # 11: beyond one CUDA pass (8 inputs), folded
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


@pytest.mark.parametrize("dtype, w", [(torch.float16, 2049 / 8), (torch.bfloat16, 257 / 8)])
def test_nine_inputs_round_once(backend, device, dtype, w):
    # Eight inputs sum to 2049 (fp16; 257 for bf16), between two representable values, and the
    # ninth adds 1: rounded once, the sum is 2050 (258); rounded after the first eight too (CUDA
    # folds K > 8 in passes), it would be 2048 (256).
    ones = [[torch.ones(3, dtype=dtype, device=device)] for _ in range(9)]
    inputs = [t for lst in ones for t in lst]
    out = torch.ops.fused_optim.multi_tensor_weighted_sum(inputs, [w] * 8 + [1.0])[0]
    assert out.tolist() == [8 * w + 1] * 3  # 2050 (258), exact in the dtype


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


@pytest.mark.parametrize("k", [3, 10])
def test_average_into_the_last_input_list(backend, device, k):
    # The output aliases the list read last (in a later pass where CUDA folds K > 8 inputs).
    lists = make_lists(k, torch.float64, device, sizes=(70001, 5))
    expected = fp64_average(lists, [1.0] * k)
    out = fused_optim.average_tensors(lists, out=lists[-1])
    for o, e in zip(out, expected):
        torch.testing.assert_close(o, e)


def test_ops_opcheck(backend, device):
    lists = make_lists(3, torch.float32, device, sizes=(7, 5))
    out = [torch.empty_like(t) for t in lists[0]]
    opcheck(torch.ops.fused_optim.multi_tensor_weighted_sum_, ([t for tl in lists for t in tl], [0.2, 0.3, 0.5], out))
    opcheck(torch.ops.fused_optim.multi_tensor_weighted_sum, ([t for tl in lists for t in tl], [0.2, 0.3, 0.5]))
    opcheck(torch.ops.fused_optim.multi_tensor_lerp_, ([t.clone() for t in lists[0]], lists[1], torch.tensor(0.1, device=device)))


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
    # The first state dict decides the tying and the key order (docs/api.md, Averaging): a later one's entry under
    # the tied key is not read.
    untied = {k: v.clone() for k, v in reversed(sds[1].items())}
    untied["out.weight"].fill_(1e6)
    mixed = fused_optim.average_state_dicts([sds[0], untied])
    assert list(mixed) == list(sds[0]) and mixed["out.weight"] is mixed["embed.weight"]
    torch.testing.assert_close(mixed["embed.weight"], (sds[0]["embed.weight"] + untied["embed.weight"]) / 2)
    model = fused_optim.average_model_weights(models, weights=[1, 2, 3])
    assert model.out.weight is model.embed.weight


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda sd: sd.pop("0.bias"), r"state_dicts\[1\] lacks the key '0.bias'"),
        (lambda sd: sd.__setitem__("extra", torch.zeros(1)), r"state_dicts\[1\] has the key 'extra'"),
        (lambda sd: sd.__setitem__("3.weight", torch.zeros(2, 16)), r"\['3.weight'\] is torch.float32\[2, 16\]"),
        (lambda sd: sd.__setitem__("0.weight", sd["0.weight"].double()), r"\['0.weight'\] is torch.float64"),
    ],
    ids=["missing-key", "extra-key", "shape", "dtype"],
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


@pytest.mark.parametrize("dtype", DTYPES)
def test_ema_update_tensor_decay_equals_float_decay(backend, device, dtype):
    # A tensor decay (on the CPU or the device) is never read on the host; same bits as a float.
    averaged, current = make_lists(2, dtype, device)
    expected = [t.clone() for t in averaged]
    fused_optim.ema_update_(expected, current, 0.97)
    for where in ("cpu", device):
        got = [t.clone() for t in averaged]
        fused_optim.ema_update_(got, current, torch.tensor(0.97, dtype=torch.float64, device=where))
        assert all(torch.equal(g, e) for g, e in zip(got, expected))


@pytest.mark.parametrize(
    "weight, exc, fragment",
    [(torch.tensor([0.1, 0.2]), RuntimeError, "one element"), (torch.tensor(1), RuntimeError, "floating tensor"),
     (torch.tensor(float("nan")), ValueError, "must be finite"), (torch.tensor(float("inf")), ValueError, "must be finite")],
    ids=["two-elements", "integer", "nan", "inf"],
)
def test_lerp_op_rejects_bad_weight_and_writes_nothing(backend, weight, exc, fragment):
    averaged, current = make_lists(2, torch.float32, "cpu", sizes=(4, 5))
    before = [t.clone() for t in averaged]
    with pytest.raises(exc, match=fragment):
        torch.ops.fused_optim.multi_tensor_lerp_(averaged, current, weight)
    assert all(torch.equal(a, b) for a, b in zip(averaged, before))


def test_ema_bad_decay_and_mismatch_change_nothing(backend):
    averaged, current = make_lists(2, torch.float32, "cpu", sizes=(4, 5))
    before = [t.clone() for t in averaged]
    with pytest.raises(ValueError, match="decay must be in"):
        fused_optim.ema_update_(averaged, current, 1.5)
    with pytest.raises(RuntimeError, match=r"current\[1\] must match averaged\[1\]"):
        fused_optim.ema_update_(averaged, [current[0], torch.zeros(6)], 0.9)
    assert all(torch.equal(a, b) for a, b in zip(averaged, before))


def _bad_calls():
    """(call on lists a, b of two tensors (sizes 4, 5) and c, exception, what its message says): the
    public functions' errors name the caller's arguments, not the op's (self, end, out, inputs)."""
    ints = [torch.arange(4), torch.arange(5)]
    odd = [torch.zeros(4), torch.zeros(6)]
    nan = torch.tensor(float("nan"))
    ema, swa, avg = fused_optim.ema_update_, fused_optim.swa_update_, fused_optim.average_tensors
    return {
        "ema-integer": (lambda a, b, c: ema(ints, b, 0.5), TypeError, r"averaged\[0\] must be a real floating tensor"),
        "ema-length": (lambda a, b, c: ema(a, b[:1], 0.5), ValueError, r"averaged and current must have the same length"),
        "ema-shape": (lambda a, b, c: ema(a, odd, 0.5), RuntimeError, r"current\[1\] must match averaged\[1\]"),
        "ema-not-tensor": (lambda a, b, c: ema(a, [1.0, 2.0], 0.5), TypeError, r"current\[0\] must be a tensor, got float"),
        "ema-expanded": (lambda a, b, c: ema([torch.zeros(1).expand(4), a[1]], b, 0.5), RuntimeError, r"averaged\[0\]: unsupported"),
        "ema-overlap": (lambda a, b, c: ema([c[0][:4], a[1]], [c[0][1:5], b[1]], 0.5), RuntimeError, r"averaged\[0\] and current\[0\]: unsupported"),
        "ema-nan-tensor": (lambda a, b, c: ema(a, b, nan), ValueError, r"decay must be in \[0, 1\], got nan"),
        "ema-tensor-1.5": (lambda a, b, c: ema(a, b, torch.tensor(1.5)), ValueError, r"decay must be in \[0, 1\], got 1.5"),
        "swa-negative-tensor": (lambda a, b, c: swa(a, b, torch.tensor(-1)), ValueError, r"num_averaged must be >= 0, got -1"),
        "swa-negative": (lambda a, b, c: swa(a, b, -1), ValueError, r"num_averaged must be >= 0, got -1"),
        "swa-shape": (lambda a, b, c: swa(a, odd, 3), RuntimeError, r"current\[1\] must match averaged\[1\]"),
        "avg-integer": (lambda a, b, c: avg([ints, ints]), TypeError, r"tensor_lists\[0\]\[0\] must be a real floating tensor"),
        "avg-not-tensor": (lambda a, b, c: avg([[1.0], [2.0]]), TypeError, r"tensor_lists\[0\]\[0\] must be a tensor, got float"),
        "avg-shape": (lambda a, b, c: avg([a, odd]), RuntimeError, r"tensor_lists\[1\]\[1\] must match tensor_lists\[0\]\[1\]"),
        "avg-out-length": (lambda a, b, c: avg([a, b], out=c[:1]), ValueError, r"out and tensor_lists\[0\] must have the same length"),
        "avg-out-shape": (lambda a, b, c: avg([a, b], out=[c[0][:4], c[0][:6]]), RuntimeError, r"tensor_lists\[0\]\[1\] must match out\[1\]"),
        "avg-out-integer": (lambda a, b, c: avg([a, b], out=ints), TypeError, r"out\[0\] must be a real floating tensor"),
        "avg-out-overlap": (lambda a, b, c: avg([[c[0][1:5]], [b[0]]], out=[c[0][:4]]), RuntimeError, r"out\[0\] and tensor_lists\[0\]\[0\]: unsupported"),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_errors_name_the_arguments_and_write_nothing(backend, name):
    call, exc, fragment = _bad_calls()[name]
    a, b = make_lists(2, torch.float32, "cpu", sizes=(4, 5))
    c = [torch.randn(9), torch.randn(5)]
    snapshot = [t.clone() for t in (*a, *b, *c)]
    with pytest.raises(exc, match=fragment):
        call(a, b, c)
    assert all(torch.equal(t, s) for t, s in zip((*a, *b, *c), snapshot))


# ---------------------------------------------------------------- ModelEMA


def _step(model, opt, x):
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def test_model_ema_matches_plain_ema_and_copies_buffers(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    ema = fused_optim.ModelEMA(model, decay=0.9)
    reference = [p.detach().double().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):
        _step(model, opt, torch.randn(16, 6))
        ema.update(model)
        reference = [0.9 * r + 0.1 * p.detach().double() for r, p in zip(reference, model.parameters())]
    for e, r in zip(ema.module.parameters(), reference):
        torch.testing.assert_close(e.double(), r, rtol=1e-5, atol=1e-6)
    for e, b in zip(ema.module.buffers(), model.buffers()):
        assert torch.equal(e, b)  # buffers="copy"
    assert int(ema.step) == 4 and not any(p.requires_grad for p in ema.parameters())
    x = torch.randn(3, 6)
    torch.testing.assert_close(ema(x), ema.module(x))


def test_model_ema_warmup_decay_follows_timm_formula(backend):
    ema = fused_optim.ModelEMA(nn.Linear(2, 2), decay=0.999, warmup=True, min_decay=0.1)
    for step in (0, 1, 10, 1000, 10**7):
        expected = min(0.999, max(0.1, 1 - (1 + step) ** (-2 / 3)))
        assert ema.get_decay(step) == pytest.approx(expected)
    assert fused_optim.ModelEMA(nn.Linear(2, 2), decay=0.9).get_decay(5) == 0.9


def test_model_ema_warmup_updates_use_the_decay_of_each_step(backend):
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    ema = fused_optim.ModelEMA(model, decay=0.99, warmup=True)
    reference = [p.detach().double().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(5):
        _step(model, opt, torch.randn(8, 6))
        ema.update(model)
        d = min(0.99, 1 - (1 + step) ** (-2 / 3))
        reference = [d * r + (1 - d) * p.detach().double() for r, p in zip(reference, model.parameters())]
    for e, r in zip(ema.module.parameters(), reference):
        torch.testing.assert_close(e.double(), r, rtol=1e-5, atol=1e-6)


def test_model_ema_averages_buffers_on_request(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    ema = fused_optim.ModelEMA(model, decay=0.5, buffers="average")
    start = ema.module[1].running_mean.clone()
    model(torch.randn(32, 4) + 3)
    ema.update(model)
    torch.testing.assert_close(ema.module[1].running_mean, 0.5 * start + 0.5 * model[1].running_mean)
    assert torch.equal(ema.module[1].num_batches_tracked, model[1].num_batches_tracked)


def test_model_ema_fp32_shadow_keeps_a_bf16_ema_moving(backend):
    model = nn.Linear(64, 64).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.5)  # bf16 spacing here is 2**-7: a 5e-4 step rounds away
    with_shadow = fused_optim.ModelEMA(model, decay=0.999)
    without = fused_optim.ModelEMA(model, decay=0.999, fp32_shadow=False)
    start = with_shadow.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(0.5)  # the model moves away; the EMA should follow by 1e-3 a step
    for _ in range(200):
        with_shadow.update(model)
        without.update(model)
    moved = (with_shadow.module.weight.float() - start.float()).mean().item()  # bf16 of the fp32 EMA
    stalled = (without.module.weight.float() - start.float()).abs().max().item()
    assert moved == pytest.approx(0.5 * (1 - 0.999**200), abs=2**-7)
    assert stalled == 0.0  # in bf16 every step rounds back: the problem the shadow solves


def test_model_ema_state_dict_round_trip(backend):
    torch.manual_seed(0)
    model = nn.Linear(5, 3).to(torch.bfloat16)
    ema = fused_optim.ModelEMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    restored = fused_optim.ModelEMA(nn.Linear(5, 3).to(torch.bfloat16), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    for a, b in zip(ema.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(a, b)
    assert int(restored.step) == 1


# ---------------------------------------------------------------- soups


def _train_models_on_synthetic_data(k):
    torch.manual_seed(0)
    centers = torch.randn(3, 10) * 2
    labels = torch.randint(0, 3, (600,))
    data = centers[labels] + torch.randn(600, 10)
    train, held_out = (data[:400], labels[:400]), (data[400:], labels[400:])
    base = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    models = []
    for m in range(k):  # fine-tunes of one start, as soups assume
        model = copy.deepcopy(base)
        torch.manual_seed(100 + m)
        opt = torch.optim.SGD(model.parameters(), lr=0.05 * (m + 1))
        for _ in range(30):
            idx = torch.randint(0, 400, (64,))
            opt.zero_grad()
            nn.functional.cross_entropy(model(train[0][idx]), train[1][idx]).backward()
            opt.step()
        models.append(model)

    def accuracy(model):
        with torch.no_grad():
            return (model(held_out[0]).argmax(-1) == held_out[1]).float().mean().item()

    return models, accuracy


def test_greedy_soup_on_a_small_training_run(backend):
    models, accuracy = _train_models_on_synthetic_data(4)
    soup, chosen = fused_optim.greedy_soup(models, accuracy)
    individual = [accuracy(m) for m in models]
    assert chosen[0] == max(range(4), key=lambda i: individual[i])
    assert accuracy(soup) >= max(individual)
    expected = fused_optim.average_model_weights([models[i] for i in chosen])
    for a, b in zip(soup.parameters(), expected.parameters()):
        torch.testing.assert_close(a, b)
    uniform = fused_optim.uniform_soup(models)
    for a, b in zip(uniform.parameters(), fused_optim.average_model_weights(models).parameters()):
        torch.testing.assert_close(a, b)


def test_greedy_soup_keeps_a_model_only_if_the_score_improves(backend):
    models = [nn.Linear(2, 2) for _ in range(3)]
    scores = iter([0.5, 0.9, 0.7, 0.9, 0.95])  # individual: 0.5, 0.9, 0.7; then soups {1,2}: 0.9, {1,0}: 0.95
    soup, chosen = fused_optim.greedy_soup(models, lambda m: next(scores))
    assert chosen == [1, 0]


def test_compile_fullgraph(backend):
    lists = make_lists(3, torch.float32, "cpu", sizes=(6, 4))
    averaged = [t.clone() for t in lists[0]]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(inputs, avg, cur):
        out = torch.ops.fused_optim.multi_tensor_weighted_sum.default(inputs, [0.2, 0.3, 0.5])
        torch.ops.fused_optim.multi_tensor_lerp_.default(avg, cur, torch.tensor(0.1))
        return out

    out = step([t for tl in lists for t in tl], averaged, lists[1])
    for o, e in zip(out, fp64_average(lists, [0.2, 0.3, 0.5])):
        torch.testing.assert_close(o.double(), e, rtol=1e-6, atol=1e-6)
    for a, s, c in zip(averaged, lists[0], lists[1]):
        torch.testing.assert_close(a, torch.lerp(s, c, 0.1))


@native_cuda_test
def test_cuda_model_ema_warmup_update_makes_no_host_sync():
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64)).cuda().to(torch.bfloat16)
    ema = fused_optim.ModelEMA(model, decay=0.999, warmup=True).cuda()  # step and shadows on the GPU
    ema.update(model)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ema.update(model)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(ema.step) == 2


def test_model_ema_swapped_into_the_model_and_back(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    ema = fused_optim.ModelEMA(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 4)).square().mean().backward()
        opt.step()
        ema.update(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 4)
    model.eval(), ema.eval()
    with ema.swapped_into(model) as swapped:
        assert swapped is model
        torch.testing.assert_close(model(x), ema.module(x), rtol=0, atol=0)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ema.module.state_dict().values()))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="inside"):
        with ema.swapped_into(model):
            raise RuntimeError("inside")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    other = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    snapshot = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="parameter"):
        with ema.swapped_into(other):
            pass
    assert all(torch.equal(snapshot[k], v) for k, v in other.state_dict().items())
