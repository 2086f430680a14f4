"""python -m fused_optim.benchmark: every fused op against PyTorch's ways of doing the same work,
timed side by side in one run, with the machine's memory speed measured in the same run.

Columns: op, case, reference, reference ms, fused ms, speedup (reference / fused), GB/s the fused
op moves, and that rate as a fraction of the memory-speed yardstick named for the row (the rate of
``flat.sum()`` for reductions, ``flat.mul_(1.0)`` for in-place updates, over one flat tensor of the
same bytes; ``copy_`` between two flat tensors on CUDA).

Timing: each callable is warmed up, then the callables of one row group run in turn, round after
round, each round timing a block of back-to-back calls of each; the median over rounds is reported.
Back-to-back calls measure warm caches: called once between unrelated work (cold caches), an op over
thousands of small tensors pays extra cache misses on their metadata.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import fused_optim


# ---------------------------------------------------------------- standard cases


def transformer_shapes(layers: int = 12, d: int = 768) -> list[tuple[int, ...]]:
    """Parameter shapes of a `layers`-layer, width-`d` transformer encoder (12 tensors a layer)."""
    per_layer = [
        (3 * d, d), (3 * d,), (d, d), (d,),  # attention in/out projections
        (d,), (d,),  # layer norm 1
        (4 * d, d), (4 * d,), (d, 4 * d), (d,),  # MLP
        (d,), (d,),  # layer norm 2
    ]
    return per_layer * layers


CASES = {
    "a": ("transformer 144 tensors / 85M", transformer_shapes),
    "b": ("2000 x 1000", lambda: [(1000,)] * 2000),
    "c": ("one 1 GiB tensor", lambda: [(2**28,)]),
}
# The 1 GiB case is run by default on GPUs only (a CPU run of it takes minutes for little news).
DEFAULT_CASES = {"cpu": "a,b", "cuda": "a,b,c"}


def make_case(case: str, dtype=torch.float32, device="cpu", seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype, device=device) for s in CASES[case][1]()]


def nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------- timing


def _sync(device: str) -> None:
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
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        calls[name] = max(1, int(block_ms / max((time.perf_counter() - start) * 1e3, 1e-3)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            _sync(device)
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


# ---------------------------------------------------------------- ops

L1, L2 = 1e-5, 1e-4


def seed_penalty(params, l1=L1, l2=L2):
    """The seed's L1L2Regularizer loop."""
    reg_loss = 0
    for p in params:
        reg_loss += l1 * torch.sum(torch.abs(p))
        reg_loss += l2 * torch.sum(p**2)
    return reg_loss


def foreach_penalty(params, l1=L1, l2=L2):
    """torch's multi-tensor norms: two passes (p=1 and p=2) over all tensors."""
    n1 = torch.stack(torch._foreach_norm(params, 1)).sum()
    n2 = torch.stack(torch._foreach_norm(params, 2))
    return l1 * n1 + l2 * n2.square().sum()


def seed_grad_(params, l1=L1, l2=L2):
    for p in params:
        p.grad.add_(l1 * torch.sign(p) + 2 * l2 * p)


def foreach_grad_(params, l1=L1, l2=L2):
    grads = [p.grad for p in params]
    signs = torch._foreach_sign(params)
    torch._foreach_add_(grads, signs, alpha=l1)
    torch._foreach_add_(grads, params, alpha=2 * l2)


def regularization_rows(bench: Bench, case: str) -> list[Row]:
    params = make_case(case, device=bench.device)
    size = nbytes(params)
    rows = bench.rows(
        "l1l2_penalty", case,
        fused=lambda: fused_optim.l1l2_penalty(params, L1, L2),
        references={"seed loop": lambda: seed_penalty(params), "_foreach_norm p=1,2": lambda: foreach_penalty(params)},
        bytes_moved=size, yardstick="sum", yardstick_bytes=size,
    )
    for p in params:
        p.requires_grad_()
        p.grad = torch.zeros_like(p)
    with torch.no_grad():
        rows += bench.rows(
            "l1l2_grad_", case,
            fused=lambda: fused_optim.l1l2_grad_(params, L1, L2),
            references={"seed loop": lambda: seed_grad_(params), "torch._foreach_*": lambda: foreach_grad_(params)},
            bytes_moved=3 * size, yardstick="mul_", yardstick_bytes=size,  # read p, read + write grad
        )

    def fused_fwd_bwd():
        fused_optim.l1l2_penalty(params, L1, L2).backward()

    def seed_fwd_bwd():
        seed_penalty(params).backward()

    rows += bench.rows("l1l2_penalty fwd+bwd", case, fused=fused_fwd_bwd, references={"seed loop (autograd)": seed_fwd_bwd})
    return rows


def params_with_grads(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Parameters and their gradients, each a copy of `grads` (initialized values: uninitialized
    weights hold NaNs and denormals that would time the penalty's slow paths)."""
    params = []
    for g in grads:
        p = g.clone().requires_grad_()
        p.grad = g.clone()
        params.append(p)
    return params


def clip_by_norm_each_call(clip: Callable, params: list[torch.Tensor], max_norm: float) -> Callable[[], object]:
    """A callable that clips `params` by norm on every call: max_norm shrinks by 2^-16 a call, so the
    norm left by the last call is always just above it (a fixed max_norm would stop clipping after
    the first call), while gradients stay far from denormal numbers."""
    state = [max_norm]

    def call():
        state[0] *= 1 - 2**-16
        return clip(params, state[0])

    return call


def clip_rows(bench: Bench, case: str) -> list[Row]:
    grads = make_case(case, device=bench.device)
    size = nbytes(grads)
    norm = torch.nn.utils.get_total_norm(grads).item()
    torch_clip = {
        "torch foreach=True": lambda ps, m: torch.nn.utils.clip_grad_norm_(ps, m, foreach=True),
        "torch foreach=False": lambda ps, m: torch.nn.utils.clip_grad_norm_(ps, m, foreach=False),
    }
    copies = {name: params_with_grads(grads) for name in ["fused", *torch_clip]}
    del grads
    rows = bench.rows(
        "clip_grad_norm_ clipping", case,
        fused=clip_by_norm_each_call(fused_optim.clip_grad_norm_, copies["fused"], norm / 2),
        references={name: clip_by_norm_each_call(fn, copies[name], norm / 2) for name, fn in torch_clip.items()},
        bytes_moved=3 * size, yardstick="mul_", yardstick_bytes=size,  # read; read + write
    )
    no_clip = 1e6 * norm
    rows += bench.rows(
        "clip_grad_norm_ no clip", case,
        fused=lambda: fused_optim.clip_grad_norm_(copies["fused"], no_clip),
        references={name: (lambda fn=fn, ps=copies[name]: fn(ps, no_clip)) for name, fn in torch_clip.items()},
        bytes_moved=size, yardstick="sum", yardstick_bytes=size,  # read only: nothing to write
    )
    torch_value = {
        "torch foreach=True": lambda ps: torch.nn.utils.clip_grad_value_(ps, 0.5, foreach=True),
        "torch foreach=False": lambda ps: torch.nn.utils.clip_grad_value_(ps, 0.5, foreach=False),
    }
    rows += bench.rows(
        "clip_grad_value_", case,
        fused=lambda: fused_optim.clip_grad_value_(copies["fused"], 0.5),
        references={name: (lambda fn=fn, ps=copies[name]: fn(ps)) for name, fn in torch_value.items()},
        bytes_moved=2 * size, yardstick="mul_", yardstick_bytes=size,
    )
    return rows


def seed_average(lists: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """The seed's average_model_weights arithmetic: clone the first, add the others, divide."""
    out = []
    for i in range(len(lists[0])):
        acc = lists[0][i].clone()
        for tl in lists[1:]:
            acc += tl[i]
        out.append(acc / len(lists))
    return out


def foreach_average(lists: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    out = torch._foreach_mul(lists[0], 1.0 / len(lists))
    for tl in lists[1:]:
        torch._foreach_add_(out, tl, alpha=1.0 / len(lists))
    return out


def stack_average(lists: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """What merge tools do: stack the K copies of each tensor, then mean."""
    return [torch.stack([tl[i] for tl in lists]).mean(0) for i in range(len(lists[0]))]


def averaging_rows(bench: Bench, case: str) -> list[Row]:
    k = 5
    lists = [make_case(case, device=bench.device, seed=m) for m in range(k)]
    size = nbytes(lists[0])
    rows = bench.rows(
        f"average K={k}", case,
        fused=lambda: fused_optim.average_tensors(lists),
        references={
            "seed loop": lambda: seed_average(lists),
            "torch._foreach_add_": lambda: foreach_average(lists),
            "torch.stack().mean(0)": lambda: stack_average(lists),
        },
        bytes_moved=(k + 1) * size, yardstick="mul_", yardstick_bytes=size,  # K reads, one write
    )
    ema, theirs, current = make_case(case, device=bench.device, seed=k), make_case(case, device=bench.device, seed=k), lists[0]
    rows += bench.rows(
        "ema_update_", case,
        fused=lambda: fused_optim.ema_update_(ema, current, 0.999),
        references={"torch._foreach_lerp_": lambda: torch._foreach_lerp_(theirs, current, 0.001)},
        bytes_moved=3 * size, yardstick="mul_", yardstick_bytes=size,  # read both, write one
    )
    return rows


def ensemble_rows(bench: Bench, case: str) -> list[Row]:
    """ModelEnsemble.predict of 8 small MLPs (64 -> 256 -> 10): "auto" (which measures both paths
    on its first call for a shape) and the vmap path, each against the loop; the suite's cases are
    batch sizes, 32 and 256 for (a) and 1024 for (b); none for (c)."""
    if case not in ("a", "b"):
        return []
    torch.manual_seed(0)
    models = [
        torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).to(bench.device)
        for _ in range(8)
    ]
    auto = fused_optim.ModelEnsemble(models)
    loop = fused_optim.ModelEnsemble(models, vectorize=False)
    vmapped = fused_optim.ModelEnsemble(models, vectorize=True)
    rows = []
    for batch in {"a": (32, 256), "b": (1024,)}[case]:
        x = torch.randn(batch, 64, device=bench.device)
        # Each path against the loop in its own interleaving: a run right after a vmap run finds
        # the caches cold (its 8x larger intermediates), which would tax whichever path comes next.
        for name, ensemble in (("auto", auto), ("vmap", vmapped)):
            rows += bench.rows(
                f"ensemble predict 8 MLPs, {name}", f"batch {batch}",
                fused=lambda x=x, ensemble=ensemble: ensemble.predict(x),
                references={"loop over models": lambda x=x: loop.predict(x)},
            )
    return rows


def seed_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """The seed's CustomDropout.forward."""
    mask = torch.bernoulli(torch.ones_like(x) * (1 - p))
    return x * mask / (1 - p)


def saved_bytes(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward when running fn(x)."""
    sizes: list[int] = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(sizes)


def dropout_rows(bench: Bench, case: str) -> list[Row]:
    """Dropout on 16M elements (256M on a GPU); the suite's own cases replace (a) and (b): fp32 for
    (a), bf16 for (b); none for (c)."""
    if case not in ("a", "b"):
        return []
    dtype = {"a": torch.float32, "b": torch.bfloat16}[case]
    millions = 256 if bench.on_gpu else 16
    label = f"{millions}M {'fp32' if dtype == torch.float32 else 'bf16'}"
    p = 0.5
    x = torch.randn(millions * 2**20, device=bench.device).to(dtype)
    size = nbytes([x])
    rows = bench.rows(
        "dropout fwd", label,
        fused=lambda: fused_optim.dropout(x, p),
        references={"F.dropout": lambda: torch.nn.functional.dropout(x, p), "seed CustomDropout": lambda: seed_dropout(x, p)},
        bytes_moved=2 * size, yardstick="mul_", yardstick_bytes=size,
    )
    y, z = x.clone(), x.clone()
    rows += bench.rows(
        "dropout fwd inplace", label,
        fused=lambda: fused_optim.dropout(y, p, inplace=True),
        references={"F.dropout inplace": lambda: torch.nn.functional.dropout(z, p, inplace=True)},
        bytes_moved=2 * size, yardstick="mul_", yardstick_bytes=size,
    )
    leaf = x.clone().requires_grad_()
    grad = torch.ones_like(x)

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(leaf, p), leaf, grad)

    rows += bench.rows(
        "dropout fwd+bwd", label,
        fused=fwd_bwd(fused_optim.dropout),
        references={"F.dropout": fwd_bwd(torch.nn.functional.dropout), "seed CustomDropout": fwd_bwd(seed_dropout)},
        bytes_moved=4 * size,  # forward read + write, backward read + write
    )
    saved = {
        name: saved_bytes(lambda t, fn=fn: fn(t, p), leaf)
        for name, fn in [("fused", fused_optim.dropout), ("F.dropout", torch.nn.functional.dropout), ("seed", seed_dropout)]
    }
    bench.notes.append(
        f"dropout {label}: bytes saved for backward: " + ", ".join(f"{k} {v:,}" for k, v in saved.items())
    )
    return rows


def timm_drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """timm's drop_path formula: a per-sample bernoulli tensor in x's dtype, scaled, multiplied."""
    keep = 1 - drop_prob
    return x * x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)


# The two activations: a ViT-B token tensor and a ResNet stage-1 feature map (fp32).
STRUCTURED_CASES = {"a": (64, 197, 768), "b": (32, 256, 56, 56)}


def structured_dropout_rows(bench: Bench, case: str) -> list[Row]:
    """DropPath, channel dropout and the fused residual form on case (a) (64, 197, 768) or (b)
    (32, 256, 56, 56), against timm's / torch's forms and the memory-speed yardsticks of the same
    traffic: x * 2 (out of place), x.mul_(2) (in place), x + y (the residual)."""
    if case not in STRUCTURED_CASES:
        return []
    shape = STRUCTURED_CASES[case]
    label = "x".join(map(str, shape))
    p = 0.1
    g = torch.Generator(device=bench.device).manual_seed(0)
    x, branch = (torch.randn(shape, generator=g, device=bench.device) for _ in range(2))
    channel = fused_optim.dropout1d if len(shape) == 3 else fused_optim.dropout2d
    torch_channel = torch.nn.functional.dropout1d if len(shape) == 3 else torch.nn.functional.dropout2d
    rows = bench.rows(
        "drop_path fwd", label,
        fused=lambda: fused_optim.drop_path(x, p, True),
        references={"timm drop_path": lambda: timm_drop_path(x, p), "yardstick x * 2": lambda: x * 2},
    )
    rows += bench.rows(
        f"{channel.__name__} fwd", label,
        fused=lambda: channel(x, p),
        references={f"F.{channel.__name__}": lambda: torch_channel(x, p), "yardstick x * 2": lambda: x * 2},
    )
    y, z, w = x.clone(), x.clone(), x.clone()
    rows += bench.rows(
        f"{channel.__name__} fwd inplace", label,
        fused=lambda: channel(y, p, inplace=True),
        references={f"F.{channel.__name__} inplace": lambda: torch_channel(z, p, inplace=True),
                    "yardstick x.mul_(2)": lambda: w.mul_(2)},
    )
    leaf = x.clone().requires_grad_()
    grad = torch.ones_like(x)

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(leaf), leaf, grad)

    rows += bench.rows(
        "drop_path fwd+bwd", label,
        fused=fwd_bwd(lambda t: fused_optim.drop_path(t, p, True)),
        references={"timm drop_path": fwd_bwd(lambda t: timm_drop_path(t, p)), "yardstick x * 2": fwd_bwd(lambda t: t * 2)},
    )
    rows += bench.rows(
        "drop_path_add (x + drop_path(branch))", label,
        fused=lambda: fused_optim.drop_path_add(x, branch, p, True),
        references={"x + timm drop_path(branch)": lambda: x + timm_drop_path(branch, p), "yardstick x + y": lambda: x + branch},
    )
    saved = {
        name: saved_bytes(fn, leaf)
        for name, fn in [("fused", lambda t: fused_optim.drop_path(t, p, True)), ("timm", lambda t: timm_drop_path(t, p))]
    }
    bench.notes.append(f"drop_path {label}: bytes saved for backward: " + ", ".join(f"{k} {v:,}" for k, v in saved.items()))
    return rows


def _module_with_grads(case: str, device: str, seed: int) -> torch.nn.Module:
    """The case's tensors as the parameters of one module, each with a gradient."""
    module = torch.nn.ParameterList([torch.nn.Parameter(t) for t in make_case(case, device=device, seed=seed)])
    for p, g in zip(module.parameters(), make_case(case, device=device, seed=seed + 1)):
        p.grad = g
    return module


def flat_rows(bench: Bench, case: str) -> list[Row]:
    """The glue on flat buffers (fused_optim.flatten_parameters): the FlatParameters methods, and the
    public functions given a flattened module's parameters(), against torch's best and against the
    same fused functions on the unflattened module; plus the host overhead of a flat call on 2000
    one-element parameters (case (b) only)."""
    if case not in ("a", "b"):
        return []
    flat_model, plain, torch_model = (_module_with_grads(case, bench.device, 0) for _ in range(3))
    flat = fused_optim.flatten_parameters(flat_model)
    size = nbytes(list(plain.parameters()))
    norm = float(fused_optim.get_total_norm([p.grad for p in plain.parameters()]))
    no_clip = 1e6 * norm
    rows = bench.rows(
        "flat clip_grad_norm_ clipping", case,
        fused=clip_by_norm_each_call(lambda _, m: flat.clip_grad_norm_(m), None, norm / 2),
        references={
            "torch foreach=True": clip_by_norm_each_call(
                lambda ps, m: torch.nn.utils.clip_grad_norm_(ps, m, foreach=True), list(torch_model.parameters()), norm / 2),
            "fused per-tensor": clip_by_norm_each_call(fused_optim.clip_grad_norm_, list(plain.parameters()), norm / 2),
        },
        bytes_moved=3 * size, yardstick="mul_", yardstick_bytes=size,
    )
    rows += bench.rows(
        "flat clip_grad_norm_ no clip", case,
        fused=lambda: flat.clip_grad_norm_(no_clip),
        references={
            "torch foreach=True": lambda: torch.nn.utils.clip_grad_norm_(torch_model.parameters(), no_clip, foreach=True),
            "fused per-tensor": lambda: fused_optim.clip_grad_norm_(plain.parameters(), no_clip),
        },
        bytes_moved=size, yardstick="sum", yardstick_bytes=size,
    )
    rows += bench.rows(
        "clip_grad_norm_(model.parameters()) no clip, flattened", case,
        fused=lambda: fused_optim.clip_grad_norm_(flat_model.parameters(), no_clip),
        references={
            "torch foreach=True": lambda: torch.nn.utils.clip_grad_norm_(torch_model.parameters(), no_clip, foreach=True),
            "fused, not flattened": lambda: fused_optim.clip_grad_norm_(plain.parameters(), no_clip),
        },
        bytes_moved=size, yardstick="sum", yardstick_bytes=size,
    )
    with torch.no_grad():
        rows += bench.rows(
            "flat l1l2_penalty", case,
            fused=lambda: flat.l1l2_penalty(L1, L2),
            references={
                "_foreach_norm p=1,2": lambda: foreach_penalty(list(torch_model.parameters())),
                "fused per-tensor": lambda: fused_optim.l1l2_penalty(plain.parameters(), L1, L2),
            },
            bytes_moved=size, yardstick="sum", yardstick_bytes=size,
        )
        rows += bench.rows(
            "flat l1l2_grad_", case,
            fused=lambda: flat.l1l2_grad_(L1, L2),
            references={
                "torch._foreach_*": lambda: foreach_grad_(list(torch_model.parameters())),
                "fused per-tensor": lambda: fused_optim.l1l2_grad_(plain.parameters(), L1, L2),
            },
            bytes_moved=3 * size, yardstick="mul_", yardstick_bytes=size,
        )
    ema_flat = fused_optim.ModelEMA(flat_model, decay=0.999, flat=True)
    ema_plain = fused_optim.ModelEMA(plain, decay=0.999)
    shadow = [p.detach().clone() for p in torch_model.parameters()]
    current = [p.detach() for p in torch_model.parameters()]
    rows += bench.rows(
        "ModelEMA.update, flat", case,
        fused=lambda: ema_flat.update(flat_model),
        references={
            "torch._foreach_lerp_": lambda: torch._foreach_lerp_(shadow, current, 0.001),
            "ModelEMA per-tensor": lambda: ema_plain.update(plain),
        },
        bytes_moved=3 * size, yardstick="lerp_", yardstick_bytes=size,
    )
    if case == "b":
        tiny_flat_model, tiny = (torch.nn.ParameterList([torch.nn.Parameter(torch.randn(1, device=bench.device)) for _ in range(2000)]) for _ in range(2))
        for p in [*tiny_flat_model.parameters(), *tiny.parameters()]:
            p.grad = torch.randn_like(p)
        tiny_flat = fused_optim.flatten_parameters(tiny_flat_model)
        rows += bench.rows(
            "host overhead: flat clip_grad_norm_", "2000 x 1",
            fused=lambda: tiny_flat.clip_grad_norm_(1e9),
            references={"fused per-tensor": lambda: fused_optim.clip_grad_norm_(tiny.parameters(), 1e9)},
        )
        rows += bench.rows(
            "host overhead: flat l1l2_grad_", "2000 x 1",
            fused=lambda: tiny_flat.l1l2_grad_(L1, L2),
            references={"fused per-tensor": lambda: fused_optim.l1l2_grad_(tiny.parameters(), L1, L2)},
        )
    return rows


def _torch_glue(params: list[torch.Tensor], max_norm: float) -> None:
    """torch's best way to the pre-step: the penalty's gradient with foreach ops, then
    clip_grad_norm_(foreach=True)."""
    foreach_grad_(params)
    torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)


def _seed_glue(params: list[torch.Tensor], max_norm: float) -> None:
    """The seed's way: the penalty through autograd (its L1L2Regularizer loop, backward), then
    torch's clip_grad_norm_."""
    seed_penalty(params).backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)


def _fused_separate(params: list[torch.Tensor], max_norm: float) -> None:
    fused_optim.l1l2_grad_(params, L1, L2)
    fused_optim.clip_grad_norm_(params, max_norm)


def pre_step_rows(bench: Bench, case: str) -> list[Row]:
    """The fused pre-step (penalty gradient + norm in one pass, then the clip) against the separate
    fused calls, torch's foreach sequence and the seed's autograd penalty; on flat buffers against
    the foreach sequence. Bytes: params and grads read, grads written (3 passes' worth), plus a
    read and a write of the grads when clipping (5); the separate calls move 4 and 6."""
    if case not in ("a", "b"):
        return []
    names = ["fused", "fused separate", "torch", "seed", "flat"]
    models = {name: _module_with_grads(case, bench.device, 0) for name in names}
    flat = fused_optim.flatten_parameters(models["flat"])
    params = {name: list(m.parameters()) for name, m in models.items()}
    size = nbytes(params["fused"])
    norm = float(fused_optim.get_total_norm([p.grad for p in params["fused"]]))
    no_clip = 1e30
    rows = []
    for clipping in (False, True):
        def each(fn, name):
            if clipping:
                return clip_by_norm_each_call(fn, params[name], norm / 2)
            return lambda: fn(params[name], no_clip)

        label = "clipping" if clipping else "no clip"
        references = {
            "fused l1l2_grad_ + clip_grad_norm_": each(_fused_separate, "fused separate"),
            "torch _foreach_* + clip foreach=True": each(_torch_glue, "torch"),
        }
        if case == "a":  # the seed's autograd loop over 2000 tensors takes seconds a round
            references["seed: autograd penalty + clip"] = each(_seed_glue, "seed")
        rows += bench.rows(
            f"pre_step_ {label}", case,
            fused=each(lambda ps, m: fused_optim.pre_step_(ps, L1, L2, max_norm=m), "fused"),
            references=references,
            bytes_moved=(5 if clipping else 3) * size, yardstick="mul_", yardstick_bytes=size,
        )
        rows += bench.rows(
            f"flat pre_step_ {label}", case,
            fused=each(lambda _, m: flat.pre_step_(L1, L2, max_norm=m), "flat"),
            references={"torch _foreach_* + clip foreach=True": references["torch _foreach_* + clip foreach=True"]},
            bytes_moved=(5 if clipping else 3) * size, yardstick="mul_", yardstick_bytes=size,
        )
    return rows


def _transformer_step_setups(device: str):
    """A training step of a small transformer block stack (4 layers, width 256, dropout 0.1; a
    batch of 16 x 64 tokens): forward, loss, backward, the glue (L1+L2 penalty gradient, clip by
    norm, EMA), AdamW. Three ways to write the glue: torch's foreach ops, fused_optim.attach on the
    per-tensor model, attach on a flattened model (EMA flat too). Returns {name: (step, glue)}."""
    torch.manual_seed(0)
    x = torch.randn(16, 64, 256, device=device)

    def build():
        torch.manual_seed(0)
        layer = torch.nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.1, batch_first=True)
        return torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False).to(device).train()

    setups = {}
    plain = build()
    plain_params = list(plain.parameters())
    plain_opt = torch.optim.AdamW(plain_params, lr=1e-4, foreach=True)
    shadow = [p.detach().clone() for p in plain_params]

    def plain_glue():
        with torch.no_grad():
            foreach_grad_(plain_params)
            torch.nn.utils.clip_grad_norm_(plain_params, 1.0, foreach=True)

    def plain_ema():
        with torch.no_grad():
            torch._foreach_lerp_(shadow, [p.detach() for p in plain_params], 1e-3)

    def plain_step():
        plain_opt.zero_grad(set_to_none=False)
        plain(x).square().mean().backward()
        plain_glue()
        plain_opt.step()
        plain_ema()

    setups["plain PyTorch (foreach)"] = (plain_step, lambda: (plain_glue(), plain_ema()))
    for name, flat in (("fused attach, per-tensor", False), ("fused attach, flat", True)):
        model = build()
        if flat:
            fused_optim.flatten_parameters(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        ema = fused_optim.ModelEMA(model, decay=0.999, flat=flat)
        fused_optim.attach(opt, l1=L1, l2=L2, max_norm=1.0, ema=ema, model=model)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=False)
            model(x).square().mean().backward()
            opt.step()

        def glue(model=model, ema=ema, flat=flat):  # what attach's hooks call
            params = model.parameters() if flat else list(model.parameters())
            fused_optim.pre_step_(params, L1, L2, max_norm=1.0)
            ema.update(model)

        setups[name] = (step, glue)
    return setups


def step_rows(bench: Bench, case: str) -> list[Row]:
    """End to end: the transformer step of _transformer_step_setups, plain PyTorch against attach
    per-tensor and flat; the glue's share of each step goes in the notes."""
    if case != "a":
        return []
    setups = _transformer_step_setups(bench.device)
    for step, _ in setups.values():  # gradients and optimizer state exist before the glue is timed
        step()
    steps = bench.time({name: step for name, (step, _) in setups.items()})
    glues = bench.time({name: glue for name, (_, glue) in setups.items()})
    reference = "plain PyTorch (foreach)"
    rows = [Row("transformer training step", "4 x 256, 16 x 64 tokens", reference, steps[reference], steps[name])
            for name in setups if name != reference]
    for row, name in zip(rows, [n for n in setups if n != reference]):
        row.reference = f"{reference} vs {name}"
    bench.notes.append("glue (penalty + clip + EMA) share of the transformer step: " + "; ".join(
        f"{name} {glues[name]:.2f} of {steps[name]:.2f} ms ({100 * glues[name] / steps[name]:.1f}%)" for name in setups))
    return rows


# One entry per area; each returns its rows for one case.
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
}


# ---------------------------------------------------------------- speedup sweeps (--plot)

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


# ---------------------------------------------------------------- report


def format_table(rows: list[Row], markdown: bool = True) -> str:
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


if __name__ == "__main__":
    main()
