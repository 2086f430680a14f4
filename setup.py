"""Build of fused_optim._C: C++ CPU kernels always, CUDA kernels when torch has CUDA and nvcc exists.

Environment:
  FUSED_OPTIM_CUDA=auto|0|1   auto (default): build csrc/cuda/*.cu when torch.version.cuda is set and
                              nvcc is found; 0: never; 1: always, failing loudly without nvcc.
  TORCH_CUDA_ARCH_LIST        respected; defaults to "8.0;9.0+PTX" (sm_80, sm_90 and PTX for newer).
  MAX_JOBS                    respected by torch's ninja build.

CPU kernels under csrc/cpu/kernels/ are compiled once per CPU capability (DEFAULT, and AVX2 on
x86-64), as ATen compiles its own: each copy defines CPU_CAPABILITY, registers into an ATen
DispatchStub, and the stub picks the best copy the running CPU supports (ATEN_CPU_CAPABILITY=default
forces the portable one). The rest of the build uses no -march flag, so it runs on any x86-64 CPU.
"""

import glob
import os
import platform
import shutil
import sys

import setuptools

# pyproject.toml's license is an SPDX expression, which setuptools reads from version 77 on. Under
# --no-build-isolation (how this package is built) pip does not install build-system.requires, and
# an older setuptools fails later with a schema error about project.license: say what to upgrade.
if int(setuptools.__version__.split(".")[0]) < 77:
    sys.exit(
        f"fused_optim: building needs setuptools>=77 (found {setuptools.__version__}); "
        "run: pip install -U 'setuptools>=77', then build again"
    )

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
X86_64 = platform.machine().lower() in ("x86_64", "amd64")

# ATen's capability names and flags; AVX512 is left out, as ATen leaves it out for most kernels
# (the stub then runs the AVX2 copy on AVX512 machines).
CPU_CAPABILITIES = {"DEFAULT": [], **({"AVX2": ["-mavx2", "-mfma", "-mf16c"]} if X86_64 else {})}


# The arithmetic contract (docs/numerics.md, "Arithmetic"): a * b + c is rounded twice unless the source calls
# fma_rn, so the AVX2 and portable CPU builds, the scalar tails and the CUDA kernels give the same
# bits; nvcc would otherwise contract it into one FMA (-fmad=true is its default).
# tools/check_cuda_compile.py compiles with these flags and checks the PTX for it.
NVCC_ARITHMETIC = ["-fmad=false"]


def _cuda_requested() -> bool:
    mode = os.environ.get("FUSED_OPTIM_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"FUSED_OPTIM_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    available = torch.version.cuda is not None and nvcc is not None and os.path.exists(nvcc)
    if mode == "1" and not available:
        raise RuntimeError(
            "FUSED_OPTIM_CUDA=1 but the CUDA build is impossible: "
            f"torch.version.cuda={torch.version.cuda!r}, nvcc={nvcc!r} (set CUDA_HOME)"
        )
    return available


def _sources(pattern: str) -> list[str]:
    # Relative paths keep the build reproducible and the object names short.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extension():
    with_cuda = _cuda_requested()
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp") + _sources("csrc/common/*.cpp")
    # at::parallel_for is an inline OpenMP region: without -fopenmp it silently runs on one thread.
    # The extension then links libgomp.so.1, the same soname torch loads, so one runtime is shared
    # and torch.set_num_threads() governs our kernels too.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # No -march flags: the default build must run on any x86-64 CPU. No contraction of a * b + c
    # into an FMA behind our back (NVCC_ARITHMETIC's reason).
    cxx_flags = ["-O3", "-ffp-contract=off", *openmp]
    macros = [
        ("FUSED_OPTIM_WITH_CUDA", "1" if with_cuda else "0"),
        ("FUSED_OPTIM_CPU_CAPABILITIES", '"' + ",".join(CPU_CAPABILITIES) + '"'),
    ]
    if X86_64:
        # torch's x86-64 builds have both stub slots; the DispatchStub layout must match theirs.
        macros += [("HAVE_AVX2_CPU_DEFINITION", None), ("HAVE_AVX512_CPU_DEFINITION", None)]
    if not with_cuda:
        return CppExtension(
            "fused_optim._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=openmp,
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    return CUDAExtension(
        "fused_optim._C",
        sources + _sources("csrc/cuda/*.cu"),
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", *NVCC_ARITHMETIC, "-lineinfo", "--expt-relaxed-constexpr", "--extended-lambda"]},
        extra_link_args=openmp,
    )


class BuildWithCpuCapabilities(BuildExtension):
    """torch's BuildExtension, plus one compile of each csrc/cpu/kernels/*.cpp per CPU capability."""

    def build_extension(self, ext) -> None:
        gen_dir = os.path.abspath(os.path.join(self.build_temp, "cpu_capabilities"))
        os.makedirs(gen_dir, exist_ok=True)
        for cap, isa_flags in CPU_CAPABILITIES.items():
            wrappers = []
            for src in _sources("csrc/cpu/kernels/*.cpp"):
                name = os.path.splitext(os.path.basename(src))[0]
                wrapper = os.path.join(gen_dir, f"{name}.{cap}.cpp")
                text = f'#include "{os.path.join(ROOT, src)}"\n'
                if not os.path.exists(wrapper) or open(wrapper).read() != text:
                    with open(wrapper, "w") as f:
                        f.write(text)
                wrappers.append(wrapper)
            # extra_compile_args["cxx"] already holds torch's flags (C++ standard, ABI) here.
            flags = ext.extra_compile_args["cxx"] + isa_flags
            flags += [f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}"]
            ext.extra_objects += self.compiler.compile(
                wrappers,
                output_dir=os.path.join(gen_dir, cap),
                macros=ext.define_macros,
                include_dirs=ext.include_dirs,
                extra_postargs=flags,
            )
        super().build_extension(ext)


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildWithCpuCapabilities})
