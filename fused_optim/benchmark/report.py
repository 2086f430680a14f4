"""What a run shows: ``format_table``, the table of rows (Markdown or aligned text), and
``plot_speedups``, the speedup sweeps of ``--plot``: each ``SWEEP_OPS`` op against torch's best as
the number of tensors and the total size grow."""

from __future__ import annotations

from collections.abc import Callable

import torch

import fused_optim
from fused_optim.benchmark.cases import L1, L2, params_with_grads
from fused_optim.benchmark.rows.regularization import foreach_penalty
from fused_optim.benchmark.timing import Bench, Row


# Each op's fused call and torch's best way, on a list of fp32 tensors (they are clones, so the
# in-place ops of the two sides do not interfere).
SWEEP_OPS: dict[str, tuple[Callable, Callable]] = {
    "l1l2_penalty (vs _foreach_norm)": (
        lambda ts, grads: fused_optim.l1l2_penalty(ts, L1, L2),
        lambda ts, grads: foreach_penalty(ts),
    ),
    "clip_grad_norm_, no clip (vs foreach=True)": (
        lambda ts, grads: fused_optim.clip_grad_norm_(grads[0], 1e30),
        lambda ts, grads: torch.nn.utils.clip_grad_norm_(grads[1], 1e30, foreach=True),
    ),
    "clip_grad_norm_, no clip, flat buffer (vs foreach=True)": (
        lambda ts, grads: _flat_of_sweep(grads[0]).clip_grad_norm_(1e30),
        lambda ts, grads: torch.nn.utils.clip_grad_norm_(grads[1], 1e30, foreach=True),
    ),
    "clip_grad_value_ (vs foreach=True)": (
        lambda ts, grads: fused_optim.clip_grad_value_(grads[0], 1e30),
        lambda ts, grads: torch.nn.utils.clip_grad_value_(grads[1], 1e30, foreach=True),
    ),
    "ema_update_ (vs _foreach_lerp_)": (
        lambda ts, grads: fused_optim.ema_update_([g.grad for g in grads[0]], ts, 0.999),
        lambda ts, grads: torch._foreach_lerp_([g.grad for g in grads[1]], ts, 0.001),
    ),
}


_sweep_flats: dict[int, "fused_optim.FlatParameters"] = {}


def _flat_of_sweep(params: list[torch.Tensor]) -> "fused_optim.FlatParameters":
    """A flattened copy of `params` (with their gradients), built once per list."""
    if id(params) not in _sweep_flats:
        copies = params_with_grads([p.grad for p in params])
        _sweep_flats.clear()
        _sweep_flats[id(params)] = fused_optim.flatten_parameters(copies)
    return _sweep_flats[id(params)]


def sweep(bench: Bench, counts: list[int], total: int) -> dict[str, list[float]]:
    """Speedup over torch's best of each SWEEP_OPS op, for `total` fp32 elements cut into each of
    `counts` equal tensors."""
    speedups: dict[str, list[float]] = {name: [] for name in SWEEP_OPS}
    for count in counts:
        ts = [torch.randn(max(1, total // count), device=bench.device) for _ in range(count)]
        grads = (params_with_grads(ts), params_with_grads(ts))
        for name, (fused, reference) in SWEEP_OPS.items():
            times = bench.time({"fused": lambda: fused(ts, grads), "torch": lambda: reference(ts, grads)})
            speedups[name].append(times["torch"] / times["fused"])
    return speedups


def plot_speedups(
    bench: Bench,
    path: str,
    counts: tuple[int, ...] = (10, 100, 1000, 10000),
    totals: tuple[int, ...] = (10**4, 10**5, 10**6, 10**7),
) -> None:
    """Draws, for each op, the speedup over torch's best as the number of tensors grows (8M
    elements in all) and as the total size grows (in 100 tensors), into `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_count = sweep(bench, list(counts), 8 * 2**20)
    by_size = {name: [] for name in SWEEP_OPS}
    for total in totals:
        for name, values in sweep(bench, [100], total).items():
            by_size[name] += values
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in SWEEP_OPS:
        axes[0].plot(list(counts), by_count[name], marker="o", label=name)
        axes[1].plot(list(totals), by_size[name], marker="o", label=name)
    for ax, xlabel, title in (
        (axes[0], "number of tensors (8M fp32 elements in all)", "speedup vs number of tensors"),
        (axes[1], "total fp32 elements (in 100 tensors)", "speedup vs total size"),
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("speedup over torch's best (x)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"fused_optim vs torch, {bench.device}, torch {torch.__version__}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"speedup plot written to {path}")


def format_table(rows: list[Row], markdown: bool = True) -> str:
    """The rows as a Markdown table (else aligned text). Columns: op, case, reference, reference ms,
    fused ms, speedup (reference / fused), GB/s the fused op moves, and that rate as a fraction of
    the memory-speed yardstick named for the row (the rate of ``flat.sum()`` for reductions,
    ``flat.mul_(1.0)`` for in-place updates, over one flat tensor of the same bytes; ``copy_``
    between two flat tensors on CUDA)."""
    header = ["op", "case", "reference", "ref ms", "fused ms", "speedup", "fused GB/s", "of memory speed"]

    def fmt(r: Row) -> list[str]:
        frac = "-" if r.mem_fraction is None else f"{100 * r.mem_fraction:.0f}% of {r.yardstick}"
        gbps = "-" if r.gbps is None else f"{r.gbps:.1f}"
        return [r.op, r.case, r.reference, f"{r.ref_ms:.3f}", f"{r.fused_ms:.3f}", f"{r.speedup:.2f}x", gbps, frac]

    body = [fmt(r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(c) for c in col) for col in zip(header, *body)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in [header, *body])
