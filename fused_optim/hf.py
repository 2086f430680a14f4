"""Hugging Face ``Trainer`` integration: :class:`FusedOptimCallback`, a ``TrainerCallback`` that
runs the glue of each optimizer step through :func:`fused_optim.attach` (penalty, clipping, EMA),
logs the glue's pre-clip norm as ``grad_norm``, keeps a :class:`ModelEMA` in the Trainer's
checkpoints and, on request, evaluates with the EMA's weights.

Not imported by ``fused_optim`` itself; ``from fused_optim.hf import FusedOptimCallback`` needs
transformers (this module imports without it, so that the package's tools can list it; the
callback then refuses to be built)."""

from __future__ import annotations

import os

import torch

from .averaging import ModelEMA
from .patch import patch
from .pre_step import attach

try:
    from transformers import TrainerCallback
except ImportError:  # transformers not installed: FusedOptimCallback() raises, naming it
    TrainerCallback = object

__all__ = ["EMA_FILE", "FusedOptimCallback"]

EMA_FILE = "fused_optim_ema.pt"  # the EMA's state dict, in each checkpoint-<step> folder


class FusedOptimCallback(TrainerCallback):
    """``Trainer(..., callbacks=[FusedOptimCallback(l2=1e-4, ema_decay=0.999)])``.

    At train begin, :func:`fused_optim.attach` goes on the Trainer's optimizer (accelerate's
    wrapper: on the torch optimizer inside) with ``l1``, ``l2`` (a coupled penalty,
    ``grad += l1 * sign(p) + 2 * l2 * p``, not the optimizer's ``weight_decay``), ``norm_type`` and
    ``max_norm``, which defaults to ``args.max_grad_norm``. The clip is then ours, after the
    penalty, in the same pass: ``args.max_grad_norm`` is set to 0 for the run (put back at train
    end) so that the Trainer does not clip as well.

    What the Trainer (transformers 5.x) still does: before each optimizer step it measures a
    gradient norm for its logs whatever ``max_grad_norm`` is (``accelerator.clip_grad_norm_(params,
    inf)``). During training the callback patches torch's clipping functions
    (:func:`fused_optim.patch`, ``dropout=False``), so that measurement is our norm: one read of
    the gradients, nothing written (torch's would also multiply every gradient by 1). In ``on_log``
    the logged ``grad_norm`` (the event's ``logs`` and ``state.log_history``) becomes the glue's
    pre-clip norm of the same step, which includes the penalty's gradient; reporting integrations
    (``report_to``) run before user callbacks and record the Trainer's own measurement, the same
    number when ``l1 = l2 = 0``.

    ``ema_decay``: a :class:`ModelEMA` of the model (``ema_options``: its other arguments) is built
    at train begin and updated after each optimizer step (by attach: not after a step GradScaler
    skipped); ``self.ema``. It is saved as ``fused_optim_ema.pt`` in each checkpoint folder
    (``on_save``) and loaded back when training resumes from a checkpoint (from
    ``args.resume_from_checkpoint`` if it names a folder, else ``output_dir/checkpoint-<step>``;
    FileNotFoundError when it is not there). ``eval_ema=True``: the Trainer's evaluations during
    training run with the EMA's weights swapped into the model (:meth:`ModelEMA.swapped_into`,
    from the step that triggers the evaluation to ``on_evaluate``; the model's own weights come
    back bit for bit before anything is saved). For ``trainer.evaluate()`` after training:
    ``with callback.ema.swapped_into(trainer.model): trainer.evaluate()``.

    ``self.handle`` is attach's :class:`AttachHandle` during training (None before and after)."""

    def __init__(
        self,
        *,
        l1: float = 0.0,
        l2: float = 0.0,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        ema_decay: float | None = None,
        ema_options: dict | None = None,
        eval_ema: bool = False,
    ) -> None:
        if TrainerCallback is object:
            raise ImportError("FusedOptimCallback needs transformers: pip install transformers")
        if eval_ema and ema_decay is None:
            raise ValueError("eval_ema needs an EMA: pass ema_decay")
        self.l1, self.l2, self.max_norm, self.norm_type = l1, l2, max_norm, norm_type
        self.ema_decay, self.ema_options, self.eval_ema = ema_decay, dict(ema_options or {}), eval_ema
        self.ema: ModelEMA | None = None
        self.handle = None
        self._patch = None
        self._trainers_max_grad_norm = None
        self._swap = None  # the open swapped_into() of an evaluation in progress

    # ------------------------------------------------------------------ training

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._release(args)  # what a run that raised (no on_train_end) left in place
        max_norm = self.max_norm
        if max_norm is None and args.max_grad_norm and args.max_grad_norm > 0:
            max_norm = args.max_grad_norm
        if self.ema_decay is not None:
            self.ema = ModelEMA(model, decay=self.ema_decay, **self.ema_options)
            if state.global_step > 0:  # resumed: the Trainer has loaded the checkpoint's weights and state
                self._load_ema(args, state)
        self.handle = attach(
            optimizer, l1=self.l1, l2=self.l2, max_norm=max_norm, norm_type=self.norm_type, ema=self.ema, model=model
        )
        self._trainers_max_grad_norm, args.max_grad_norm = args.max_grad_norm, 0.0
        self._patch = patch(dropout=False)

    def on_train_end(self, args, state, control, **kwargs):
        self._release(args)

    def _release(self, args) -> None:
        """Undoes on_train_begin: the swap, the patch, the hooks, the Trainer's max_grad_norm."""
        self._close_swap()
        if self._patch is not None:
            self._patch.unpatch()
        if self.handle is not None:
            self.handle.remove()
            args.max_grad_norm = self._trainers_max_grad_norm
        self.handle = self._patch = self._trainers_max_grad_norm = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The Trainer logs the last optimizer step's norm: the glue's of that step is handle.total_norm.
        if logs is None or "grad_norm" not in logs or self.handle is None or self.handle.total_norm is None:
            return
        norm = self.handle.total_norm.item()
        logs["grad_norm"] = norm
        if state.log_history and "grad_norm" in state.log_history[-1]:  # the Trainer's copy of `logs`
            state.log_history[-1]["grad_norm"] = norm

    # ------------------------------------------------------------------ checkpoints

    def on_save(self, args, state, control, **kwargs):
        if self.ema is None or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        torch.save(self.ema.state_dict(), os.path.join(folder, EMA_FILE))

    def _load_ema(self, args, state) -> None:
        folder = args.resume_from_checkpoint
        if not (isinstance(folder, str) and os.path.isdir(folder)):
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = os.path.join(folder, EMA_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"resuming at step {state.global_step} with an EMA, but {path} does not exist: set "
                "args.resume_from_checkpoint to the checkpoint folder, or drop ema_decay to start a new EMA"
            )
        self.ema.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    # ------------------------------------------------------------------ evaluation with the EMA

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._maybe_swap_in(control, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self._maybe_swap_in(control, model)

    def _maybe_swap_in(self, control, model) -> None:
        # DefaultFlowCallback (first in the list) has decided by now whether an evaluation follows.
        if self.eval_ema and control.should_evaluate and self._swap is None:
            self._swap = self.ema.swapped_into(model)
            self._swap.__enter__()

    def on_evaluate(self, args, state, control, **kwargs):
        self._close_swap()

    def _close_swap(self) -> None:
        if self._swap is not None:
            swap, self._swap = self._swap, None
            swap.__exit__(None, None, None)
