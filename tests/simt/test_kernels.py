"""Every CUDA op on the SIMT runner: tools/cuda_kernel_cases.py --simt runs the CUDA sources
(host-compiled, under AddressSanitizer, with the runner's race log) on the launcher's boundary
cases, and compares each result with the reference and with the CPU kernels, bit for bit where
docs/numerics.md promises it. A finding of the runner fails the case as an error."""

from __future__ import annotations

import glob
import os
import random
import re
import sys

import pytest

import simt_build

pytestmark = pytest.mark.simt

CASES = os.path.join("tools", "cuda_kernel_cases.py")
sys.path.insert(0, os.path.join(simt_build.ROOT, "tools"))
from cuda_kernel_cases import FAMILIES  # noqa: E402  (its --family choices)
# The schedule's seed changes from run to run; a failure names it (SIMT_SEED=... reproduces it).
SEED = random.randrange(2**32)


@pytest.fixture(scope="module")
def runs():
    """Each family's run of the cases on the runner (all of them: the last test needs them all)."""
    return {family: simt_build.run_python(CASES, "--simt", "--family", family, seed=SEED) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_ops_on_the_runner(family, runs):
    done = runs[family]
    assert done.returncode == 0, f"SIMT_SEED={SEED}\n" + done.stdout[-3000:] + done.stderr[-5000:]
    assert f"cuda_kernel_cases: {family}: every op agrees" in done.stdout, done.stdout[-3000:]


def test_every_cuda_op_ran_on_the_runner(runs):
    called = set()
    for done in runs.values():
        called.update(re.search(r"^ops called: (.*)$", done.stdout, re.M).group(1).split())
    registered = set()
    for source in glob.glob(os.path.join(simt_build.ROOT, "csrc", "cuda", "*.cu")):
        registered |= set(re.findall(r'm\.impl\("(\w+)"', open(source).read()))
    assert registered and registered - called == set()
