"""L1+L2 penalty: value, backward, l1l2_grad_ and L1L2Regularizer against plain fp64 formulas."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fused_optim
from helpers import DTYPES, HALF_DTYPES, assert_close_to_fp64, opcheck

L1, L2 = 0.3, 0.7


def seed_penalty(tensors, l1, l2):
    """The seed's L1L2Regularizer formula, summed over the given tensors in their own dtype."""
    reg_loss = 0
    for p in tensors:
        reg_loss += l1 * torch.sum(torch.abs(p))
        reg_loss += l2 * torch.sum(p**2)
    return reg_loss


def fp64_penalty(tensors, l1, l2):
    return seed_penalty([t.detach().double() for t in tensors], l1, l2)


def fp64_grad(p, l1, l2):
    x = p.detach().double()
    return l1 * torch.sign(x) + 2 * l2 * x


def make_tensors(dtype, device, shapes=((37, 19), (5,), (), (0, 3), (70001,), (3, 4, 5))):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]


# ---------------------------------------------------------------- value


@pytest.mark.parametrize("dtype", DTYPES)
def test_penalty_matches_fp64_reference(backend, device, dtype):
    ts = make_tensors(dtype, device)
    out = fused_optim.l1l2_penalty(ts, L1, L2)
    assert out.dim() == 0 and out.device.type == device
    assert out.dtype == (torch.float32 if dtype in HALF_DTYPES else dtype)
    assert_close_to_fp64(out, fp64_penalty(ts, L1, L2), seed_penalty(ts, L1, L2), dtype)


@pytest.mark.parametrize("l1,l2", [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1e-5, 1e-4)])
def test_penalty_coefficients(backend, device, l1, l2):
    ts = make_tensors(torch.float32, device)
    torch.testing.assert_close(fused_optim.l1l2_penalty(ts, l1, l2), fp64_penalty(ts, l1, l2).float())


def test_penalty_mixed_dtypes(backend, device):
    ts = [t.to(d) for t, d in zip(make_tensors(torch.float32, device, [(300,)] * 4), DTYPES)]
    out = fused_optim.l1l2_penalty(ts, L1, L2)
    assert out.dtype == torch.float64  # promoted math types: fp32, fp64, fp32, fp32
    # fp32 math for the fp32/fp16/bf16 parts bounds the accuracy at fp32's.
    torch.testing.assert_close(out, fp64_penalty(ts, L1, L2), rtol=1.3e-6, atol=1e-5)
    half_only = ts[2:]
    assert fused_optim.l1l2_penalty(half_only, L1, L2).dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_penalty_non_contiguous(backend, device, dtype):
    base = torch.randn(64, 48, dtype=torch.float64, device=device).to(dtype)
    views = [
        base.t(),  # dense, read in place
        base[::2, 1::3],  # strided slice
        base[:, :1].expand(64, 5),  # overlapping (stride 0): every logical element counts
        base.unsqueeze(0).permute(2, 0, 1),
    ]
    out = fused_optim.l1l2_penalty(views, L1, L2)
    assert_close_to_fp64(out, fp64_penalty(views, L1, L2), seed_penalty(views, L1, L2), dtype)


def test_penalty_empty_and_zero_size(backend, device):
    assert fused_optim.l1l2_penalty([], L1, L2).item() == 0.0
    assert fused_optim.l1l2_penalty([], L1, L2).dtype == torch.float32
    z = [torch.empty(0, device=device), torch.empty(3, 0, device=device)]
    out = fused_optim.l1l2_penalty(z, L1, L2)
    assert out.item() == 0.0 and out.device.type == device


def test_penalty_many_tensors_and_chunks(backend, device):
    g = torch.Generator().manual_seed(1)
    sizes = torch.randint(0, 300, (1500,), generator=g).tolist() + [100_003, 0, 65_536]
    ts = [torch.randn(n, generator=g).to(device) for n in sizes]
    torch.testing.assert_close(fused_optim.l1l2_penalty(ts, L1, L2), fp64_penalty(ts, L1, L2).float())


def test_penalty_accepts_single_tensor_generator_and_parameters(backend, device):
    t = torch.randn(10, 10, device=device)
    expected = fp64_penalty([t], L1, L2).float()
    torch.testing.assert_close(fused_optim.l1l2_penalty(t, L1, L2), expected)
    torch.testing.assert_close(fused_optim.l1l2_penalty((x for x in [t]), L1, L2), expected)
    model = nn.Linear(4, 3).to(device)
    torch.testing.assert_close(
        fused_optim.l1l2_penalty(model.parameters(), L1, L2),
        fp64_penalty(list(model.parameters()), L1, L2).float(),
    )


def test_penalty_native_deterministic_across_thread_counts(backend):
    # A promise of the native kernel (fixed chunks, partials combined in chunk order); the
    # reference inherits torch.sum's thread-dependent order.
    if backend != "native":
        pytest.skip("determinism across thread counts is a property of the native kernel")
    ts = [torch.randn(n) for n in (200_000, 3, 50_000, 1_000)]
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(fused_optim.l1l2_penalty(ts, L1, L2))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)


def test_penalty_inf_and_nan_propagate(backend, device):
    t = torch.tensor([1.0, float("inf")], device=device)
    assert fused_optim.l1l2_penalty([t], L1, L2).item() == float("inf")
    t = torch.tensor([1.0, float("nan")], device=device)
    assert fused_optim.l1l2_penalty([t], L1, L2).isnan().item()


# ---------------------------------------------------------------- backward


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_fp64_formula(backend, device, dtype):
    ts = [t.requires_grad_() for t in make_tensors(dtype, device)]
    ts[0].data[0, :3] = 0  # sign(0) = 0
    (fused_optim.l1l2_penalty(ts, L1, L2) * 3.0).backward()
    for t in ts:
        assert t.grad.dtype == dtype and t.grad.shape == t.shape
        expected = 3.0 * fp64_grad(t, L1, L2)
        plain = 3.0 * (L1 * torch.sign(t.detach()) + 2 * L2 * t.detach())
        assert_close_to_fp64(t.grad, expected, plain, dtype)


def test_backward_matches_seed_autograd(backend, device):
    ts = make_tensors(torch.float64, device)
    a = [t.clone().requires_grad_() for t in ts]
    b = [t.clone().requires_grad_() for t in ts]
    fused_optim.l1l2_penalty(a, L1, L2).backward()
    seed_penalty(b, L1, L2).backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)


def test_backward_non_contiguous_and_partial_requires_grad(backend, device):
    base = torch.randn(30, 20, dtype=torch.float64, device=device, requires_grad=True)
    frozen = torch.randn(7, dtype=torch.float64, device=device)
    fused_optim.l1l2_penalty([base.t(), base[::3], frozen], L1, L2).backward()
    rows = torch.arange(30, device=device)[:, None]
    times_used = torch.where(rows % 3 == 0, 2.0, 1.0)  # every row via base.t(), every 3rd again
    torch.testing.assert_close(base.grad, times_used * fp64_grad(base, L1, L2))
    assert frozen.grad is None


def test_gradcheck(backend, device):
    ts = [torch.randn(s, dtype=torch.float64, device=device, requires_grad=True) for s in [(4, 3), (5,), (2, 2)]]
    # l1 > 0 makes the penalty non-smooth at 0; random inputs stay far from it.
    assert torch.autograd.gradcheck(lambda *xs: fused_optim.l1l2_penalty(list(xs), L1, L2), ts)


def test_opcheck(backend, device):
    ts = [torch.randn(s, device=device, requires_grad=True) for s in [(4, 3), (5,)]]
    mixed = [torch.randn(6, device=device, dtype=d) for d in DTYPES] + [torch.randn(4, 6, device=device).t()]
    ops = torch.ops.fused_optim
    opcheck(ops.l1l2_penalty, (ts, L1, L2))
    opcheck(ops.l1l2_penalty, (mixed, L1, L2))
    opcheck(ops.l1l2_penalty_backward, (torch.tensor(2.0, device=device), mixed, L1, L2))
    grads = [torch.randn_like(t) for t in mixed]
    opcheck(ops.l1l2_grad_, (mixed, grads, L1, L2))


@pytest.mark.parametrize("grad_out_dtype", [torch.float32, torch.float64, torch.float16])
def test_backward_op_takes_grad_out_from_the_cpu(backend, device, grad_out_dtype):
    # The reference accepts a CPU grad_out for tensors on any device; the CUDA kernel reads it from
    # device memory, so it must be put there (a host pointer read on the device is the defect).
    ts = [torch.randn(5, device=device), torch.randn(3, 2, device=device, dtype=torch.float64)]
    grad_out = torch.tensor(-1.5, dtype=grad_out_dtype)
    grads = torch.ops.fused_optim.l1l2_penalty_backward(grad_out, ts, L1, L2)
    for g, t in zip(grads, ts):
        expected = -1.5 * (L1 * t.double().sign() + 2 * L2 * t.double())
        assert g.device == t.device and g.dtype == t.dtype
        torch.testing.assert_close(g.double(), expected, rtol=1e-6, atol=1e-6)


def test_compile_fullgraph(backend, device):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)).to(device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x):
        params = list(model.parameters())
        loss = model(x).square().mean() + fused_optim.l1l2_penalty(params, L1, L2)
        return loss

    x = torch.randn(4, 8, device=device)
    loss = step(x)
    expected = model(x).square().mean() + fp64_penalty(list(model.parameters()), L1, L2).float()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------- l1l2_grad_


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_adds_penalty_gradient(backend, device, dtype):
    params = [t.requires_grad_() for t in make_tensors(dtype, device)]
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in params]
    fused_optim.l1l2_grad_(params, L1, L2)
    for p, g0 in zip(params, before):
        expected = g0.double() + fp64_grad(p, L1, L2)
        plain = g0 + (L1 * torch.sign(p.detach()) + 2 * L2 * p.detach())
        assert_close_to_fp64(p.grad, expected, plain, dtype)


def test_grad_allocates_missing_and_skips_frozen(backend, device):
    p = torch.randn(5, 4, device=device, requires_grad=True)
    frozen = torch.randn(3, device=device)
    fused_optim.l1l2_grad_([p, frozen], L1, L2)
    torch.testing.assert_close(p.grad, fp64_grad(p, L1, L2).float())
    assert frozen.grad is None


def test_grad_non_contiguous_layouts(backend, device):
    # A transposed parameter with a contiguous grad, and a grad that is a strided view.
    p1 = torch.randn(6, 9, device=device, dtype=torch.float64).t().requires_grad_()
    p1.grad = torch.randn(9, 6, device=device, dtype=torch.float64)
    p2 = torch.randn(4, 5, device=device, dtype=torch.float64, requires_grad=True)
    storage = torch.randn(4, 10, device=device, dtype=torch.float64)
    p2.grad = storage[:, ::2]
    g1, g2 = p1.grad.clone(), p2.grad.clone()
    fused_optim.l1l2_grad_([p1, p2], L1, L2)
    torch.testing.assert_close(p1.grad, g1 + fp64_grad(p1, L1, L2))
    torch.testing.assert_close(p2.grad, g2 + fp64_grad(p2, L1, L2))
    assert p2.grad.data_ptr() == storage.data_ptr()  # updated in place, through the view
    torch.testing.assert_close(storage[:, 1::2], storage[:, 1::2].clone())


def test_grad_many_tensors(backend, device):
    params = [torch.randn(n, device=device, requires_grad=True) for n in [1000] * 1200 + [100_003]]
    fused_optim.l1l2_grad_(params, L1, L2)
    for p in params[::97] + params[-1:]:
        torch.testing.assert_close(p.grad, fp64_grad(p, L1, L2).float())


def test_grad_matches_autograd_of_penalty(backend, device):
    a = [t.requires_grad_() for t in make_tensors(torch.float64, device)]
    b = [t.detach().clone().requires_grad_() for t in a]
    fused_optim.l1l2_penalty(a, L1, L2).backward()
    fused_optim.l1l2_grad_(b, L1, L2)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)


# ---------------------------------------------------------------- L1L2Regularizer


class SeedL1L2Regularizer:
    """The seed's class, verbatim in behaviour."""

    def __init__(self, l1_lambda=0.0, l2_lambda=0.0):
        self.l1_lambda = l1_lambda
        self.l2_lambda = l2_lambda

    def __call__(self, model):
        reg_loss = 0
        for param in model.parameters():
            if param.requires_grad:
                reg_loss += self.l1_lambda * torch.sum(torch.abs(param))
                reg_loss += self.l2_lambda * torch.sum(param**2)
        return reg_loss


def test_regularizer_matches_seed(backend, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).to(device).double()
    model[0].bias.requires_grad_(False)  # frozen parameters are not penalized
    seed_model = copy.deepcopy(model)
    ours = fused_optim.L1L2Regularizer(l1_lambda=1e-5, l2_lambda=1e-4)
    seed = SeedL1L2Regularizer(l1_lambda=1e-5, l2_lambda=1e-4)
    a, b = ours(model), seed(seed_model)
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    for p, q in zip(model.parameters(), seed_model.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad)
    assert "l1_lambda=1e-05" in repr(ours)


def test_regularizer_no_trainable_parameters(backend):
    model = nn.Linear(3, 3).requires_grad_(False)
    out = fused_optim.L1L2Regularizer(1.0, 1.0)(model)
    assert out.item() == 0.0 and (torch.tensor(2.0) + out).item() == 2.0


# ---------------------------------------------------------------- bad input


def _snapshot(tensors):
    return [(t.clone(), None if t.grad is None else t.grad.clone()) for t in tensors]


def _assert_unchanged(tensors, snapshot):
    for t, (value, grad) in zip(tensors, snapshot):
        assert torch.equal(t.detach(), value)
        assert (t.grad is None) == (grad is None)
        if grad is not None:
            assert torch.equal(t.grad, grad)


def _good_params(device):
    p = [torch.randn(4, device=device, requires_grad=True), torch.randn(3, device=device, requires_grad=True)]
    p[0].grad = torch.randn(4, device=device)
    return p  # p[1] has no grad: l1l2_grad_ would create it


BAD_CASES = {
    "int_tensor": (lambda d: [torch.ones(3, dtype=torch.int64, device=d)], {}, TypeError, "real floating"),
    "complex_tensor": (lambda d: [torch.ones(3, dtype=torch.complex64, device=d)], {}, TypeError, "real floating"),
    "negative_l1": (lambda d: [], {"l1": -1.0}, ValueError, "l1 must be a finite number >= 0"),
    "nan_l2": (lambda d: [], {"l2": float("nan")}, ValueError, "l2 must be a finite number >= 0"),
    "inf_l1": (lambda d: [], {"l1": float("inf")}, ValueError, "l1 must be a finite number >= 0"),
    "string_l1": (lambda d: [], {"l1": "0.1"}, TypeError, "l1 must be a real number"),
    "bool_l2": (lambda d: [], {"l2": True}, TypeError, "l2 must be a real number"),
    "mixed_devices": (lambda d: [torch.ones(3, device="meta")], {}, RuntimeError, "on one"),
}


@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.parametrize("fn", ["l1l2_penalty", "l1l2_grad_"])
def test_bad_input_raises_and_changes_nothing(backend, device, case, fn):
    make_extra, kwargs, exc, fragment = BAD_CASES[case]
    extra = make_extra(device)
    if fn == "l1l2_grad_":
        if case == "int_tensor":
            pytest.skip("integer tensors cannot require grad: l1l2_grad_ skips them like frozen ones")
        extra = [t.requires_grad_() for t in extra]
    params = _good_params(device)
    snapshot = _snapshot(params)
    with pytest.raises(exc, match=fragment):
        getattr(fused_optim, fn)(params + extra, **{"l1": L1, "l2": L2, **kwargs})
    _assert_unchanged(params, snapshot)


@pytest.mark.parametrize(
    "grads_of, exc, fragment",
    [
        (lambda ps: [torch.zeros(5, device=ps[0].device), torch.zeros_like(ps[1])], RuntimeError, r"grads\[0\] must match params\[0\]"),
        (lambda ps: [torch.zeros_like(ps[0]), torch.zeros_like(ps[1], dtype=torch.float64)], RuntimeError, r"grads\[1\] must match"),
        (lambda ps: [torch.zeros_like(ps[0])], ValueError, "same length"),
    ],
    ids=["shape", "dtype", "length"],
)
def test_grad_op_mismatched_grads_raise_and_change_nothing(backend, device, grads_of, exc, fragment):
    # The .grad setter already refuses mismatches, so the op's own check is reached directly.
    params = [torch.randn(4, device=device), torch.randn(3, device=device)]
    grads = grads_of(params)
    snapshot = [g.clone() for g in grads]
    with pytest.raises(exc, match=fragment):
        torch.ops.fused_optim.l1l2_grad_(params, grads, L1, L2)
    assert all(torch.equal(g, s) for g, s in zip(grads, snapshot))


@pytest.mark.parametrize("value", [3, None, "abc", [1, "x"]])
def test_non_tensor_input_raises(backend, value):
    with pytest.raises(TypeError, match="tensors"):
        fused_optim.l1l2_penalty(value, L1, L2)
