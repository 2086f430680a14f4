"""Checks that fused_optim installs from its own artifacts: builds the sdist and, from it, the wheel
(`python -m build --no-isolation`, with the torch already installed), checks that the sdist holds
every source file the build reads, installs the wheel into a fresh virtual environment (with its own copy of the torch it
was built against), and runs a smoke test there, outside the source tree:
import, `python -m fused_optim`, the version, and one call of each op on the native kernels.

    python tools/check_package.py [--keep DIR]

Needs the `build` package (CI installs it). Exits non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tarfile
import tempfile
import venv

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One call of each op, checked against the formula it computes; run by the venv's Python.
SMOKE = r"""
import json, subprocess, sys
import torch, fused_optim
from fused_optim import _library

assert fused_optim.__file__.startswith(sys.prefix), f"imported from the source tree: {fused_optim.__file__}"
info = fused_optim.backend_info()
assert info["extension"]["loaded"], info["extension"]["error"]
not_native = [op for op in _library.SCHEMAS if info["ops"][op]["cpu"] != "native"]
assert not not_native, f"ops without their native CPU kernel: {not_native}"
out = subprocess.run([sys.executable, "-m", "fused_optim"], check=True, capture_output=True, text=True).stdout
assert json.loads(out)["extension"]["loaded"]

ops = torch.ops.fused_optim
def close(a, b):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype))
x = torch.tensor([-2.0, 0.5, 3.0])
seed = torch.tensor([1, 0])
close(ops.l1l2_penalty(x.split(1), 0.1, 0.2), 0.1 * 5.5 + 0.2 * 13.25)
g = ops.l1l2_penalty_backward(torch.tensor(1.0), [x], 0.1, 0.2)[0]
close(g, 0.1 * x.sign() + 0.4 * x)
grads = [torch.zeros(3)]
ops.l1l2_grad_([x], grads, 0.1, 0.2)
close(grads[0], g)
close(ops.multi_tensor_norm([x], 2.0, False)[0], x.norm())
t = [x.clone()]
ops.multi_tensor_scale_(t, torch.tensor(2.0))
close(t[0], 2 * x)
t = [x.clone()]
close(ops.clip_grad_norm_(t, 1.0, 2.0, False), x.norm())
close(t[0], x / (x.norm() + 1e-6))
t = [x.clone()]
ops.clip_grad_value_(t, 1.0)
close(t[0], x.clamp(-1, 1))
close(ops.multi_tensor_weighted_sum([x, 3 * x], [0.5, 0.5])[0], 2 * x)
out = [torch.empty(3)]
ops.multi_tensor_weighted_sum_([x, 3 * x], [0.5, 0.5], out)
close(out[0], 2 * x)
t = [x.clone()]
ops.multi_tensor_lerp_(t, [3 * x], torch.tensor(0.5))
close(t[0], 2 * x)
y = ops.dropout(torch.ones(1000), 0.5, seed)
assert set(y.unique().tolist()) <= {0.0, 2.0}
z = torch.ones(1000)
ops.dropout_(z, 0.5, seed)
close(z, y)
mask = ops.dropout_mask(torch.ones(1000), 0.5, seed)
close(fused_optim.unpack_dropout_mask(mask, (1000,)).float() * 2, y)
print("smoke ok:", fused_optim.__version__, len(_library.SCHEMAS), "ops")
"""


def run(cmd: list[str], **kwargs) -> str:
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        print(proc.stdout[-6000:], proc.stderr[-6000:], sep="\n")
        raise SystemExit(f"check_package: failed: {' '.join(cmd)}")
    return proc.stdout


def build_sources() -> set[str]:
    """The files the build reads: setup.py's sources and headers, and the package's Python files."""
    patterns = ["csrc/**/*.h", "csrc/**/*.cpp", "csrc/**/*.cu", "csrc/**/*.cuh", "fused_optim/**/*.py",
                "setup.py", "pyproject.toml", "README.md", "LICENSE"]
    return {os.path.relpath(p, ROOT) for pat in patterns for p in glob.glob(os.path.join(ROOT, pat), recursive=True)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", help="build and install under this folder, kept afterwards (default: a temporary one)")
    args = parser.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="fused_optim_package_")
    dist = os.path.join(work, "dist")
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, ROOT], env={**os.environ, "FUSED_OPTIM_CUDA": "0"})
    [sdist] = glob.glob(os.path.join(dist, "fused_optim-*.tar.gz"))
    [wheel] = glob.glob(os.path.join(dist, "fused_optim-*.whl"))
    with tarfile.open(sdist) as tar:
        prefix = os.path.basename(sdist)[: -len(".tar.gz")] + "/"
        members = {m.name[len(prefix):] for m in tar.getmembers() if m.name.startswith(prefix)}
    missing = sorted(build_sources() - members)
    if missing:
        raise SystemExit(f"check_package: the sdist lacks {missing}")
    print(f"sdist holds all {len(build_sources())} build sources: {os.path.basename(sdist)}")
    env_dir = os.path.join(work, "venv")
    venv.create(env_dir, with_pip=True)
    python = os.path.join(env_dir, "bin", "python")
    # The torch the wheel was built against (its C++ ABI), not whatever the index would pick.
    run([python, "-m", "pip", "install", "-q", wheel, f"torch=={torch.__version__}"])
    print(run([python, "-c", SMOKE], cwd=work).strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
