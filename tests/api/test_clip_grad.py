"""Gradient clipping against torch.nn.utils itself, on copies of the same gradients."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fused_optim
from helpers import DTYPES, HALF_DTYPES, native_cuda_test, opcheck

NORM_TYPES = [2.0, 1.0, 0.0, 3.5, 0.5, -1.5, math.inf, -math.inf]
INF = math.inf


def make_grads(dtype, device, sizes=(1000, 70001, 3, 40000, 1), scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(n, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype) for n in sizes]


def params_with(grads):
    params = []
    for g in grads:
        p = torch.zeros_like(g, requires_grad=True)
        p.grad = g.clone()
        params.append(p)
    return params


def fp64_total_norm(grads, norm_type):
    return torch.nn.utils.get_total_norm([g.double() for g in grads], norm_type)


def assert_norm_matches(ours, grads, norm_type, dtype):
    """Same dtype as torch; value vs torch on fp64 copies: assert_close defaults for fp32/fp64,
    and for half types at most 2x the error of torch in that dtype."""
    theirs = torch.nn.utils.get_total_norm(grads, norm_type)
    assert ours.dtype == theirs.dtype and ours.shape == ()
    exact = fp64_total_norm(grads, norm_type)
    if dtype in HALF_DTYPES:
        err, torch_err = (ours.double() - exact).abs().item(), (theirs.double() - exact).abs().item()
        tol = 2 * torch_err + 2 * torch.finfo(dtype).eps * exact.abs().item()
        assert err <= tol or (math.isinf(exact) and ours.isinf()), (ours, theirs, exact)
    else:
        torch.testing.assert_close(ours, exact.to(dtype))


# ---------------------------------------------------------------- norms


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_total_norm_matches_torch(backend, device, dtype, norm_type):
    grads = make_grads(dtype, device)
    assert_norm_matches(fused_optim.get_total_norm(grads, norm_type), grads, norm_type, dtype)


def test_total_norm_norm_type_zero_counts_nonzero_tensors_like_torch(backend, device):
    grads = [torch.zeros(5, device=device), torch.tensor([0.0, 2.0, 3.0], device=device), torch.ones(4, device=device)]
    assert fused_optim.get_total_norm(grads, 0).item() == torch.nn.utils.get_total_norm(grads, 0).item() == 2.0


@pytest.mark.parametrize("norm_type", [2.0, INF, 1.0])
def test_total_norm_mixed_dtypes(backend, device, norm_type):
    grads = [g.to(d) for g, d in zip(make_grads(torch.float32, device, sizes=(300,) * 4), DTYPES)]
    ours = fused_optim.get_total_norm(grads, norm_type)
    theirs = torch.nn.utils.get_total_norm(grads, norm_type)
    assert ours.dtype == theirs.dtype == torch.float64
    # fp32 math for the fp32/half parts bounds accuracy at fp32's.
    torch.testing.assert_close(ours, fp64_total_norm(grads, norm_type), rtol=1.3e-6, atol=1e-5)


def test_half_norms_in_a_mixed_list_are_not_rounded_to_half_unlike_torch(backend, device):
    # The documented difference (docs/api.md): torch rounds each fp16/bf16 tensor's norm to its dtype
    # before combining (an fp16 norm above 65504 becomes inf, and clipping then zeroes every
    # gradient); ours keeps it in fp32 or wider.
    half = torch.full((10000,), 1000.0, dtype=torch.float16, device=device)  # norm 1e5 > 65504
    grads = [half, torch.ones(4, device=device)]
    assert torch.nn.utils.get_total_norm(grads).isinf()
    exact = fp64_total_norm(grads, 2.0)
    assert fused_optim.get_total_norm(grads).item() == pytest.approx(exact.item(), rel=1e-6)
    params = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    fused_optim.clip_grad_norm_(params, 1.0)
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, (g.double() / (exact + 1e-6)).to(g.dtype))  # not zeroed


def test_total_norm_many_small_and_non_contiguous(backend, device):
    grads = make_grads(torch.float32, device, sizes=[1000] * 2000)
    grads += [torch.randn(64, 48, device=device).t(), torch.randn(40, 10, device=device)[::3, 1::2]]
    for norm_type in (2.0, 1.0, INF):
        assert_norm_matches(fused_optim.get_total_norm(grads, norm_type), grads, norm_type, torch.float32)


def test_total_norm_empty_and_single_tensor(backend, device):
    out = fused_optim.get_total_norm([])
    assert out.item() == 0.0 and out.dtype == torch.float32
    t = torch.randn(7, device=device)
    torch.testing.assert_close(fused_optim.get_total_norm(t, 3.0), torch.nn.utils.get_total_norm(t, 3.0))


def test_per_tensor_norms_match_foreach_norm(backend, device):
    grads = make_grads(torch.float32, device) + [torch.empty(0, device=device)]
    for norm_type in (2.0, 1.0, 3.0, 0.5):
        total, each = torch.ops.fused_optim.multi_tensor_norm(grads, norm_type, True)
        expected = torch.stack([torch.linalg.vector_norm(g.double(), norm_type) for g in grads[:-1]])
        torch.testing.assert_close(each[:-1], expected.float())
        assert each[-1].item() == 0.0  # an empty tensor's norm
        _, none = torch.ops.fused_optim.multi_tensor_norm(grads, norm_type, False)
        assert none.shape == (0,)


@pytest.mark.parametrize("norm_type", [INF, -INF, -1.0, -0.5])
def test_norms_without_identity_refuse_an_empty_tensor(backend, device, norm_type):
    # As torch.linalg.vector_norm (and so torch.nn.utils.get_total_norm): no max, min or negative
    # order of no elements.
    grads = [torch.ones(3, device=device), torch.empty(0, device=device)]
    with pytest.raises(RuntimeError, match=r"tensors\[1\] is empty: .*cannot compute the .* norm on an empty tensor"):
        torch.ops.fused_optim.multi_tensor_norm(grads, norm_type, False)
    with pytest.raises(RuntimeError, match="on an empty tensor"):
        torch.nn.utils.get_total_norm(grads, norm_type)


# ---------------------------------------------------------------- clip by norm


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clips", [True, False], ids=["clipping", "no-clip"])
def test_clip_grad_norm_matches_torch(backend, device, dtype, norm_type, clips):
    grads = make_grads(dtype, device)
    exact = fp64_total_norm(grads, norm_type).item()
    max_norm = exact * (0.25 if clips else 4.0)
    ours, theirs = params_with(grads), params_with(grads)
    norm = fused_optim.clip_grad_norm_(ours, max_norm, norm_type)
    torch_norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type, foreach=True)
    assert_norm_matches(norm, grads, norm_type, dtype)
    assert norm.dtype == torch_norm.dtype
    if not torch_norm.isfinite():  # e.g. an fp16 1-norm past 65504: torch then zeroes the grads
        assert norm.isinf() and all(torch.equal(p.grad, q.grad) for p, q in zip(ours, theirs))
        return
    for p, q, g in zip(ours, theirs, grads):
        if not clips:
            assert torch.equal(p.grad, g)  # untouched
        else:
            expected = g.double() * min(1.0, max_norm / (exact + 1e-6))
            plain = q.grad
            if dtype in HALF_DTYPES:
                err = (p.grad.double() - expected).abs().max().item()
                plain_err = (plain.double() - expected).abs().max().item()
                assert err <= 2 * plain_err + torch.finfo(dtype).eps * expected.abs().max().item()
            else:
                torch.testing.assert_close(p.grad, expected.to(dtype))


def test_clip_grad_norm_no_clip_is_bit_identical_and_in_place(backend, device):
    grads = make_grads(torch.float32, device, sizes=[1000] * 2000)
    params = params_with(grads)
    ptrs = [p.grad.data_ptr() for p in params]
    fused_optim.clip_grad_norm_(params, 1e9)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    assert [p.grad.data_ptr() for p in params] == ptrs


def test_clip_grad_norm_many_tensors_skips_missing_grads_and_generators(backend, device):
    grads = make_grads(torch.float32, device, sizes=[1000] * 2000 + [100_003])
    ours, theirs = params_with(grads), params_with(grads)
    extra = [torch.zeros(3, device=device, requires_grad=True) for _ in range(2)]  # no .grad
    norm = fused_optim.clip_grad_norm_((p for p in ours + extra), 1.0)
    torch_norm = torch.nn.utils.clip_grad_norm_(theirs + extra, 1.0)
    torch.testing.assert_close(norm, torch_norm)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad)
    assert all(e.grad is None for e in extra)


def test_clip_grad_norm_non_contiguous_grads(backend, device):
    p = torch.zeros(10, 8, device=device, requires_grad=True)
    storage = torch.randn(10, 16, device=device)
    p.grad = storage[:, ::2]
    q = torch.zeros(10, 8, device=device, requires_grad=True)
    q.grad = storage[:, ::2].clone()
    before_odd = storage[:, 1::2].clone()
    torch.testing.assert_close(fused_optim.clip_grad_norm_([p], 0.5), torch.nn.utils.clip_grad_norm_([q], 0.5))
    torch.testing.assert_close(p.grad, q.grad)
    assert p.grad.data_ptr() == storage.data_ptr()
    assert torch.equal(storage[:, 1::2], before_odd)


def test_clip_grad_norm_empty_inputs(backend, device):
    assert fused_optim.clip_grad_norm_([], 1.0).item() == 0.0
    no_grad = [torch.zeros(3, device=device, requires_grad=True)]
    out = fused_optim.clip_grad_norm_(no_grad, 1.0)
    assert out.item() == 0.0 and out.dtype == torch.float32
    with pytest.warns(UserWarning, match="empty generator"):
        fused_optim.clip_grad_norm_((p for p in []), 1.0)


@pytest.mark.parametrize("bad", [float("nan"), INF], ids=["nan", "inf"])
def test_clip_grad_norm_nonfinite_error_leaves_grads(backend, device, bad):
    grads = make_grads(torch.float32, device)
    grads[1][5] = bad
    params = params_with(grads)
    with pytest.raises(RuntimeError, match="is non-finite, so it cannot be clipped"):
        fused_optim.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    for p, g in zip(params, grads):
        assert torch.equal(p.grad.nan_to_num(), g.nan_to_num())
    with pytest.raises(RuntimeError, match="is non-finite"):
        fused_optim.get_total_norm(grads, error_if_nonfinite=True)


@pytest.mark.parametrize("bad", [float("nan"), INF], ids=["nan", "inf"])
def test_clip_grad_norm_nonfinite_without_error_behaves_like_torch(backend, device, bad):
    grads = make_grads(torch.float32, device, sizes=(50, 70))
    grads[0][3] = bad
    ours, theirs = params_with(grads), params_with(grads)
    norm = fused_optim.clip_grad_norm_(ours, 1.0)
    torch_norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    torch.testing.assert_close(norm, torch_norm, equal_nan=True)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, equal_nan=True)


def test_clip_grads_with_norm_matches_torch(backend, device):
    grads = make_grads(torch.float32, device)
    ours, theirs = params_with(grads), params_with(grads)
    total = torch.nn.utils.get_total_norm(grads)
    fused_optim.clip_grads_with_norm_(ours, 2.0, total)
    torch.nn.utils.clip_grads_with_norm_(theirs, 2.0, total)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad)


# ---------------------------------------------------------------- clip by value


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_grad_value_matches_torch(backend, device, dtype):
    grads = make_grads(dtype, device, scale=3.0)
    grads[0][:4] = torch.tensor([float("nan"), INF, -INF, 0.1], dtype=dtype)
    grads.append(torch.randn(30, 20, device=device).to(dtype).t())
    ours, theirs = params_with(grads), params_with(grads)
    fused_optim.clip_grad_value_(ours, 1.3)
    torch.nn.utils.clip_grad_value_(theirs, 1.3, foreach=True)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, equal_nan=True, rtol=0, atol=0)


def test_clip_grad_value_many_tensors_and_views(backend, device):
    grads = make_grads(torch.float32, device, sizes=[1000] * 2000, scale=2.0)
    ours, theirs = params_with(grads), params_with(grads)
    storage = torch.randn(8, 10, device=device) * 3
    view_param = torch.zeros(8, 5, device=device, requires_grad=True)
    view_param.grad = storage[:, ::2]
    fused_optim.clip_grad_value_(ours + [view_param], 0.5)
    torch.nn.utils.clip_grad_value_(theirs, 0.5)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ours, theirs))
    assert torch.equal(storage[:, ::2], storage[:, ::2].clamp(-0.5, 0.5))
    assert storage[:, 1::2].abs().max() > 0.5  # untouched columns


# ---------------------------------------------------------------- opcheck, compile, properties


def test_opcheck(backend, device):
    ops = torch.ops.fused_optim
    mixed = [torch.randn(6, device=device, dtype=d) for d in DTYPES] + [torch.randn(4, 6, device=device).t()]
    for norm_type in (2.0, INF, 0.0, 3.0):
        opcheck(ops.multi_tensor_norm, (mixed, norm_type, True))
    opcheck(ops.multi_tensor_scale_, ([t.clone() for t in mixed], torch.tensor(0.5, device=device)))
    opcheck(ops.multi_tensor_scale_, ([t.clone() for t in mixed], torch.tensor(1.0, device=device)))
    opcheck(ops.clip_grad_norm_, ([t.clone() for t in mixed], 0.1, 2.0, False))
    opcheck(ops.clip_grad_value_, ([t.clone() for t in mixed], 0.1))


def test_compile_fullgraph(backend, device):
    model = nn.Linear(8, 4).to(device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def clip(grads):
        norm = torch.ops.fused_optim.clip_grad_norm_(grads, 0.1, 2.0, False)
        torch.ops.fused_optim.clip_grad_value_(grads, 0.01)
        return norm

    reference = copy.deepcopy(model)
    x = torch.randn(3, 8, device=device)
    model(x).sum().backward()
    reference(x).sum().backward()
    norm = clip([p.grad for p in model.parameters()])
    torch_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
    torch.nn.utils.clip_grad_value_(reference.parameters(), 0.01)
    torch.testing.assert_close(norm, torch_norm)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=40),
    dtype=st.sampled_from(DTYPES),
    norm_type=st.sampled_from(NORM_TYPES),
    ratio=st.floats(0.1, 3.0),
    seed=st.integers(0, 2**16),
)
def test_property_clip_grad_norm_matches_torch(backend, sizes, dtype, norm_type, ratio, seed):
    if norm_type < 0 or math.isinf(norm_type):
        sizes = [max(n, 1) for n in sizes]  # torch cannot take these norms of an empty tensor
    grads = make_grads(dtype, "cpu", sizes=sizes, seed=seed)
    exact = fp64_total_norm(grads, norm_type).item()
    if not math.isfinite(exact) or exact == 0:
        return
    ours, theirs = params_with(grads), params_with(grads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        norm = fused_optim.clip_grad_norm_(ours, ratio * exact, norm_type)
        # torch's clipping given our norm: near ratio 1, a half-precision norm rounded either
        # side of max_norm decides whether clipping happens at all, so compare given the norm.
        torch.nn.utils.clip_grads_with_norm_(theirs, ratio * exact, norm)
    assert_norm_matches(norm, grads, norm_type, dtype)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad)


# ---------------------------------------------------------------- seed helpers


def seed_clip_gradients(model, clip_value=1.0, clip_norm=None):
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    else:
        torch.nn.utils.clip_grad_value_(model.parameters(), clip_value)


def seed_train_with_gradient_clipping(model, train_loader, criterion, optimizer, device, clip_value=1.0, clip_norm=None):
    model.train()
    for data, target in train_loader:
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        output = model(data)
        loss = criterion(output, target)
        loss.backward()
        seed_clip_gradients(model, clip_value, clip_norm)
        optimizer.step()


@pytest.mark.parametrize("clip_norm", [None, 0.5], ids=["by-value", "by-norm"])
def test_train_with_gradient_clipping_matches_seed(backend, device, clip_norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3)).to(device)
    seed_model = copy.deepcopy(model)
    data = [(torch.randn(16, 10), torch.randint(0, 3, (16,))) for _ in range(6)]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    seed_opt = torch.optim.SGD(seed_model.parameters(), lr=0.5)
    result = fused_optim.train_with_gradient_clipping(
        model, data, nn.CrossEntropyLoss(), opt, device, clip_value=0.05, clip_norm=clip_norm
    )
    seed_train_with_gradient_clipping(seed_model, data, nn.CrossEntropyLoss(), seed_opt, device, 0.05, clip_norm)
    for p, q in zip(model.parameters(), seed_model.parameters()):
        torch.testing.assert_close(p, q)
    if clip_norm is None:
        assert isinstance(result, float) and math.isfinite(result)
    else:
        mean_loss, mean_norm = result
        assert math.isfinite(mean_loss) and mean_norm > 0


def test_train_with_gradient_clipping_reports_mean_loss_and_norm(backend, device):
    torch.manual_seed(0)
    model = nn.Linear(4, 1).to(device)
    data = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(3)]
    probe = copy.deepcopy(model)
    probe_opt = torch.optim.SGD(probe.parameters(), lr=0.1)
    losses, norms = [], []
    for x, y in data:
        probe_opt.zero_grad()
        loss = nn.functional.mse_loss(probe(x.to(device)), y.to(device))
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(probe.parameters(), 0.3).item())
        probe_opt.step()
        losses.append(loss.item())
    mean_loss, mean_norm = fused_optim.train_with_gradient_clipping(
        model, data, nn.functional.mse_loss, torch.optim.SGD(model.parameters(), lr=0.1), device, clip_norm=0.3
    )
    assert mean_loss == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert mean_norm == pytest.approx(sum(norms) / 3, rel=1e-5)


def test_clip_gradients_seed_semantics(backend, device):
    torch.manual_seed(0)
    model = nn.Linear(6, 6).to(device)
    seed = copy.deepcopy(model)
    x = torch.randn(4, 6, device=device)
    model(x).pow(2).sum().backward()
    seed(x).pow(2).sum().backward()
    assert fused_optim.clip_gradients(model, clip_value=0.01) is None
    seed_clip_gradients(seed, clip_value=0.01)
    for p, q in zip(model.parameters(), seed.parameters()):
        assert torch.equal(p.grad, q.grad)
    norm = fused_optim.clip_gradients(model, clip_norm=0.02)
    torch.testing.assert_close(norm, torch.nn.utils.get_total_norm([q.grad for q in seed.parameters()]))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, exc, fragment",
    [
        (lambda ps: fused_optim.clip_grad_norm_(ps, 1.0, norm_type=float("nan")), ValueError, "norm_type must be a number"),
        # Numbers are read with float(), as torch reads them ("inf" and "1.0" are accepted).
        (lambda ps: fused_optim.clip_grad_norm_(ps, "one"), ValueError, "max_norm must be a number"),
        (lambda ps: fused_optim.clip_grad_norm_(ps, 1.0, norm_type="fro"), ValueError, "norm_type must be a number"),
        (lambda ps: fused_optim.clip_grad_value_(ps, None), TypeError, "clip_value must be a number"),
        (lambda ps: fused_optim.get_total_norm([p.grad for p in ps], float("nan")), ValueError, "norm_type"),
        (lambda ps: fused_optim.clip_grad_norm_(ps + [_complex_param()], 0.1), TypeError, "real floating"),
        (lambda ps: fused_optim.clip_grad_value_(ps + [_complex_param()], 0.1), TypeError, "real floating"),
        (lambda ps: fused_optim.clip_grad_norm_(ps + [_meta_param()], 0.1), RuntimeError, "on one"),
    ],
    ids=["nan-norm-type", "str-max-norm", "str-norm-type", "none-clip-value", "total-nan-norm-type",
         "complex-norm", "complex-value", "mixed-devices"],
)
def test_bad_input_raises_and_changes_nothing(backend, device, call, exc, fragment):
    grads = make_grads(torch.float32, device, sizes=(10, 20), scale=10.0)
    params = params_with(grads)
    with pytest.raises(exc, match=fragment):
        call(params)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


def _complex_param():
    p = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    p.grad = torch.ones(3, dtype=torch.complex64)
    return p


def _meta_param():
    p = torch.zeros(3, device="meta", requires_grad=True)
    p.grad = torch.zeros(3, device="meta")
    return p


NO_WRITE_SCRIPT = """
import ctypes, mmap, sys, warnings
import torch, fused_optim
warnings.simplefilter("ignore")  # torch warns that the buffer is not writable: that is the point
buf = mmap.mmap(-1, 4 * 3000)
torch.frombuffer(buf, dtype=torch.float32).copy_(torch.randn(3000))
address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
ctypes.CDLL(None).mprotect(ctypes.c_void_p(address), ctypes.c_size_t(len(buf)), mmap.PROT_READ)
params = [torch.zeros(1000, requires_grad=True) for _ in range(3)]
for p, g in zip(params, torch.frombuffer(buf, dtype=torch.float32).split(1000)):
    p.grad = g
max_norm = float(sys.argv[1])
norm = fused_optim.clip_grad_norm_(params, max_norm)
fused_optim.clip_grads_with_norm_(params, max_norm, norm)
print("no write", float(norm))
"""


@pytest.mark.parametrize("disable_ext", ["0", "1"], ids=["native", "reference"])
def test_no_clip_writes_nothing_to_read_only_gradients(disable_ext):
    # Gradients in read-only memory: any write, even of an unchanged value, is a segfault.
    def run(max_norm):
        return subprocess.run(
            [sys.executable, "-c", NO_WRITE_SCRIPT, str(max_norm)],
            env={**os.environ, "FUSED_OPTIM_DISABLE_EXT": disable_ext},
            capture_output=True, text=True, timeout=300,
        )

    proc = run(1e9)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.startswith("no write")
    assert run(1e-3).returncode != 0  # the harness does catch writes: clipping must write


@native_cuda_test
@pytest.mark.parametrize("clips", [True, False], ids=["clipping", "no-clip"])
def test_cuda_clip_grad_norm_makes_no_host_sync(clips):
    grads = make_grads(torch.float32, "cuda", sizes=[1000] * 500 + [100_003])
    params = params_with(grads)
    max_norm = 1.0 if clips else 1e9
    fused_optim.clip_grad_norm_(params, max_norm)  # warm-up: allocator, kernels loaded
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.ops.fused_optim.clip_grad_norm_.default([p.grad for p in params], max_norm, 2.0, False)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@native_cuda_test
def test_cuda_clip_grad_norm_launches_do_not_grow_with_the_tensor_count():
    def device_events(n):
        grads = make_grads(torch.float32, "cuda", sizes=[1000] * n)
        torch.ops.fused_optim.clip_grad_norm_.default(grads, 1e-3, 2.0, False)  # warm-up
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            torch.ops.fused_optim.clip_grad_norm_.default(grads, 1e-3, 2.0, False)
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    # 10 and 100 tensors both fit one launch of the launcher (110 tensors, 320 chunks).
    few, many = device_events(10), device_events(100)
    assert len(few) == len(many) and len(few) > 0, (few, many)
