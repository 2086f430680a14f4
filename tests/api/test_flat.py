"""Flat parameter and gradient buffers (fused_optim/flat.py): the flattened model trains as the
unflattened one, every FlatParameters method equals the per-tensor function, the public functions'
one-view fast path gives the per-tensor results (and is taken only when exact), and whatever breaks
the views is detected. On both backends (native, reference)."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings

import pytest
import torch
from torch import nn

import fused_optim
from fused_optim import _library, _route
from fused_optim._route import one_view as as_one_view
from fused_optim.flat import FlatBuffersBroken, flatten_parameters

from helpers import DTYPES, EXT_DISABLED

native_only = pytest.mark.skipif(EXT_DISABLED or _library._C is None, reason="needs the native extension")


def warns_where_native(match: str):
    """The warning that a flat call lost its one-call path: given only where that path exists."""
    return pytest.warns(UserWarning, match=match) if _library._C is not None else contextlib.nullcontext()
NORM_TYPES = (2.0, 1.0, 3.5, math.inf, -math.inf, 0.0, -1.5)


def _model(dtype=torch.float32, seed=0, device="cpu") -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.Tanh(), nn.Linear(8, 3))
    return m.to(device, dtype)


def _data(dtype=torch.float32, steps=3, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(5, 3, 6, 6, generator=g).to(device, dtype) for _ in range(steps)]


def _backward(model, x):
    model(x).float().square().mean().backward()


def _pair(dtype=torch.float32, device="cpu"):
    """A model, a copy flattened, and their gradients from the same batch."""
    plain = _model(dtype, device=device)
    flat_model = copy.deepcopy(plain)
    flat = flatten_parameters(flat_model)
    x = _data(dtype, device=device)[0]
    _backward(plain, x)
    _backward(flat_model, x)
    return plain, flat_model, flat


def _assert_grads_equal(a: nn.Module, b: nn.Module, exact=True):
    for p, q in zip(a.parameters(), b.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            if exact:
                assert torch.equal(p.grad, q.grad)
            else:
                torch.testing.assert_close(p.grad, q.grad)


# ---------------------------------------------------------------- the flattened model


def test_flatten_keeps_identity_values_and_state_dict():
    model = _model()
    before = [(n, p, p.detach().clone()) for n, p in model.named_parameters()]
    state = copy.deepcopy(model.state_dict())
    flat = flatten_parameters(model)
    assert [(n, p) for n, p, _ in before] == list(model.named_parameters())
    for _, p, value in before:
        assert torch.equal(p, value) and p.is_leaf and p.requires_grad
        assert p.untyped_storage().data_ptr() == flat.data[0].untyped_storage().data_ptr()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    changed = {k: v + 1 for k, v in state.items()}
    model.load_state_dict(changed)  # copies into the views: the buffer holds the new values
    assert all(torch.equal(v, changed[k]) for k, v in model.state_dict().items())
    assert flat.check()
    assert torch.equal(flat.data[0], torch.cat([p.detach().flatten() for p in model.parameters()]))


def test_channels_last_parameter_keeps_its_layout():
    model = _model().to(memory_format=torch.channels_last)
    stride = model[0].weight.stride()
    flatten_parameters(model)
    assert model[0].weight.stride() == stride


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("built", ["before", "after"])
def test_training_matches_unflattened(backend, device, set_to_none, optimizer, built):
    make = {
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    }[optimizer]
    plain, flat_model = _model(device=device), _model(device=device)
    opt_plain = make(plain.parameters())
    opt_flat = make(flat_model.parameters()) if built == "before" else None
    flat = flatten_parameters(flat_model)
    opt_flat = opt_flat or make(flat_model.parameters())
    for x in _data(steps=4, device=device):
        for model, opt in ((plain, opt_plain), (flat_model, opt_flat)):
            opt.zero_grad(set_to_none=set_to_none)
            _backward(model, x)
        fused_optim.l1l2_grad_(plain.parameters(), 1e-3, 1e-2)
        flat.l1l2_grad_(1e-3, 1e-2)
        torch.testing.assert_close(flat.clip_grad_norm_(0.3), fused_optim.clip_grad_norm_(plain.parameters(), 0.3))
        opt_plain.step()
        opt_flat.step()
        for p, q in zip(plain.parameters(), flat_model.parameters()):
            torch.testing.assert_close(p, q)
    # Optimizer state and checkpoints are untouched by flattening.
    restored = _model(seed=5, device=device)
    restored.load_state_dict(flat_model.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(restored.parameters(), flat_model.parameters()))
    opt_plain.load_state_dict(opt_flat.state_dict())


# ---------------------------------------------------------------- the methods = the per-tensor functions


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_norms_and_clipping_equal_per_tensor(backend, device, dtype, norm_type):
    plain, flat_model, flat = _pair(dtype, device)
    expected = fused_optim.get_total_norm([p.grad for p in plain.parameters()], norm_type)
    torch.testing.assert_close(flat.get_total_norm(norm_type), expected)
    max_norm = float(expected) / 2 if math.isfinite(float(expected)) and float(expected) > 0 else 1.0
    total = flat.clip_grad_norm_(max_norm, norm_type)
    torch.testing.assert_close(total, fused_optim.clip_grad_norm_(plain.parameters(), max_norm, norm_type))
    _assert_grads_equal(plain, flat_model, exact=False)  # the coefficient comes from a norm summed in another order


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_value_penalty_and_penalty_grad_equal_per_tensor(backend, device, dtype):
    plain, flat_model, flat = _pair(dtype, device)
    flat.clip_grad_value_(0.01)
    fused_optim.clip_grad_value_(plain.parameters(), 0.01)
    _assert_grads_equal(plain, flat_model)  # elementwise: bitwise
    flat.l1l2_grad_(1e-3, 1e-2)
    fused_optim.l1l2_grad_(plain.parameters(), 1e-3, 1e-2)
    _assert_grads_equal(plain, flat_model)
    with torch.no_grad():
        torch.testing.assert_close(flat.l1l2_penalty(1e-3, 1e-2), fused_optim.l1l2_penalty(plain.parameters(), 1e-3, 1e-2))
    # Under grad mode the penalty is differentiable, with the per-tensor gradients.
    plain.zero_grad(), flat_model.zero_grad()
    flat.l1l2_penalty(1e-3, 1e-2).backward()
    fused_optim.l1l2_penalty(list(plain.parameters()), 1e-3, 1e-2).backward()
    _assert_grads_equal(plain, flat_model, exact=False)


def test_mixed_dtypes_make_one_group_each(backend):
    plain = _model()
    plain[3].to(torch.bfloat16)
    plain[5].to(torch.float64)
    flat_model = copy.deepcopy(plain)
    flat = flatten_parameters(flat_model)
    assert len(flat.data) == 3
    for model in (plain, flat_model):
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.5)
    torch.testing.assert_close(flat.clip_grad_norm_(1.0), fused_optim.clip_grad_norm_(plain.parameters(), 1.0))
    _assert_grads_equal(plain, flat_model, exact=False)


def test_missing_gradients_are_skipped_and_never_leak(backend):
    plain, flat_model = _model(), _model()
    flat = flatten_parameters(flat_model)
    for model in (plain, flat_model):
        model[5].weight.requires_grad_(False)  # frozen: no gradient, no penalty gradient
        model(_data()[0])[:, :1].sum().backward()
        model[5].bias.grad = None  # unused this step
    # A nan norm scales every slot, the zero slots of missing gradients too; they must stay zero.
    flat_model[0].weight.grad[0, 0, 0, 0] = float("nan")
    plain[0].weight.grad[0, 0, 0, 0] = float("nan")
    assert flat.clip_grad_norm_(1.0).isnan() and fused_optim.clip_grad_norm_(plain.parameters(), 1.0).isnan()
    assert flat_model[5].weight.grad is None and flat_model[5].bias.grad is None
    assert not flat.grad[0].isnan().all() and flat.grad[0][-3:].eq(0).all()  # the last layer's slots
    flat.zero_grad()
    for p in plain.parameters():
        if p.grad is not None:
            p.grad.zero_()
    fused_optim.l1l2_grad_(plain.parameters(), 1e-3, 1e-2)
    flat.l1l2_grad_(1e-3, 1e-2)
    _assert_grads_equal(plain, flat_model)
    assert flat_model[5].weight.grad is None  # does not require grad: no gradient made
    assert flat_model[5].bias.grad is not None  # requires grad: gets one, as per tensor
    for norm_type in (2.0, -1.0, -math.inf):
        plain_norm = fused_optim.get_total_norm([p.grad for p in plain.parameters() if p.grad is not None], norm_type)
        torch.testing.assert_close(flat.get_total_norm(norm_type), plain_norm, equal_nan=True)


def test_set_to_none_gradients_land_in_the_buffer(backend):
    # torch's default zero_grad(set_to_none=True): backward makes new gradients; with the extension
    # a hook copies each into its slot as it is made, without it the next call re-homes them.
    plain, flat_model, flat = _pair()
    buffer = flat.grad[0]
    plain.zero_grad(set_to_none=True), flat_model.zero_grad(set_to_none=True)
    _backward(plain, _data()[1]), _backward(flat_model, _data()[1])
    landed = [p.grad._base is buffer for p in flat_model.parameters()]
    assert all(landed) if _library._C is not None else not any(landed)
    _assert_grads_equal(plain, flat_model)
    grads = [p.grad.clone() for p in flat_model.parameters()]
    assert flat.check()
    assert all(p.grad._base is flat.grad[0] or p.grad._base is not None for p in flat_model.parameters())
    assert all(torch.equal(p.grad, g) for p, g in zip(flat_model.parameters(), grads))
    # Gradients assigned by hand (no hook runs): the next call copies them into the buffer.
    for p, g in zip(flat_model.parameters(), grads):
        p.grad = g.clone()
    assert flat.check() and all(p.grad._base is flat.grad[0] for p in flat_model.parameters())
    # zero_grad(set_to_none=False) keeps them in the buffer: the next backward accumulates there.
    views = [p.grad for p in flat_model.parameters()]
    flat_model.zero_grad(set_to_none=False)
    _backward(flat_model, _data()[1])
    assert all(p.grad is v for p, v in zip(flat_model.parameters(), views))
    assert torch.equal(flat.grad[0], torch.cat([g.flatten() for g in grads]))


def test_nonfinite_error_writes_nothing(backend):
    _, flat_model, flat = _pair()
    flat_model[0].weight.grad[0, 0, 0, 0] = float("inf")
    snapshot = [g.clone() for g in flat.grad]
    with pytest.raises(RuntimeError, match="non-finite"):
        flat.clip_grad_norm_(1e-3, error_if_nonfinite=True)
    assert all(torch.equal(a, b) for a, b in zip(flat.grad, snapshot))


# ---------------------------------------------------------------- what breaks the views


MOVERS = {
    "double": lambda m: m.double(),
    "half": lambda m: m.half(),
    "to": lambda m: m.to(torch.float64),
    "data": lambda m: setattr(m[3].weight, "data", torch.zeros_like(m[3].weight)),
    "transposed-data": lambda m: setattr(m[3].weight, "data", m[3].weight.data.t().contiguous().t()),
}


@pytest.mark.parametrize("mover", MOVERS.values(), ids=MOVERS.keys())
def test_moved_data_is_detected_and_the_methods_run_per_tensor(backend, mover):
    # The list is the truth: a FlatParameters whose views broke only loses its speed.
    plain, flat_model, flat = _pair()
    mover(plain), mover(flat_model)
    with pytest.raises(FlatBuffersBroken, match="flatten"):
        flat.check()
    with warns_where_native("per-tensor path"):
        total = flat.clip_grad_norm_(1e-3)
    torch.testing.assert_close(total, fused_optim.clip_grad_norm_(plain.parameters(), 1e-3))
    flat.l1l2_grad_(1e-3), fused_optim.l1l2_grad_(plain.parameters(), 1e-3)
    _assert_grads_equal(plain, flat_model, exact=False)


STRUCTURE_CHANGES = {
    "new-parameter": lambda m: setattr(m[3], "weight", nn.Parameter(torch.zeros_like(m[3].weight))),
    "load-assign": lambda m: m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True),
    "new-submodule": lambda m: m.__setitem__(3, nn.Linear(64, 8)),
    "del-last": lambda m: m.__delitem__(-1),
    "bias-none": lambda m: setattr(m[-1], "bias", None),
    "del-bias": lambda m: delattr(m[-1], "bias"),
    "overwrite-on-conversion": lambda m: _overwriting(lambda: m.to(torch.float64)),
}


def _overwriting(convert):
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        convert()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)


@pytest.mark.parametrize("change", STRUCTURE_CHANGES.values(), ids=STRUCTURE_CHANGES.keys())
def test_the_list_given_is_the_truth_after_the_model_changed(backend, change):
    # Parameters added, removed or replaced after flattening: the public functions see the
    # model's parameters as they are now (torch's results, nothing removed is counted or written),
    # and flattening again, as the docs advise, works and brings the one-call path back.
    plain, flat_model, _ = _pair()
    torch.manual_seed(3)
    change(plain)
    torch.manual_seed(3)
    change(flat_model)
    for p, q in zip(plain.parameters(), flat_model.parameters()):  # new parameters: same values, a gradient
        if q.grad is None and p.grad is None and p.requires_grad:
            p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    expected = torch.nn.utils.clip_grad_norm_(plain.parameters(), 1e-3)
    got = fused_optim.clip_grad_norm_(flat_model.parameters(), 1e-3)
    torch.testing.assert_close(got, expected)
    assert fused_optim.last_route().path != "flat"
    _assert_grads_equal(plain, flat_model, exact=False)
    again = flatten_parameters(flat_model)
    _assert_grads_equal(plain, flat_model, exact=False)
    torch.testing.assert_close(again.clip_grad_norm_(1e-3), torch.nn.utils.clip_grad_norm_(plain.parameters(), 1e-3))
    if not EXT_DISABLED:
        assert fused_optim.last_route() == ("clip_grad_norm_", "flat")


@pytest.mark.parametrize("change", ["del-last", "bias-none", "del-bias"])
def test_removed_parameters_gradients_are_neither_counted_nor_written(backend, change):
    # The case: 12.87 where torch gives 3.05 / 9.52 when the removed gradients counted.
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    flatten_parameters(m)
    m(torch.randn(5, 4)).square().sum().backward()
    removed = [m[2].weight, m[2].bias] if change == "del-last" else [m[2].bias]
    before = [p.grad.clone() for p in removed]
    STRUCTURE_CHANGES[change](m)
    kept = [p.grad.clone() for p in m.parameters()]
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in kept]))
    torch.testing.assert_close(fused_optim.clip_grad_norm_(m.parameters(), 1e-3), expected)
    fused_optim.l1l2_grad_(m.parameters(), 0.1)
    assert all(torch.equal(p.grad, b) for p, b in zip(removed, before))


def test_frozen_half_part_and_gradientless_fp64_part_take_no_part(backend):
    # A dtype without any gradient: clip_grad_value_ beyond its range is not refused (torch and
    # the unflattened path accept it), and the total norm keeps the gradients' dtype (fp32).
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4).half().requires_grad_(False), nn.Linear(4, 4), nn.Linear(4, 4).double())
    m[2].requires_grad_(False)
    plain = copy.deepcopy(m)
    flat = flatten_parameters(m)
    x = torch.randn(3, 4)
    for model in (m, plain):
        model[1](x).square().sum().backward()
    fused_optim.clip_grad_value_(m.parameters(), 1e6)
    fused_optim.pre_step_(m.parameters(), clip_value=1e6)
    total = fused_optim.clip_grad_norm_(m.parameters(), 1e-3)
    expected = torch.nn.utils.clip_grad_norm_(plain.parameters(), 1e-3)
    assert total.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(total, expected)
    _assert_grads_equal(plain, m)
    assert flat.get_total_norm().dtype == torch.float32
    if not EXT_DISABLED:
        fused_optim.clip_grad_value_(m.parameters(), 1e6)
        assert fused_optim.last_route() == ("clip_grad_value_", "flat")


def test_state_dict_of_a_part_holds_that_part_only(backend, tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    flatten_parameters(m)
    torch.save(m[0].state_dict(), tmp_path / "first.pt")
    loaded = torch.load(tmp_path / "first.pt")
    assert all(torch.equal(loaded[k], v) for k, v in m[0].state_dict().items())
    # What the file holds: the part's 4 x 8 + 8 elements, not the model's 4 x 8 + 8 + 8 x 3 + 3.
    assert {loaded[k].untyped_storage().nbytes() for k in loaded} == {32 * 4, 8 * 4}
    torch.save(m.state_dict(), tmp_path / "whole.pt")
    whole = torch.load(tmp_path / "whole.pt")
    assert {t.untyped_storage().nbytes() for t in whole.values()} == {67 * 4}  # the buffer, once
    assert m.state_dict()["0.weight"].untyped_storage().data_ptr() == m[0].weight.untyped_storage().data_ptr()
    assert m[0].state_dict(keep_vars=True)["weight"] is m[0].weight


def test_flattening_twice_works(backend):
    plain, flat_model, _ = _pair()
    flatten_parameters(flat_model)
    flatten_parameters(flat_model)
    torch.testing.assert_close(fused_optim.clip_grad_norm_(flat_model.parameters(), 1e-3), fused_optim.clip_grad_norm_(plain.parameters(), 1e-3))
    _assert_grads_equal(plain, flat_model, exact=False)


@native_only
def test_broken_flat_makes_public_functions_warn_once_and_run_per_tensor():
    plain, flat_model, flat = _pair()
    flat_model.double()
    plain.double()
    with pytest.warns(UserWarning, match="per-tensor path"):
        total = fused_optim.clip_grad_norm_(flat_model.parameters(), 0.1)
    torch.testing.assert_close(total, fused_optim.clip_grad_norm_(plain.parameters(), 0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_optim.clip_grad_norm_(flat_model.parameters(), 0.1)


def test_foreign_gradient_views_run_per_tensor_with_one_warning(backend):
    plain, flat_model, flat = _pair()
    bucket = torch.cat([p.grad.flatten() for p in flat_model.parameters()])
    offset = 0
    for p in flat_model.parameters():
        p.grad = bucket[offset:offset + p.numel()].view_as(p)  # as DDP's gradient_as_bucket_view
        offset += p.numel()
    with warns_where_native("view of another buffer"):
        total = flat.clip_grad_norm_(0.1)
    torch.testing.assert_close(total, fused_optim.clip_grad_norm_(plain.parameters(), 0.1))
    _assert_grads_equal(plain, flat_model, exact=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flat.clip_grad_value_(0.01)
    assert all(p.grad._base is bucket for p in flat_model.parameters())


@pytest.mark.parametrize(
    "params, error, match",
    [
        (lambda: [], ValueError, "no parameters"),
        (lambda: [nn.Parameter(torch.ones(2))] * 2, ValueError, "appears twice"),
        (lambda: (lambda b: [nn.Parameter(b[:2]), nn.Parameter(b[1:])])(torch.ones(4)), ValueError, "shares memory"),
        (lambda: [nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2, dtype=torch.int64), requires_grad=False)],
         TypeError, "floating"),
        (lambda: [torch.ones(2, requires_grad=True) * 2], ValueError, "leaf"),
        (lambda: 3, TypeError, "model_or_params"),
    ],
)
def test_flatten_refuses_bad_input(params, error, match):
    given = params()
    snapshot = [p.detach().clone() for p in given] if isinstance(given, list) else []
    with pytest.raises(error, match=match):
        flatten_parameters(given)
    for p, s in zip(given if isinstance(given, list) else [], snapshot):
        assert torch.equal(p, s)


# ---------------------------------------------------------------- the public functions' fast path


def _views(buffer: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    out, offset = [], 0
    for n in sizes:
        out.append(buffer[offset:offset + n])
        offset += n
    return out


def _cases(seed: int = 0):
    """Named lists of tensors, and whether each is exactly one view; the same seed builds the same
    values with the same aliasing in new memory."""
    g = torch.Generator().manual_seed(seed)
    buf, other = torch.randn(100, generator=g), torch.randn(20, generator=g)
    views = _views(buf, [10, 20, 30, 40])
    return {
        "exact": (views, True),
        "prefix": (views[:2], True),  # a run covering part of the buffer is still exact
        "skip": ([views[0], views[2]], False),
        "reorder": ([views[1], views[0]], False),
        "repeat": ([views[0], views[0]], False),
        "other storage": ([views[0], other], False),
        "strided": ([buf[::2]], False),
        "empty": ([views[0], buf[10:10], views[1]], False),
        "dtype": ([views[0], buf.double()[10:30]], False),
        "requires grad": ([torch.randn(4, requires_grad=True, generator=g)], False),
        "empty list": ([], False),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_as_one_view_only_when_exact(case):
    tensors, exact = _cases()[case]
    views = as_one_view([tensors], [True])
    assert (views is not None) == exact
    if exact:
        assert torch.equal(views[0], torch.cat([t.flatten() for t in tensors]))
        assert not views[0].requires_grad and views[0]._base is None
    if _library._C is not None and not EXT_DISABLED:  # the C++ and the Python rule agree
        python = _route._python_one_view((tensors,), (True,))
        assert (python is not None) == exact


def test_as_one_view_pairs_and_overlaps():
    a, b = torch.randn(30), torch.randn(30)
    va, vb = _views(a, [10, 20]), _views(b, [10, 20])
    assert as_one_view([va, vb], [True, False]) is not None
    assert as_one_view([va, _views(b, [20, 10])], [True, False]) is None  # shapes differ by position
    assert as_one_view([va, va], [True, False]) is not None  # the same run: per position the same too
    shifted = _views(a[5:], [10, 15])
    assert as_one_view([va, shifted], [True, False]) is None


@pytest.mark.parametrize("case", list(_cases()))
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 0.0, -1.0])
def test_public_functions_equal_torch_on_any_list(backend, case, norm_type):
    """Every list, one view or not, gives torch's results (computed on the same list built in new
    memory, aliasing included); the fast path bumps the version of every tensor it wrote."""
    tensors, _ = _cases()[case]
    theirs, _ = _cases()[case]
    if not tensors or any(t.requires_grad for t in tensors) or len({t.dtype for t in tensors}) > 1:
        return
    if any(t.numel() == 0 for t in tensors) and (norm_type < 0 or math.isinf(norm_type)):
        return  # no identity: both raise (tests/api/test_clip_grad.py)
    torch.testing.assert_close(fused_optim.get_total_norm(tensors, norm_type), torch.nn.utils.get_total_norm(theirs, norm_type))
    params = [torch.empty_like(t).requires_grad_() for t in tensors]
    their_params = [torch.empty_like(t).requires_grad_() for t in tensors]
    for p, q, t, c in zip(params, their_params, tensors, theirs):
        p.grad, q.grad = t, c
    versions = [t._version for t in tensors]
    torch.testing.assert_close(
        fused_optim.clip_grad_norm_(params, 0.5, norm_type), torch.nn.utils.clip_grad_norm_(their_params, 0.5, norm_type)
    )
    for t, c in zip(tensors, theirs):
        torch.testing.assert_close(t, c)
    assert all(t._version > v for t, v in zip(tensors, versions))  # as the per-tensor op bumps them
    fused_optim.clip_grad_value_(params, 0.05)
    torch.nn.utils.clip_grad_value_(their_params, 0.05)
    for t, c in zip(tensors, theirs):  # equal up to the rounding the clipping left
        torch.testing.assert_close(t, c)
    with torch.no_grad():
        expected = sum(1e-3 * c.double().abs().sum() + 1e-2 * c.double().square().sum() for c in theirs)
        torch.testing.assert_close(fused_optim.l1l2_penalty(tensors, 1e-3, 1e-2).double(), expected)
    fused_optim.ema_update_(tensors, [torch.ones_like(t) for t in tensors], 0.9)
    torch._foreach_lerp_(theirs, [torch.ones_like(t) for t in tensors], 0.1)
    for t, c in zip(tensors, theirs):
        torch.testing.assert_close(t, c)


def test_public_functions_on_a_flattened_model_equal_per_tensor(backend, device):
    plain, flat_model, flat = _pair(device=device)
    for fn in (
        lambda m: fused_optim.clip_grad_norm_(m.parameters(), 0.1),
        lambda m: fused_optim.clip_grad_value_(m.parameters(), 0.001),
        lambda m: fused_optim.l1l2_grad_(m.parameters(), 1e-3, 1e-2),
        lambda m: fused_optim.clip_grad_norm_(list(m.parameters()), 0.05),
        lambda m: fused_optim.clip_grad_norm_(m.parameters(), 0.01, 0.0),
    ):
        a, b = fn(plain), fn(flat_model)
        if a is not None:
            torch.testing.assert_close(b, a)
        _assert_grads_equal(plain, flat_model, exact=False)


def test_written_leaves_take_the_per_tensor_path(backend):
    """Leaves that require grad are never written through a view without autograd history: the
    per-tensor op writes them (under no_grad, as torch's in-place ops may) and bumps their versions."""
    buf = torch.zeros(6)
    leaves = [nn.Parameter(buf[:3]), nn.Parameter(buf[3:])]
    assert as_one_view([leaves], [True]) is None and as_one_view([leaves], [False]) is not None
    versions = [p._version for p in leaves]
    fused_optim.ema_update_(leaves, [torch.ones(3), torch.ones(3)], 0.5)
    assert torch.equal(buf, torch.full((6,), 0.5))
    assert all(p._version > v for p, v in zip(leaves, versions))


# ---------------------------------------------------------------- ModelEMA(flat=True), torch.compile


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_ema_flat_equals_per_tensor(backend, device, dtype):
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).to(device, dtype)
    per_tensor = fused_optim.ModelEMA(model, decay=0.9, warmup=True, buffers="average")
    flatten_parameters(model)
    flat_ema = fused_optim.ModelEMA(model, decay=0.9, warmup=True, buffers="average", flat=True)
    unflat_source = copy.deepcopy(model)  # a model that is not flattened: the per-tensor update
    other_ema = fused_optim.ModelEMA(unflat_source, decay=0.9, warmup=True, buffers="average", flat=True)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(4, 6).to(device, dtype))
        unflat_source.load_state_dict(model.state_dict())
        for ema, source in ((per_tensor, model), (flat_ema, model), (other_ema, unflat_source)):
            ema.update(source)
    expected = per_tensor.module.state_dict()
    for ema in (flat_ema, other_ema):
        assert all(torch.equal(v, expected[k]) for k, v in ema.module.state_dict().items())
    restored = fused_optim.ModelEMA(model, decay=0.9, flat=True)
    restored.load_state_dict(flat_ema.state_dict())
    assert all(torch.equal(v, expected[k]) for k, v in restored.module.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("flat", [False, True])
def test_model_ema_update_bumps_the_versions_of_what_it_writes(backend, dtype, flat):
    # An EMA output saved for backward and then updated: torch's error at backward, flat or not.
    model = nn.Linear(4, 3).to(dtype)
    flatten_parameters(model)
    ema = fused_optim.ModelEMA(model, decay=0.5, flat=flat)
    versions = [p._version for p in ema.module.parameters()]
    x = torch.randn(5, 4, dtype=dtype, requires_grad=True)
    y = ema(x).sum()
    with torch.no_grad():
        model.weight.add_(1)
    ema.update(model)
    assert all(p._version > v for p, v in zip(ema.module.parameters(), versions))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def _assign_data(model):
    model[0].weight.data = model[0].weight.data.clone()


def _assign_parameter(model):
    model[0].weight = nn.Parameter(model[0].weight.detach().clone())


@pytest.mark.filterwarnings("ignore:FlatParameters")  # attach's pre-step warns once, then runs per tensor
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("breaking", [_assign_data, _assign_parameter])
def test_model_ema_flat_updates_per_tensor_from_a_model_whose_flattening_broke(backend, dtype, breaking):
    # Under attach: the step completes (no FlatBuffersBroken from opt.step() after the step was
    # applied) and the EMA equals a per-tensor EMA of the same model.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).to(dtype)
    flatten_parameters(model)
    flat_ema = fused_optim.ModelEMA(model, decay=0.9, buffers="average", flat=True)
    per_tensor = fused_optim.ModelEMA(model, decay=0.9, buffers="average")
    for step in range(3):
        if step == 1:
            breaking(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)  # after the break: it steps the new parameter
        handle = fused_optim.attach(opt, max_norm=1.0, ema=flat_ema, model=model)
        model(torch.randn(4, 6, dtype=dtype)).float().square().mean().backward()
        before = model[0].weight.detach().clone()
        opt.step()
        handle.remove()
        assert not torch.equal(model[0].weight, before)  # the step was applied
        per_tensor.update(model)
        expected = per_tensor.module.state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in flat_ema.module.state_dict().items())


def test_compiled_training_step_on_flattened_model_matches(backend):
    plain, flat_model = _model(), _model()
    flat = flatten_parameters(flat_model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, flat_model)]

    def step(model, x):
        model(x).square().mean().backward()

    compiled = torch.compile(step)
    for x in _data(steps=3):
        for model, opt, run in ((plain, opts[0], step), (flat_model, opts[1], compiled)):
            opt.zero_grad(set_to_none=False)
            run(model, x)
        fused_optim.clip_grad_norm_(plain.parameters(), 0.1)
        flat.clip_grad_norm_(0.1)
        for opt in opts:
            opt.step()
        for p, q in zip(plain.parameters(), flat_model.parameters()):
            torch.testing.assert_close(p, q)
    assert flat.check()


def test_landing_keeps_python_post_accumulate_grad_hooks_and_accumulates(backend):
    # A post-accumulate-grad hook registered before flattening still runs (ours runs after it);
    # one registered after replaces ours (the next call copies instead). Two backwards without
    # zero_grad accumulate, in the buffer, as torch does.
    plain, flat_model = _model(), _model()
    seen = []
    flat_model[0].weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    flat = flatten_parameters(flat_model)
    for model in (plain, flat_model):
        model.zero_grad(set_to_none=True)
        _backward(model, _data()[0])
        _backward(model, _data()[1])
    _assert_grads_equal(plain, flat_model, exact=False)
    assert len(seen) == 2 and torch.equal(seen[-1], plain[0].weight.grad)
    flat_model[3].bias.register_post_accumulate_grad_hook(lambda p: seen.append(None))
    flat_model.zero_grad(set_to_none=True), plain.zero_grad(set_to_none=True)
    _backward(flat_model, _data()[2]), _backward(plain, _data()[2])
    assert any(s is None for s in seen[2:]) and flat.check()
    assert all(p.grad._base is flat.grad[0] for p in flat_model.parameters())
    _assert_grads_equal(plain, flat_model)


def test_a_slot_whose_gradient_is_none_is_zero_when_read(backend):
    # Backward lands a gradient in its slot; no call reads it; zero_grad(set_to_none=True); the
    # next step gives that parameter no gradient: its slot must not count (torch excludes it).
    plain, flat_model = _model(), _model()
    flatten_parameters(flat_model)
    for model in (plain, flat_model):
        _backward(model, _data()[0])
        model.zero_grad(set_to_none=True)
        _backward(model, _data()[1])
        model[0].weight.grad = None
    torch.testing.assert_close(
        fused_optim.clip_grad_norm_(flat_model.parameters(), 1e-3), torch.nn.utils.clip_grad_norm_(plain.parameters(), 1e-3)
    )
    _assert_grads_equal(plain, flat_model, exact=False)


def test_gradients_with_a_graph_are_left_alone(backend):
    # backward(create_graph=True): the gradients carry a graph; neither the landing hook nor a
    # call moves them into the buffer (the graph would be lost); the calls run per tensor.
    plain, flat_model = _model(), _model()
    flatten_parameters(flat_model)
    x = _data()[0]
    for model in (plain, flat_model):
        model(x).square().mean().backward(create_graph=True)
    assert all(p.grad.requires_grad and p.grad._base is None for p in flat_model.parameters())
    second = [torch.autograd.grad(sum(p.grad.square().sum() for p in m.parameters()), list(m.parameters()))
              for m in (plain, flat_model)]
    for a, b in zip(*second):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        torch.testing.assert_close(
            fused_optim.clip_grad_norm_(flat_model.parameters(), 1e-3),
            fused_optim.clip_grad_norm_(plain.parameters(), 1e-3),
        )
    assert all(p.grad.requires_grad for p in flat_model.parameters())


def test_part_state_dicts_after_a_state_dict_that_raised(backend):
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    flatten_parameters(m)
    handle = m[2].register_state_dict_pre_hook(lambda *args: (_ for _ in ()).throw(RuntimeError("hook")))
    with pytest.raises(RuntimeError, match="hook"):
        m.state_dict()
    handle.remove()
    part = m[0].state_dict()
    assert {t.untyped_storage().nbytes() for t in part.values()} == {32 * 4, 8 * 4}


def test_copies_of_a_flattened_model_save_their_own_weights(backend):
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    flatten_parameters(m)
    twin = copy.deepcopy(m)
    assert all(torch.equal(a, b) for a, b in zip(twin[0].state_dict().values(), m[0].state_dict().values()))
    ema = fused_optim.ModelEMA(m, flat=True)
    assert {t.untyped_storage().nbytes() for t in ema.module[0].state_dict().values()} == {32 * 4, 8 * 4}
