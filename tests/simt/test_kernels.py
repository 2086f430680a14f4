"""Every CUDA op on the SIMT runner: tools/cuda_kernel_cases.py --simt runs the CUDA sources
(host-compiled, under AddressSanitizer, with the runner's race log) on the launcher's boundary
cases, and compares each result with the reference and with the CPU kernels, bit for bit where
docs/numerics.md promises it. A finding of the runner fails the case as an error."""

from __future__ import annotations

import glob
import os
import re

import pytest

import simt_build

pytestmark = pytest.mark.simt

CASES = os.path.join("tools", "cuda_kernel_cases.py")
FAMILIES = ("penalty", "clip", "pre_step", "averaging", "dropout", "structured")  # its --family choices


@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_ops_on_the_runner(family):
    done = simt_build.run_python(CASES, "--simt", "--family", family)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert f"cuda_kernel_cases: {family}: every op agrees" in done.stdout, done.stdout[-3000:]


def test_every_cuda_op_has_cases():
    registered = set()
    for source in glob.glob(os.path.join(simt_build.ROOT, "csrc", "cuda", "*.cu")):
        registered |= set(re.findall(r'm\.impl\("(\w+)"', open(source).read()))
    cases = open(os.path.join(simt_build.ROOT, CASES)).read()
    assert registered and {op for op in registered if f'"{op}"' not in cases} == set()
