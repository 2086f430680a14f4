"""How the benchmark times: ``time_side_by_side`` warms each callable up, then runs the callables of
one row group in turn, round after round, each round timing a block of back-to-back calls of each,
and reports the median over rounds (back-to-back calls measure warm caches: called once between
unrelated work, an op over thousands of small tensors pays extra cache misses on their metadata);
``Bench``, a run's shared state, times a fused op beside its references and a memory-speed
yardstick in the same rounds; ``Row``, one line of the table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_side_by_side(
    fns: dict[str, Callable[[], object]], device: str, rounds: int, block_ms: float = 30.0
) -> dict[str, float]:
    """Median milliseconds per call of each callable.

    Each round runs every callable in turn, each for a block of back-to-back calls lasting about
    `block_ms` (as timeit and torch.utils.benchmark time a statement), so the numbers are warm,
    steady-state costs and slow drifts of a shared machine hit all callables alike."""
    calls = {}
    for name, fn in fns.items():  # a warm-up call (one-time costs), then one that sizes the blocks
        fn()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        calls[name] = max(1, int(block_ms / max((time.perf_counter() - start) * 1e3, 1e-3)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - start) * 1e3 / calls[name])
    return {name: statistics.median(s) for name, s in samples.items()}


@dataclass
class Row:
    op: str
    case: str
    reference: str
    ref_ms: float
    fused_ms: float
    bytes_moved: int | None = None  # by the fused op
    yardstick: str = ""  # memory-speed yardstick of the fraction column
    yardstick_gbps: float | None = None

    @property
    def speedup(self) -> float:
        return self.ref_ms / self.fused_ms

    @property
    def gbps(self) -> float | None:
        return None if self.bytes_moved is None else self.bytes_moved / self.fused_ms / 1e6

    @property
    def mem_fraction(self) -> float | None:
        return None if self.gbps is None or not self.yardstick_gbps else self.gbps / self.yardstick_gbps


class Bench:
    """Shared state of one run: device, rounds, and the flat tensors of the memory-speed yardsticks."""

    def __init__(self, device: str, rounds: int) -> None:
        self.device = device
        self.rounds = rounds
        self.notes: list[str] = []  # facts printed under the table
        self._flat: dict[int, torch.Tensor] = {}

    def time(self, fns: dict[str, Callable[[], object]]) -> dict[str, float]:
        return time_side_by_side(fns, self.device, self.rounds)

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def yardstick(self, kind: str, num_bytes: int) -> tuple[str, Callable[[], object], int]:
        """The memory-speed yardstick over flat fp32 tensors of `num_bytes`: its name, callable and
        the bytes it moves. On CPU, `kind`: 'sum' reads them, 'mul_' reads and writes them, 'lerp_'
        reads them and another, writes them; on a
        GPU always a device-to-device copy (read + write), the bandwidth GPU kernels are held to."""
        if num_bytes not in self._flat:
            self._flat[num_bytes] = torch.randn(num_bytes // 4, device=self.device)
        flat = self._flat[num_bytes]
        if self.on_gpu:
            dst = torch.empty_like(flat)
            return "D2D copy", (lambda: dst.copy_(flat)), 2 * num_bytes
        if kind == "sum":
            return kind, (lambda: flat.sum()), num_bytes
        if kind == "lerp_":
            end = torch.randn_like(flat)
            return kind, (lambda: flat.lerp_(end, 0.001)), 3 * num_bytes
        return kind, (lambda: flat.mul_(1.0)), 2 * num_bytes

    def rows(self, op: str, case: str, fused: Callable, references: dict[str, Callable],
             bytes_moved: int | None = None, yardstick: str = "", yardstick_bytes: int = 0) -> list[Row]:
        """Times `fused` beside each reference (and the yardstick, in the same rounds, so that
        all see the same machine); one row per reference."""
        fns = {"fused": fused, **references}
        if yardstick:
            yardstick, measure, moved = self.yardstick(yardstick, yardstick_bytes)
            fns[yardstick] = measure
        times = self.time(fns)
        rate = moved / times[yardstick] / 1e6 if yardstick else None
        return [
            Row(op, case, name, times[name], times["fused"], bytes_moved, yardstick, rate)
            for name in references
        ]
