"""Compiles every csrc/cuda/*.cu to an object file with the machine's nvcc against the installed
torch headers, and fails on any error: the CUDA code is checked on GPU-less CI machines too.

    python tools/check_cuda_compile.py [--arch sm_90] [--jobs 2]

A CPU build of torch ships the ATen/c10 CUDA headers but not the generated
c10/cuda/impl/cuda_cmake_macros.h, which is supplied (empty of macros) in a temporary folder.
"""

from __future__ import annotations

import argparse
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
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            "-DTORCH_EXTENSION_NAME=_C", "-DFUSED_OPTIM_WITH_CUDA=1",
            f"-I{os.path.join(tmp, 'include')}", f"-I{os.path.join(ROOT, 'csrc')}",
            *(f"-I{p}" for p in include_paths()),
        ]

        def compile_one(src: str) -> tuple[str, int, str]:
            out = os.path.join(tmp, os.path.basename(src) + ".o")
            proc = subprocess.run([nvcc, *flags, src, "-o", out], capture_output=True, text=True)
            return src, proc.returncode, proc.stdout + proc.stderr

        failed = 0
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            for src, rc, output in pool.map(compile_one, sources):
                print(f"{'ok  ' if rc == 0 else 'FAIL'} {os.path.relpath(src, ROOT)}")
                if rc != 0:
                    failed += 1
                if output.strip():  # errors, and warnings of sources that compiled
                    print(output[-8000:])
    print(f"check_cuda_compile: {len(sources) - failed} of {len(sources)} CUDA sources compiled ({args.arch})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
