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
    assert "REPORT simt:" in done.stdout, done.stdout[-3000:]
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


def test_two_blocks_writing_one_partial():
    done = run("assert ops.broken_partials(6, 1).tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]\nprint('clean')\n")
    assert done.returncode == 0 and "clean" in done.stdout, done.stderr[-3000:]
    out = expect_report("ops.broken_partials(6, 2)", seed=0)
    assert re.search(r"race: thread 0 of block 1 writes global memory \S+, which thread 0 of block 0 wrote", out), out


# The real sources, broken on purpose, in one copy of csrc/: (file, the text replaced, its
# replacement). block_sum loses the barrier between its threads' writes and the tree's reads (the
# penalty's value reduces with it); the penalty gradient's tail bound goes one past the end.
MUTATIONS = [
    ("multi_tensor_apply.cuh", "  shared[threadIdx.x] = value;\n  __syncthreads();\n", "  shared[threadIdx.x] = value;\n"),
    (
        "regularization.cu",
        "const int64_t end = min(begin + kChunkSize, meta.sizes[tensor]);\n    const auto* p",
        "const int64_t end = min(begin + kChunkSize, meta.sizes[tensor] + 1);\n    const auto* p",
    ),
]


@pytest.fixture(scope="module")
def mutant(tmp_path_factory):
    """The runner's library built from a copy of csrc/ with MUTATIONS applied (regularization.cu only)."""
    root = tmp_path_factory.mktemp("mutant")
    csrc = root / "csrc"
    shutil.copytree(os.path.join(simt_build.ROOT, "csrc"), csrc)
    for file, old, new in MUTATIONS:
        source = (csrc / "cuda" / file).read_text()
        assert source.count(old) == 1, f"{file} no longer holds the text this mutation changes"
        (csrc / "cuda" / file).write_text(source.replace(old, new))
    return simt_build.build(str(csrc), str(root / "build"), kernels=["regularization.cu"])


def test_block_sum_without_its_barrier_fails_the_penalty(mutant):
    t = "[torch.randn(n) for n in (5, 65537)]"
    out = expect_report(f"ops.l1l2_penalty({t}, 0.3, 0.7)", seed=0, library=mutant)
    assert re.search(r"(uninitialized|race): thread \d+ of block 0 reads shared memory", out), out


def test_penalty_gradient_tail_off_by_one_fails(mutant):
    done = run("ops.l1l2_grad_([torch.randn(5)], [torch.randn(5)], 0.3, 0.7)\nprint('not caught')\n", library=mutant)
    assert done.returncode != 0 and "not caught" not in done.stdout
    assert "AddressSanitizer: heap-buffer-overflow" in done.stderr and "PenaltyGrad" in done.stderr, done.stderr[-3000:]
