"""Builds the SIMT runner's library (test tooling, never shipped): csrc/cuda/*.cu compiled by g++ as
C++ against tests/simt/include (the CUDA execution model, simt/cuda.h, force-included, and stand-ins
for the few CUDA headers of c10/ATen the sources include), with AddressSanitizer, and linked with
the runner (tests/simt/runtime.cpp) and the deliberately broken kernels of tests/simt/broken.cu.
The ops register in the namespace fused_optim_simt on the CPU key (csrc/cuda/launch.cuh);
`load()` gives them the schemas of fused_optim's ops.

    python tests/simt/simt_build.py     # builds (if a source changed) and prints the library's path

Every memory access of the kernel sources becomes a call (AddressSanitizer's outline mode), renamed
from __asan_* to simt_asan_* in the object files, so that the runner logs it (the race log) before
AddressSanitizer checks it. The library needs AddressSanitizer's runtime loaded first: Python runs
it in a subprocess with `asan_env()` (LD_PRELOAD), as `run_python` does.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import glob
import hashlib
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.join(ROOT, "tests", "simt")
OUT = os.path.join(ROOT, "build", "simt")

# The instrumented access calls, renamed to the runner's hooks.
HOOKS = [f"__asan_{kind}{n}" for kind in ("load", "store") for n in ("1", "2", "4", "8", "16", "N")]


def kernel_sources(csrc: str) -> list[str]:
    return sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu"))) + [os.path.join(HERE, "broken.cu")]


def all_inputs(csrc: str) -> list[str]:
    """Every file the build reads: a change to any rebuilds."""
    files = glob.glob(os.path.join(csrc, "**", "*"), recursive=True)
    files += glob.glob(os.path.join(HERE, "include", "**", "*"), recursive=True)
    files += [os.path.join(HERE, name) for name in ("runtime.cpp", "broken.cu", "simt_build.py")]
    return sorted(f for f in files if os.path.isfile(f))


def flags(csrc: str) -> list[str]:
    import torch
    from torch.utils.cpp_extension import include_paths

    return [
        # -ffp-contract=off: no multiply-add contracted, as nvcc's -fmad=false (setup.py).
        "-std=c++20", "-O1", "-g1", "-fPIC", "-fno-omit-frame-pointer", "-ffp-contract=off", "-Wno-unknown-pragmas",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-DFUSED_OPTIM_SIMT=1",
        f"-I{os.path.join(HERE, 'include')}", f"-I{csrc}",
        *(f"-I{p}" for p in include_paths()),
        "-include", "simt/cuda.h",
    ]


# -O0: fewer checks merged away, and a faster build. A store that follows a load of the same address
# is not checked even so (x[i] = f(x[i])): the runner finds those writes (log_unseen_writes).
INSTRUMENT = ["-fsanitize=address", "--param", "asan-instrumentation-with-call-threshold=0", "-O0"]


def stamp(csrc: str, kernels: list[str] | None) -> str:
    import torch

    h = hashlib.sha256(torch.__version__.encode())
    h.update(" ".join(flags(csrc) + INSTRUMENT + (kernels or ["all"])).encode())
    for f in all_inputs(csrc):
        h.update(f.encode())
        with open(f, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


def run(cmd: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # not the compiler under AddressSanitizer
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"simt build failed: {' '.join(cmd)}\n{done.stdout}{done.stderr}")


def compile_kernels(source: str, obj: str, common: list[str]) -> None:
    """An instrumented object file, its access calls renamed to the runner's hooks."""
    run(["g++", "-x", "c++", *common, *INSTRUMENT, "-c", source, "-o", obj])
    run(["objcopy", *(f"--redefine-sym={h}=simt_asan_{h[len('__asan_'):]}" for h in HOOKS), obj])


def build(csrc: str = os.path.join(ROOT, "csrc"), out: str = OUT, kernels: list[str] | None = None) -> str:
    """The library's path (in `out`), built first if any input changed since the last build: the CUDA
    sources of `csrc` (those named in `kernels`, default all, and broken.cu), the runner, and
    csrc/common/tensor_list.cpp. Another `csrc` is a changed copy of the sources (a mutant)."""
    library = os.path.join(out, "fused_optim_simt.so")
    stamp_file = os.path.join(out, "stamp")
    want = stamp(csrc, kernels)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # processes that build at once build once
        if not (os.path.exists(library) and os.path.exists(stamp_file) and open(stamp_file).read() == want):
            compile_and_link(csrc, out, kernels, library)
            with open(stamp_file, "w") as f:
                f.write(want)
    return library


def compile_and_link(csrc: str, out: str, kernels: list[str] | None, library: str) -> None:
    from torch.utils.cpp_extension import library_paths

    common = flags(csrc)
    sources = [s for s in kernel_sources(csrc) if kernels is None or os.path.basename(s) in kernels]
    objects, work = [], []
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for source in sources:
            obj = os.path.join(out, os.path.basename(source) + ".o")
            objects.append(obj)
            work.append(pool.submit(compile_kernels, source, obj, common))
        # The host code the kernels' host functions call, instrumented alike (its accesses are not
        # logged: no kernel is running), and the runner, which must not be.
        tensor_list = os.path.join(csrc, "common", "tensor_list.cpp")
        objects.append(os.path.join(out, "tensor_list.cpp.o"))
        work.append(pool.submit(compile_kernels, tensor_list, objects[-1], common))
        objects.append(os.path.join(out, "runtime.cpp.o"))
        work.append(pool.submit(run, ["g++", *common, "-c", os.path.join(HERE, "runtime.cpp"), "-o", objects[-1]]))
        for w in work:
            w.result()
    libs = [f"-L{p}" for p in library_paths()] + [f"-Wl,-rpath,{p}" for p in library_paths()]
    # Linked beside, then renamed: a process that has the old library loaded keeps it intact.
    run(["g++", "-shared", "-fsanitize=address", *objects, *libs, "-lc10", "-ltorch_cpu", "-ltorch", "-o", library + ".new"])
    os.replace(library + ".new", library)


def asan_env(seed: int = 0) -> dict[str, str]:
    """The environment of a Python process that loads the library: AddressSanitizer's runtime
    preloaded (with libstdc++, which its C++ exception interceptor needs to find at start), leaks not
    reported (Python and torch keep memory to exit), the schedule's seed."""
    def gcc_file(name: str) -> str:
        return subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout.strip()

    env = dict(os.environ)
    env["LD_PRELOAD"] = f"{gcc_file('libasan.so')} {gcc_file('libstdc++.so.6')}"
    # Fake stacks (use-after-return) would put the kernels' locals outside the fibers' stacks.
    env["ASAN_OPTIONS"] = "detect_leaks=0:detect_stack_use_after_return=0:abort_on_error=0:halt_on_error=1"
    env["SIMT_SEED"] = str(seed)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return env


def run_python(*args: str, seed: int = 0, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python *args` under asan_env(seed), from the repository's root, with this folder on its path
    (so that a script can `import simt_build`)."""
    env = asan_env(seed)
    env["PYTHONPATH"] = os.pathsep.join([HERE, env["PYTHONPATH"]])
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def load(library: str | None = None) -> object:
    """Loads `library` (default: the build of this tree's sources) into this process, which must run
    under asan_env(), and defines the schemas of its ops: those of the fused_optim ops of the same
    names. Returns torch.ops.fused_optim_simt."""
    import torch

    import fused_optim  # noqa: F401  (defines the schemas copied below)

    torch.ops.load_library(library or build())
    library = torch.library.Library("fused_optim_simt", "FRAGMENT")
    registered = set(torch._C._dispatch_get_registrations_for_dispatch_key("CPU"))
    for name in torch.ops.fused_optim:
        if f"fused_optim_simt::{name}" in registered:
            schema = str(getattr(torch.ops.fused_optim, name).default._schema)
            library.define(schema.replace("fused_optim::", "", 1))
    load.library = library  # kept alive: the definitions go with it
    return torch.ops.fused_optim_simt


if __name__ == "__main__":
    print(build())
    sys.exit(0)
