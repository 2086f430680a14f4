"""The GPU half of fused_optim verified in one command, sized for a short lease on a GPU machine:

    python tools/gpu_check.py [--out DIR] [--budget SECONDS]
    python tools/gpu_check.py --dry-run        # any machine: the plan, and every path checked

From a fresh checkout on a machine with a CUDA build of torch, nvcc and compute-sanitizer:
  1. build    the extension in place with CUDA (FUSED_OPTIM_CUDA=1, MAX_JOBS = the core count,
              TORCH_CUDA_ARCH_LIST = the local GPU's arch only), then fail loudly if any op lacks
              its native CUDA kernel;
  2. tests    every CUDA test (`pytest -k cuda`: the `cuda` marker and each CUDA parametrization),
              without -x, so one run reports every failure;
  3. memcheck, 4. racecheck
              compute-sanitizer on tools/cuda_kernel_cases.py (every kernel once, on sizes that
              cross the launcher's boundaries; --small under racecheck);
  5. bench    python -m fused_optim.benchmark --device cuda --quick.
Each phase has a time budget, and the whole run one (--budget, default 480 s): a phase that runs
out is stopped and fails; once the total is spent, the phases left are skipped with a line saying
so. After every phase the summary is rewritten (gpu_check.md and gpu_check.json in --out, default
$FUSED_OPTIM_GPU_CHECK_OUT, else $OUT, else ./gpu_check_out, with each phase's log), so a run
never ends with nothing written. Exits non-zero if any phase failed or was skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = os.path.join("tools", "cuda_kernel_cases.py")
PHASE_BUDGET = {"build": 240, "tests": 180, "memcheck": 90, "racecheck": 90, "bench": 60}  # seconds
PATHS = ["setup.py", "csrc/cuda", "tests/conftest.py", CASES, "fused_optim/benchmark/__main__.py"]


def sanitizer() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = os.path.join(cuda_home, "bin", "compute-sanitizer")
    return path if os.path.exists(path) else shutil.which("compute-sanitizer")


def phases(python: str) -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, command, extra environment) of each phase, in order."""
    san = sanitizer() or "compute-sanitizer"
    verify = (
        "import fused_optim, json; info = fused_optim.backend_info(); "
        "missing = [op for op, d in info['ops'].items() if d.get('cuda') != 'native']; "
        "print(json.dumps(info['extension']['build'])); "
        "assert info['extension']['loaded'], info['extension']['error']; "
        "assert not missing, f'ops without a native CUDA kernel: {missing}'"
    )
    build = [
        "bash", "-c",
        f"{python} setup.py build_ext --inplace && {python} -c \"{verify}\"",
    ]
    return [
        ("build", build, {"FUSED_OPTIM_CUDA": "1", "MAX_JOBS": str(os.cpu_count() or 1)}),
        ("tests", [python, "-m", "pytest", "tests", "-q", "-k", "cuda", "-p", "no:cacheprovider", "-rfE"], {}),
        ("memcheck", [san, "--tool", "memcheck", "--error-exitcode", "1", python, CASES, "--device", "cuda"], {}),
        ("racecheck", [san, "--tool", "racecheck", "--error-exitcode", "1", python, CASES, "--device", "cuda", "--small"], {}),
        ("bench", [python, "-m", "fused_optim.benchmark", "--device", "cuda", "--quick"], {}),
    ]


def gpu_facts(python: str) -> dict:
    code = (
        "import json, torch; ok = torch.cuda.is_available(); "
        "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name() if ok else None, "
        "'capability': '.'.join(map(str, torch.cuda.get_device_capability())) if ok else None}))"
    )
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=ROOT)
    facts = json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr[-2000:]}
    facts["host"] = platform.node()
    facts["cores"] = os.cpu_count()
    return facts


def write_summary(out: str, facts: dict, results: list[dict]) -> None:
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump({"machine": facts, "phases": results}, f, indent=2)
    lines = [
        "# fused_optim GPU check",
        "",
        f"GPU: {facts.get('gpu')} (sm_{str(facts.get('capability')).replace('.', '')}), torch {facts.get('torch')}, "
        f"CUDA {facts.get('cuda')}, {facts.get('cores')} cores",
        "",
        "| phase | result | seconds | budget |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['phase']} | {r['result']} | {r['seconds']:.0f} | {r['budget']} |" for r in results]
    for r in results:
        if r["result"] != "pass":
            lines += ["", f"## {r['phase']}: {r['result']}", "", "```", r["tail"], "```"]
    bench = next((r for r in results if r["phase"] == "bench" and r["result"] == "pass"), None)
    if bench:
        lines += ["", "## Benchmark (--quick)", "", bench["tail"]]
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def dry_run(python: str) -> int:
    missing = [p for p in PATHS if not os.path.exists(os.path.join(ROOT, p))]
    print("gpu_check plan (dry run):")
    for name, cmd, env in phases(python):
        extra = " ".join(f"{k}={v}" for k, v in env.items())
        print(f"  {name:9s} budget {PHASE_BUDGET[name]:3d} s: {extra + ' ' if extra else ''}{' '.join(cmd)}")
    print(f"  nvcc: {shutil.which('nvcc') or os.path.join(os.environ.get('CUDA_HOME', '/usr/local/cuda'), 'bin', 'nvcc')}"
          f" ({'found' if shutil.which('nvcc') or os.path.exists('/usr/local/cuda/bin/nvcc') else 'not found here'})")
    print(f"  compute-sanitizer: {sanitizer() or 'not found here'}")
    if missing:
        print(f"gpu_check: missing paths: {missing}", file=sys.stderr)
        return 1
    print(f"gpu_check: every path exists ({', '.join(PATHS)})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("FUSED_OPTIM_GPU_CHECK_OUT") or os.environ.get("OUT") or "gpu_check_out")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    python = sys.executable
    if args.dry_run:
        return dry_run(python)
    os.makedirs(args.out, exist_ok=True)
    start = time.monotonic()
    facts = gpu_facts(python)
    capability = facts.get("capability")
    if capability:
        os.environ["TORCH_CUDA_ARCH_LIST"] = capability  # the local GPU's arch only: a shorter build
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}
    results: list[dict] = []
    for name, cmd, extra in phases(python):
        left = args.budget - (time.monotonic() - start)
        budget = PHASE_BUDGET[name]
        if left < 10:
            results.append({"phase": name, "result": "skipped", "seconds": 0.0, "budget": budget,
                            "tail": f"skipped: {left:.0f} s of the {args.budget:.0f} s budget left"})
            print(f"gpu_check: {name} skipped (total budget spent)", flush=True)
            write_summary(args.out, facts, results)
            continue
        log_path = os.path.join(args.out, f"{name}.log")
        t0 = time.monotonic()
        with open(log_path, "w") as log:
            try:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**env, **extra},
                                    timeout=min(budget, left)).returncode
                result = "pass" if rc == 0 else f"fail (exit {rc})"
            except subprocess.TimeoutExpired:
                result = f"fail (over its {min(budget, left):.0f} s)"
            except FileNotFoundError as e:
                result = f"fail ({e})"
        with open(log_path) as log:
            text = log.read()
        tail = text[-6000:] if result != "pass" or name != "bench" else text[text.find("|"):] if "|" in text else text
        results.append({"phase": name, "result": result, "seconds": time.monotonic() - t0, "budget": budget, "tail": tail})
        print(f"gpu_check: {name} {result} in {time.monotonic() - t0:.0f} s", flush=True)
        write_summary(args.out, facts, results)
        if name == "build" and result != "pass":  # nothing after it can run without the build
            for later, _, _ in phases(python)[1:]:
                results.append({"phase": later, "result": "skipped", "seconds": 0.0, "budget": PHASE_BUDGET[later],
                                "tail": "skipped: the build failed"})
            write_summary(args.out, facts, results)
            break
    failed = [r["phase"] for r in results if r["result"] != "pass"]
    print(f"gpu_check: {'all phases passed' if not failed else 'not passed: ' + ', '.join(failed)}; summary in {args.out}/gpu_check.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
