"""The op library itself: loading of _C, the reference fallback, backend_info, CPU capabilities."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import fused_optim
from fused_optim import _library
from helpers import EXT_DISABLED

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )


PENALTY_SCRIPT = """
import json, torch, fused_optim
g = torch.Generator().manual_seed(0)
ts = [torch.randn(n, generator=g).to(d) for n, d in [(100_003, torch.float32), (999, torch.float16),
      (5000, torch.bfloat16), (77, torch.float64)]]
print(json.dumps({"info": fused_optim.backend_info(), "value": fused_optim.l1l2_penalty(ts, 0.3, 0.7).item()}))
"""


def test_every_op_has_a_schema_and_a_kernel():
    info = fused_optim.backend_info()
    assert set(info["ops"]) == set(_library.SCHEMAS)
    for op in _library.SCHEMAS:
        assert hasattr(torch.ops.fused_optim, op)
        expected = "reference" if EXT_DISABLED else "native"
        assert info["ops"][op]["cpu"] == expected, op


def _registered_at(op: str, key: str) -> str | None:
    """The file that registered `op`'s kernel for `key` (from the dispatcher's own dump), or None."""
    for line in torch._C._dispatch_dump(f"fused_optim::{op}").splitlines():
        if line.startswith(f"{key}:") or line.startswith(f"{key}[alias]:"):
            return line.split("registered at ")[1].split(":")[0]
    return None


@pytest.mark.parametrize("op", sorted(_library.SCHEMAS))
def test_every_op_has_autograd_and_version_kernels(op):
    # Every op has an Autograd kernel (a derivative, a refusal of grad-requiring writes, or
    # torch's NotImplemented rule), and every op that writes a tensor an ADInplaceOrView kernel
    # that bumps versions; with the extension loaded, those of csrc/autograd.cpp (which derives
    # them from the schemas), except the dropout family's derivatives, which are Python's.
    mutable = getattr(torch.ops.fused_optim, op).default._schema.is_mutable
    autograd = _registered_at(op, "Autograd")
    version = _registered_at(op, "ADInplaceOrView")
    assert autograd is not None
    assert (version is not None) == mutable
    if not EXT_DISABLED and op not in ("dropout", "drop_groups", "drop_groups_add"):
        assert autograd.endswith("csrc/autograd.cpp"), autograd
        assert not mutable or version.endswith("csrc/autograd.cpp"), version


def test_the_ops_with_a_derivative_are_those_registered_with_one():
    assert _library.DIFFERENTIABLE == {"l1l2_penalty", "dropout", "drop_groups", "drop_groups_add"}
    assert not any(getattr(torch.ops.fused_optim, op).default._schema.is_mutable for op in _library.DIFFERENTIABLE)


# The op families (issue 28, "one op family, one row"): a family's ops are registered in
# csrc/cpu/<family>.cpp and csrc/cuda/<family>.cu, its per-capability CPU kernels (if any) are
# csrc/cpu/kernels/<family>.cpp, and those files hold no other family's ops.
OP_FAMILIES = {family: list(ops) for family, ops in _library.FAMILIES.items()}


def _stems(pattern: str) -> set[str]:
    return {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, pattern))}


def test_op_families_are_the_kernel_files():
    assert sorted(op for ops in OP_FAMILIES.values() for op in ops) == sorted(_library.SCHEMAS)
    assert _stems("csrc/cpu/*.cpp") == set(OP_FAMILIES)
    assert _stems("csrc/cuda/*.cu") == set(OP_FAMILIES)
    assert _stems("csrc/cpu/kernels/*.cpp") <= set(OP_FAMILIES)


@pytest.mark.parametrize("family", sorted(OP_FAMILIES))
def test_each_family_registers_its_ops_in_its_own_files(family):
    for path in (f"csrc/cpu/{family}.cpp", f"csrc/cuda/{family}.cu"):
        with open(os.path.join(ROOT, path)) as f:
            assert sorted(re.findall(r'm\.impl\("(\w+)"', f.read())) == sorted(OP_FAMILIES[family]), path
    if not EXT_DISABLED:
        for op in OP_FAMILIES[family]:
            assert _registered_at(op, "CPU").endswith(f"csrc/cpu/{family}.cpp"), op


def test_backend_info_reports_build():
    info = fused_optim.backend_info()
    assert info["torch"] == torch.__version__
    if EXT_DISABLED:
        assert not info["extension"]["loaded"] and "FUSED_OPTIM_DISABLE_EXT" in info["extension"]["error"]
    else:
        assert info["extension"]["loaded"] and info["extension"]["error"] is None
        assert info["extension"]["build"]["openmp"] is True
        assert torch.__version__.startswith(info["extension"]["build"]["torch_version"])


def test_main_prints_backend_info():
    out = subprocess.run([sys.executable, "-m", "fused_optim"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["ops"].keys() == set(_library.SCHEMAS)


def test_disable_ext_runs_reference_with_same_results():
    native = json.loads(run_python(PENALTY_SCRIPT).stdout)
    ref = json.loads(run_python(PENALTY_SCRIPT, FUSED_OPTIM_DISABLE_EXT="1").stdout)
    assert not ref["info"]["extension"]["loaded"]
    assert all(v["cpu"] == "reference" for v in ref["info"]["ops"].values())
    assert ref["value"] == pytest.approx(native["value"], rel=1e-6)


def test_failed_load_warns_once_and_falls_back():
    code = (
        "import sys, warnings\n"
        "sys.modules['fused_optim._C'] = None  # makes 'from . import _C' raise ImportError\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import fused_optim, fused_optim.regularization, torch\n"
        "    print(fused_optim.l1l2_penalty([torch.ones(4)], 1.0, 0.0).item())\n"
        "print(sum('failed to load' in str(x.message) for x in w))\n"
        "print(fused_optim.backend_info()['extension']['error'])\n"
    )
    out = run_python(code, FUSED_OPTIM_DISABLE_EXT="0").stdout.splitlines()
    assert out[0] == "4.0"
    assert out[1] == "1"
    assert "Error" in out[2] and "fused_optim._C" in out[2]


@pytest.mark.skipif(EXT_DISABLED, reason="native extension disabled by FUSED_OPTIM_DISABLE_EXT=1")
def test_portable_cpu_kernels_agree_with_vectorized_ones():
    # ATEN_CPU_CAPABILITY=default makes the DispatchStubs pick the portable copy of every kernel.
    best = json.loads(run_python(PENALTY_SCRIPT).stdout)
    portable = json.loads(run_python(PENALTY_SCRIPT, ATEN_CPU_CAPABILITY="default").stdout)
    assert portable["info"]["cpu_kernels"] == "DEFAULT"
    assert best["info"]["cpu_kernels"] in best["info"]["extension"]["build"]["cpu_capabilities"].split(",")
    assert portable["value"] == pytest.approx(best["value"], rel=1e-6)


@pytest.mark.skipif(EXT_DISABLED, reason="already running without the extension")
def test_whole_suite_without_extension():
    # The path users get when _C is absent: reference kernels and the Python autograd rule.
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(ROOT, "tests"),
         "--deselect", "tests/ops/test_library.py::test_whole_suite_without_extension",
         "-m", "not simt"],  # the SIMT runner runs the CUDA sources, alike with or without the extension
        env={**os.environ, "FUSED_OPTIM_DISABLE_EXT": "1"},
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout.splitlines()[-1]


def _run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_cuda_kernel_cases_script_runs_on_the_cpu():
    # tools/cuda_kernel_cases.py is what compute-sanitizer runs on a GPU; here it runs every op's
    # boundary cases on the CPU against the reference, so the script (and those cases) cannot rot.
    proc = _run_tool(os.path.join("tools", "cuda_kernel_cases.py"), "--device", "cpu", "--small")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "every op agrees with the reference" in proc.stdout


def test_gpu_check_dry_run_finds_every_path():
    proc = _run_tool(os.path.join("tools", "gpu_check.py"), "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for phase in ("build", "tests", "memcheck", "racecheck", "bench"):
        assert f"  {phase}" in proc.stdout
    assert "every path exists" in proc.stdout


def test_setup_py_names_the_setuptools_to_upgrade():
    # Under --no-build-isolation pip does not install build-system.requires: an older setuptools
    # would fail later with a schema error about project.license (an SPDX string needs 77).
    code = "import runpy, setuptools; setuptools.__version__ = '{}'; runpy.run_path('setup.py', run_name='__main__')"
    old = subprocess.run([sys.executable, "-c", code.format("76.1.0"), "--name"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert old.returncode != 0
    assert "needs setuptools>=77 (found 76.1.0)" in old.stderr and "pip install -U 'setuptools>=77'" in old.stderr
    new = subprocess.run([sys.executable, "-c", code.format("77.0.0"), "--name"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert new.returncode == 0 and new.stdout.strip().endswith("fused_optim"), new.stderr[-2000:]
