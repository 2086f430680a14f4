"""The CUDA kernels' index arithmetic, run on the host through the same C++ functions the kernels
call (csrc/common/launch_plan.h, csrc/common/dropout.h, exposed by csrc/testing.cpp as
torch.ops.fused_optim_testing.*): the launch plan covers every chunk exactly once within the
kernel-argument limits, the norms' per-tensor chunk ranges (kernel arguments) match the launcher's
chunk numbering, the weighted sum's passes cover every input once, the CUDA dropout tiles give
every element the stream's word and mask bit, bit for bit, and the norm kernels' reduction order
(op-math runs per thread, then fp64) is the documented one. Needs the native extension (a CPU
build is enough); no GPU, except the tests marked native_cuda_test, which check the CUDA kernels
themselves (that order, bit for bit; CUDA graph replays) on a GPU."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import EXT_DISABLED, native_cuda_test
import fused_optim
from fused_optim import _library, reference

pytestmark = pytest.mark.skipif(
    EXT_DISABLED or _library._C is None, reason="the CUDA index logic is C++ code of the native extension"
)

T = getattr(torch.ops, "fused_optim_testing", None)


def limits():
    rows = T.launch_limits().tolist()
    per_depth = {d + 1: rows[d] for d in range(9)}  # depth -> (tensors per launch, metadata bytes)
    (max_blocks, arg_bytes), (chunk, functor_bytes) = rows[9], rows[10]
    return per_depth, max_blocks, arg_bytes, chunk, functor_bytes


def check_plan(numels: list[int], depth: int) -> torch.Tensor:
    per_depth, max_blocks, _, chunk, _ = limits()
    plan = T.launch_plan(numels, depth)
    expected = [(t, c) for t, n in enumerate(numels) for c in range(-(-n // chunk))]
    # Every chunk of every non-empty tensor exactly once, in order (so global chunk indices, the
    # count of blocks before, are the CPU's chunk order too).
    assert [tuple(r) for r in plan[:, 3:].tolist()] == expected
    for launch in plan[:, 0].unique().tolist():
        rows = plan[plan[:, 0] == launch]
        assert rows[:, 1].tolist() == list(range(len(rows)))  # blocks 0, 1, ... of this launch
        assert len(rows) <= max_blocks
        slots = rows[:, 2]
        assert int(slots.max()) < per_depth[depth][0]  # tensors per launch within the table
        # A slot holds one tensor within a launch; slots fill in order of the tensors.
        tensor_of_slot = {}
        for s, t in rows[:, 2:4].tolist():
            assert tensor_of_slot.setdefault(s, t) == t
        assert sorted(tensor_of_slot) == list(range(len(tensor_of_slot)))
        assert [tensor_of_slot[s] for s in sorted(tensor_of_slot)] == sorted(tensor_of_slot.values())
    if len(plan):
        # A launch closes only when full: all but the last hit the block or the tensor limit.
        launches = plan[:, 0].tolist()
        for launch in range(launches[-1]):
            rows = plan[plan[:, 0] == launch]
            assert len(rows) == max_blocks or rows[:, 2].max() + 1 == per_depth[depth][0]
    return plan


def test_kernel_arguments_fit_at_every_depth():
    per_depth, max_blocks, arg_bytes, chunk, functor_bytes = limits()
    assert (max_blocks, arg_bytes, chunk) == (320, 4096, 65536)
    for depth, (tensors, meta_bytes) in per_depth.items():
        # addresses[depth][tensors], sizes[tensors], block tables, first chunk
        assert meta_bytes >= 8 * tensors * (depth + 1) + max_blocks * 5 + 8
        assert meta_bytes + functor_bytes <= arg_bytes, depth
    assert per_depth[1][0] < 256  # block_to_tensor is one byte
    # The norms' per-tensor step: first tensor, then begin[] and end[] chunk indices (int64).
    ranges, range_bytes = T.launch_limits().tolist()[11]
    assert range_bytes >= 8 + 16 * ranges and range_bytes + functor_bytes <= arg_bytes


def check_norm_chunk_ranges(numels: list[int], group: list[int]) -> None:
    _, _, _, chunk, _ = limits()
    per_launch = T.launch_limits().tolist()[11][0]
    rows = T.norm_chunk_ranges(numels, group)
    # Block b of launch l takes tensor l * per_launch + b: every tensor once, in order.
    assert rows[:, 2].tolist() == list(range(len(numels)))
    assert rows[:, 0].tolist() == [t // per_launch for t in range(len(numels))]
    assert rows[:, 1].tolist() == [t % per_launch for t in range(len(numels))]
    # The partials kernels number chunks group by group (groups in order of first appearance), each
    # group's launches starting after the chunks of the groups before: the launcher's plan of that
    # group, offset. Each tensor's range must hold exactly its chunks' global indices.
    first, expected = 0, {}
    for g in dict.fromkeys(group):
        idx = [t for t in range(len(numels)) if group[t] == g]
        plan = T.launch_plan([numels[t] for t in idx], 1)
        for k, (t, _) in enumerate(plan[:, 3:].tolist()):
            expected.setdefault(idx[t], []).append(first + k)
        first += len(plan)
    for t, begin, end in rows[:, 2:].tolist():
        assert list(range(begin, end)) == expected.get(t, []), t
        assert end - begin == -(-numels[t] // chunk)
    if len(numels):
        assert rows[:, 4].max().item() == first  # the partials buffer's size: every chunk


@pytest.mark.parametrize(
    "numels, group",
    [
        ([], []),
        ([0], [0]),
        ([70000, 5, 0, 200000], [0, 1, 0, 1]),  # groups interleaved: ranges are not in input order
        ([1] * 221, [0] * 221),  # one tensor past a launch of the per-tensor step
        ([65536 * 3] * 450, [t % 3 for t in range(450)]),
    ],
)
def test_norm_chunk_ranges_follow_the_launchers_numbering(numels, group):
    check_norm_chunk_ranges(numels, group)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.one_of(st.integers(0, 3), st.integers(65530, 65540), st.integers(0, 400_000)),
                       st.integers(0, 3)), max_size=500)
)
def test_norm_chunk_ranges_cover_every_chunk_once(tensors):
    check_norm_chunk_ranges([n for n, _ in tensors], [g for _, g in tensors])


@pytest.mark.parametrize("depth", [1, 2, 9])
def test_launch_plan_boundaries(depth):
    _, max_blocks, _, chunk, _ = limits()
    tensors = limits()[0][depth][0]
    cases = [
        [],
        [0, 0],
        [1],
        [chunk - 1, chunk, chunk + 1],
        [1] * (tensors - 1),
        [1] * tensors,
        [1] * (tensors + 1),  # one launch more
        [5, 0] * tensors,
        [max_blocks * chunk],  # exactly one launch's blocks
        [max_blocks * chunk + 1, 3],  # a tensor cut by a full launch goes on as slot 0
        [1] * (tensors - 1) + [3 * chunk],  # the tensor that fills the table has several chunks
        [chunk] * (max_blocks + 2),
    ]
    for numels in cases:
        plan = check_plan(numels, depth)
        if numels == [max_blocks * chunk + 1, 3]:
            assert plan[plan[:, 0] == 1][:, 2:4].tolist() == [[0, 0], [1, 1]]


@settings(max_examples=60, deadline=None)
@given(
    numels=st.lists(st.one_of(st.integers(0, 3), st.integers(65530, 65540), st.integers(0, 700_000)), max_size=300),
    depth=st.integers(1, 9),
)
def test_launch_plan_covers_every_chunk_once(numels, depth):
    check_plan(numels, depth)


@pytest.mark.parametrize("k", range(1, 40))
def test_weighted_sum_passes_cover_each_input_once(k):
    passes = T.weighted_sum_passes(k).tolist()
    covered = [m for first, n in passes for m in range(first, first + n)]
    assert covered == list(range(k))
    assert passes[0][1] <= 8 and all(n <= 7 for _, n in passes[1:])  # depth 9: 8 inputs + the output
    assert len(passes) == (1 if k <= 8 else 1 + -(-(k - 8) // 7))


@pytest.mark.parametrize("numel", [0, 1, 31, 32, 127, 128, 129, 1000, 4099])
@pytest.mark.parametrize("seed, offset", [(0, 0), (1234, 8), (2**63 - 1, 2**40 + 3)])
def test_cuda_dropout_tiles_give_each_element_the_streams_word(numel, seed, offset):
    assert torch.equal(T.dropout_tile_words(numel, seed, offset), reference.philox_words(numel, seed, offset))


@pytest.mark.parametrize("numel", [0, 1, 3, 4, 5, 8, 127, 128, 129, 1000])
def test_cuda_dropout_mask_packing_matches_the_reference(numel):
    for p, seed in itertools.product([0.0, 0.3, 1.0], [0, 99]):
        x = torch.ones(numel)
        so = torch.tensor([seed, 4])
        keep = reference.dropout_keep(x, p, so).reshape(-1)
        assert torch.equal(T.dropout_tile_mask(keep), reference.dropout_mask(x, p, so))


def documented_combine(p: float):
    """The identity and the combine of two accumulators for norm order p: sums for finite p,
    NaN-propagating max / min for inf / -inf (csrc/common/reduce_order.h)."""
    if p == float("inf"):
        return 0.0, lambda a, b: a if (a != a or a > b) else b
    if p == -float("inf"):
        return float("inf"), lambda a, b: a if (a != a or a < b) else b
    return 0.0, lambda a, b: a + b


def documented_tree(acc: list[float], p: float) -> float:
    """Step 3 of the documented order, in Python floats (fp64): at strides len(acc) / 2, ..., 1,
    thread t < s folds in thread t + s's value."""
    _, combine = documented_combine(p)
    acc = list(acc)
    s = len(acc) // 2
    while s:
        for t in range(s):
            acc[t] = combine(acc[t], acc[t + s])
        s //= 2
    return acc[0]


def documented_block_order(values: list[float], p: float, threads: int = 512) -> float:
    """csrc/common/reduce_order.h's order for fp64 accumulators, as its comment states it, in plain
    Python floats (fp64): thread t folds values t, t + threads, ... in turn from the identity, then
    the tree."""
    init, combine = documented_combine(p)
    acc = [init] * threads
    for t in range(threads):
        for i in range(t, len(values), threads):
            acc[t] = combine(acc[t], values[i])
    return documented_tree(acc, p)


def documented_element_order(x: torch.Tensor, p: float, threads: int = 512) -> float:
    """The same order for elements, as its comment states it, with torch ops that each round once:
    thread t folds elements t, t + threads, ... in the op-math type T (fp32, or fp64 for fp64), the
    term and the addition rounded apart (x * x, then + acc), then its value goes to fp64 and the
    tree combines the threads' values."""
    op_math = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(op_math)
    init, _ = documented_combine(p)
    acc = torch.full((threads,), init, dtype=op_math)
    for start in range(0, x.numel(), threads):
        v = x[start : start + threads]
        a, m = v.abs(), len(v)
        if p == float("inf"):
            acc[:m] = torch.where(acc[:m].isnan() | (acc[:m] > a), acc[:m], a)
        elif p == -float("inf"):
            acc[:m] = torch.where(acc[:m].isnan() | (acc[:m] < a), acc[:m], a)
        else:
            term = {0.0: (v != 0).to(op_math), 1.0: a, 2.0: v * v}.get(p)
            acc[:m] = acc[:m] + (term if term is not None else a**p)
    return documented_tree(acc.double().tolist(), p)


@pytest.mark.parametrize("n", [0, 1, 511, 512, 513, 1500, 4096])
@pytest.mark.parametrize("p", [1.0, 2.0, 0.5, float("inf"), -float("inf")])
def test_norm_combine_order_is_the_documented_one(n, p):
    g = torch.Generator().manual_seed(n)
    # Magnitudes over 40 binades, so that another order of the sums rounds differently.
    values = torch.randn(n, generator=g, dtype=torch.float64) * 2.0 ** torch.randint(-20, 20, (n,), generator=g)
    values = values.abs()
    if n > 3 and p in (float("inf"), -float("inf")):
        values[n // 3] = float("nan")  # propagates, wherever it sits
    got = T.block_combine(values, p).item()
    expected = documented_block_order(values.tolist(), p)
    assert got == expected or (got != got and expected != expected)


def element_values(n: int, dtype: torch.dtype, p: float, seed: int) -> torch.Tensor:
    """n elements whose terms round differently in another order or precision: magnitudes over 20
    binades and every sign; for p = 3, integers times powers of two, whose cubes are exact in fp32 (so
    the host's and torch's pow agree and only the sums round)."""
    g = torch.Generator().manual_seed(seed)
    if p == 3.0:
        x = torch.randint(-63, 64, (n,), generator=g).double() * 2.0 ** torch.randint(-8, 8, (n,), generator=g)
    else:
        x = torch.randn(n, generator=g, dtype=torch.float64) * 2.0 ** torch.randint(-10, 10, (n,), generator=g)
    if n > 8:
        x[::7] = 0.0  # what p = 0 counts, and signed zeros for max / min
        x[1::11] = -0.0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [0, 1, 511, 513, 4096, 65536])
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 0.0, float("inf"), -float("inf")])
def test_norm_element_order_is_the_documented_one(dtype, n, p):
    x = element_values(n, dtype, p, seed=n)
    got = T.block_reduce(x, p).item()
    expected = documented_element_order(x, p)
    assert got == expected or (got != got and expected != expected), (got, expected)


def test_norm_element_runs_accumulate_in_fp32_for_fp32():
    # Not vacuous: a chunk of fp32 elements folded in fp64 per thread gives other bits than the
    # documented fp32 runs, which the kernels (and block_reduce) follow.
    x = element_values(65536, torch.float32, 2.0, seed=1)
    assert T.block_reduce(x, 2.0).item() == documented_element_order(x, 2.0)
    assert T.block_reduce(x, 2.0).item() != T.block_reduce(x.double(), 2.0).item()


def test_norm_element_nan_propagates_through_max_and_min():
    for p in (float("inf"), -float("inf")):
        x = element_values(1500, torch.float32, p, seed=2)
        x[700] = float("nan")
        assert math.isnan(T.block_reduce(x, p).item())


@native_cuda_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("p", [1.0, 2.0, float("inf")])
def test_cuda_norm_reduces_a_chunk_in_the_documented_order(dtype, p):
    # One tensor of one chunk: its norm is the block's fp64 partial (the per-tensor step adds it to
    # the identity), so the kernel must give the host replica's value bit for bit.
    x = element_values(65536, dtype, p, seed=3)
    acc = T.block_reduce(x, p).item()
    expected = torch.tensor(math.sqrt(acc) if p == 2.0 else acc, dtype=torch.float64).to(dtype)  # the norm's dtype
    per = torch.ops.fused_optim.multi_tensor_norm([x.cuda()], p, True)[1]
    assert torch.equal(per.cpu(), expected.reshape(1))


@native_cuda_test
@pytest.mark.parametrize("chunks", [300, 1100])  # one value per thread, and several
def test_cuda_norm_combines_chunks_in_the_documented_order(chunks):
    # Chunk c holds 65536 copies of v_c, a value of 40 significant bits: every order of summing
    # within a chunk gives exactly 65536 |v_c|. Across chunks the order matters, so the CUDA total
    # must equal the documented order's combine of those partials, bit for bit.
    chunk = limits()[3]
    g = torch.Generator().manual_seed(chunks)
    v = torch.randn(chunks, generator=g, dtype=torch.float64) * 2.0 ** torch.randint(-20, 20, (chunks,), generator=g)
    mantissa, exponent = torch.frexp(v)
    v = torch.ldexp(torch.round(mantissa * 2.0**40) / 2.0**40, exponent)
    x = v.repeat_interleave(chunk).cuda()
    expected = T.block_combine(v.abs() * chunk, 1.0).item()
    assert torch.ops.fused_optim.multi_tensor_norm([x], 1.0, False)[0].item() == expected


def _views():
    base = torch.arange(240.0)
    grid = base.view(4, 6, 10)
    return {
        "contiguous": grid,
        "transposed": grid.transpose(0, 2),
        "sliced": grid[:, ::2, 1:7],
        "channels_last": base[:192].view(2, 4, 4, 6).contiguous(memory_format=torch.channels_last),
        "permuted slice": grid.permute(2, 0, 1)[::3],
        "size-1 dims with odd strides": base.as_strided((3, 1, 4), (20, 7, 2)),
        "0-dim": base[5],
        "windows apart": base.unfold(0, 4, 4),
        "overlapping windows": base.unfold(0, 4, 2),
        "expanded": base[:4].view(4, 1).expand(4, 3),
        "strides that interleave": base.as_strided((4, 4), (3, 4)),
        "overlapping as_strided": base.as_strided((5, 5), (2, 3)),
    }


@pytest.mark.parametrize("name", list(_views()))
def test_strided_scale_takes_only_views_without_shared_elements(name):
    # The CUDA scale walks a non-dense tensor through its strides only when the host proves no two
    # elements share memory; the proof must never be wrong, and must hold for ordinary views.
    t = _views()[name]
    offsets = torch.as_strided(torch.arange(t.untyped_storage().nbytes() // 4), t.shape, t.stride(), t.storage_offset())
    overlaps = offsets.numel() != offsets.unique().numel()
    proved = T.provably_non_overlapping(t)
    assert not (proved and overlaps)
    ordinary = name not in ("overlapping windows", "expanded", "strides that interleave", "overlapping as_strided")
    assert proved == ordinary


def _capture(fn):
    """fn captured in a CUDA graph after a warm-up on a side stream (as torch's docs do)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@native_cuda_test
def test_cuda_graph_replays_the_norm_of_the_current_values():
    # A replay reads no host memory (the per-tensor chunk ranges are kernel arguments): after the
    # tensors change, it gives their new norms, as an eager call does. 301 tensors of two dtypes:
    # two launches of the per-tensor step, chunks numbered group by group.
    g = torch.Generator().manual_seed(0)
    sizes = [1000 + 37 * i for i in range(300)] + [3 * 65536 + 5]
    ts = [torch.randn(n, generator=g).to("cuda", torch.float16 if i % 2 else torch.float32) for i, n in enumerate(sizes)]
    graph, (total, per) = _capture(lambda: torch.ops.fused_optim.multi_tensor_norm(ts, 2.0, True))
    for _ in range(3):
        for t in ts:
            t.copy_(torch.randn(t.shape, generator=g))
        graph.replay()
        eager_total, eager_per = torch.ops.fused_optim.multi_tensor_norm(ts, 2.0, True)
        assert torch.equal(total, eager_total) and torch.equal(per, eager_per)


@native_cuda_test
@pytest.mark.parametrize("op", ["multi_tensor_scale_", "multi_tensor_lerp_", "l1l2_penalty_backward"])
def test_cuda_graph_capture_refuses_a_cpu_scalar_tensor(op):
    # A CPU value is read at capture: a replay would use it whatever the tensor holds by then.
    x, y = [torch.ones(1000, device="cuda")], [torch.ones(1000, device="cuda")]
    call, name = {
        "multi_tensor_scale_": (lambda: torch.ops.fused_optim.multi_tensor_scale_(x, torch.tensor(0.5)), "scale"),
        "multi_tensor_lerp_": (lambda: torch.ops.fused_optim.multi_tensor_lerp_(x, y, torch.tensor(0.5)), "weight"),
        "l1l2_penalty_backward": (
            lambda: torch.ops.fused_optim.l1l2_penalty_backward(torch.tensor(1.0), x, 0.1, 0.1),
            "grad_out",
        ),
    }[op]
    call()  # accepted outside capture
    with pytest.raises(RuntimeError) as info:
        _capture(call)
    message = str(info.value) + str(info.value.__context__)
    assert f"{op}: {name} is on the CPU while a CUDA graph is being captured" in message


@native_cuda_test
def test_cuda_graph_captures_ema_update_with_a_number_as_decay():
    # A number is a constant of the graph (made on the device, not a CPU tensor, which is refused).
    avg, cur = [torch.zeros(1000, device="cuda")], [torch.ones(1000, device="cuda")]
    graph, _ = _capture(lambda: fused_optim.ema_update_(avg, cur, 0.5))
    avg[0].zero_()
    graph.replay()
    graph.replay()
    assert torch.equal(avg[0], torch.full_like(avg[0], 0.75))
