"""Calls every fused_optim op on sizes that cross the CUDA launcher's boundaries and checks each
result against the pure-Python reference kernels (fused_optim.reference) on the same inputs.

    python tools/cuda_kernel_cases.py [--device cuda] [--small] [--family F ...] [--simt]

Made to run under compute-sanitizer (memcheck, racecheck: tools/gpu_check.py does so), where every
kernel must be called at least once; it runs on the CPU too (CI does, so the script cannot rot,
and the CPU kernels get the same boundary cases). The cases: empty tensors, 1 element, a chunk
less one, a chunk, a chunk plus one (the CUDA chunk, 65536 elements), a tensor of more chunks than
one launch's block table holds (in fp32 only; with --small, left out), more tensors than one launch holds at the
list depth of each op (110 at depth 1, 64 at depth 2), a list of mixed dtypes, non-dense tensors,
an aliased list (a tensor twice), the widest kernel arguments (the weighted sum with 8 inputs: 9
lists) and the folded case beyond it (9 and 17 inputs), dropout on unaligned views, structured
dropout over group counts across the dropout tiles, and every floating dtype. On every backend it
also checks that pre_step_ equals the separate calls, bit for bit. --simt runs the CUDA sources on
the SIMT runner of tests/simt (under AddressSanitizer: tests/simt/test_kernels.py runs it) and
compares them with the CPU kernels too, bit for bit where the arithmetic contract is bitwise.
Exits non-zero at the first mismatch.
"""

from __future__ import annotations

import argparse
import math
import os
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


def list_cases_of(small: bool, on_runner: bool) -> list[tuple[str, list[int], object, str]]:
    """(tag, sizes, dtype or a dtype per tensor, layout) of each list case. On the SIMT runner, the
    many-tensor lists are taken in one dtype only, the multi-launch tensor in fp16 (the runner's
    race log takes about 32 bytes for each byte a launch touches)."""
    cases = []
    for c, sizes in enumerate(size_cases(small)):
        big = sum(sizes) > MAX_BLOCKS * CHUNK
        for dtype in DTYPES:
            if (big or on_runner and c > 0) and dtype != (torch.float16 if big and on_runner else torch.float32):
                continue  # the launch split does not depend on the dtype
            cases.append((f"case {c} ({len(sizes)} tensors) {dtype}", sizes, dtype, "dense"))
    mixed = [torch.float32, torch.float16, torch.float64, torch.bfloat16, torch.float32, torch.float64]
    cases.append(("mixed dtypes", [CHUNK + 1, 3, CHUNK - 1, 1, 0, 5], mixed, "dense"))
    cases.append(("non-dense", [CHUNK + 1, 7, 1, 130], torch.float32, "strided"))
    cases.append(("aliased", [CHUNK + 1, 7, 3], torch.float32, "aliased"))
    return cases


def make(sizes: list[int], dtype, device: str, seed: int, layout: str = "dense") -> list[torch.Tensor]:
    """Tensors of `sizes`, of `dtype` (or dtype[i] each); layout "strided": every other element of
    a buffer twice as long (not dense); "aliased": the first tensor again at the end of the list."""
    g = torch.Generator().manual_seed(seed)
    dtypes = dtype if isinstance(dtype, list) else [dtype] * len(sizes)
    stride = 2 if layout == "strided" else 1
    out = [torch.randn(n * stride, generator=g, dtype=torch.float64).to(device=device, dtype=d)[::stride]
           for n, d in zip(sizes, dtypes)]
    return out + out[:1] if layout == "aliased" else out


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


# Ops whose contract (docs/numerics.md, "Arithmetic") gives the same bits on every backend: the
# SIMT run compares them with the CPU kernels bit for bit; the others are sums, taken in another
# order on each backend, compared within rounding.
BITWISE = {"l1l2_penalty_backward", "l1l2_grad_", "multi_tensor_scale_", "clip_grad_value_", "multi_tensor_weighted_sum",
           "multi_tensor_weighted_sum_", "multi_tensor_lerp_", "dropout", "dropout_", "dropout_mask", "drop_groups",
           "drop_groups_", "drop_groups_add"}


BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(what: str, got, expected) -> None:
    """The same dtypes and the same bits (a -0.0 is not 0.0, NaN payloads count)."""
    got = got if isinstance(got, (list, tuple)) else [got]
    expected = expected if isinstance(expected, (list, tuple)) else [expected]
    assert len(got) == len(expected), what
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}[{i}]: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        bits = BITS[a.element_size()]
        a_bits, b_bits = a.contiguous().view(bits), b.to(a.device).contiguous().view(bits)
        if not torch.equal(a_bits, b_bits):
            first = (a_bits != b_bits).flatten().nonzero()[0].item()
            raise AssertionError(f"{what}[{i}]: bits differ first at element {first}: {a.flatten()[first]} vs {b.flatten()[first]}")


def run_op(what: str, op, ref, make_args, native=None, bitwise: bool = False) -> None:
    """op(*args) and ref(*args) on fresh copies of the same arguments: return values and every
    written tensor must agree. With `native` (the CPU kernels, when op runs the CUDA code on the
    SIMT runner), op must agree with it too: bit for bit if `bitwise`."""
    ours = make_args()
    out_ours = op(*ours)
    for other, agree in [(ref, close)] + ([(native, same_bits if bitwise else close)] if native is not None else []):
        theirs = make_args()
        out_theirs = other(*theirs)
        if out_ours is not None:
            agree(what, out_ours, out_theirs)
        for a, b in zip(ours, theirs):
            if isinstance(a, list) and a and isinstance(a[0], torch.Tensor) or isinstance(a, torch.Tensor):
                agree(what + " (written)", a, b)


CALLED: set[str] = set()  # the ops the cases have called (printed at the end)


def checker(ops, native):
    """check(name, tag, make_args): run_op on the op `name` of `ops`, against the reference's (and the
    CPU kernels' when `native` is given)."""
    def check(name: str, tag: str, make_args) -> None:
        CALLED.add(name)
        run_op(f"{name} {tag}", getattr(ops, name), getattr(reference, name), make_args,
               native=getattr(native, name) if native is not None else None, bitwise=name in BITWISE)

    return check


def list_cases(ops, dev: str, small: bool, families: set[str], native) -> int:
    check, calls = checker(ops, native), 0
    on_runner = native is not None  # the SIMT run: every norm order and input count on the first list only
    for i, (tag, sizes, dtype, layout) in enumerate(list_cases_of(small, on_runner)):
        all_orders = not on_runner or i == 0

        def ts(k=0, sizes=sizes, dtype=dtype, seed=i, layout=layout):
            return make(sizes, dtype, dev, seed + 1000 * k, layout)

        if on_runner and sum(sizes) > MAX_BLOCKS * CHUNK:
            # The multi-launch tensor on the runner: one op, whose partials are numbered across launches.
            if "penalty" in families:
                check("l1l2_penalty", tag, lambda: (ts(), 0.3, 0.7))
            continue

        if "penalty" in families:
            check("l1l2_penalty", tag, lambda: (ts(), 0.3, 0.7))
            check("l1l2_penalty_backward", tag, lambda: (torch.tensor(2.0, device=dev), ts(), 0.3, 0.7))
            check("l1l2_grad_", tag, lambda: (ts(), ts(1), 0.3, 0.7))
        if "clip" in families:
            for p in (2.0, 1.0, 0.5, 0.0, float("inf"), -float("inf"), -1.0) if all_orders else (2.0, float("inf")):
                # inf, -inf and p < 0 have no identity and refuse empty tensors: those left out.
                def nonempty(p=p):
                    return [t for t in ts() if t.numel() > 0 or (p >= 0 and p != float("inf"))]

                check("multi_tensor_norm", f"p={p} {tag}", lambda nonempty=nonempty, p=p: (nonempty(), p, True, False))
            for scale in (0.5, 1.0):
                check("multi_tensor_scale_", f"{scale} {tag}", lambda scale=scale: (ts(), torch.tensor(scale, device=dev)))
            for max_norm in (1.0, 1e30):  # clipping, and a coefficient of 1 (no write)
                check("clip_grad_norm_", f"{max_norm} {tag}", lambda max_norm=max_norm: (ts(), max_norm, 2.0, False))
            check("clip_grad_value_", tag, lambda: (ts(), 0.5))
        if "pre_step" in families:
            for max_norm, clip_value, error in ((None, None, False), (1.0, None, False), (1e30, None, True), (None, 0.5, False)):
                # No clip, clipping, a coefficient of 1 (after the no-write pass of error_if_nonfinite), the clamp.
                check("pre_step_", f"{max_norm} {clip_value} {error} {tag}",
                      lambda m=max_norm, v=clip_value, e=error: (ts(), ts(1), 0.3, 0.7, m, 2.0, v, e))
            check("pre_step_", f"p=inf {tag}", lambda: ([t for t in ts() if t.numel()], [t for t in ts(1) if t.numel()],
                                                         0.3, 0.0, 1.0, float("inf"), None, False))
            if sum(sizes) <= MAX_BLOCKS * CHUNK:  # the multi-launch tensor: compute-sanitizer's budget
                pre_step_equals_separate_calls(ops, ts, tag)
        if "averaging" in families:
            for k in (1, 8, 9, 17) if all_orders else (1, 9):
                if k > 1 and len(sizes) > MAX_TENSORS[9] + 1 and dtype != torch.float32:
                    continue  # the many-tensor lists at full depth once, in fp32, keep the run short
                weights = [0.5 + m for m in range(k)]

                def inputs(k=k):
                    return [t for m in range(k) for t in ts(m)]

                check("multi_tensor_weighted_sum", f"K={k} {tag}", lambda k=k, weights=weights: (inputs(k), weights))
                check("multi_tensor_weighted_sum_", f"K={k} {tag}", lambda k=k, weights=weights: (inputs(k), weights, ts(99)))
            for weight in (torch.tensor(0.25), torch.tensor(0.25, device=dev, dtype=torch.float64)):
                check("multi_tensor_lerp_", f"{weight.device} {tag}", lambda weight=weight: (ts(), ts(1), weight))
        calls += 1
    return calls


def pre_step_equals_separate_calls(ops, ts, tag: str) -> None:
    """What the README promises on every backend: pre_step_ gives l1l2_grad_ then clip_grad_norm_
    (or clip_grad_value_) bit for bit, and its norm is multi_tensor_norm's of the gradients it wrote
    (the same combine order)."""
    for max_norm, clip_value in ((1.0, None), (None, 0.5), (None, None)):
        params, fused, separate = ts(), ts(1), ts(1)
        norm = ops.pre_step_(params, fused, 0.3, 0.7, max_norm, 2.0, clip_value, False)
        ops.l1l2_grad_(params, separate, 0.3, 0.7)
        expected = ops.multi_tensor_norm(separate, 2.0, False, False)[0]
        if max_norm is not None:
            ops.clip_grad_norm_(separate, max_norm, 2.0, False)
        if clip_value is not None:
            ops.clip_grad_value_(separate, clip_value)
        same_bits(f"pre_step_ {max_norm} {clip_value} vs the separate calls {tag}", fused, separate)
        same_bits(f"pre_step_'s norm vs multi_tensor_norm {tag}", norm, expected)


def dropout_cases(ops, dev: str, families: set[str], native) -> None:
    check = checker(ops, native)
    if "dropout" in families:
        for n in (0, 1, 127, 128, 129, 1000, CHUNK + 5):
            for dtype in DTYPES if n < CHUNK or native is None else (torch.float32,):  # SIMT: the big one once
                for so_device in dict.fromkeys(("cpu", dev)):
                    so = torch.tensor([1234, 8], device=so_device)
                    for offset in (0, 1):  # an unaligned view: the scalar path of the vectorized kernel
                        def x(n=n, dtype=dtype, offset=offset):
                            return make([n + offset], dtype, dev, n)[0][offset:]

                        tag = f"n={n} {dtype} offset={offset} seed_offset on {so_device}"
                        for name in ("dropout", "dropout_mask", "dropout_"):
                            check(name, tag, lambda x=x, so=so: (x(), 0.3, so))
    if "structured" in families:
        # Structured dropout: group counts across the dropout kernel's tiles (128 elements), group
        # dims 0, 1, 2, a channels_last input, and the residual form.
        for shape, group_dims in (((0, 3), 1), ((1, 5), 1), ((129, 7), 1), ((3, 300, 4, 4), 2), ((6, 5, 4), 0)):
            for dtype in DTYPES:
                so = torch.tensor([99, 3], device=dev)

                def t(k=0, shape=shape, dtype=dtype):
                    x = make([math.prod(shape)], dtype, dev, k)[0].view(shape)
                    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x

                tag = f"{shape} group_dims={group_dims} {dtype}"
                check("drop_groups", tag, lambda: (t(), group_dims, 0.3, True, so))
                check("drop_groups_", tag, lambda: (t(), group_dims, 0.3, False, so))
                check("drop_groups_add", tag, lambda: (t(), t(1), group_dims, 0.3, True, so))


FAMILIES = ("penalty", "clip", "pre_step", "averaging", "dropout", "structured")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="leave out the 84 MB multi-launch tensor")
    parser.add_argument("--family", action="append", choices=FAMILIES, help="only these op families (default: all)")
    parser.add_argument("--simt", action="store_true",
                        help="run the CUDA code on the SIMT runner (tests/simt; under AddressSanitizer, as "
                             "tests/simt/test_kernels.py runs it) and compare it with the CPU kernels too")
    args = parser.parse_args()
    families = set(args.family or FAMILIES)
    dev, ops, native = args.device, torch.ops.fused_optim, None
    if args.simt:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "simt"))
        import simt_build

        dev, ops, native = "cpu", simt_build.load(), torch.ops.fused_optim
    calls = list_cases(ops, dev, args.small, families, native)
    dropout_cases(ops, dev, families, native)
    if dev != "cpu":
        torch.cuda.synchronize()
    where = "the CUDA code on the SIMT runner, against the CPU kernels too" if args.simt else dev
    print(f"cuda_kernel_cases: {', '.join(sorted(families))}: every op agrees with the reference on {calls} list cases "
          f"and the dropout cases ({where})")
    print(f"ops called: {' '.join(sorted(CALLED))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
