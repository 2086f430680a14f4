"""Batched weight averaging: uniform/weighted averages of several models in one pass, and the
in-place EMA and SWA updates, multi-tensor."""

from __future__ import annotations

import contextlib
import copy
import math
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import _distributed, _route, checks
from ._route import ONE_VIEW, SHARDED
from ._utils import as_float, as_int, as_tensor_list
from .flat import FlatParameters, flatten_parameters


def _normalized(weights: Sequence[float] | None, k: int) -> list[float]:
    """Weights divided by their sum (1/k each when None): the result is a weighted average."""
    if weights is None:
        return [1.0 / k] * k
    weights = [as_float(w, f"weights[{i}]") for i, w in enumerate(weights)]
    if len(weights) != k:
        raise ValueError(f"weights must hold one weight per model ({k}), got {len(weights)}")
    if any(not math.isfinite(w) or w < 0 for w in weights) or max(weights, default=0.0) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {weights}")
    # Scaled by the largest first, so that huge finite weights do not overflow their sum.
    largest = max(weights)
    scaled = [w / largest for w in weights]
    total = sum(scaled)
    return [w / total for w in scaled]


@torch.no_grad()
def average_tensors(
    tensor_lists: Sequence[Sequence[Tensor]],
    weights: Sequence[float] | None = None,
    out: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """``out[i] = sum_m w[m] * tensor_lists[m][i]`` with the weights normalized to sum to 1 (a
    uniform average when ``weights`` is None), reading each input once and writing each output
    once. fp16/bf16 are averaged in fp32. ``out`` (default: new tensors like the first list) may
    be one of the input lists, e.g. to average into the first model. Returns ``out``.

    Raises ValueError for lists of different lengths or bad weights, RuntimeError for tensors
    that differ in shape, dtype or device at the same position, TypeError for non-floating
    tensors or other objects, naming ``tensor_lists[m][i]`` or ``out[i]``; nothing is written then.

    DTensors (e.g. FSDP2-sharded weights) are averaged shard by shard on each rank, with no
    communication; new outputs are DTensors laid out as the first list's."""
    lists = [list(tl) for tl in tensor_lists]
    if not lists:
        raise ValueError("tensor_lists must hold at least one list")
    n = len(lists[0])
    for m, tl in enumerate(lists):
        if len(tl) != n:
            raise ValueError(f"tensor_lists[{m}] holds {len(tl)} tensors, tensor_lists[0] holds {n}")
    w = _normalized(weights, len(lists))
    out = None if out is None else list(out)
    try:
        return _weighted_sum(lists, w, out)
    except (TypeError, ValueError, RuntimeError):
        named = [(f"tensor_lists[{m}]", tl) for m, tl in enumerate(lists)]
        if out is None:
            _name_the_refusal(named[0], named[1:], written=False)
        else:
            _name_the_refusal(("out", out), named, written=True)
        raise


def _weighted_sum(lists: list[list[Tensor]], w: list[float], out: list[Tensor] | None) -> list[Tensor]:
    """average_tensors' op call (into `out`, or new tensors when None), on DTensors shard by shard."""
    inputs = [t for tl in lists for t in tl]
    lists_of_call = (inputs,) if out is None else (inputs, out)
    route = _route.choose("average_tensors", lists_of_call, (False,) * len(lists_of_call), one_view_ok=False)
    if route.kind == SHARDED and out is None:
        local = [t for tl in _distributed.local_lists(*lists) for t in tl]
        new = torch.ops.fused_optim.multi_tensor_weighted_sum.default(local, w)
        return [_distributed.like(o, t) for o, t in zip(new, lists[0])]
    if route.kind == SHARDED:
        *local, local_out = _distributed.local_lists(*lists, out)
        torch.ops.fused_optim.multi_tensor_weighted_sum_.default([t for tl in local for t in tl], w, local_out)
        return out
    if out is None:
        return torch.ops.fused_optim.multi_tensor_weighted_sum.default(inputs, w)
    torch.ops.fused_optim.multi_tensor_weighted_sum_.default(inputs, w, out)
    return out


def average_state_dicts(
    state_dicts: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None
) -> dict[str, Tensor]:
    """The weighted average of several state dicts, as new tensors, in one fused pass.

    Floating tensors are averaged (fp32 math for half types). Integer and bool entries (e.g.
    BatchNorm's ``num_batches_tracked``) are copied from the first state dict. Entries that are
    one tensor in the first state dict (tied weights) are averaged once and share the result.
    Keys may come in any order (the first state dict's order is kept). Mismatched keys, shapes or
    dtypes raise ValueError naming the first offending key, and a value that is not a tensor
    TypeError naming it, before anything is computed."""
    if not state_dicts:
        raise ValueError("state_dicts must hold at least one state dict")
    first = state_dicts[0]
    for m, sd in enumerate(state_dicts):
        for key, t in sd.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"state_dicts[{m}][{key!r}] is a {type(t).__name__}, not a tensor: only tensors are averaged")
    for m, sd in enumerate(state_dicts[1:], start=1):
        if sd.keys() != first.keys():  # the same keys in another order are the same state dict
            missing = [k for k in first if k not in sd]
            if missing:
                raise ValueError(f"state_dicts[{m}] lacks the key {missing[0]!r} of state_dicts[0]")
            extra = next(k for k in sd if k not in first)
            raise ValueError(f"state_dicts[{m}] has the key {extra!r}, which state_dicts[0] lacks")
        for key, t in first.items():
            other = sd[key]
            if other.shape != t.shape or other.dtype != t.dtype:
                raise ValueError(
                    f"state_dicts[{m}][{key!r}] is {other.dtype}{list(other.shape)}, "
                    f"state_dicts[0][{key!r}] is {t.dtype}{list(t.shape)}"
                )
    def alias_key(t: Tensor) -> tuple:  # state_dict() detaches each entry: compare memory, not objects
        return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())

    owner: dict[tuple, str] = {}  # first key of each distinct tensor of state_dicts[0]
    for key, t in first.items():
        owner.setdefault(alias_key(t), key)
    distinct = [key for key in first if owner[alias_key(first[key])] == key]
    averaged_keys = [key for key in distinct if first[key].is_floating_point()]
    result = {key: first[key].clone() for key in distinct if not first[key].is_floating_point()}
    outs = average_tensors([[sd[k] for k in averaged_keys] for sd in state_dicts], weights)
    result.update(zip(averaged_keys, outs))
    return {key: result[owner[alias_key(t)]] for key, t in first.items()}


def average_model_weights(models: Sequence[nn.Module], weights: Sequence[float] | None = None) -> nn.Module:
    """The seed's function: a deep copy of ``models[0]`` holding the (weighted) average of all
    models' state dicts (see :func:`average_state_dicts` for integer buffers and tied weights)."""
    if not models:
        raise ValueError("models must hold at least one model")
    averaged = average_state_dicts([m.state_dict() for m in models], weights)
    avg_model = copy.deepcopy(models[0])
    avg_model.load_state_dict(averaged)
    return avg_model


def _name_the_refusal(first: tuple[str, list], others: list[tuple[str, list]], written: bool) -> None:
    """Called once an averaging op refused its lists (writing nothing), in a message naming its own
    arguments (``self``, ``end``, ``out``, ``inputs``): runs the op's list checks again under the
    caller's names (`first`: the list the others are paired with, written when `written`), so that
    the first failing check raises naming them. Returns when none fails (the caller then raises the
    op's own error). Run only after a refusal: a call that succeeds pays nothing."""
    for name, tensors in (first, *others):
        as_tensor_list(tensors, name)
    if any(_distributed.any_dtensor(tensors) for _, tensors in (first, *others)):
        return  # the sharded path's own message (these checks read plain tensors' storage)
    checks.check_floating_list(first[1], first[0])
    for name, tensors in others:
        checks.check_paired_lists(first[1], tensors, (first[0], name))
    if written:
        checks.check_writable(first[1], first[0])
        for name, tensors in others:
            checks.check_same_or_disjoint(first[1], first[0], tensors, name)


def _host_value(t: Tensor) -> float | None:
    """The value of a one-element tensor where reading it costs no device sync (on the CPU, outside
    torch.compile), else None."""
    return None if t.device.type != "cpu" or torch.compiler.is_compiling() else t.item()


def _lerp_(function: str, averaged: Sequence[Tensor], current: Sequence[Tensor], weight: Tensor | float) -> None:
    averaged, current = list(averaged), list(current)
    if not isinstance(weight, Tensor):
        # A number is a constant: made where the tensors are (a fill, which a CUDA graph replays as
        # captured), since the CUDA op refuses a CPU weight under graph capture (a tensor the caller
        # may change between replays).
        device = averaged[0].device if averaged and isinstance(averaged[0], Tensor) else "cpu"
        weight = torch.full((), weight, dtype=torch.float64, device=device)
    lerp = torch.ops.fused_optim.multi_tensor_lerp_.default
    try:
        route = _route.choose(function, (averaged, current), (True, False))
        if route.kind == ONE_VIEW:
            lerp([route.views[0]], [route.views[1]], weight)
            _route.bump_versions(averaged)
        elif route.kind == SHARDED:  # sharded weights: shard-local, no communication.
            lerp(*_distributed.local_lists(averaged, current), weight)
        else:
            lerp(averaged, current, weight)
    except (TypeError, ValueError, RuntimeError):
        _name_the_refusal(("averaged", averaged), [("current", current)], written=True)
        raise


@torch.no_grad()
def ema_update_(averaged: Sequence[Tensor], current: Sequence[Tensor], decay: float | Tensor) -> None:
    """``averaged[i] = decay * averaged[i] + (1 - decay) * current[i]`` in place, one pass over all
    tensors, with torch.lerp's arithmetic (as ``torch.optim.swa_utils.get_ema_multi_avg_fn``).

    ``decay``: a float in [0, 1] (ValueError otherwise), or a one-element tensor: on the CPU,
    checked as a float (outside torch.compile); on the tensors' device, used as it is (never read
    on the host: no sync, no range check), e.g. a warm-up decay computed on the GPU.

    Errors name ``averaged``, ``current`` and ``decay``; nothing is written then."""
    if isinstance(decay, Tensor):
        if decay.numel() != 1:
            raise ValueError(f"decay must be a number or a one-element tensor, got shape {list(decay.shape)}")
        value, decay = _host_value(decay), decay.to(torch.float64)  # the weight computed in fp64
    else:
        value = decay = as_float(decay, "decay")
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {value}")
    _lerp_("ema_update_", averaged, current, 1.0 - decay)


@torch.no_grad()
def swa_update_(averaged: Sequence[Tensor], current: Sequence[Tensor], num_averaged: int | Tensor) -> None:
    """``averaged[i] += (current[i] - averaged[i]) / (num_averaged + 1)`` in place, one pass (the
    running mean of ``torch.optim.swa_utils.get_swa_multi_avg_fn``). ``num_averaged``: an int >= 0
    (ValueError otherwise), or a one-element tensor (``AveragedModel.n_averaged``): on the CPU,
    checked as a number (outside torch.compile); on the tensors' device, used as it is, never read
    on the host (no sync, no range check).

    Errors name ``averaged``, ``current`` and ``num_averaged``; nothing is written then."""
    if isinstance(num_averaged, Tensor):
        if num_averaged.numel() != 1:
            raise ValueError(f"num_averaged must be an int or a one-element tensor, got shape {list(num_averaged.shape)}")
        n, num_averaged = _host_value(num_averaged), num_averaged.to(torch.float64)
    else:
        n = num_averaged = as_float(num_averaged, "num_averaged")
    if n is not None and not (math.isfinite(n) and n >= 0):
        raise ValueError(f"num_averaged must be >= 0, got {n}")
    _lerp_("swa_update_", averaged, current, 1.0 / (num_averaged + 1.0))


def get_ema_multi_avg_fn(decay: float = 0.999) -> Callable[[list[Tensor], list[Tensor], Tensor | int], None]:
    """A ``multi_avg_fn`` for ``torch.optim.swa_utils.AveragedModel`` running :func:`ema_update_`
    on floating tensors. Others (``num_batches_tracked`` under ``use_buffers=True``) get torch's
    own formula, ``decay * averaged + (1 - decay) * current`` truncated to their dtype, as
    ``torch.optim.swa_utils.get_ema_multi_avg_fn`` gives them."""
    decay = as_float(decay, "decay")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")

    @torch.no_grad()
    def ema_update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor | int) -> None:
        averaged, current = list(averaged), list(current)
        if len(averaged) != len(current):
            raise ValueError(f"averaged and current must have the same length, got {len(averaged)} and {len(current)}")
        floating = [i for i, t in enumerate(averaged) if t.is_floating_point()]
        if len(floating) == len(averaged):
            ema_update_(averaged, current, decay)
            return
        ema_update_([averaged[i] for i in floating], [current[i] for i in floating], decay)
        for a, c in zip(averaged, current):
            if not a.is_floating_point():
                a.copy_(a * decay + c * (1 - decay))

    return ema_update


def get_swa_multi_avg_fn() -> Callable[[list[Tensor], list[Tensor], Tensor | int], None]:
    """A ``multi_avg_fn`` for ``torch.optim.swa_utils.AveragedModel`` running :func:`swa_update_`."""
    return swa_update_


class ModelEMA(nn.Module):
    """Exponential moving average of a model's weights, in the spirit of timm's ModelEmaV3.

    ``ema = ModelEMA(model, decay=0.9999, warmup=True)``; after each optimizer step,
    ``ema.update(model)``; evaluate with ``ema(x)`` or ``ema.module``. One fused multi-tensor lerp
    per update (:func:`ema_update_`).

    - ``warmup=True``: the decay used at update ``step`` is
      ``min(decay, max(min_decay, 1 - (1 + step / warmup_gamma) ** -warmup_power))``, so early
      averages follow the model closely (timm's formula).
    - ``buffers="copy"`` (default) copies the model's buffers (BatchNorm statistics) each update;
      ``"average"`` averages floating buffers with the same decay and copies the others.
    - ``fp32_shadow`` (default: True when the model has fp16/bf16 parameters) keeps fp32 copies of
      half-precision weights and averages those, writing the rounded result into ``module``: in
      bf16, ``decay=0.9999`` changes a weight by 1e-4 of its distance to the model's, below bf16's
      resolution, so a bf16 EMA would stall. The shadow costs 4 bytes per such weight, and each
      update converts the model's half weights to fp32 first.
    - ``state_dict()``/``load_state_dict()`` hold the averaged weights, the shadow and the step.
    - ``flat=True`` keeps the averaged weights in one buffer per dtype (``ema.module``'s parameters
      are views of it; the fp32 shadow is one ``flat_shadow_<group>`` buffer per half dtype, so the
      state dict's shadow keys differ from the per-tensor mode's ``shadow_<i>``). Updating from a
      model flattened by :func:`fused_optim.flatten_parameters` (same layout, views intact) is
      then one lerp call; from any other model, the per-tensor update, with the same result.

    ``style="timm"`` takes timm's ``ModelEmaV3`` keyword arguments (``decay``, ``min_decay``,
    ``update_after_step``, ``use_warmup``, ``warmup_gamma``, ``warmup_power``, ``exclude_buffers``)
    and ``update(model, step=...)``, and gives the same weights for the same updates: the decay of
    ``step`` is 0 until ``step - update_after_step - 1 > 0``, then ``decay`` or, with
    ``use_warmup``, ``max(min(1 - (1 + s / warmup_gamma) ** -warmup_power, decay), min_decay)`` for
    ``s = step - update_after_step - 1``; without ``step``, ``decay``. Every floating entry of the
    state dict (parameters and floating buffers, such as BatchNorm's statistics) is averaged and
    the others copied, entry by entry as timm walks the state dict: a tensor under two keys (tied
    weights) is averaged twice per update, and a non-persistent buffer (under none) is neither
    averaged nor copied. With ``exclude_buffers``, parameters are averaged (once each) and all
    buffers copied.
    (timm updates bf16 EMA weights with stochastic rounding; here half-precision weights keep the
    fp32 shadow above, so those differ.)
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        warmup: bool = False,
        min_decay: float = 0.0,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        buffers: str = "copy",
        fp32_shadow: bool | None = None,
        *,
        style: str = "default",
        update_after_step: int = 0,
        use_warmup: bool | None = None,
        exclude_buffers: bool = False,
        flat: bool = False,
    ) -> None:
        super().__init__()
        if style not in ("default", "timm"):
            raise ValueError(f"style must be 'default' or 'timm', got {style!r}")
        if style == "default" and (use_warmup is not None or update_after_step != 0 or exclude_buffers):
            raise ValueError("update_after_step, use_warmup and exclude_buffers are timm's: pass style='timm'")
        if style == "timm":
            warmup = bool(use_warmup)
            buffers = "copy" if exclude_buffers else "average"
        self.style, self.update_after_step = style, as_int(update_after_step, "update_after_step", 0)
        decay = as_float(decay, "decay")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        min_decay = as_float(min_decay, "min_decay")
        warmup_gamma, warmup_power = as_float(warmup_gamma, "warmup_gamma"), as_float(warmup_power, "warmup_power")
        if not (math.isfinite(warmup_gamma) and warmup_gamma > 0):
            raise ValueError(f"warmup_gamma must be a finite number > 0, got {warmup_gamma}")
        if buffers not in ("copy", "average"):
            raise ValueError(f"buffers must be 'copy' or 'average', got {buffers!r}")
        if _distributed.any_dtensor(list(model.parameters())):
            raise ValueError(
                "ModelEMA deep-copies the model, which FSDP2 refuses: build ModelEMA(model) before "
                "fully_shard(model), then shard ema.module the same way (docs/distributed.md)"
            )
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.min_decay = decay, warmup, min_decay
        # Not `self.buffers`: that is nn.Module's method, which .to(), AveragedModel and others call.
        self.warmup_gamma, self.warmup_power, self.buffer_mode = warmup_gamma, warmup_power, buffers
        half = (torch.float16, torch.bfloat16)
        if fp32_shadow is None:
            fp32_shadow = any(p.dtype in half for p in self.module.parameters())
        self._shadowed = [fp32_shadow and p.dtype in half for p in self.module.parameters()]
        self.flat = bool(flat)
        if self.flat:
            # The averaged weights are views of one buffer per dtype (the shadow: one fp32 buffer per
            # half dtype, `flat_shadow_<group>`); the update of a flattened model is one lerp call.
            self._flatten_module()
            self._matched: weakref.ref | None = None
            for gi, g in enumerate(self._flat.groups):
                if fp32_shadow and g.dtype in half:
                    self.register_buffer(f"flat_shadow_{gi}", g.data.float())
        else:
            for i, (p, shadowed) in enumerate(zip(self.module.parameters(), self._shadowed)):
                if shadowed:
                    self.register_buffer(f"shadow_{i}", p.detach().float())
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def get_decay(self, step: int | None = None) -> float:
        """The decay of update number `step` (default: the next one; with ``style="timm"``, the
        decay of timm's ``ModelEmaV3.get_decay(step)``, ``decay`` when `step` is None)."""
        if self.style == "timm":
            return self._timm_decay(step)
        step = self.step if step is None else torch.tensor(step)
        return float(self._decay(step))

    def _timm_decay(self, step: int | None) -> float:
        if step is None:
            return self.decay
        s = max(0, as_int(step, "step", 0) - self.update_after_step - 1)
        if s <= 0:
            return 0.0
        if not self.warmup:
            return self.decay
        return max(min(1 - (1 + s / self.warmup_gamma) ** -self.warmup_power, self.decay), self.min_decay)

    def _decay(self, step: Tensor) -> float | Tensor:
        """The decay at `step` as a tensor where `step` is (on the GPU: never read on the host, and
        torch.compile keeps it in the graph)."""
        if not self.warmup:
            return self.decay
        decay = 1.0 - (1.0 + step.to(torch.float64) / self.warmup_gamma) ** -self.warmup_power
        # min(decay, max(min_decay, .)); clamp gives max when min > max, which is the same.
        return decay.clamp(self.min_decay, self.decay)

    def _check_matches(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """The EMA's and the model's parameters and buffers, once checked to pair up (ValueError
        naming the first mismatch otherwise: an update then writes nothing)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        pairs = []
        for kind, named in (("parameter", nn.Module.named_parameters), ("buffer", nn.Module.named_buffers)):
            ours, theirs = list(named(self.module)), list(named(model))
            if len(ours) != len(theirs):
                raise ValueError(f"model has {len(theirs)} {kind}s, the EMA {len(ours)}: update it with the model it was built from")
            for (name, a), (_, b) in zip(ours, theirs):
                if a.shape != b.shape or (a.is_floating_point() != b.is_floating_point()):
                    raise ValueError(
                        f"model's {kind} {name!r} is {b.dtype}{list(b.shape)}, the EMA's is {a.dtype}{list(a.shape)}"
                    )
            pairs.append(([a for _, a in ours], [b for _, b in theirs]))
        (ema_params, params), (ema_buffers, model_buffers) = pairs
        return ema_params, params, ema_buffers, model_buffers

    def _flatten_module(self) -> None:
        """Flat mode: the EMA's module flattened, and each parameter's (group, view) for its shadow."""
        self._flat = flatten_parameters(self.module)
        self._slots = {id(p): (gi, v) for gi, g in enumerate(self._flat.groups) for p, v in zip(g.params, g.views)}

    def _shadow(self, i: int, ema_p: Tensor) -> Tensor:
        """The fp32 shadow of the EMA's parameter number i (in flat mode, a view of its buffer)."""
        if not self.flat:
            return getattr(self, f"shadow_{i}")
        gi, view = self._slots[id(ema_p)]
        return getattr(self, f"flat_shadow_{gi}").as_strided(view.shape, view.stride(), view.storage_offset())

    def _flat_source(self, model: nn.Module) -> FlatParameters | None:
        """The model's FlatParameters when this EMA is flat, the model's views are intact and its
        layout is the EMA's (same dtype groups, same shapes in the same order), else None (the
        update then runs per tensor)."""
        src = _route.flat_holding(list(model.parameters())) if self.flat else None
        if src is None or not src.intact():  # not flattened, or it left its buffers (model.half(), ...)
            return None
        if self._matched is not None and self._matched() is src:
            return src
        ours, theirs = self._flat.groups, src.groups
        if len(ours) != len(theirs) or any(
            a.dtype != b.dtype or [p.shape for p in a.params] != [p.shape for p in b.params] for a, b in zip(ours, theirs)
        ):
            return None
        self._matched = weakref.ref(src)
        return src

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """One EMA step towards `model` (the model this EMA was built from, or one of the same
        architecture). `step`: the decay of that update number (``style="timm"``: timm's
        schedule), instead of the EMA's own count of updates. With ``flat=True`` and a model
        flattened by :func:`fused_optim.flatten_parameters`, one lerp call for all weights."""
        src = self._flat_source(model) if isinstance(model, nn.Module) else None
        averaged, current, written, views = [], [], [], []
        if src is not None:
            if not self._flat.intact():  # the EMA was moved (ema.to(...)): its module is flattened again
                self._flatten_module()
            ema_buffers, model_buffers = list(self.module.buffers()), list(model.buffers())
            if len(ema_buffers) != len(model_buffers) or any(a.shape != b.shape for a, b in zip(ema_buffers, model_buffers)):
                self._check_matches(model)  # raises, naming the mismatch
            for gi, (ours, theirs) in enumerate(zip(self._flat.groups, src.groups)):
                views += ours.params
                shadow = getattr(self, f"flat_shadow_{gi}", None)
                if shadow is not None:
                    averaged.append(shadow)
                    current.append(theirs.data.float())
                    written.append((ours.data, shadow))
                else:
                    averaged.append(ours.data)
                    current.append(theirs.data)
        else:
            ema_params, params, ema_buffers, model_buffers = self._check_matches(model)
            for i, (ema_p, p, shadowed) in enumerate(zip(ema_params, params, self._shadowed)):
                if shadowed:
                    averaged.append(self._shadow(i, ema_p))
                    current.append(p.detach().float())
                    written.append((ema_p, averaged[-1]))
                else:
                    averaged.append(ema_p)
                    current.append(p.detach())
        if self.style == "timm":
            decay = self._timm_decay(step)
        else:
            decay = self._decay(self.step if step is None else torch.tensor(as_int(step, "step", 0)))
        buffers = list(zip(ema_buffers, model_buffers))
        repeats = Counter()  # lerps of a tensor beyond its first
        if self.style == "timm" and self.buffer_mode == "average":
            # timm's ModelEmaV3 lerps along the state dicts: a tensor under two keys (tied weights)
            # twice, a buffer under none (non-persistent) never, nor is it copied.
            keys = Counter(map(id, self.module.state_dict(keep_vars=True).values()))
            repeats = Counter({key: n - 1 for key, n in keys.items() if n > 1})
            buffers = [(b, mb) for b, mb in buffers if keys[id(b)]]
            if repeats:
                ema_params, params = list(self.module.parameters()), list(model.parameters())
                for i, (ema_p, p, shadowed) in enumerate(zip(ema_params, params, self._shadowed)):
                    averaged += [self._shadow(i, ema_p) if shadowed else ema_p] * repeats[id(ema_p)]
                    current += [p.detach().float() if shadowed else p.detach()] * repeats[id(ema_p)]
        if self.buffer_mode == "average":
            for b, mb in buffers:
                if b.is_floating_point():
                    averaged += [b] * (1 + repeats[id(b)])
                    current += [mb.detach()] * (1 + repeats[id(b)])
        ema_update_(averaged, current, decay)
        for ema_p, shadow in written:
            ema_p.copy_(shadow)
        if views:  # written through their buffer: bumped as the per-tensor update would bump them
            _route.bump_versions(views)
        for b, mb in buffers:
            if self.buffer_mode == "copy" or not b.is_floating_point():
                b.copy_(mb)
        self.step += 1
        if src is not None:
            _route.record("ModelEMA.update", _route.FLAT)  # one lerp over the buffers

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the ``with`` block, `model` (the model this EMA follows, or one of the same
        architecture) holds the EMA's weights: its parameters and buffers are those of
        ``ema.module``; on leaving the block, an exception included, it gets its own back, bit
        for bit. For evaluating the EMA where only `model` can be evaluated (a trainer's
        evaluation loop, a model wrapped in DDP). Costs one copy of `model`'s weights while it
        lasts. ValueError naming the first mismatch, before anything is written."""
        ema_params, params, ema_buffers, model_buffers = self._check_matches(model)
        theirs, ours = params + model_buffers, ema_params + ema_buffers
        for t, e in zip(theirs, ours):
            if t.dtype != e.dtype:
                raise ValueError(f"model holds a {t.dtype} tensor where the EMA holds {e.dtype}: convert one of them first")
        with torch.no_grad():
            saved = [t.clone() for t in theirs]
            torch._foreach_copy_(theirs, ours)
        try:
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(theirs, saved)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def uniform_soup(models: Sequence[nn.Module]) -> nn.Module:
    """The uniform model soup (Wortsman et al., 2022): the average of all models' weights."""
    return average_model_weights(models)


def greedy_soup(
    models: Sequence[nn.Module], evaluate: Callable[[nn.Module], float]
) -> tuple[nn.Module, list[int]]:
    """The greedy model soup (Wortsman et al., 2022): models are tried in order of their own
    held-out score (``evaluate``, higher is better); each joins the soup (a uniform average) only
    if the soup's score then improves strictly. Returns the soup and the chosen indices."""
    if not models:
        raise ValueError("models must hold at least one model")
    scores = [float(evaluate(m)) for m in models]
    order = sorted(range(len(models)), key=lambda i: scores[i], reverse=True)
    chosen, best = [order[0]], scores[order[0]]
    soup = average_model_weights([models[order[0]]])
    for i in order[1:]:
        candidate = average_model_weights([models[j] for j in [*chosen, i]])
        score = float(evaluate(candidate))
        if score > best:
            chosen, best, soup = [*chosen, i], score, candidate
    return soup, chosen
