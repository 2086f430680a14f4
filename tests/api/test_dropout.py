"""Dropout with the counter-based stream: statistics, exact values against the mask, autograd
without a saved mask, reproducibility, nn.Dropout drop-in behaviour."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import fused_optim
from fused_optim import checks, reference
from helpers import DTYPES, EXT_DISABLED, HAS_CUDA, native_cuda_test, opcheck

SEED_OFFSET = torch.tensor([1234567890123, 98765432101], dtype=torch.int64)


def expected_output(x, mask, p):
    """x * mask / (1 - p) in fp64 (dropped elements multiplied by 0)."""
    scale = 0.0 if p == 1 else 1.0 / (1.0 - p)
    return x.double() * mask.double() * scale


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_fraction_and_mean_within_five_sigma(backend, device, p):
    torch.manual_seed(0)
    n = 2**20
    out = fused_optim.dropout(torch.ones(n, device=device), p)
    kept = (out != 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 5 * sigma
    # mean preserved: E[out] = 1, sd of the mean = sqrt(p / (1 - p) / n)
    assert abs(out.double().mean().item() - 1.0) < 5 * math.sqrt(p / (1 - p) / n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.2, 0.7])
def test_values_are_input_times_mask_over_keep_probability(backend, device, dtype, p):
    torch.manual_seed(1)
    x = torch.randn(3001, device=device).to(dtype)
    out, packed = fused_optim.dropout(x, p, return_mask=True)
    mask = fused_optim.unpack_dropout_mask(packed, x.shape)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out != 0, mask & (x != 0))
    expected = expected_output(x, mask, p)
    # One rounding of x * (1 / (1 - p)): within an ulp of the fp64 value.
    tol = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=0)


def test_native_and_reference_masks_are_bit_identical(backend, device):
    shapes = [(1,), (31,), (32,), (33,), (1000, 37), (7, 0), ()]
    for dtype in DTYPES:
        for shape in shapes:
            x = torch.randn(shape, device=device).to(dtype)
            ours = torch.ops.fused_optim.dropout.default(x, 0.4, SEED_OFFSET)
            assert torch.equal(ours, reference.dropout(x, 0.4, SEED_OFFSET)), (dtype, shape)
            assert torch.equal(
                torch.ops.fused_optim.dropout_mask.default(x, 0.4, SEED_OFFSET),
                reference.dropout_mask(x, 0.4, SEED_OFFSET),
            )


def test_non_contiguous_input_uses_logical_order(backend, device):
    base = torch.randn(40, 50, device=device)
    for view_of in (lambda t: t.t(), lambda t: t[::2, 1::3]):
        view = view_of(base)
        expected = torch.ops.fused_optim.dropout.default(view.contiguous(), 0.5, SEED_OFFSET)
        assert torch.equal(torch.ops.fused_optim.dropout.default(view, 0.5, SEED_OFFSET), expected)
        storage = base.clone()
        torch.ops.fused_optim.dropout_.default(view_of(storage), 0.5, SEED_OFFSET)
        assert torch.equal(view_of(storage), expected)


def test_manual_seed_reproduces_and_calls_differ(backend, device):
    x = torch.randn(10_000, device=device)
    torch.manual_seed(7)
    a = fused_optim.dropout(x, 0.5)
    b = fused_optim.dropout(x, 0.5)
    torch.manual_seed(7)
    assert torch.equal(fused_optim.dropout(x, 0.5), a)
    assert not torch.equal(a != 0, b != 0)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(fused_optim.dropout(x, 0.5, generator=g1), fused_optim.dropout(x, 0.5, generator=g2))


def test_mask_independent_of_thread_count(backend):
    x = torch.randn(1_000_003)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(torch.ops.fused_optim.dropout.default(x, 0.3, SEED_OFFSET))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o, outs[0]) for o in outs)


@pytest.mark.skipif(EXT_DISABLED, reason="native extension disabled by FUSED_OPTIM_DISABLE_EXT=1")
def test_portable_and_avx2_kernels_give_the_same_mask():
    code = (
        "import torch, fused_optim, hashlib\n"
        "so = torch.tensor([11, 22], dtype=torch.int64)\n"
        "x = torch.arange(100_003, dtype=torch.float32)\n"
        "out = torch.ops.fused_optim.dropout.default(x, 0.3, so)\n"
        "print(fused_optim.backend_info()['cpu_kernels'], hashlib.sha256(out.numpy().tobytes()).hexdigest())\n"
    )
    runs = [
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
        for env in (None, {**os.environ, "ATEN_CPU_CAPABILITY": "default"})
    ]
    assert runs[1][0] == "DEFAULT"
    assert runs[0][1] == runs[1][1]


# ---------------------------------------------------------------- autograd


@pytest.mark.parametrize("inplace", [False, True])
def test_backward_is_grad_times_mask_over_keep_probability(backend, device, inplace):
    torch.manual_seed(2)
    leaf = torch.randn(500, 3, device=device, dtype=torch.float64, requires_grad=True)
    x = leaf * 1.0  # non-leaf, so in-place is allowed
    out, packed = fused_optim.dropout(x, 0.3, inplace=inplace, return_mask=True)
    if inplace:
        assert out is x
    grad = torch.randn_like(out)
    out.backward(grad)
    mask = fused_optim.unpack_dropout_mask(packed, leaf.shape)
    torch.testing.assert_close(leaf.grad, expected_output(grad, mask, 0.3))


def test_inplace_on_leaf_requiring_grad_is_refused_like_torch(backend):
    leaf = torch.randn(10, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        F.dropout(leaf, 0.5, inplace=True)
    before = leaf.detach().clone()
    with pytest.raises(RuntimeError, match="leaf"):
        fused_optim.dropout(leaf, 0.5, inplace=True)
    assert torch.equal(leaf.detach(), before)


def test_saves_constant_bytes_for_backward(backend):
    def saved_bytes(fn, x):
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x).sum()
        return sum(sizes)

    for n in (1000, 1_000_000):
        x = torch.randn(n, requires_grad=True)
        assert saved_bytes(lambda t: fused_optim.dropout(t, 0.5), x) == 16  # seed and offset
        assert saved_bytes(lambda t: F.dropout(t, 0.5), x) >= n  # torch saves a mask


def test_double_call_and_gradcheck(backend):
    x = torch.randn(20, dtype=torch.float64, requires_grad=True)
    so = SEED_OFFSET

    def twice(t):
        y = torch.ops.fused_optim.dropout.default(t, 0.3, so)
        return torch.ops.fused_optim.dropout.default(y, 0.3, so + 1)

    assert torch.autograd.gradcheck(twice, (x,))


def test_checkpoint_recomputes_the_same_mask(backend):
    torch.manual_seed(3)
    lin = nn.Linear(16, 16)
    x = torch.randn(8, 16, requires_grad=True)

    def block(t):
        return fused_optim.dropout(lin(t), 0.5).square()

    torch.manual_seed(10)
    plain = block(x)
    plain.sum().backward()
    expected = x.grad.clone()
    x.grad = None
    torch.manual_seed(10)
    ckpt = checkpoint(block, x, use_reentrant=False)
    torch.testing.assert_close(ckpt, plain)
    ckpt.sum().backward()
    torch.testing.assert_close(x.grad, expected)


# ---------------------------------------------------------------- edge cases, module


def test_identity_cases_and_p_one(backend, device):
    x = torch.randn(100, device=device)
    assert fused_optim.dropout(x, 0.5, training=False) is x
    assert fused_optim.dropout(x, 0.0) is x
    assert torch.equal(fused_optim.dropout(x, 1.0), torch.zeros_like(x))
    nan = torch.tensor([float("nan"), 1.0], device=device)
    assert torch.isnan(fused_optim.dropout(nan, 1.0)[0])  # dropped nan stays nan, as in torch
    _, mask = fused_optim.dropout(x[:10], 0.5, training=False, return_mask=True)
    assert mask.tolist() == [255, 3]


def test_scalar_and_empty(backend, device):
    torch.manual_seed(0)
    s = torch.tensor(3.0, device=device)
    out = fused_optim.dropout(s, 0.5)
    assert out.shape == () and out.item() in (0.0, 6.0)
    e = torch.empty(0, 4, device=device)
    assert fused_optim.dropout(e, 0.5).shape == (0, 4)
    fused_optim.dropout(e, 0.5, inplace=True)


def test_module_is_a_drop_in_for_nn_dropout(backend):
    ours, theirs = fused_optim.Dropout(0.3, inplace=True), nn.Dropout(0.3, inplace=True)
    assert repr(ours) == f"fused_optim.{repr(theirs)}" and isinstance(ours, nn.Dropout)  # says it is ours
    assert ours.state_dict() == theirs.state_dict() == {}
    model = nn.Sequential(nn.Linear(4, 8), fused_optim.Dropout(0.5), nn.Linear(8, 2))
    x = torch.randn(64, 4)
    model.eval()
    assert torch.equal(model(x), model[2](model[0](x)))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(0)
    assert torch.equal(model(x), a)
    a.sum().backward()
    assert fused_optim.Dropout(0.0)(x) is x


def test_custom_dropout_keeps_the_seed_constructor(backend):
    m = fused_optim.CustomDropout(p=0.25, training=False)
    x = torch.randn(1000)
    assert m(x) is x
    m.train()
    out = m(x)
    assert ((out == 0) | torch.isclose(out, x / 0.75)).all()


def test_opcheck(backend, device):
    x = torch.randn(5, 7, device=device, requires_grad=True)
    for op in (torch.ops.fused_optim.dropout, torch.ops.fused_optim.dropout_mask):
        opcheck(op, (x, 0.3, SEED_OFFSET))
    opcheck(torch.ops.fused_optim.dropout_, (x.detach().clone(), 0.3, SEED_OFFSET))
    opcheck(torch.ops.fused_optim.dropout, (x.detach().t(), 0.3, SEED_OFFSET))


def test_compile_fullgraph_same_mask_as_eager(backend):
    model = nn.Sequential(nn.Linear(8, 8), fused_optim.Dropout(0.5))
    x = torch.randn(4, 8)
    torch.manual_seed(5)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    torch.testing.assert_close(compiled(x), eager)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "p, exc, fragment",
    [(-0.1, ValueError, "between 0 and 1"), (1.5, ValueError, "between 0 and 1"),
     ("0.5", TypeError, "must be a real number"), (None, TypeError, "must be a real number")],
    ids=["negative", "above-one", "string", "none"],
)
@pytest.mark.parametrize("inplace", [False, True])
def test_bad_p_raises_and_changes_nothing(backend, p, exc, fragment, inplace):
    x = torch.randn(50)
    before = x.clone()
    with pytest.raises(exc, match=fragment):
        fused_optim.dropout(x, p, inplace=inplace)
    assert torch.equal(x, before)


def test_generator_on_another_device_raises(backend):
    x = torch.randn(50, device="meta")  # a CPU generator for a tensor of another device type
    with pytest.raises(ValueError, match="generator is on cpu"):
        fused_optim.dropout(x, 0.5, inplace=True, generator=torch.Generator())


def test_non_floating_input_raises(backend):
    x = torch.arange(10)
    with pytest.raises(TypeError, match="real floating"):
        fused_optim.dropout(x, 0.5, inplace=True)
    assert torch.equal(x, torch.arange(10))
    with pytest.raises(ValueError, match="between 0 and 1"):
        torch.ops.fused_optim.dropout_.default(torch.ones(3), 2.0, SEED_OFFSET)


# ---------------------------------------------------------------- CUDA

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("so_device", ["cpu", "cuda"])
@pytest.mark.usefixtures("backend")
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")
def test_cpu_and_cuda_give_the_same_masks_and_values(dtype, so_device):
    # Also the unaligned (scalar) path of the CUDA kernel: views starting one element in.
    so = SEED_OFFSET.to(so_device)
    for shape in [(1,), (33,), (127,), (129,), (1000, 37), (4097,)]:
        x = torch.randn(shape).to(dtype)
        for view in (lambda t: t, lambda t: t.reshape(-1)[1:]):
            cpu_in, gpu_in = view(x), view(x.cuda())
            cpu = torch.ops.fused_optim.dropout.default(cpu_in, 0.3, SEED_OFFSET)
            assert torch.equal(torch.ops.fused_optim.dropout.default(gpu_in, 0.3, so).cpu(), cpu), shape
            assert torch.equal(
                torch.ops.fused_optim.dropout_mask.default(gpu_in, 0.3, so).cpu(),
                torch.ops.fused_optim.dropout_mask.default(cpu_in, 0.3, SEED_OFFSET),
            )
            in_place = gpu_in.clone()
            torch.ops.fused_optim.dropout_.default(in_place, 0.3, so)
            assert torch.equal(in_place.cpu(), cpu)


@native_cuda_test
def test_cuda_dropout_forward_and_backward_make_no_host_sync():
    x = torch.randn(100_000, device="cuda", requires_grad=True)
    fused_optim.dropout(x, 0.3).sum().backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fused_optim.dropout(x, 0.3)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(x.grad != 0, (out != 0) | (x.grad != 0))


@native_cuda_test
def test_cuda_graph_replays_draw_new_masks():
    n, p = 2**16, 0.5
    x = torch.ones(n, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture, as torch's docs do
        fused_optim.dropout(x, p)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_optim.dropout(x, p)
    masks = []
    for _ in range(3):
        graph.replay()
        masks.append(out != 0)
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    for m in masks:
        assert abs(m.double().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)


@native_cuda_test
def test_cuda_graph_capture_refuses_a_cpu_seed_offset():
    x = torch.ones(1024, device="cuda")
    torch.ops.fused_optim.dropout.default(x, 0.5, SEED_OFFSET)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError) as info:
        with torch.cuda.graph(graph):
            torch.ops.fused_optim.dropout.default(x, 0.5, SEED_OFFSET)
    assert "CUDA graph" in str(info.value) + str(info.value.__context__)


def _stand_in(dtype: torch.dtype, shape: tuple, device: str) -> SimpleNamespace:
    return SimpleNamespace(dtype=dtype, shape=shape, numel=lambda: math.prod(shape), device=torch.device(device))


def test_reference_takes_seed_offset_on_the_cpu_or_the_inputs_device_only():
    # The native CUDA ops read seed_offset on the input's device or on the host, as torch takes a
    # tensor argument on the input's device or a CPU scalar; the reference applies the same rule.
    # Stand-ins (the rule reads dtype, shape and device), so that it is checked without two GPUs.
    x = _stand_in(torch.float32, (4,), "cuda:0")
    for device in ("cpu", "cuda:0"):
        checks.check_dropout_args(x, 0.5, _stand_in(torch.int64, (2,), device))
    with pytest.raises(RuntimeError, match=r"^seed_offset must be .* on the CPU or on cuda:0, got .* on cuda:1$"):
        checks.check_dropout_args(x, 0.5, _stand_in(torch.int64, (2,), "cuda:1"))


@native_cuda_test
@pytest.mark.skipif(HAS_CUDA and torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_seed_offset_on_another_gpu_is_refused_by_both_paths():
    x, so = torch.ones(64, device="cuda:0"), SEED_OFFSET.to("cuda:1")
    for dropout in (torch.ops.fused_optim.dropout.default, reference.dropout):
        with pytest.raises(RuntimeError, match="seed_offset must be .* on the CPU or on cuda:0"):
            dropout(x, 0.5, so)
