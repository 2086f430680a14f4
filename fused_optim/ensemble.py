"""Prediction ensembles: the seed's ModelEnsemble, with reduction modes and a vectorized path for
models of one architecture."""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.utils import parametrize

REDUCE_MODES = ("mean", "softmax_mean", "vote")
_ROUNDS = 5  # timed runs of each path when "auto" measures


# Module attributes that do not change what forward computes in eval mode from given weights:
# the weights (passed to functional_call), the submodules (compared one by one), the training
# flag (both paths run in eval mode) and state-dict hooks.
_NOT_COMPARED = frozenset(
    {"_parameters", "_buffers", "_modules", "training", "_state_dict_hooks", "_state_dict_pre_hooks",
     "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"}
)


def _equal(a: object, b: object) -> bool:
    """Whether two attribute values are interchangeable: tensors equal in dtype, shape, device and
    every element; lists, tuples and dicts item by item; partials by function and arguments;
    anything else by ``==`` (identity for most objects, so an unknown object counts as different
    unless it is the same one)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, Tensor):
        return a is b or (a.dtype == b.dtype and a.shape == b.shape and a.device == b.device and torch.equal(a, b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, functools.partial):  # deepcopy makes a new partial of the same call
        return _equal((a.func, a.args, a.keywords), (b.func, b.args, b.keywords))
    try:
        return a is b or bool(a == b)
    except Exception:  # an == that gives no truth value
        return False


def _module_class(m: nn.Module) -> type:
    """m's class, but for a parametrized module (torch.nn.utils.parametrize makes a class per
    module) the class it was made from: the parametrizations are compared as submodules."""
    return type(m).__bases__[0] if parametrize.is_parametrized(m) else type(m)


def _comparable(key: str, value: object) -> object:
    """A module attribute as compared: a hook dict by its hooks only (its keys are the handles'
    global ids, different for the same hook registered on two models)."""
    return list(value.values()) if "hook" in key and isinstance(value, dict) else value


def _difference(model: nn.Module, base: nn.Module) -> str | None:
    """Where `model` computes another function of its weights than `base` (None: nowhere, so
    functional_call(base, model's weights) is model's forward): the first submodule name, class,
    weight name, shape or dtype, or other attribute that differs."""
    for kind in ("parameters", "buffers"):
        ours, theirs = ([(n, t.shape, t.dtype) for n, t in getattr(m, f"named_{kind}")()] for m in (model, base))
        if ours != theirs:
            i = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            a, b = (entries[i] if i < len(entries) else "none" for entries in (ours, theirs))
            return f"its {kind} differ (name, shape, dtype) at position {i}: {a}, not {b}"
    modules, base_modules = dict(model.named_modules()), dict(base.named_modules())
    if list(modules) != list(base_modules):
        return f"its submodules are {list(modules)}, not {list(base_modules)}"
    for name, m in modules.items():
        b, where = base_modules[name], f"submodule {name!r}" if name else "the model"
        if _module_class(m) is not _module_class(b):
            return f"{where} is a {type(m).__name__}, not a {type(b).__name__}"
        ours, theirs = ({k: _comparable(k, v) for k, v in vars(x).items() if k not in _NOT_COMPARED} for x in (m, b))
        for key in dict.fromkeys([*ours, *theirs]):
            if key not in ours or key not in theirs or not _equal(ours[key], theirs[key]):
                ours_v, theirs_v = ours.get(key, "<unset>"), theirs.get(key, "<unset>")
                same_repr = " (another object with the same repr)" if repr(ours_v) == repr(theirs_v) else ""
                return f"{where} ({type(m).__name__}) has {key}={ours_v!r}, not {theirs_v!r}{same_repr}"
    return None


class ModelEnsemble:
    """The seed's ``ModelEnsemble(models).predict(x)``: every model's output on ``x`` in eval mode
    and without grad, reduced over the models; each model's previous training mode is restored.

    ``reduce``: ``"mean"`` (the seed's: mean of the outputs), ``"softmax_mean"`` (mean of
    ``softmax(output, -1)``: averaged class probabilities) or ``"vote"`` (the class most models
    predict by ``argmax(-1)``; ties go to the smaller class index; returns int64 class indices).

    ``vectorize`` (``"auto"``, True, False): models that compute the same function of their
    weights run as one batched call, ``torch.func.vmap`` over their parameters and buffers, stacked
    on every call (as ``torch.func.stack_module_state`` does), so that a call sees every change of
    the weights (an optimizer step, ``p.data.mul_(3)``, ``p.data = t``, a new Parameter of the
    same shape). The vmap path runs one copy of ``models[0]`` (taken when the ensemble is built)
    for every model, so it is taken only where, at that call, every model has that copy's
    submodule names and classes, parameter and buffer names, shapes and dtypes, and every other
    attribute of every submodule equal: hyperparameters (``nn.LeakyReLU``'s ``negative_slope``,
    ``nn.LayerNorm``'s ``eps``), hooks, plain tensor attributes. Not compared: the training flag
    (both paths run in eval mode) and state-dict hooks. Where that fails or the model cannot be
    vmapped, ``"auto"`` runs the plain loop and ``True`` raises ValueError naming the first
    difference. Neither path always wins (on CPU, vmap won for 8 small MLPs at batch 32 and lost
    at batch 1024: benchmarks/RESULTS.md), so ``"auto"`` measures: the first calls with a new input
    shape, dtype and device run both paths (a warm-up run each, then five timed runs each,
    alternating; on CUDA, synchronized) and the faster is kept for that input signature from then
    on. The choice changes the speed, never the outputs.
    """

    def __init__(self, models: Sequence[nn.Module], reduce: str = "mean", vectorize: bool | str = "auto") -> None:
        self.models = list(models)
        if not self.models:
            raise ValueError("models must hold at least one model")
        if reduce not in REDUCE_MODES:
            raise ValueError(f"reduce must be one of {REDUCE_MODES}, got {reduce!r}")
        if vectorize not in ("auto", True, False):
            raise ValueError(f"vectorize must be 'auto', True or False, got {vectorize!r}")
        self.reduce = reduce
        self.vectorize = vectorize
        self._base = None  # the copy of models[0] on the meta device that vmap runs
        self._faster: dict[tuple, bool] = {}  # "auto": input signature -> whether vmap was faster
        if vectorize is not False:
            differences = ((i, _difference(m, self.models[0])) for i, m in enumerate(self.models[1:], 1))
            i, difference = next(((i, d) for i, d in differences if d is not None), (None, None))
            if difference is None:
                self._base = base = copy.deepcopy(self.models[0]).to("meta")
                base.eval()  # the models' own modes do not matter on this path: base is what runs
                self._batched = vmap(lambda p, b, inp: functional_call(base, (p, b), (inp,)), in_dims=(0, 0, None))
            elif vectorize is True:
                raise ValueError(
                    f"vectorize=True needs models that compute the same function of their weights; models[{i}] "
                    f"differs from models[0]: {difference}"
                )

    def _same_as_base(self) -> bool:
        """Whether every model computes what the vmap path's copy of models[0] computes with its
        weights (checked on every call: settings can change after the ensemble was built);
        vectorize=True raises naming the first difference instead of returning False."""
        for i, m in enumerate(self.models):
            difference = _difference(m, self._base)
            if difference is not None:
                if self.vectorize is True:
                    raise ValueError(
                        f"vectorize=True needs models that compute the same function of their weights; models[{i}] "
                        f"differs from models[0] as it was when the ensemble was built: {difference}"
                    )
                return False
        return True

    def _stacked_state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The models' current parameters and buffers, each stacked along a new first dim (as
        torch.func.stack_module_state, without marking them as requiring grad, which
        torch.compile refuses for a returned tensor). Stacked on every call: no cheap test sees
        every change (``p.data.mul_()`` bumps no version counter of ``p``)."""
        params = [dict(m.named_parameters()) for m in self.models]
        buffers = [dict(m.named_buffers()) for m in self.models]
        return (
            {name: torch.stack([p[name] for p in params]) for name in params[0]},
            {name: torch.stack([b[name] for b in buffers]) for name in buffers[0]},
        )

    def _vmapped(self, x: Tensor) -> Tensor | None:
        """The outputs through vmap, or None when the model cannot be vmapped ("auto": the loop
        from now on; True: the error)."""
        try:
            return self._batched(*self._stacked_state(), x)
        except Exception:
            if self.vectorize is True:
                raise
            self._base = None
            return None

    def _vmap_is_faster(self, x: Tensor) -> bool:
        """For "auto": whether vmap beats the loop on inputs like x, measured on the first call
        with x's signature: a warm-up run of each path, then _ROUNDS rounds timing each once, in
        turn (so that a drift of the machine's speed hits both), the fastest run of each compared."""
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self._faster:
            sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)

            def timed(f) -> float:
                sync()
                start = time.perf_counter()
                f()
                sync()
                return time.perf_counter() - start

            if self._vmapped(x) is None:  # not vmappable: the loop it is
                return False
            self._looped(x)
            rounds = [(timed(lambda: self._vmapped(x)), timed(lambda: self._looped(x))) for _ in range(_ROUNDS)]
            self._faster[key] = min(v for v, _ in rounds) < min(lo for _, lo in rounds)
        return self._faster[key]

    def _outputs_in_eval_mode(self, x: Tensor) -> Tensor:
        if (
            self._base is not None
            and self._same_as_base()
            and (self.vectorize is True or torch.compiler.is_compiling() or self._vmap_is_faster(x))
        ):
            out = self._vmapped(x)
            if out is not None:
                return out
        return self._looped(x)

    def _looped(self, x: Tensor) -> Tensor:
        modes = [m.training for m in self.models]
        for m in self.models:
            m.eval()
        try:
            return torch.stack([m(x) for m in self.models])
        finally:
            for m, mode in zip(self.models, modes):
                m.train(mode)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        outputs = self._outputs_in_eval_mode(x)
        if self.reduce == "mean":
            return outputs.mean(0)
        if self.reduce == "softmax_mean":
            return outputs.softmax(-1).mean(0)
        votes = nn.functional.one_hot(outputs.argmax(-1), outputs.shape[-1]).sum(0)
        return votes.argmax(-1)
