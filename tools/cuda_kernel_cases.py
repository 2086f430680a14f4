"""Calls every fused_optim op on sizes that cross the CUDA launcher's boundaries and checks each
result against the pure-Python reference kernels (fused_optim.reference) on the same inputs.

    python tools/cuda_kernel_cases.py [--device cuda] [--small]

Made to run under compute-sanitizer (memcheck, racecheck: tools/gpu_check.py does so), where every
kernel must be called at least once; it runs on the CPU too (CI does, so the script cannot rot,
and the CPU kernels get the same boundary cases). The cases: empty tensors, 1 element, a chunk
less one, a chunk, a chunk plus one (the CUDA chunk, 65536 elements), a tensor of more chunks than
one launch's block table holds (in fp32 only; with --small, left out), more tensors than one launch holds at the
list depth of each op (110 at depth 1, 64 at depth 2), the widest kernel arguments (the weighted
sum with 8 inputs: 9 lists) and the folded case beyond it (9 and 17 inputs), dropout on unaligned
views, structured dropout over group counts across the dropout tiles, and every floating dtype.
Exits non-zero at the first mismatch.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from fused_optim import reference

CHUNK = 65536  # csrc/cuda/multi_tensor_apply.cuh: kChunkSize
MAX_BLOCKS = 320  # kMaxBlocks
MAX_TENSORS = {1: 110, 2: 64, 9: 16}  # kMaxTensors at the depths used below
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def size_cases(small: bool) -> list[list[int]]:
    """Lists of tensor sizes, each list one call."""
    edges = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3]
    cases = [edges, [1] * (MAX_TENSORS[1] + 1), [5, 0] * (MAX_TENSORS[2] // 2 + 1) + [CHUNK + 7]]
    if not small:
        cases.append([(MAX_BLOCKS + 1) * CHUNK + 3, 2])  # one tensor over two launches
    return cases


def make(sizes: list[int], dtype: torch.dtype, device: str, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for n in sizes]


# assert_close's default tolerances per dtype.
RTOL = {torch.float32: 1.3e-6, torch.float64: 1e-7, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}
ATOL = {torch.float32: 1e-5, torch.float64: 1e-7, torch.float16: 1e-5, torch.bfloat16: 1e-5}


def close(what: str, got, expected) -> None:
    got = got if isinstance(got, (list, tuple)) else [got]
    expected = expected if isinstance(expected, (list, tuple)) else [expected]
    assert len(got) == len(expected), what
    for i, (a, b) in enumerate(zip(got, expected)):
        b = b.to(a.device)
        if not a.is_floating_point():  # dropout masks: exact
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{what}[{i}]: {m}")
            continue
        # A sum of K terms done in another order rounds differently by a few ulps of its largest
        # terms, not of the (possibly cancelled) result: the absolute tolerance scales with them.
        scale = b.abs().nan_to_num(0.0, 0.0, 0.0).max().item() if b.numel() else 0.0
        atol = max(ATOL[a.dtype], 4 * torch.finfo(a.dtype).eps * scale)
        torch.testing.assert_close(a, b, rtol=RTOL[a.dtype], atol=atol, equal_nan=True,
                                   msg=lambda m: f"{what}[{i}]: {m}")


def run_op(what: str, op, ref, make_args) -> None:
    """op(*args) and ref(*args) on fresh copies of the same arguments: return values and every
    written tensor must agree."""
    ours, theirs = make_args(), make_args()
    out_ours, out_theirs = op(*ours), ref(*theirs)
    if out_ours is not None:
        close(what, out_ours, out_theirs)
    for a, b in zip(ours, theirs):
        if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            close(what + " (written)", a, b)
        elif isinstance(a, torch.Tensor):
            close(what + " (written)", a, b)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="leave out the 84 MB multi-launch tensor")
    args = parser.parse_args()
    dev, ops, calls = args.device, torch.ops.fused_optim, 0
    for c, sizes in enumerate(size_cases(args.small)):
        for d, dtype in enumerate(DTYPES):
            if sum(sizes) > MAX_BLOCKS * CHUNK and dtype != torch.float32:
                continue  # the launch split does not depend on the dtype: the big case once
            seed = 100 * c + d

            def ts(k=0, sizes=sizes, dtype=dtype, seed=seed):
                return make(sizes, dtype, dev, seed + 1000 * k)

            tag = f"case {c} ({len(sizes)} tensors) {dtype}"
            run_op(f"l1l2_penalty {tag}", ops.l1l2_penalty, reference.l1l2_penalty, lambda: (ts(), 0.3, 0.7))
            run_op(f"l1l2_penalty_backward {tag}", ops.l1l2_penalty_backward, reference.l1l2_penalty_backward,
                   lambda: (torch.tensor(2.0, device=dev), ts(), 0.3, 0.7))
            run_op(f"l1l2_grad_ {tag}", ops.l1l2_grad_, reference.l1l2_grad_, lambda: (ts(), ts(1), 0.3, 0.7))
            for p in (2.0, 1.0, 0.5, 0.0, float("inf"), -float("inf"), -1.0):
                # inf, -inf and p < 0 have no identity and refuse empty tensors: those left out.
                def nonempty(p=p):
                    return [t for t in ts() if t.numel() > 0 or (p >= 0 and p != float("inf"))]

                run_op(f"multi_tensor_norm p={p} {tag}", ops.multi_tensor_norm, reference.multi_tensor_norm,
                       lambda nonempty=nonempty, p=p: (nonempty(), p, True, False))
            for scale in (0.5, 1.0):
                run_op(f"multi_tensor_scale_ {scale} {tag}", ops.multi_tensor_scale_, reference.multi_tensor_scale_,
                       lambda scale=scale: (ts(), torch.tensor(scale, device=dev)))
            for max_norm in (1.0, 1e30):  # clipping, and a coefficient of 1 (no write)
                run_op(f"clip_grad_norm_ {max_norm} {tag}", ops.clip_grad_norm_, reference.clip_grad_norm_,
                       lambda max_norm=max_norm: (ts(), max_norm, 2.0, False))
            run_op(f"clip_grad_value_ {tag}", ops.clip_grad_value_, reference.clip_grad_value_, lambda: (ts(), 0.5))
            for max_norm, clip_value, error in ((None, None, False), (1.0, None, False), (1e30, None, True), (None, 0.5, False)):
                # No clip, clipping, a coefficient of 1 (after the no-write pass of error_if_nonfinite), the clamp.
                run_op(f"pre_step_ {max_norm} {clip_value} {error} {tag}", ops.pre_step_, reference.pre_step_,
                       lambda m=max_norm, v=clip_value, e=error: (ts(), ts(1), 0.3, 0.7, m, 2.0, v, e))
            run_op(f"pre_step_ p=inf {tag}", ops.pre_step_, reference.pre_step_,
                   lambda: ([t for t in ts() if t.numel()], [t for t in ts(1) if t.numel()], 0.3, 0.0, 1.0, float("inf"), None, False))
            for k in (1, 8, 9, 17):
                if k > 1 and len(sizes) > MAX_TENSORS[9] + 1 and dtype != torch.float32:
                    continue  # the many-tensor lists at full depth once, in fp32, keep the run short
                weights = [0.5 + m for m in range(k)]

                def inputs(k=k):
                    return [t for m in range(k) for t in ts(m)]

                run_op(f"multi_tensor_weighted_sum K={k} {tag}", ops.multi_tensor_weighted_sum,
                       reference.multi_tensor_weighted_sum, lambda k=k, weights=weights: (inputs(k), weights))
                run_op(f"multi_tensor_weighted_sum_ K={k} {tag}", ops.multi_tensor_weighted_sum_,
                       reference.multi_tensor_weighted_sum_, lambda k=k, weights=weights: (inputs(k), weights, ts(99)))
            for weight in (torch.tensor(0.25), torch.tensor(0.25, device=dev, dtype=torch.float64)):
                run_op(f"multi_tensor_lerp_ {weight.device} {tag}", ops.multi_tensor_lerp_, reference.multi_tensor_lerp_,
                       lambda weight=weight: (ts(), ts(1), weight))
            calls += 1
    for n in (0, 1, 127, 128, 129, 1000, CHUNK + 5):
        for dtype in DTYPES:
            for so_device in ("cpu", dev):
                so = torch.tensor([1234, 8], device=so_device)
                for offset in (0, 1):  # an unaligned view: the scalar path of the vectorized kernel
                    def x(n=n, dtype=dtype, offset=offset):
                        return make([n + offset], dtype, dev, n)[0][offset:]

                    tag = f"n={n} {dtype} offset={offset} seed_offset on {so_device}"
                    run_op(f"dropout {tag}", ops.dropout, reference.dropout, lambda: (x(), 0.3, so))
                    run_op(f"dropout_mask {tag}", ops.dropout_mask, reference.dropout_mask, lambda: (x(), 0.3, so))
                    run_op(f"dropout_ {tag}", ops.dropout_, reference.dropout_, lambda: (x(), 0.3, so))
    # Structured dropout: group counts across the dropout kernel's tiles (128 elements), group dims
    # 0, 1, 2, a channels_last input, and the residual form.
    for shape, group_dims in (((0, 3), 1), ((1, 5), 1), ((129, 7), 1), ((3, 300, 4, 4), 2), ((6, 5, 4), 0)):
        for dtype in DTYPES:
            so = torch.tensor([99, 3], device=dev)

            def t(k=0, shape=shape, dtype=dtype):
                x = make([math.prod(shape)], dtype, dev, k)[0].view(shape)
                return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x

            tag = f"{shape} group_dims={group_dims} {dtype}"
            run_op(f"drop_groups {tag}", ops.drop_groups, reference.drop_groups, lambda: (t(), group_dims, 0.3, True, so))
            run_op(f"drop_groups_ {tag}", ops.drop_groups_, reference.drop_groups_, lambda: (t(), group_dims, 0.3, False, so))
            run_op(f"drop_groups_add {tag}", ops.drop_groups_add, reference.drop_groups_add,
                   lambda: (t(), t(1), group_dims, 0.3, True, so))
    if dev != "cpu":
        torch.cuda.synchronize()
    print(f"cuda_kernel_cases: every op agrees with the reference on {calls} list cases and the dropout cases ({dev})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
