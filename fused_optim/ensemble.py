"""Prediction ensembles: the seed's ModelEnsemble, with reduction modes and a vectorized path for
models of one architecture."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

REDUCE_MODES = ("mean", "softmax_mean", "vote")


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
    ``True`` raises instead. On CPU, vmap wins when per-call overhead dominates (small batches:
    8 MLPs at batch 32 ran 1.3x faster) and loses when the matmuls dominate (batch 1024: 1.9x
    slower); pass ``vectorize=False`` there (benchmarks/RESULTS.md).
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

    def _outputs_in_eval_mode(self, x: Tensor) -> Tensor:
        if self._base is not None:
            try:
                return self._batched(*self._stacked_state(), x)
            except Exception:
                if self.vectorize is True:
                    raise
                self._base = None  # not vmappable: the loop from now on
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
