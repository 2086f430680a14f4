"""python -m fused_optim.benchmark: every fused op against PyTorch's ways of doing the same work,
timed side by side in one run, with the machine's memory speed measured in the same run.

The command line: its arguments, ``SUITES`` (each name ``--suites`` accepts and the rows function
of its op family) and ``main``, which runs the suites on the cases and prints the header lines, the
table (its columns: ``report.format_table``) and the notes."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

import fused_optim
from fused_optim.benchmark.cases import CASES, DEFAULT_CASES
from fused_optim.benchmark.report import format_table, plot_speedups
from fused_optim.benchmark.rows.averaging import averaging_rows
from fused_optim.benchmark.rows.clients import clients_rows
from fused_optim.benchmark.rows.clip_grad import clip_rows
from fused_optim.benchmark.rows.dropout import dropout_rows
from fused_optim.benchmark.rows.ensemble import ensemble_rows
from fused_optim.benchmark.rows.flat import flat_rows
from fused_optim.benchmark.rows.pre_step import pre_step_rows
from fused_optim.benchmark.rows.regularization import regularization_rows
from fused_optim.benchmark.rows.step import step_rows
from fused_optim.benchmark.rows.structured_dropout import structured_dropout_rows
from fused_optim.benchmark.timing import Bench, Row


# The suite names --suites accepts, in their default order, and the rows function of each; each
# returns its rows for one case.
SUITES: dict[str, Callable[[Bench, str], list[Row]]] = {
    "regularization": regularization_rows,
    "clip": clip_rows,
    "dropout": dropout_rows,
    "averaging": averaging_rows,
    "ensemble": ensemble_rows,
    "flat": flat_rows,
    "pre_step": pre_step_rows,
    "step": step_rows,
    "structured_dropout": structured_dropout_rows,
    "clients": clients_rows,
}


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m fused_optim.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds: a short, noisier run")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per callable (default 15, 3 with --quick)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--cases", default=None, help=f"comma-separated, from {sorted(CASES)} (default: {DEFAULT_CASES})"
    )
    parser.add_argument("--suites", default=",".join(SUITES), help=f"comma-separated, from {sorted(SUITES)}")
    parser.add_argument("--plain", action="store_true", help="aligned text instead of a Markdown table")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the speedup sweeps into FILE.png (needs matplotlib)")
    args = parser.parse_args(argv)

    rounds = args.rounds or (3 if args.quick else 15)
    cases = args.cases or DEFAULT_CASES["cuda" if args.device.startswith("cuda") else "cpu"]
    bench = Bench(args.device, rounds)
    info = fused_optim.backend_info()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"fused_optim benchmark: torch {torch.__version__}, {name}, rounds={rounds}, "
          f"extension {'loaded' if info['extension']['loaded'] else 'NOT loaded: ' + str(info['extension']['error'])}")
    if args.plot:
        plot_speedups(bench, args.plot)
    rows: list[Row] = []
    for suite in args.suites.split(","):
        for case in cases.split(","):
            print(f"  running {suite} on case {case} ...", flush=True)
            rows += SUITES[suite](bench, case)
    print()
    dropout_size = "256M" if bench.on_gpu else "16M"
    print("cases: " + "; ".join(f"({k}) {v[0]}" for k, v in CASES.items()) + f"; dropout: {dropout_size} fp32 / bf16")
    print(format_table(rows, markdown=not args.plain))
    for note in bench.notes:
        print(note)
    return rows
