"""The SIMT runner can fail: kernels of the shapes in csrc/cuda/ (tests/simt/broken.cu), each broken
the way a real kernel breaks, are reported, and the same kernels unbroken run clean and give the
right values. Then the real sources, broken on purpose (a copy of csrc/ with a barrier deleted or a
tail bound off by one), fail the runner's op cases. Each run is a subprocess under AddressSanitizer."""

from __future__ import annotations

import os
import re
import shutil

import pytest

import simt_build

pytestmark = pytest.mark.simt

def run(code: str, seed: int = 0, library: str | None = None):
    """`code` with `ops` the runner's ops (of `library`, default the build of this tree)."""
    return simt_build.run_python("-c", f"import torch, simt_build\nops = simt_build.load({library!r})\n" + code, seed=seed)


def expect_report(code: str, seed: int, library: str | None = None) -> str:
    """Runs `code`, which must raise the runner's error; returns the error's text."""
    done = run(f"try:\n    {code}\nexcept RuntimeError as e:\n    print('REPORT', e)\nelse:\n    print('NO REPORT')\n", seed, library)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "REPORT simt (SIMT_SEED=" in done.stdout, done.stdout[-3000:]
    return done.stdout


@pytest.mark.parametrize("seed", [0, 1])
def test_block_reduction_without_its_barrier(seed):
    done = run(
        "x = torch.randn(1000, dtype=torch.float64)\n"
        "torch.testing.assert_close(ops.broken_block_sum(x, True), x.sum(), rtol=1e-12, atol=1e-12)\n"
        "print('clean')\n",
        seed,
    )
    assert done.returncode == 0 and "clean" in done.stdout, done.stderr[-3000:]
    out = expect_report("ops.broken_block_sum(torch.randn(1000, dtype=torch.float64), False)", seed)
    # A thread reads a neighbour's slot before the neighbour has written it: a read of poisoned
    # shared memory, or a race with the write, depending on the schedule.
    assert re.search(r"(uninitialized|race): thread \d+ of block 0 reads shared memory", out), out


def test_shuffle_with_a_lane_left_out():
    done = run(
        "x = torch.arange(32) * 7\n"
        "expected = torch.cat([x[1:], x[31:]])  # lane 31 has no lane above: its own value\n"
        "assert torch.equal(ops.broken_shuffle(x, 0xFFFFFFFF), expected)\n"
        "print('clean')\n"
    )
    assert done.returncode == 0 and "clean" in done.stdout, done.stderr[-3000:]
    out = expect_report("ops.broken_shuffle(torch.arange(32), 0x7FFFFFFF)", seed=0)
    assert "with the mask 0x7fffffff, which leaves it out" in out or "outside the mask 0x7fffffff" in out, out


def test_tail_read_past_the_end():
    done = run("x = torch.ones(300)\nops.broken_tail(x, 0)\nassert torch.equal(x, torch.full((300,), 2.0))\nprint('clean')\n")
    assert done.returncode == 0 and "clean" in done.stdout, done.stderr[-3000:]
    done = run("ops.broken_tail(torch.ones(300), 1)\nprint('not caught')\n")
    assert done.returncode != 0 and "not caught" not in done.stdout
    assert "AddressSanitizer: heap-buffer-overflow" in done.stderr and "tail_kernel" in done.stderr, done.stderr[-3000:]


@pytest.mark.parametrize("accumulate", [False, True], ids=["store", "read-modify-write"])
def test_two_blocks_writing_one_partial(accumulate):
    done = run(f"assert ops.broken_partials(6, 1, {accumulate}).tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]\nprint('clean')\n")
    assert done.returncode == 0 and "clean" in done.stdout, done.stderr[-3000:]
    out = expect_report(f"ops.broken_partials(6, 2, {accumulate})", seed=0)
    what = "read|wrote" if accumulate else "wrote"
    assert re.search(rf"race: thread 0 of block 1 (writes|reads) global memory \S+, which thread 0 of block 0 ({what})", out), out


# The real sources, broken on purpose: (file, the text replaced, its replacement, the call that
# must then fail, and how: "report", the runner's error, or "asan", AddressSanitizer's).
MUTANTS = {
    "block_sum without the barrier after its writes": (
        "multi_tensor_apply.cuh", "  shared[threadIdx.x] = value;\n  __syncthreads();\n", "  shared[threadIdx.x] = value;\n",
        "ops.l1l2_penalty([torch.randn(n) for n in (5, 65537)], 0.3, 0.7)", "report",
    ),
    "block_sum without the barrier in its tree": (
        "multi_tensor_apply.cuh",
        "      shared[threadIdx.x] += shared[threadIdx.x + stride];\n    }\n    __syncthreads();\n",
        "      shared[threadIdx.x] += shared[threadIdx.x + stride];\n    }\n",
        "ops.l1l2_penalty([torch.randn(n) for n in (5, 65537)], 0.3, 0.7)", "report",
    ),
    "penalty gradient's tail bound one past the end": (
        "regularization.cu",
        "const int64_t end = min(begin + kChunkSize, meta.sizes[tensor]);\n    const auto* p",
        "const int64_t end = min(begin + kChunkSize, meta.sizes[tensor] + 1);\n    const auto* p",
        "ops.l1l2_grad_([torch.randn(5)], [torch.randn(5)], 0.3, 0.7)", "asan",
    ),
}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_broken_sources_fail(mutant, tmp_path):
    file, old, new, call, how = MUTANTS[mutant]
    csrc = tmp_path / "csrc"
    shutil.copytree(os.path.join(simt_build.ROOT, "csrc"), csrc)
    source = (csrc / "cuda" / file).read_text()
    assert source.count(old) == 1, f"{file} no longer holds the text this mutant changes"
    (csrc / "cuda" / file).write_text(source.replace(old, new))
    library = simt_build.build(str(csrc), str(tmp_path / "build"), kernels=["regularization.cu"])
    if how == "report":
        out = expect_report(call, seed=0, library=library)
        assert re.search(r"(uninitialized|race): thread \d+ of block 0 (reads|writes) shared memory", out), out
    else:
        done = run(f"{call}\nprint('not caught')\n", library=library)
        assert done.returncode != 0 and "not caught" not in done.stdout
        assert "AddressSanitizer: heap-buffer-overflow" in done.stderr, done.stderr[-3000:]
