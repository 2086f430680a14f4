"""The arithmetic contract (docs/numerics.md, "Arithmetic"), compared bit for bit: every op gives the same
bits on the AVX2 and the portable CPU build (a subprocess with ATEN_CPU_CAPABILITY=default), in
its vector body and in its scalar tail (tensor sizes 1..33), on the native and the reference
kernels, and the lerp equals torch.lerp_.

The inputs are made here and handed to the subprocess in a file: torch.randn itself draws
differently under ATEN_CPU_CAPABILITY=default."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fused_optim  # noqa: F401  (registers torch.ops.fused_optim)
from helpers import DTYPES, EXT_DISABLED, reference_kernels
from fused_optim import _library

ops = torch.ops.fused_optim
N = 1037  # vector bodies, several unrolled steps, and a tail
LERP_WEIGHTS = [0.9, 0.7, 0.5, 0.4, 0.1, 1e-3, -0.3, 1.7]  # 1 - decay: warm-up weights are large
# The native kernels' builds and their agreement with the reference (which is all there is without
# the extension; the reference's own tails and lerp are tested either way).
native_only = pytest.mark.skipif(EXT_DISABLED or _library._C is None, reason="compares the native kernels")
# Both builds exist, and torch fuses its lerp, only on x86-64 CPUs with AVX2.
needs_avx2 = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"), reason="needs an AVX2 CPU (docs/numerics.md, Arithmetic)"
)


def make_inputs() -> dict:
    g = torch.Generator().manual_seed(27)
    inputs = {}
    for dt in DTYPES:
        p, grad, end = (torch.randn(N, generator=g).to(dt) for _ in range(3))
        p[:5] = torch.tensor([0.0, -0.0, 1e-30, -2.5, 3.0]).to(dt)  # signs of zero, a subnormal in fp32
        inputs[dt] = (p, grad, end)
    return inputs


def elementwise_results(p: torch.Tensor, grad: torch.Tensor, end: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each elementwise op on one dtype's inputs, as name -> result tensor."""
    out = {}
    g = grad.clone()
    ops.l1l2_grad_([p], [g], 0.0123, 0.0456)
    out["l1l2_grad_"] = g
    out["l1l2_penalty_backward fp32 grad_out"] = ops.l1l2_penalty_backward(torch.tensor(0.7), [p], 0.0123, 0.0456)[0]
    out["l1l2_penalty_backward fp64 grad_out"] = ops.l1l2_penalty_backward(
        torch.tensor(-1.3, dtype=torch.float64), [p], 0.0123, 0.0456
    )[0]
    for w in LERP_WEIGHTS:
        for wdt in (torch.float64, torch.float32):
            s = p.clone()
            ops.multi_tensor_lerp_([s], [end], torch.tensor(w, dtype=wdt))
            out[f"multi_tensor_lerp_ w={w} ({wdt})"] = s
    out["multi_tensor_weighted_sum K=3"] = ops.multi_tensor_weighted_sum([p, grad, end], [0.3, 0.3, 0.4])[0]
    out["multi_tensor_weighted_sum K=9"] = ops.multi_tensor_weighted_sum(
        [p, grad, end] * 3, [0.1 * (m + 1) / 4.5 for m in range(9)]
    )[0]
    s = grad.clone()
    ops.multi_tensor_scale_([s], torch.tensor(0.3))
    out["multi_tensor_scale_"] = s
    s = grad.clone()
    ops.clip_grad_value_([s], 0.5)
    out["clip_grad_value_"] = s
    out["dropout"] = ops.dropout(grad, 0.3, torch.tensor([5, 7]))
    out["drop_groups"] = ops.drop_groups(grad, 1, 0.3, True, torch.tensor([5, 7]))
    for max_norm, clip_value in ((0.5, None), (None, 0.5)):
        s = grad.clone()
        ops.pre_step_([p], [s], 0.0123, 0.0456, max_norm, 2.0, clip_value, False)
        out[f"pre_step_ max_norm={max_norm} clip_value={clip_value}"] = s
    return out


def reduction_results(p: torch.Tensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reductions: their lanes and fold order are the same on both builds, so are their bits."""
    out = {"l1l2_penalty": ops.l1l2_penalty([p, grad], 0.0123, 0.0456)}
    for norm_type in (1.0, 2.0, 3.0, 0.0, float("inf")):
        out[f"multi_tensor_norm {norm_type}"] = ops.multi_tensor_norm([p, grad], norm_type, True, False)[1]
    out["pre_step_ total"] = ops.pre_step_([p], [grad.clone()], 0.0123, 0.0456, 0.5, 2.0, None, False)
    return out


def all_results(inputs: dict) -> dict[str, torch.Tensor]:
    out = {}
    for dt, (p, grad, end) in inputs.items():
        for name, r in {**elementwise_results(p, grad, end), **reduction_results(p, grad)}.items():
            out[f"{name} {dt}"] = r
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same_bits(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    differ = {k: int((bits(actual[k]) != bits(expected[k])).sum()) for k in expected}
    differ = {k: n for k, n in differ.items() if n}
    assert not differ, f"elements whose bits differ: {differ}"


@pytest.fixture(scope="module")
def inputs():
    return make_inputs()


@native_only
@needs_avx2
def test_avx2_and_portable_builds_give_the_same_bits(inputs, tmp_path):
    torch.save(inputs, tmp_path / "inputs.pt")
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where helpers.py is
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    subprocess.run(
        [sys.executable, __file__, str(tmp_path / "inputs.pt"), str(tmp_path / "portable.pt")], env=env, check=True
    )
    portable = torch.load(tmp_path / "portable.pt")
    assert portable.pop("capability") == "DEFAULT"
    assert_same_bits(all_results(inputs), portable)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scalar_tail_gives_the_vector_body_bits(inputs, dtype):
    p, grad, end = inputs[dtype]
    body = elementwise_results(p, grad, end)
    for n in range(1, 34):
        tail = elementwise_results(p[:n].clone(), grad[:n].clone(), end[:n].clone())
        # pre_step_'s scaling by max_norm depends on the norm of the whole tensor: the rest compare.
        tail = {k: v for k, v in tail.items() if not k.startswith("pre_step_ max_norm=0.5")}
        assert_same_bits(tail, {k: body[k][:n] for k in tail})


@native_only
@needs_avx2  # the reference's lerp is torch's, fused on AVX2 CPUs only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_kernels_give_the_native_bits(inputs, dtype):
    """The reference writes each contract with torch ops that round once each (the unfused
    formulas), and lerp as torch.lerp_, which fuses on AVX2 CPUs as the contract does.
    drop_groups_add is torch.addcmul on both (torch's arithmetic, which differs between torch's
    own AVX2 and portable builds, so it is compared here only)."""
    p, grad, end = inputs[dtype]

    def results():
        return {
            **elementwise_results(p, grad, end),
            "drop_groups_add": ops.drop_groups_add(p, grad, 1, 0.3, True, torch.tensor([5, 7])),
        }

    native = results()
    with reference_kernels():
        reference = results()
    assert_same_bits(reference, native)


@needs_avx2
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weight", LERP_WEIGHTS)
def test_lerp_is_torch_lerp(inputs, dtype, weight):
    """ema_update_/swa_update_'s op against torch.lerp_ with the same Python weight (torch rounds
    it to the op-math type first); fp64 and fp32 weight tensors give the same."""
    p, _, end = inputs[dtype]
    expected = p.clone().lerp_(end, weight)
    for wdt in (torch.float64, torch.float32):
        s = p.clone()
        ops.multi_tensor_lerp_([s], [end], torch.tensor(weight, dtype=wdt))
        if wdt == torch.float32 and dtype == torch.float64:
            expected = p.clone().lerp_(end, torch.tensor(weight, dtype=wdt).item())
        assert_same_bits({"lerp": s}, {"lerp": expected})


@needs_avx2
def test_ema_update_is_foreach_lerp_in_warm_up():
    """The case the contract was written for: ModelEMA's warm-up weights (decay < 0.5)."""
    g = torch.Generator().manual_seed(3)
    avg = [torch.randn(1037, generator=g), torch.randn(40, 7, generator=g)]
    cur = [torch.randn(1037, generator=g), torch.randn(40, 7, generator=g)]
    for decay in (0.1, 0.3, 0.45):
        ours = [a.clone() for a in avg]
        fused_optim.ema_update_(ours, cur, decay)
        theirs = [a.clone() for a in avg]
        torch._foreach_lerp_(theirs, cur, 1 - decay)
        assert_same_bits(dict(enumerate(ours)), dict(enumerate(theirs)))


# ---------------------------------------------------------------- sums beyond fp32's range


@pytest.mark.parametrize("numel, value", [(100_000, 1e18), (256, 1.5e18)])
def test_fp32_sum_beyond_range_is_inf_as_torch(backend, numel, value):
    """A sum of squares beyond fp32's range is inf for fp32 tensors on both paths, as in torch (the
    kernels add in fp64 past short fp32 runs: 256 elements of 1.5e18 never overflowed a run), so
    clip_grad_norm_ raises or zeroes the gradients as torch does; fp64 tensors stay finite."""
    grads = [torch.full((numel,), value)]
    assert torch.isinf(torch.nn.utils.get_total_norm(grads))
    assert torch.isinf(fused_optim.get_total_norm(grads))
    assert torch.isinf(fused_optim.get_total_norm(grads, norm_type=3.0))
    exact = fused_optim.get_total_norm([grads[0].double()])
    torch.testing.assert_close(exact, torch.tensor(value * numel**0.5, dtype=torch.float64))

    ours, theirs = (torch.zeros(numel, requires_grad=True) for _ in range(2))
    for p in (ours, theirs):
        p.grad = grads[0].clone()
    with pytest.raises(RuntimeError, match="non-finite"):
        fused_optim.clip_grad_norm_([ours], 1.0, error_if_nonfinite=True)
    assert torch.equal(ours.grad, grads[0])  # refused before writing
    fused_optim.clip_grad_norm_([ours], 1.0)
    torch.nn.utils.clip_grad_norm_([theirs], 1.0)
    assert torch.equal(ours.grad, theirs.grad)  # zeroed by 1 / inf, as torch

    # The penalty's sums follow the same rule: the seed's l2 * (p ** 2).sum() in fp32 is inf.
    assert torch.isinf(1e-10 * (grads[0] ** 2).sum())
    assert torch.isinf(fused_optim.l1l2_penalty(grads, l1=0.0, l2=1e-10))
    assert torch.isfinite(fused_optim.l1l2_penalty([grads[0].double()], l1=0.0, l2=1e-10))


def test_fp32_total_beyond_range_is_inf_as_torch(backend):
    """Each tensor's norm is finite, their total's sum of squares is beyond fp32's range: torch sums
    the fp32 norms in fp32 (inf, gradients zeroed), and so do we; with an fp64 tensor in the list
    the norms' dtype is fp64 and the total finite."""
    grads = [torch.full((1,), 1.5e19), torch.full((1,), 1.5e19)]
    assert torch.isinf(torch.nn.utils.get_total_norm(grads))
    assert torch.isinf(fused_optim.get_total_norm(grads))
    ours, theirs = ([torch.zeros(1, requires_grad=True) for _ in range(2)] for _ in range(2))
    for ps in (ours, theirs):
        for p, g in zip(ps, grads):
            p.grad = g.clone()
    with pytest.raises(RuntimeError, match="non-finite"):
        fused_optim.clip_grad_norm_(ours, 1.0, error_if_nonfinite=True)
    fused_optim.clip_grad_norm_(ours, 1.0)
    torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))
    mixed = [grads[0], grads[1].double()]
    torch.testing.assert_close(fused_optim.get_total_norm(mixed), torch.nn.utils.get_total_norm(mixed))
    assert torch.isfinite(fused_optim.get_total_norm(mixed))


@pytest.mark.parametrize("numel", [4, 1000])
def test_penalty_of_mixed_list_holds_fp32_sums_as_fp32(backend, numel):
    """An fp64 tensor in the list does not make the fp32 tensors' sums fp64: they are inf beyond
    fp32's range whatever the tensor's size (4 elements: the kernels' scalar tail; 1000: vector
    runs), as the seed's per-tensor fp32 sums; the fp64 tensor's own sum stays finite."""
    big = torch.full((numel,), 1e19)
    assert torch.isinf((big**2).sum())
    assert torch.isinf(fused_optim.l1l2_penalty([big, torch.zeros(1, dtype=torch.float64)], l1=0.0, l2=1.0))
    assert torch.isfinite(fused_optim.l1l2_penalty([torch.zeros(1), big.double()], l1=0.0, l2=1.0))


if __name__ == "__main__":  # the subprocess of test_avx2_and_portable_builds_give_the_same_bits
    results = all_results(torch.load(sys.argv[1]))
    results["capability"] = torch.backends.cpu.get_cpu_capability()
    torch.save(results, sys.argv[2])
