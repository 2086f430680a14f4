"""The fused pre-step (penalty gradient + norm in one pass, then the clip) against the separate
calls it replaces, and attach(optimizer) against the hand-written loop, in plain loops (SGD,
AdamW, param groups, GradScaler with bf16 autocast, GradientAccumulator, closures, flat buffers)
and inside PyTorch Lightning's Trainer."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from torch import nn

import fused_optim
from helpers import DTYPES, EXT_DISABLED, HALF_DTYPES, assert_close_to_fp64, native_cuda_test, opcheck, require

INF = math.inf
NORM_TYPES = [2.0, 1.0, 0.0, 3.5, INF, -INF, -1.5]
# How a step clips: (max_norm, clip_value); max_norm 1e9 never clips.
CLIPS = {"no-clip": (None, None), "norm-clips": (0.5, None), "norm-no-clip": (1e9, None), "value": (None, 0.05)}
ops = torch.ops.fused_optim


def make(dtype, device, sizes=(1000, 70001, 3, 0, 40000, 1), seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(n, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype) for n in sizes]


def sizes_for(norm_type):
    # Orders without an identity (inf, -inf, < 0) refuse empty tensors, as torch does.
    return (1000, 70001, 3, 40000, 1) if norm_type < 0 or norm_type == INF else (1000, 70001, 3, 0, 40000, 1)


def separate_calls(params, grads, l1, l2, max_norm, norm_type, clip_value):
    """What pre_step_ replaces: l1l2_grad_, then clip_grad_norm_ (or the norm, then the clamp)."""
    if l1 or l2:
        ops.l1l2_grad_(params, grads, l1, l2)
    if max_norm is not None:
        return ops.clip_grad_norm_(grads, max_norm, norm_type, False)
    total = ops.multi_tensor_norm(grads, norm_type, False, False)[0]
    if clip_value is not None:
        ops.clip_grad_value_(grads, clip_value)
    return total


# ---------------------------------------------------------------- the op


@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_equals_the_separate_calls(backend, device, dtype, norm_type, clip):
    max_norm, clip_value = CLIPS[clip]
    sizes = sizes_for(norm_type)
    params, grads = make(dtype, device, sizes, seed=1), make(dtype, device, sizes, seed=2)
    ours, theirs = [g.clone() for g in grads], [g.clone() for g in grads]
    total = ops.pre_step_(params, ours, 0.01, 0.02, max_norm, norm_type, clip_value, False)
    expected = separate_calls(params, theirs, 0.01, 0.02, max_norm, norm_type, clip_value)
    # The gradients: the same arithmetic, bit for bit. The norm: the same value up to rounding
    # (bitwise on the native kernels, whose fold order is the norm op's).
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert total.dtype == expected.dtype and total.shape == ()
    if backend == "native":
        assert torch.equal(total, expected)
    else:
        torch.testing.assert_close(total, expected)


@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_against_plain_fp64_formulas(backend, device, dtype, norm_type, clip):
    max_norm, clip_value = CLIPS[clip]
    sizes = sizes_for(norm_type)
    params, grads = make(dtype, device, sizes, seed=3), make(dtype, device, sizes, seed=4)
    l1, l2 = 0.003, 0.04
    ours = [g.clone() for g in grads]
    total = ops.pre_step_(params, ours, l1, l2, max_norm, norm_type, clip_value, False)
    # The seed's penalty gradient written plainly in fp64, torch's own norm and clipping.
    want = [g.double() + l1 * torch.sign(p.double()) + 2 * l2 * p.double() for p, g in zip(params, grads)]
    want_total = torch.nn.utils.get_total_norm(want, norm_type)
    plain = [(g + l1 * torch.sign(p) + 2 * l2 * p) for p, g in zip(params, grads)]
    plain_total = torch.nn.utils.get_total_norm(plain, norm_type)
    if max_norm is not None:
        # torch's coefficient: in the total's dtype (bf16 for bf16 gradients), as clip_grad_norm_'s.
        want = [w * min(1.0, max_norm / (want_total.item() + 1e-6)) for w in want]
        plain = [w * torch.clamp(max_norm / (plain_total + 1e-6), max=1.0) for w in plain]
    elif clip_value is not None:
        want = [w.clamp(-clip_value, clip_value) for w in want]
        plain = [w.clamp(-clip_value, clip_value) for w in plain]
    assert_close_to_fp64(total.reshape(1), want_total.reshape(1), plain_total.reshape(1), dtype)
    for a, w, pl in zip(ours, want, plain):
        assert_close_to_fp64(a, w, pl, dtype)


def test_op_without_penalty_is_the_clip(backend, device):
    grads = make(torch.float32, device, seed=5)
    params = make(torch.float32, device, seed=6)
    ours, theirs = [g.clone() for g in grads], [g.clone() for g in grads]
    total = ops.pre_step_(params, ours, 0.0, 0.0, 0.5, 2.0, None, False)
    expected = ops.clip_grad_norm_(theirs, 0.5, 2.0, False)
    assert torch.equal(total, expected) and all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_op_mixed_dtypes_and_layouts(backend, device):
    g = torch.Generator().manual_seed(7)

    def rand(shape, dtype):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    # (param, gradient base, the gradient as a view of its base): channels_last, transposed and
    # strided (not dense) tensors in four dtypes.
    cases = [
        (rand((8, 3, 5, 7), torch.float32).contiguous(memory_format=torch.channels_last), rand((8, 3, 5, 7), torch.float32),
         lambda b: b.contiguous(memory_format=torch.channels_last)),
        (rand((90, 70), torch.float16).t(), rand((90, 70), torch.float16), lambda b: b.t()),
        (rand((40, 120), torch.float64)[:, ::2], rand((40, 120), torch.float64), lambda b: b[:, ::2]),
        (rand((33, 65), torch.bfloat16), rand((33, 65), torch.bfloat16), lambda b: b),
        (rand((200, 300), torch.float32).t(), rand((300, 200), torch.float32), lambda b: b),
    ]
    params = [p for p, _, _ in cases]
    ours = [view(base.clone()) for _, base, view in cases]
    theirs = [view(base.clone()) for _, base, view in cases]
    assert not ours[2].is_contiguous() and ours[2].stride() == (120, 2) and ours[0].is_contiguous(memory_format=torch.channels_last)
    total = ops.pre_step_(params, ours, 0.01, 0.3, 1.0, 2.0, None, False)
    expected = separate_calls(params, theirs, 0.01, 0.3, 1.0, 2.0, None)
    assert total.dtype == expected.dtype == torch.float64
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=0)
    for a, b in zip(ours, theirs):
        assert a.stride() == b.stride() and torch.equal(a, b)


def test_op_same_gradient_twice_and_grad_is_its_param(backend, device):
    # A gradient listed twice gets the penalty twice, as the separate calls (position after
    # position) give it; a gradient that is its own parameter reads it before writing it.
    params, grads = make(torch.float32, device, (500, 70000), seed=8), make(torch.float32, device, (500, 70000), seed=9)
    self_param = make(torch.float32, device, (300,), seed=10)[0]
    for max_norm, error in ((1.0, False), (None, True), (1.0, True)):
        ours_g = [g.clone() for g in grads]
        theirs_g = [g.clone() for g in grads]
        ours_sp, theirs_sp = self_param.clone(), self_param.clone()
        total = ops.pre_step_(params + [params[0], ours_sp], ours_g + [ours_g[0], ours_sp], 0.1, 0.2, max_norm, 2.0, None, error)
        expected = separate_calls(params + [params[0], theirs_sp], theirs_g + [theirs_g[0], theirs_sp], 0.1, 0.2, max_norm, 2.0, None)
        torch.testing.assert_close(total, expected)
        for a, b in zip(ours_g + [ours_sp], theirs_g + [theirs_sp]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("case", ["nan-grad", "inf-grad", "penalty-overflows", "aliased-nan"])
def test_error_if_nonfinite_writes_nothing(backend, device, case):
    dtype = torch.float16 if case == "penalty-overflows" else torch.float32
    params, grads = make(dtype, device, (1000, 70001, 5), seed=11), make(dtype, device, (1000, 70001, 5), seed=12)
    if case == "nan-grad":
        grads[1][500] = float("nan")
    elif case == "inf-grad":
        grads[2][3] = INF
    elif case == "penalty-overflows":
        params[1][7] = 60000.0  # 2 * l2 * p = 1.2e5 > fp16's max: the penalized gradient is inf
    else:
        grads[0][0] = float("nan")
        params, grads = params + [params[0]], grads + [grads[0]]  # the same gradient twice
    snapshot = [g.clone() for g in grads]
    with pytest.raises(RuntimeError, match="non-finite"):
        ops.pre_step_(params, grads, 0.01, 1.0, 1.0, 2.0, None, True)
    for g, s in zip(grads, snapshot):
        assert torch.equal(g.view(torch.int16 if dtype == torch.float16 else torch.int32),
                           s.view(torch.int16 if dtype == torch.float16 else torch.int32))


def test_nonfinite_without_error_behaves_like_the_separate_calls(backend, device):
    params, grads = make(torch.float32, device, (100, 70001), seed=13), make(torch.float32, device, (100, 70001), seed=14)
    grads[1][9] = float("nan")
    ours, theirs = [g.clone() for g in grads], [g.clone() for g in grads]
    total = ops.pre_step_(params, ours, 0.01, 0.0, 1.0, 2.0, None, False)
    expected = separate_calls(params, theirs, 0.01, 0.0, 1.0, 2.0, None)
    assert total.isnan() and expected.isnan()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)


def _bad_cases(device):
    p, g = make(torch.float32, device, (10, 20), seed=15), make(torch.float32, device, (10, 20), seed=16)
    return {
        "both-clips": ((p, g, 0.0, 0.0, 1.0, 2.0, 0.5, False), ValueError, "max_norm or clip_value"),
        "negative-l1": ((p, g, -0.1, 0.0, 1.0, 2.0, None, False), ValueError, "l1"),
        "nan-l2": ((p, g, 0.0, math.nan, 1.0, 2.0, None, False), ValueError, "l2"),
        "nan-norm-type": ((p, g, 0.1, 0.0, 1.0, math.nan, None, False), ValueError, "norm_type"),
        "lengths": ((p, g[:1], 0.1, 0.0, 1.0, 2.0, None, False), ValueError, "same length"),
        "shape-mid-list": ((p + [torch.zeros(3, device=device)], g + [torch.zeros(4, device=device)], 0.1, 0.0, 1.0, 2.0, None, False),
                           RuntimeError, "shape"),
        "complex-mid-list": ((p[:1] + [torch.zeros(3, dtype=torch.complex64, device=device)] + p[1:],
                              g[:1] + [torch.zeros(3, dtype=torch.complex64, device=device)] + g[1:], 0.1, 0.0, 1.0, 2.0, None, False),
                             TypeError, "real floating|floating"),
        # A gradient that partly overlaps its own parameter.
        "grad-overlaps-its-param": ((p + [p[1][:5]], g + [p[1][2:7]], 0.1, 0.0, 1.0, 2.0, None, False), RuntimeError, "overlap|memory|share"),
        "fp16-clip-value-out-of-range": (([x.half() for x in p], [x.half() for x in g], 0.1, 0.0, None, 2.0, 1e6, False),
                                         RuntimeError, "range|clip_value"),
    }


@pytest.mark.parametrize("case", list(_bad_cases("cpu")))
def test_bad_input_raises_and_writes_nothing(backend, device, case):
    args, exc, fragment = _bad_cases(device)[case]
    snapshot = [t.clone() for t in args[0] + args[1]]
    with pytest.raises(exc, match=fragment):
        ops.pre_step_(*args)
    for t, s in zip(args[0] + args[1], snapshot):
        assert torch.equal(t, s)


def test_version_counters_and_saved_tensors(backend, device):
    params, grads = make(torch.float32, device, (50, 60), seed=17), make(torch.float32, device, (50, 60), seed=18)
    before = [g._version for g in grads]
    ops.pre_step_(params, grads, 0.1, 0.0, 1e9, 2.0, None, False)
    assert all(g._version > v for g, v in zip(grads, before))
    # A gradient saved for backward and then overwritten by the op: autograd refuses the backward.
    w = torch.randn(60, device=device, requires_grad=True)
    y = (w * grads[1]).sum()
    ops.pre_step_(params, grads, 0.1, 0.0, None, 2.0, None, False)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_opcheck(backend, device):
    params, grads = make(torch.float32, device, (10, 0, 7), seed=19), make(torch.float32, device, (10, 0, 7), seed=20)
    opcheck(ops.pre_step_.default, (params, grads, 0.1, 0.2, 1.0, 2.0, None, False))
    opcheck(ops.pre_step_.default, (params, grads, 0.1, 0.2, None, 2.0, 0.3, False))
    params, grads = [p for p in params if p.numel()], [g for g in grads if g.numel()]  # inf refuses empty tensors
    opcheck(ops.pre_step_.default, ([p.half() for p in params], [g.half() for g in grads], 0.0, 0.2, 0.1, INF, None, True))


def test_fake_kernel_refuses_what_the_kernel_refuses(backend, device):
    # Under torch.compile the fake kernel decides at trace time: it must refuse the same metadata.
    from torch._subclasses.fake_tensor import FakeTensorMode

    cases = [
        (([torch.empty(0, device=device)], INF, None), "empty"),  # the inf norm of an empty tensor
        (([torch.ones(3, device=device, dtype=torch.float16)], 2.0, 1e6), "overflow"),  # clip_value beyond fp16
    ]
    for (params, norm_type, clip_value), fragment in cases:
        with pytest.raises(RuntimeError, match=fragment):
            ops.pre_step_(params, [p.clone() for p in params], 0.1, 0.0, None, norm_type, clip_value, False)
        with FakeTensorMode() as mode:
            fake = [mode.from_tensor(p) for p in params]
            with pytest.raises(RuntimeError, match=fragment):
                ops.pre_step_(fake, [p.clone() for p in fake], 0.1, 0.0, None, norm_type, clip_value, False)


def test_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    model, eager = model_with_grads(device), model_with_grads(device)

    def glue(m):
        return fused_optim.pre_step_(list(m.parameters()), 0.01, 0.02, max_norm=0.1)

    total = torch.compile(glue, fullgraph=True)(model)
    expected = glue(eager)
    torch.testing.assert_close(total, expected)
    for a, b in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


@native_cuda_test
def test_cuda_pre_step_makes_no_host_sync():
    params, grads = make(torch.float32, "cuda", [1000] * 300 + [100_003], seed=21), make(torch.float32, "cuda", [1000] * 300 + [100_003], seed=22)
    ops.pre_step_.default(params, grads, 0.1, 0.1, 1.0, 2.0, None, False)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for max_norm, clip_value in ((1.0, None), (1e9, None), (None, 0.1), (None, None)):
            ops.pre_step_.default(params, grads, 0.1, 0.1, max_norm, 2.0, clip_value, False)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------- the public function


def model_with_grads(device="cpu", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 3)).to(device, dtype)
    model(torch.randn(5, 12, device=device, dtype=dtype)).square().sum().backward()
    return model


@pytest.mark.parametrize("clip", list(CLIPS))
def test_public_pre_step_equals_public_separate_calls(backend, device, clip):
    max_norm, clip_value = CLIPS[clip]
    ours, theirs = model_with_grads(device), model_with_grads(device)
    for m in (ours, theirs):  # a parameter without a gradient (it gets the penalty's), a frozen one
        m[2].bias.grad = None
        m[3].weight.requires_grad_(False)
        m[3].weight.grad = None
    total = fused_optim.pre_step_(ours.parameters(), 0.01, 0.02, max_norm=max_norm, clip_value=clip_value)
    fused_optim.l1l2_grad_(theirs.parameters(), 0.01, 0.02)
    if max_norm is not None:
        expected = fused_optim.clip_grad_norm_(theirs.parameters(), max_norm)
    else:
        expected = fused_optim.get_total_norm([p.grad for p in theirs.parameters() if p.grad is not None])
        if clip_value is not None:
            fused_optim.clip_grad_value_(theirs.parameters(), clip_value)
    torch.testing.assert_close(total, expected)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad)
    assert ours[2].bias.grad is not None and ours[3].weight.grad is None


def test_public_frozen_parameter_with_a_gradient_takes_the_separate_calls(backend, device):
    ours, theirs = model_with_grads(device), model_with_grads(device)
    for m in (ours, theirs):
        m[0].weight.requires_grad_(False)  # keeps its gradient: clipped, not penalized
    total = fused_optim.pre_step_(ours.parameters(), 0.5, 0.5, max_norm=0.1)
    fused_optim.l1l2_grad_(theirs.parameters(), 0.5, 0.5)
    expected = fused_optim.clip_grad_norm_(theirs.parameters(), 0.1)
    torch.testing.assert_close(total, expected)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("frozen", [False, True], ids=["nan-grad", "frozen-inf-grad"])
def test_public_error_writes_nothing_and_creates_no_gradient(backend, device, frozen):
    # A frozen parameter with a gradient takes the separate calls, which add the penalty before the
    # norm can refuse it: they run on a snapshot.
    model = model_with_grads(device)
    model[2].bias.grad = None
    if frozen:
        model[0].bias.requires_grad_(False)
        model[0].bias.grad[0] = float("inf")
    else:
        model[0].weight.grad[0, 0] = float("nan")
    snapshot = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with pytest.raises(RuntimeError, match="non-finite"):
        fused_optim.pre_step_(model.parameters(), 0.1, 0.1, max_norm=1.0, error_if_nonfinite=True)
    assert model[2].bias.grad is None
    for n, p in model.named_parameters():
        if n in snapshot:
            torch.testing.assert_close(p.grad, snapshot[n], equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["clip-value-overflows-fp16", "empty-parameter-inf-norm"])
def test_public_separate_calls_refuse_before_the_first_write(backend, case):
    # A frozen parameter with a gradient sends the call to the separate calls; what the clip would
    # refuse is refused before the penalty is added.
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 0))
    model(torch.randn(3, 4)).sum().backward()
    model[0].weight.grad = torch.randn(4, 4)
    model[0].bias.requires_grad_(False)
    kwargs = dict(clip_value=1e6) if case == "clip-value-overflows-fp16" else dict(norm_type=INF)
    if case == "clip-value-overflows-fp16":
        model.half()
        model[0].weight.grad = torch.randn(4, 4).half()
    snapshot = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with pytest.raises(RuntimeError, match="cannot be converted|empty"):
        fused_optim.pre_step_(model.parameters(), 0.1, 0.1, **kwargs)
    for n, p in model.named_parameters():
        assert (p.grad is None) == (n not in snapshot)
        if n in snapshot:
            assert torch.equal(p.grad, snapshot[n]), n


def test_public_separate_calls_accept_what_they_accept(backend):
    # The checks made before the separate calls are theirs, not more: an expanded parameter without
    # a gradient (l1l2_grad_ gives it a dense one), a frozen parameter's gradient (clipped only).
    expanded = nn.Parameter(torch.ones(1).expand(4))
    frozen = nn.Parameter(torch.ones(3), requires_grad=False)
    frozen.grad = torch.full((3,), 2.0)
    total = fused_optim.pre_step_([expanded, frozen], l2=0.1, max_norm=1.0)
    e2, f2 = nn.Parameter(torch.ones(1).expand(4)), nn.Parameter(torch.ones(3), requires_grad=False)
    f2.grad = torch.full((3,), 2.0)
    fused_optim.l1l2_grad_([e2, f2], 0.0, 0.1)
    torch.testing.assert_close(total, fused_optim.clip_grad_norm_([e2, f2], 1.0))
    assert torch.equal(expanded.grad, e2.grad) and torch.equal(frozen.grad, f2.grad)
    with pytest.raises(TypeError, match=r"parameters\[1\] must be a tensor"):  # every entry is checked
        fused_optim.pre_step_([frozen, 5], l2=0.1)


def test_public_parameter_listed_twice_without_a_gradient(backend):
    # One gradient is created for it and shared by both positions, as an existing one would be:
    # the penalty is added twice, the norm counts it twice, the scale applies twice (torch's foreach
    # semantics for a tensor listed twice), as the separate calls and torch's clip_grad_norm_ give.
    torch.manual_seed(0)
    p, q = torch.randn(5, requires_grad=True), torch.randn(3, requires_grad=True)
    q.grad = torch.randn(3)
    q_grad = q.grad.clone()
    total = fused_optim.pre_step_([p, q, p], 0.1, 0.5, max_norm=0.5)
    p2, q2 = p.detach().clone().requires_grad_(), q.detach().clone().requires_grad_()
    q2.grad = q_grad.clone()
    fused_optim.l1l2_grad_([p2, q2, p2], 0.1, 0.5)
    separate = fused_optim.clip_grad_norm_([p2, q2, p2], 0.5)
    p3, q3 = p.detach().double().requires_grad_(), q.detach().double().requires_grad_()
    p3.grad = 2 * (0.1 * p3.detach().sign() + 2 * 0.5 * p3.detach())  # plain fp64: twice the penalty
    q3.grad = q_grad.double() + 0.1 * q3.detach().sign() + 2 * 0.5 * q3.detach()
    plain = torch.nn.utils.clip_grad_norm_([p3, q3, p3], 0.5, foreach=True)
    for got in (total, separate):
        torch.testing.assert_close(got.double(), plain)
    torch.testing.assert_close(p.grad, p2.grad, rtol=0, atol=0)
    torch.testing.assert_close(p.grad.double(), p3.grad)
    torch.testing.assert_close(q.grad.double(), q3.grad)


def test_public_bad_arguments(backend, device):
    model = model_with_grads(device)
    snapshot = [p.grad.clone() for p in model.parameters()]
    for call, exc, fragment in [
        (lambda: fused_optim.pre_step_(model.parameters(), max_norm=1.0, clip_value=1.0), ValueError, "not both"),
        (lambda: fused_optim.pre_step_(model.parameters(), l1="x"), TypeError, "l1 must be a real number"),
        (lambda: fused_optim.pre_step_(model.parameters(), max_norm="x"), ValueError, "max_norm must be a number"),
        (lambda: fused_optim.pre_step_([*model.parameters(), 3], 0.1), TypeError, r"parameters\[8\] must be a tensor"),
        (lambda: fused_optim.pre_step_(5), TypeError, "parameters must be"),
    ]:
        with pytest.raises(exc, match=fragment):
            call()
    for p, s in zip(model.parameters(), snapshot):
        assert torch.equal(p.grad, s)


@pytest.mark.parametrize("clip", list(CLIPS))
def test_flat_pre_step_equals_the_per_tensor_one(backend, device, clip):
    max_norm, clip_value = CLIPS[clip]
    flat_model, plain = model_with_grads(device), model_with_grads(device)
    grads = [p.grad.clone() for p in flat_model.parameters()]
    flat = fused_optim.flatten_parameters(flat_model)
    for p, g in zip(flat_model.parameters(), grads):
        p.grad = g  # copied into the buffer by the next flat call
    for m in (flat_model, plain):
        m[2].bias.grad = None  # gets the penalty's gradient: its view of the buffer
    for how in ("method", "public", "one-view"):
        if how == "method":
            total = flat.pre_step_(0.01, 0.02, max_norm, 2.0, clip_value)
        elif how == "public":
            total = fused_optim.pre_step_(flat_model.parameters(), 0.01, 0.02, max_norm, 2.0, clip_value)
        else:
            total = fused_optim.pre_step_(list(flat_model.parameters()), 0.01, 0.02, max_norm, 2.0, clip_value)
        expected = fused_optim.pre_step_(plain.parameters(), 0.01, 0.02, max_norm, 2.0, clip_value)
        torch.testing.assert_close(total, expected)
        for a, b in zip(flat_model.parameters(), plain.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    assert flat.check()  # every gradient, the created one included, is its view of the buffer


def test_flat_pre_step_leaves_frozen_slots_without_gradient(backend, device):
    flat_model = model_with_grads(device)
    flat_model[4].weight.requires_grad_(False)
    flat_model[4].weight.grad = None
    flat = fused_optim.flatten_parameters(flat_model)
    flat_model(torch.randn(5, 12, device=device)).square().sum().backward()
    plain = copy.deepcopy(flat_model)
    for a, b in zip(flat_model.parameters(), plain.parameters()):
        b.grad = None if a.grad is None else a.grad.clone()
    total = flat.pre_step_(0.3, 0.3, max_norm=0.5)
    expected = fused_optim.pre_step_(plain.parameters(), 0.3, 0.3, max_norm=0.5)
    torch.testing.assert_close(total, expected)
    assert flat_model[4].weight.grad is None
    (slot,) = [v for g in flat.groups for v in g.missing]
    assert not slot.any()  # the frozen parameter's slot stays zero: no penalty written there
    for a, b in zip(flat_model.parameters(), plain.parameters()):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


@pytest.mark.filterwarnings("error")  # freezing a parameter whose gradient is its slot: no fallback warning
@pytest.mark.parametrize("method", ["pre_step_", "l1l2_grad_"])
def test_flat_frozen_parameter_with_a_gradient_gets_no_penalty(backend, device, method):
    flat_model = model_with_grads(device)
    flat = fused_optim.flatten_parameters(flat_model)
    flat_model(torch.randn(5, 12, device=device)).square().sum().backward()
    flat_model[2].bias.requires_grad_(False)  # frozen after backward: keeps its gradient
    plain = copy.deepcopy(flat_model)
    for a, b in zip(flat_model.parameters(), plain.parameters()):
        b.grad = a.grad.clone()
    frozen = flat_model[2].bias.grad.clone()
    for run in (lambda m: getattr(flat, method)(0.3, 0.3), lambda m: getattr(fused_optim, method)(m.parameters(), 0.3, 0.3)):
        run(flat_model)
        getattr(fused_optim, method)(list(plain.parameters()), 0.3, 0.3)
        assert torch.equal(flat_model[2].bias.grad, frozen)
        for a, b in zip(flat_model.parameters(), plain.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


# ---------------------------------------------------------------- attach(optimizer)


def tiny_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(dropout), nn.Linear(16, 4))


def batches(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(10, 8, generator=g), torch.randn(10, 4, generator=g)) for _ in range(n)]


GLUE = dict(l1=1e-3, l2=1e-2, max_norm=0.3)


def hand_written_step(model, opt, x, y, ema=None, *, l1, l2, max_norm=None, clip_value=None, norm_type=2.0):
    """The loop attach replaces: the separate calls, in the seed's order."""
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    fused_optim.l1l2_grad_(model.parameters(), l1, l2)
    if max_norm is not None:
        total = fused_optim.clip_grad_norm_(model.parameters(), max_norm, norm_type)
    else:
        total = fused_optim.get_total_norm([p.grad for p in model.parameters()], norm_type)
        if clip_value is not None:
            fused_optim.clip_grad_value_(model.parameters(), clip_value)
    opt.step()
    if ema is not None:
        ema.update(model)
    return total


def attached_step(model, opt, x, y):
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def assert_same_weights(a: nn.Module, b: nn.Module, exact=True):
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        if exact:
            assert torch.equal(p, q), n
        else:
            torch.testing.assert_close(p, q, msg=n)


@pytest.mark.parametrize("flat", [False, True], ids=["tensors", "flat"])
@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.AdamW], ids=["sgd", "adamw"])
@pytest.mark.parametrize("clip", ["norm", "value", "none"])
def test_attach_equals_the_hand_written_loop(backend, opt_cls, flat, clip):
    glue = dict(l1=1e-3, l2=1e-2, **{"norm": dict(max_norm=0.3), "value": dict(clip_value=0.02), "none": {}}[clip])
    ours, theirs = tiny_model(), tiny_model()
    if flat:
        fused_optim.flatten_parameters(ours)
    opt_ours, opt_theirs = opt_cls(ours.parameters(), lr=0.05), opt_cls(theirs.parameters(), lr=0.05)
    ema_ours, ema_theirs = fused_optim.ModelEMA(ours, decay=0.9), fused_optim.ModelEMA(theirs, decay=0.9)
    handle = fused_optim.attach(opt_ours, ema=ema_ours, model=ours, **glue)
    for x, y in batches():
        attached_step(ours, opt_ours, x, y)
        total = hand_written_step(theirs, opt_theirs, x, y, ema_theirs, **glue)
        torch.testing.assert_close(handle.total_norm, total)
    assert handle.steps == len(batches())
    assert_same_weights(ours, theirs)
    assert_same_weights(ema_ours, ema_theirs)
    handle.remove()
    attached_step(ours, opt_ours, *batches()[0])  # detached: a plain step now
    opt_theirs.zero_grad()
    nn.functional.mse_loss(theirs(batches()[0][0]), batches()[0][1]).backward()
    opt_theirs.step()
    assert_same_weights(ours, theirs)
    assert handle.steps == len(batches())


def test_attach_param_groups_with_their_own_coefficients(backend):
    ours, theirs = tiny_model(), tiny_model()

    def groups(m):  # no penalty on biases (a group's own l1/l2), another learning rate
        return [{"params": [m[0].weight, m[3].weight]}, {"params": [m[0].bias, m[3].bias], "l1": 0.0, "l2": 0.0, "lr": 0.01}]

    opt_ours, opt_theirs = torch.optim.SGD(groups(ours), lr=0.1), torch.optim.SGD(groups(theirs), lr=0.1)
    handle = fused_optim.attach(opt_ours, l1=1e-3, l2=1e-2, max_norm=0.2)
    for x, y in batches():
        attached_step(ours, opt_ours, x, y)
        opt_theirs.zero_grad()
        nn.functional.mse_loss(theirs(x), y).backward()
        fused_optim.l1l2_grad_([theirs[0].weight, theirs[3].weight], 1e-3, 1e-2)
        total = fused_optim.clip_grad_norm_(theirs.parameters(), 0.2)  # one norm over every group
        opt_theirs.step()
        torch.testing.assert_close(handle.total_norm, total)
    assert_same_weights(ours, theirs)


def test_attach_param_groups_refused_steps_write_nothing(backend):
    model = tiny_model()
    opt = torch.optim.SGD([{"params": list(model[0].parameters())}, {"params": list(model[3].parameters()), "l2": 0.5}], lr=0.1)
    fused_optim.attach(opt, l1=1e-3, max_norm=1.0, error_if_nonfinite=True)
    x, y = batches(1)[0]
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    model[3].bias.grad[0] = float("nan")
    weights, grads = copy.deepcopy(model.state_dict()), [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.step()  # each group's penalty first, then the clip: refused, and every gradient restored
    opt.param_groups[1]["l2"] = -1.0
    with pytest.raises(ValueError, match=r'param_groups\[1\]\["l2"\] must be a finite number >= 0'):
        opt.step()  # checked before group 0's penalty is added
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name  # no step taken


def test_attach_group_without_penalty_creates_no_gradient(backend):
    # An unused module in a group with l1 = l2 = 0 (a "no decay" group): its parameters keep no
    # gradient, so AdamW neither decays them nor starts their state, as with the separate calls.
    used, unused = nn.Linear(4, 4), nn.Linear(4, 4)
    before = copy.deepcopy(unused.state_dict())
    opt = torch.optim.AdamW([{"params": used.parameters()}, {"params": unused.parameters(), "l1": 0.0, "l2": 0.0}], lr=0.1)
    fused_optim.attach(opt, l2=0.01, max_norm=1.0)
    for _ in range(2):
        opt.zero_grad()
        used(torch.randn(3, 4)).sum().backward()
        opt.step()
    assert all(p.grad is None for p in unused.parameters())
    assert all(torch.equal(v, before[k]) for k, v in unused.state_dict().items())
    assert not any(opt.state[p] for p in unused.parameters())


@pytest.mark.parametrize("case", ["expanded-grad", "complex-param", "clip-value-overflows-fp16"])
def test_attach_param_groups_refuse_before_any_group_is_written(backend, case):
    # Each group's penalty is its own call: what the second call or the clip would refuse is
    # refused before the first writes (here without error_if_nonfinite, so with no snapshot).
    w1, w2 = torch.ones(4, requires_grad=True), torch.ones(4, requires_grad=True)
    w1.grad, w2.grad = torch.ones(4), torch.full((4,), 2.0)
    kwargs = {}
    if case == "expanded-grad":
        w2.grad = torch.zeros(1).expand(4)
    elif case == "complex-param":
        w2 = torch.ones(4, dtype=torch.complex64, requires_grad=True)
        w2.grad = torch.ones(4, dtype=torch.complex64)
    else:
        w1.data, w1.grad = w1.data.half(), w1.grad.half()
        kwargs = dict(clip_value=1e6)
    opt = torch.optim.SGD([{"params": [w1]}, {"params": [w2], "l2": 0.5}], lr=0.1)
    fused_optim.attach(opt, l2=0.25, **kwargs)
    snapshot = [(w, w.detach().clone(), w.grad.clone()) for w in (w1, w2)]
    with pytest.raises((RuntimeError, TypeError), match="grads|params|cannot be converted"):
        opt.step()
    for w, value, grad in snapshot:
        assert torch.equal(w.detach(), value) and torch.equal(w.grad, grad)


def test_attach_refusal_leaves_no_grad_scaler_state(backend):
    # GradScaler sets optimizer.grad_scale / found_inf for a fused optimizer and deletes them only
    # when step returns: any refusal of the hook removes them, so later steps are unaffected.
    model = tiny_model()
    opt = torch.optim.AdamW([{"params": list(model[0].parameters())}, {"params": list(model[3].parameters())}],
                            lr=0.05, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    fused_optim.attach(opt, **GLUE)
    x, y = batches(1)[0]
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    scaler.unscale_(opt)
    opt.param_groups[1]["l1"] = -1.0
    with pytest.raises(ValueError, match=r'param_groups\[1\]\["l1"\]'):
        scaler.step(opt)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


def test_attach_refuses_a_nan_norm_type_at_once():
    opt = torch.optim.SGD(tiny_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="norm_type must be a number, got nan"):
        fused_optim.attach(opt, l2=0.1, norm_type=float("nan"))


def test_attach_follows_parameters_replaced_in_place(backend):
    # The optimizer's own list edited in place, or replaced by a new list twice (whose id may be
    # the freed one's): the glue penalizes the parameters the optimizer holds now.
    old, new = torch.ones(3, requires_grad=True), torch.full((3,), 2.0, requires_grad=True)
    opt = torch.optim.SGD([old], lr=0.0)
    fused_optim.attach(opt, l2=0.5)
    for p in (old, new):
        p.grad = torch.zeros(3)
    opt.step()
    opt.param_groups[0]["params"][0] = new
    opt.step()
    assert torch.equal(old.grad, torch.full((3,), 1.0)) and torch.equal(new.grad, torch.full((3,), 2.0))
    for _ in range(3):
        opt.param_groups[0]["params"] = [old]
        opt.param_groups[0]["params"] = [new]
        opt.step()
    assert torch.equal(old.grad, torch.full((3,), 1.0)) and torch.equal(new.grad, torch.full((3,), 8.0))


def test_attach_takes_the_flat_path_once_the_model_is_flattened(backend):
    ours, theirs = tiny_model(), tiny_model()
    opt_ours, opt_theirs = torch.optim.SGD(ours.parameters(), lr=0.1), torch.optim.SGD(theirs.parameters(), lr=0.1)
    fused_optim.attach(opt_ours, model=ours, **GLUE)
    batch = batches(3)
    attached_step(ours, opt_ours, *batch[0])  # not flattened yet: per tensor
    hand_written_step(theirs, opt_theirs, *batch[0], **GLUE)
    fused_optim.flatten_parameters(ours)  # after the first step: the glue finds it
    routes = []
    for x, y in batch[1:]:
        attached_step(ours, opt_ours, x, y)
        routes.append(fused_optim.last_route())
        hand_written_step(theirs, opt_theirs, x, y, **GLUE)
    assert routes == [("pre_step_", "per_tensor" if EXT_DISABLED else "flat")] * 2
    assert_same_weights(ours, theirs)


def test_attach_runs_per_tensor_when_the_flat_buffers_break(backend):
    ours, theirs = tiny_model(), tiny_model()
    fused_optim.flatten_parameters(ours)
    opt_ours, opt_theirs = torch.optim.SGD(ours.parameters(), lr=0.1), torch.optim.SGD(theirs.parameters(), lr=0.1)
    fused_optim.attach(opt_ours, model=ours, **GLUE)
    batch = batches(2)
    attached_step(ours, opt_ours, *batch[0])
    hand_written_step(theirs, opt_theirs, *batch[0], **GLUE)
    ours.double(), theirs.double()  # the parameters leave their buffers
    x, y = batch[1][0].double(), batch[1][1].double()
    lost = pytest.warns(UserWarning, match="per-tensor path runs") if not EXT_DISABLED else contextlib.nullcontext()
    with lost:  # the warning that the one-call path is lost: only where the extension gives it
        attached_step(ours, opt_ours, x, y)
    hand_written_step(theirs, opt_theirs, x, y, **GLUE)
    assert_same_weights(ours, theirs)


def test_attach_same_coefficients_in_every_group_is_one_clip_of_all(backend):
    ours, theirs = tiny_model(), tiny_model()

    def groups(m):
        return [{"params": list(m[0].parameters())}, {"params": list(m[3].parameters()), "lr": 0.01}]

    opt_ours, opt_theirs = torch.optim.AdamW(groups(ours), lr=0.1), torch.optim.AdamW(groups(theirs), lr=0.1)
    fused_optim.attach(opt_ours, **GLUE)
    for x, y in batches():
        attached_step(ours, opt_ours, x, y)
        hand_written_step(theirs, opt_theirs, x, y, **GLUE)
    assert_same_weights(ours, theirs)


@pytest.mark.parametrize(
    "fused_adam, unscale", [(False, True), (False, False), (True, True)],
    ids=["adamw-unscale_", "adamw-scaler.step-unscales", "adamw-fused-unscale_"],
)
def test_attach_with_grad_scaler_and_bf16_autocast(backend, fused_adam, unscale):
    # CPU GradScaler with bf16 autocast; batch 3 has an inf gradient: the scaler skips that step,
    # and with it the penalty, the clip and the EMA update. Without unscale_, scaler.step unscales
    # before it calls step: the hook still sees unscaled gradients.
    ours, theirs = tiny_model(), tiny_model()
    kw = dict(lr=0.05, fused=True) if fused_adam else dict(lr=0.05)
    opt_ours, opt_theirs = torch.optim.AdamW(ours.parameters(), **kw), torch.optim.AdamW(theirs.parameters(), **kw)
    ema_ours, ema_theirs = fused_optim.ModelEMA(ours, decay=0.8), fused_optim.ModelEMA(theirs, decay=0.8)
    scaler_ours, scaler_theirs = torch.amp.GradScaler("cpu", init_scale=1024.0), torch.amp.GradScaler("cpu", init_scale=1024.0)
    handle = fused_optim.attach(opt_ours, ema=ema_ours, model=ours, **GLUE)
    for i, (x, y) in enumerate(batches(8)):
        if i == 3:
            x = x.clone()
            x[0, 0] = INF
        for model, opt, scaler, ema in ((ours, opt_ours, scaler_ours, ema_ours), (theirs, opt_theirs, scaler_theirs, ema_theirs)):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.mse_loss(model(x).float(), y)
            scaler.scale(loss).backward()
            if unscale or model is theirs:
                scaler.unscale_(opt)  # what torch documents before clipping; attach's hook runs after it
            if model is ours and i == 3:  # the skipped step: the hook must not touch the gradients
                inv_scale = 1.0 if unscale else 1.0 / scaler.get_scale()  # a power of 2: exact
                skipped_grads = [p.grad * inv_scale for p in model.parameters()]
            if model is theirs:
                found_inf = sum(v.item() for v in scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values())
                if not found_inf:
                    fused_optim.l1l2_grad_(model.parameters(), GLUE["l1"], GLUE["l2"])
                    fused_optim.clip_grad_norm_(model.parameters(), GLUE["max_norm"])
            scaler.step(opt)
            if model is ours and i == 3:
                for p, g in zip(model.parameters(), skipped_grads):
                    torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)
            scaler.update()
            if model is theirs and not found_inf:
                ema.update(model)
    assert handle.steps == 7  # 8 batches, one skipped
    assert scaler_ours.get_scale() == scaler_theirs.get_scale() < 1024.0
    assert_same_weights(ours, theirs)
    assert_same_weights(ema_ours, ema_theirs)


def test_attach_refuses_still_scaled_gradients_of_a_fused_optimizer(backend):
    # AdamW(fused=True) unscales inside its step: without scaler.unscale_ first, the hook would see
    # scaled gradients, so it raises, before the penalty is added or anything is stepped.
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    fused_optim.attach(opt, **GLUE)
    x, y = batches(1)[0]
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    weights = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"call scaler.unscale_\(optimizer\)"):
        scaler.step(opt)
    for p, w, g in zip(model.parameters(), weights, grads):
        assert torch.equal(p, w) and torch.equal(p.grad, g)
    opt.step()  # the scaler's leftover attributes are gone: a later plain step is not refused
    assert not any(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


def test_attach_with_gradient_accumulator_runs_once_per_optimizer_step(backend):
    ours, theirs = tiny_model(), tiny_model()
    opt_ours, opt_theirs = torch.optim.SGD(ours.parameters(), lr=0.1), torch.optim.SGD(theirs.parameters(), lr=0.1)
    handle = fused_optim.attach(opt_ours, **GLUE)
    acc_ours, acc_theirs = fused_optim.GradientAccumulator(ours, 3), fused_optim.GradientAccumulator(theirs, 3)
    for x, y in batches(9):
        if acc_ours.step(nn.functional.mse_loss(ours(x), y)):
            opt_ours.step()
            opt_ours.zero_grad()
        if acc_theirs.step(nn.functional.mse_loss(theirs(x), y)):
            fused_optim.l1l2_grad_(theirs.parameters(), GLUE["l1"], GLUE["l2"])
            fused_optim.clip_grad_norm_(theirs.parameters(), GLUE["max_norm"])
            opt_theirs.step()
            opt_theirs.zero_grad()
    assert handle.steps == 3
    assert_same_weights(ours, theirs)


@pytest.mark.parametrize("positional", [False, True], ids=["closure=", "positional"])
def test_attach_runs_the_glue_on_the_closures_gradients(backend, positional):
    ours, theirs = tiny_model(), tiny_model()
    opt_ours, opt_theirs = torch.optim.SGD(ours.parameters(), lr=0.1), torch.optim.SGD(theirs.parameters(), lr=0.1)
    handle = fused_optim.attach(opt_ours, **GLUE)
    for x, y in batches(4):
        def closure_ours():
            opt_ours.zero_grad()
            loss = nn.functional.mse_loss(ours(x), y)
            loss.backward()
            return loss

        def closure_theirs():
            opt_theirs.zero_grad()
            loss = nn.functional.mse_loss(theirs(x), y)
            loss.backward()
            fused_optim.l1l2_grad_(theirs.parameters(), GLUE["l1"], GLUE["l2"])
            fused_optim.clip_grad_norm_(theirs.parameters(), GLUE["max_norm"])
            return loss

        loss_ours = opt_ours.step(closure_ours) if positional else opt_ours.step(closure=closure_ours)
        loss_theirs = opt_theirs.step(closure_theirs)
        assert torch.equal(loss_ours, loss_theirs)
    assert handle.steps == 4
    assert_same_weights(ours, theirs)


def test_attach_with_lbfgs_runs_the_glue_at_every_evaluation(backend):
    ours, theirs = tiny_model(), tiny_model()
    opt_ours = torch.optim.LBFGS(ours.parameters(), lr=0.5, max_iter=4)
    opt_theirs = torch.optim.LBFGS(theirs.parameters(), lr=0.5, max_iter=4)
    handle = fused_optim.attach(opt_ours, l2=1e-2)
    x, y = batches(1)[0]

    def closure(model, opt, glue):
        def run():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if glue:
                fused_optim.l1l2_grad_(model.parameters(), 0.0, 1e-2)
            return loss

        return run

    opt_ours.step(closure(ours, opt_ours, False))
    opt_theirs.step(closure(theirs, opt_theirs, True))
    assert handle.steps == 1  # one optimizer step, however many evaluations
    assert_same_weights(ours, theirs)


def test_attach_follows_a_param_group_added_later(backend):
    ours, theirs = tiny_model(), tiny_model()
    opt_ours = torch.optim.SGD(ours[0].parameters(), lr=0.1)
    opt_theirs = torch.optim.SGD(theirs[0].parameters(), lr=0.1)
    fused_optim.attach(opt_ours, **GLUE)
    for i, (x, y) in enumerate(batches(4)):
        if i == 2:
            opt_ours.add_param_group({"params": list(ours[3].parameters())})
            opt_theirs.add_param_group({"params": list(theirs[3].parameters())})
        attached_step(ours, opt_ours, x, y)
        opt_theirs.zero_grad()
        nn.functional.mse_loss(theirs(x), y).backward()
        params = [p for g in opt_theirs.param_groups for p in g["params"]]
        fused_optim.l1l2_grad_(params, GLUE["l1"], GLUE["l2"])
        fused_optim.clip_grad_norm_(params, GLUE["max_norm"])
        opt_theirs.step()
    assert_same_weights(ours, theirs)


def test_attach_refusals():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        fused_optim.attach(model)
    with pytest.raises(ValueError, match="not both"):
        fused_optim.attach(opt, max_norm=1.0, clip_value=1.0)
    with pytest.raises(ValueError, match="l1 must be a finite number >= 0"):
        fused_optim.attach(opt, l1=-1.0)
    with pytest.raises(ValueError, match="ema needs model"):
        fused_optim.attach(opt, ema=fused_optim.ModelEMA(model))
    with pytest.raises(TypeError, match="ema must be"):
        fused_optim.attach(opt, ema=object(), model=model)
    handle = fused_optim.attach(opt, l2=0.1)
    with pytest.raises(RuntimeError, match="already has the glue attached"):
        fused_optim.attach(opt, l2=0.1)
    handle.remove()
    with fused_optim.attach(opt, l2=0.1) as again:  # attachable again once removed; a context manager
        assert "attached" in repr(again)
    assert "removed" in repr(again)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_attach_total_norm_stays_on_the_device_without_a_host_read(backend):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = fused_optim.attach(opt, max_norm=1.0)
    assert handle.total_norm is None
    attached_step(model, opt, *batches(1)[0])
    assert isinstance(handle.total_norm, torch.Tensor) and handle.total_norm.shape == ()


def test_attach_with_torch_averaged_model(backend):
    ours, theirs = tiny_model(), tiny_model()
    opt_ours, opt_theirs = torch.optim.SGD(ours.parameters(), lr=0.1), torch.optim.SGD(theirs.parameters(), lr=0.1)
    avg = torch.optim.swa_utils.AveragedModel(ours)
    avg_theirs = torch.optim.swa_utils.AveragedModel(theirs)
    fused_optim.attach(opt_ours, ema=avg, model=ours, l2=1e-2)
    for x, y in batches(3):
        attached_step(ours, opt_ours, x, y)
        hand_written_step(theirs, opt_theirs, x, y, l1=0.0, l2=1e-2)
        avg_theirs.update_parameters(theirs)
    assert_same_weights(avg, avg_theirs)


# ---------------------------------------------------------------- inside PyTorch Lightning


def _lightning_fit(attach_glue: bool, precision: str):
    require("lightning")
    import lightning.pytorch as pl

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*[torch.cat(t) for t in zip(*batches(8))]), batch_size=10)

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_model()
            self.ema = fused_optim.ModelEMA(self.net, decay=0.9)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x).float(), y)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.net.parameters(), lr=0.05)
            if attach_glue:
                fused_optim.attach(opt, ema=self.ema, model=self.net, **GLUE)
            return opt

        # The hand-written form: the separate calls in Lightning's hooks.
        def on_before_optimizer_step(self, optimizer):
            if not attach_glue:
                fused_optim.l1l2_grad_(self.net.parameters(), GLUE["l1"], GLUE["l2"])
                fused_optim.clip_grad_norm_(self.net.parameters(), GLUE["max_norm"])

        def on_train_batch_end(self, outputs, batch, batch_idx):
            if not attach_glue:
                self.ema.update(self.net)

    module = Tiny()
    trainer = pl.Trainer(
        max_epochs=3, accelerator="cpu", devices=1, logger=False, precision=precision, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=data)
    return module


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_trainer_with_attach_equals_the_separate_calls(precision):
    ours, theirs = _lightning_fit(True, precision), _lightning_fit(False, precision)
    assert_same_weights(ours.net, theirs.net)
    assert_same_weights(ours.ema, theirs.ema)
    # And the same as a plain loop with the separate calls (fp32 only: the trainer's bf16 autocast
    # differs from no autocast).
    if precision == "32-true":
        plain = tiny_model()
        opt = torch.optim.AdamW(plain.parameters(), lr=0.05)
        ema = fused_optim.ModelEMA(plain, decay=0.9)
        for _ in range(3):
            for x, y in batches(8):
                hand_written_step(plain, opt, x, y, ema, **GLUE)
        assert_same_weights(ours.net, plain, exact=False)
