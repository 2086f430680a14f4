"""Prediction ensembles: the seed's ModelEnsemble, with reduction modes and a vectorized path for
models of one architecture."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

REDUCE_MODES = ("mean", "softmax_mean", "vote")
_ROUNDS = 5  # timed runs of each path when "auto" measures


class ModelEnsemble:
    """The seed's ``ModelEnsemble(models).predict(x)``: every model's output on ``x`` in eval mode
    and without grad, reduced over the models; each model's previous training mode is restored.

    ``reduce``: ``"mean"`` (the seed's: mean of the outputs), ``"softmax_mean"`` (mean of
    ``softmax(output, -1)``: averaged class probabilities) or ``"vote"`` (the class most models
    predict by ``argmax(-1)``; ties go to the smaller class index; returns int64 class indices).

    ``vectorize`` (``"auto"``, True, False): models of one class with the same parameter and buffer
    names, shapes and dtypes run as one batched call, ``torch.func.vmap`` over their stacked
    weights (stacked as ``torch.func.stack_module_state`` does; re-stacked when a weight is updated in place; a
    parameter replaced by a new object needs a new ensemble). ``"auto"``
    falls back to the plain loop when the architectures differ or the model cannot be vmapped;
    ``True`` raises instead. Neither path always wins (on CPU, vmap won for 8 small MLPs at batch 32
    and lost at batch 1024: benchmarks/RESULTS.md), so ``"auto"`` measures: the first calls with a
    new input shape, dtype and device run both paths (a warm-up run each, then five timed runs
    each, alternating; on CUDA, synchronized) and the faster is kept for that input signature from
    then on. Both paths compute the same outputs.
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
        self._base = None  # the architecture on the meta device, for functional_call
        self._stack_key, self._stack_cache = None, None
        self._faster: dict[tuple, bool] = {}  # "auto": input signature -> whether vmap was faster
        if vectorize is not False and self._same_architecture():
            self._base = base = copy.deepcopy(self.models[0]).to("meta")
            base.eval()  # the models' own modes do not matter on this path: base is what runs
            self._batched = vmap(lambda p, b, inp: functional_call(base, (p, b), (inp,)), in_dims=(0, 0, None))
            self._weights = [t for m in self.models for t in (*m.parameters(), *m.buffers())]
        elif vectorize is True:
            raise ValueError("vectorize=True needs models of one class with identical parameter and buffer shapes")

    def _same_architecture(self) -> bool:
        def signature(m: nn.Module):
            return type(m), [(k, v.shape, v.dtype, v.device) for k, v in m.state_dict().items()]

        first = signature(self.models[0])
        return all(signature(m) == first for m in self.models[1:])

    def _stack(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The models' parameters and buffers, each stacked along a new first dim (as
        torch.func.stack_module_state, without marking them as requiring grad, which
        torch.compile refuses for a returned tensor)."""
        params = [dict(m.named_parameters()) for m in self.models]
        buffers = [dict(m.named_buffers()) for m in self.models]
        return (
            {name: torch.stack([p[name] for p in params]) for name in params[0]},
            {name: torch.stack([b[name] for b in buffers]) for name in buffers[0]},
        )

    def _stacked_state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The stacked weights, re-stacked only when a weight changed (tensor versions count every
        in-place update: optimizer steps, load_state_dict). Under torch.compile the stacking is
        part of the graph (versions cannot be traced), so it is done on every call."""
        if torch.compiler.is_compiling():
            return self._stack()
        key = tuple(t._version for t in self._weights)
        if key != self._stack_key:
            self._stack_key, self._stack_cache = key, self._stack()
        return self._stack_cache

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
        if self._base is not None and (self.vectorize is True or torch.compiler.is_compiling() or self._vmap_is_faster(x)):
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
