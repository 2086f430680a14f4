"""Compiles every csrc/cuda/*.cu to an object file with the machine's nvcc against the installed
torch headers, and fails on any error: the CUDA code is checked on GPU-less CI machines too.
It also reads the PTX nvcc kept for the arithmetic contract (docs/numerics.md, "Arithmetic"): the elementwise
kernels whose formulas are rounded operation by operation hold no fused multiply-add, and the lerp
kernels hold the one torch's lerp rounds with.

    python tools/check_cuda_compile.py [--arch sm_90] [--jobs 2]

A CPU build of torch ships the ATen/c10 CUDA headers but not the generated
c10/cuda/impl/cuda_cmake_macros.h, which is supplied (empty of macros) in a temporary folder.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import glob
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from torch.utils.cpp_extension import CUDA_HOME, include_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Kernel (functor) name -> whether its PTX must hold an fma.rn (True) or none (False). Kernels that
# call math functions (pow, sqrt: their library code fuses internally) cannot be checked this way.
FMA_CONTRACT = {"PenaltyGrad": False, "WeightedSum": False, "Lerp": True}


def nvcc_arithmetic_flags() -> list[str]:
    """setup.py's NVCC_ARITHMETIC, read without running setup.py."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NVCC_ARITHMETIC" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError("setup.py defines no NVCC_ARITHMETIC")


def fma_contract_errors(ptx: str) -> tuple[list[str], set[str]]:
    """(violations, the FMA_CONTRACT functors found) in one PTX file's kernel entries."""
    errors, found = [], set()
    for entry in ptx.split(".entry ")[1:]:
        name = entry.split("(", 1)[0].strip()
        for functor, fused in FMA_CONTRACT.items():
            if functor in name:
                found.add(functor)
                if ("fma.rn." in entry) != fused:
                    errors.append(f"{name}: {'no' if fused else 'an'} fma.rn, the contract says {'fused' if fused else 'unfused'}")
    return errors, found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_90", help="one architecture keeps the check fast")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if not nvcc or not os.path.exists(nvcc):
        print("check_cuda_compile: nvcc not found (set CUDA_HOME)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        macros = os.path.join(tmp, "include", "c10", "cuda", "impl")
        os.makedirs(macros)
        with open(os.path.join(macros, "cuda_cmake_macros.h"), "w") as f:
            f.write("#pragma once\n")
        flags = [
            "-std=c++20", "-c", f"-arch={args.arch}", "--expt-relaxed-constexpr", "--extended-lambda",
            *nvcc_arithmetic_flags(),
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            "-DTORCH_EXTENSION_NAME=_C", "-DFUSED_OPTIM_WITH_CUDA=1",
            f"-I{os.path.join(tmp, 'include')}", f"-I{os.path.join(ROOT, 'csrc')}",
            *(f"-I{p}" for p in include_paths()),
        ]

        def compile_one(src: str) -> tuple[str, int, str, list[str], int]:
            keep = os.path.join(tmp, os.path.basename(src) + ".keep")
            os.makedirs(keep)
            out = os.path.join(tmp, os.path.basename(src) + ".o")
            cmd = [nvcc, *flags, "-keep", f"-keep-dir={keep}", src, "-o", out]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            errors, found = [], set()
            for ptx in glob.glob(os.path.join(keep, "*.ptx")):
                e, f = fma_contract_errors(open(ptx).read())
                errors += e
                found |= f
            return src, proc.returncode, proc.stdout + proc.stderr, errors, found

        failed = 0
        contract_errors, checked = [], set()
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            for src, rc, output, errors, found in pool.map(compile_one, sources):
                print(f"{'ok  ' if rc == 0 else 'FAIL'} {os.path.relpath(src, ROOT)}")
                if rc != 0:
                    failed += 1
                if output.strip():  # errors, and warnings of sources that compiled
                    print(output[-8000:])
                contract_errors += errors
                checked |= found
    print(f"check_cuda_compile: {len(sources) - failed} of {len(sources)} CUDA sources compiled ({args.arch})")
    # Every functor of FMA_CONTRACT must have been found, so a renamed kernel cannot pass unseen.
    contract_errors += [f"no kernel of {f} found" for f in FMA_CONTRACT if f not in checked]
    for e in contract_errors:
        print(f"FMA contract: {e}")
    print(f"check_cuda_compile: kernels of {sorted(checked)} checked against the FMA contract")
    return 1 if failed or contract_errors else 0


if __name__ == "__main__":
    sys.exit(main())
