"""The CUDA kernels' index arithmetic, run on the host through the same C++ functions the kernels
call (csrc/common/launch_plan.h, csrc/common/dropout.h, exposed by csrc/testing.cpp as
torch.ops.fused_optim_testing.*): the launch plan covers every chunk exactly once within the
kernel-argument limits, the weighted sum's passes cover every input once, the CUDA dropout tiles
give every element the stream's word and mask bit, bit for bit, and the norm kernels' combine
order is the documented one. Needs the native extension (a CPU build is enough); no GPU, except
the one test that checks the CUDA norm against that order on a GPU."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import EXT_DISABLED, native_cuda_test
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


def documented_block_order(values: list[float], p: float, threads: int = 512) -> float:
    """csrc/common/reduce_order.h's order, as its comment states it, in plain Python floats (fp64):
    thread t folds values t, t + threads, ... in turn from the identity, then a tree at strides
    threads / 2, ..., 1; sums for finite p, NaN-propagating max / min for inf / -inf."""
    if p == float("inf"):
        init, combine = 0.0, lambda a, b: a if (a != a or a > b) else b
    elif p == -float("inf"):
        init, combine = float("inf"), lambda a, b: a if (a != a or a < b) else b
    else:
        init, combine = 0.0, lambda a, b: a + b
    acc = [init] * threads
    for t in range(threads):
        for i in range(t, len(values), threads):
            acc[t] = combine(acc[t], values[i])
    s = threads // 2
    while s:
        for t in range(s):
            acc[t] = combine(acc[t], acc[t + s])
        s //= 2
    return acc[0]


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
