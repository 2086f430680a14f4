"""Real clients, as their users run them (installed by .ci/run): a transformers Trainer on a tiny
GPT-2 with fused_optim.hf.FusedOptimCallback, a nanoGPT-style hand-written loop with convert() and
patch(), and accelerate's optimizer wrapper under attach; each against the same client run as
written (torch's dropout and clipping) or against torch's own functions.

Runs with dropout draw other masks than torch's, so their losses are compared over seeds: the
paired difference of final losses (same initialization and batches per seed, only the masks
differ) must lie within PAIRED_SIGMAS standard errors of 0. Runs without dropout must agree step
by step."""

from __future__ import annotations

import math
import os
import statistics

import pytest
import torch

import fused_optim
from fused_optim.benchmark.rows.clients import gpt2_trainer, nanogpt_losses
from fused_optim.hf import EMA_FILE, FusedOptimCallback
from helpers import require

SEEDS = [0, 1, 2, 3, 4, 5]
PAIRED_SIGMAS = 4.0  # a false alarm about once in 100 for 6 normal pairs (t, 5 degrees of freedom); the runs are seeded


@pytest.fixture
def trainer_installed():
    """transformers' Trainer runs on accelerate: both are needed (the nanoGPT tests need neither)."""
    require("transformers")
    require("accelerate")


def _final_loss(losses: list[float]) -> float:
    return statistics.fmean(losses[-5:])


def _assert_same_mean(ours: list[float], theirs: list[float]) -> None:
    diffs = [a - b for a, b in zip(ours, theirs)]
    bound = PAIRED_SIGMAS * statistics.stdev(diffs) / math.sqrt(len(diffs))
    assert abs(statistics.fmean(diffs)) <= bound, f"mean paired difference {statistics.fmean(diffs):.4f} > {bound:.4f}: {diffs}"


def _assert_close_fp32(ours: list[float], theirs: list[float]) -> None:
    # The Trainer logs fp32 values as Python floats: compared at fp32's tolerances.
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs))


def _trainer_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


# ---------------------------------------------------------------- Hugging Face Trainer


@pytest.mark.usefixtures("trainer_installed")
def test_trainer_with_the_callback_without_dropout_is_the_trainers_run(tmp_path):
    # Penalty-free, the callback's clip (attach, max_norm = args.max_grad_norm) and the Trainer's
    # (accelerate, torch's clip_grad_norm_) must give the same steps.
    runs = {}
    for fused in (False, True):
        trainer = gpt2_trainer(str(tmp_path / str(fused)), fused=fused, dropout=0.0, max_steps=20, max_grad_norm=0.5)
        trainer.train()
        runs[fused] = trainer
    theirs, ours = runs[False], runs[True]
    _assert_close_fp32(_trainer_losses(ours), _trainer_losses(theirs))
    norms = [[e["grad_norm"] for e in t.state.log_history if "grad_norm" in e] for t in (ours, theirs)]
    assert len(norms[0]) == 20 and min(norms[1]) > 0.5  # every step clipped
    _assert_close_fp32(norms[0], norms[1])
    for a, b in zip(ours.model.parameters(), theirs.model.parameters()):
        torch.testing.assert_close(a, b)
    assert ours.args.max_grad_norm == 0.5  # put back at train end


@pytest.mark.usefixtures("trainer_installed")
def test_trainer_with_the_callback_and_dropout_trains_as_the_trainer(tmp_path):
    finals = {False: [], True: []}
    for seed in SEEDS:
        for fused in (False, True):
            trainer = gpt2_trainer(str(tmp_path / f"{seed}{fused}"), seed=seed, fused=fused, dropout=0.1, max_steps=30)
            trainer.train()
            losses = _trainer_losses(trainer)
            assert _final_loss(losses) < losses[0] - 0.5  # it learns
            finals[fused].append(_final_loss(losses))
    _assert_same_mean(finals[True], finals[False])


@pytest.mark.usefixtures("trainer_installed")
def test_logged_grad_norm_is_torchs_norm_of_the_penalized_gradients(tmp_path):
    from transformers import TrainerCallback

    l1, l2 = 1e-4, 1e-3
    reference = []

    class TorchNorm(TrainerCallback):
        # Before optimizer.step(), so before attach's hook adds the penalty: torch's norm of what it will clip.
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads = [p.grad + l1 * p.sign() + 2 * l2 * p for p in model.parameters() if p.grad is not None]
            reference.append(torch.nn.utils.get_total_norm(grads).item())

    trainer = gpt2_trainer(str(tmp_path), fused=True, callbacks=[TorchNorm()], max_steps=6, max_grad_norm=0.5,
                           callback_options=dict(l1=l1, l2=l2))
    trainer.train()
    logged = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
    assert len(logged) == 6
    _assert_close_fp32(logged, reference)


@pytest.mark.usefixtures("trainer_installed")
def test_resume_from_a_checkpoint_is_bitwise_the_uninterrupted_run(tmp_path):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):  # an interruption right after the checkpoint of step 4
        def on_save(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 4

    def trainer(folder, callbacks=()):
        return gpt2_trainer(str(tmp_path / folder), fused=True, dropout=0.1, max_steps=8, save_strategy="steps",
                            save_steps=4, callbacks=list(callbacks), callback_options=dict(l2=1e-3, ema_decay=0.9))

    whole = trainer("whole")
    whole.train()
    interrupted = trainer("resumed", [StopAt()])
    interrupted.train()
    assert interrupted.state.global_step == 4 and os.path.isfile(tmp_path / "resumed" / "checkpoint-4" / EMA_FILE)
    resumed = trainer("resumed")  # a new process's Trainer: fresh model, new callback
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 8
    ema = {t: next(c for c in t.callback_handler.callbacks if isinstance(c, FusedOptimCallback)).ema for t in (whole, resumed)}
    assert int(ema[resumed].step) == int(ema[whole].step) == 8
    for a, b in zip(resumed.model.state_dict().values(), whole.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ema[resumed].state_dict().values(), ema[whole].state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.usefixtures("trainer_installed")
def test_a_run_that_raised_is_undone_by_the_next(tmp_path):
    from transformers import TrainerCallback

    torchs_clip = torch.nn.utils.clip_grad_norm_

    class FailOnce(TrainerCallback):
        failed = False

        def on_step_end(self, args, state, control, **kwargs):
            if not FailOnce.failed:
                FailOnce.failed = True
                raise RuntimeError("interrupted")

    trainer = gpt2_trainer(str(tmp_path), fused=True, max_steps=3, max_grad_norm=0.5, callbacks=[FailOnce()])
    with pytest.raises(RuntimeError, match="interrupted"):
        trainer.train()
    assert torch.nn.utils.clip_grad_norm_ is fused_optim.clip_grad_norm_  # left in place: no on_train_end
    trainer.train()  # attaches again (no "already attached"), then undoes everything
    assert torch.nn.utils.clip_grad_norm_ is torchs_clip and trainer.args.max_grad_norm == 0.5
    fused_optim.attach(trainer.optimizer).remove()  # nothing left attached


@pytest.mark.usefixtures("trainer_installed")
def test_resume_without_the_emas_file_is_refused(tmp_path):
    first = gpt2_trainer(str(tmp_path), fused=True, max_steps=2, save_strategy="steps", save_steps=2)
    first.train()  # no EMA: no EMA file in the checkpoint
    second = gpt2_trainer(str(tmp_path), fused=True, max_steps=4, callback_options=dict(ema_decay=0.9))
    with pytest.raises(FileNotFoundError, match=EMA_FILE):
        second.train(resume_from_checkpoint=True)


@pytest.mark.usefixtures("trainer_installed")
def test_eval_ema_evaluates_the_emas_weights_and_trains_the_same(tmp_path):
    runs = {}
    for eval_ema in (False, True):
        trainer = gpt2_trainer(str(tmp_path / str(eval_ema)), fused=True, dropout=0.1, max_steps=10, eval_strategy="steps",
                               eval_steps=5, callback_options=dict(ema_decay=0.8, eval_ema=eval_ema))
        trainer.train()
        runs[eval_ema] = trainer
    for a, b in zip(runs[True].model.state_dict().values(), runs[False].model.state_dict().values()):
        assert torch.equal(a, b)  # the swaps gave the training weights back bit for bit
    evals = {k: [e["eval_loss"] for e in t.state.log_history if "eval_loss" in e] for k, t in runs.items()}
    assert len(evals[True]) == 2 and evals[True] != evals[False]
    # The last evaluation, independently: the EMA's weights loaded into the model by its state dict.
    trainer = runs[False]
    ema = next(c for c in runs[True].callback_handler.callbacks if isinstance(c, FusedOptimCallback)).ema
    trainer.model.load_state_dict(ema.module.state_dict())
    assert trainer.evaluate()["eval_loss"] == pytest.approx(evals[True][-1], rel=1e-6)
    with pytest.raises(ValueError, match="eval_ema needs an EMA"):
        FusedOptimCallback(eval_ema=True)


# ---------------------------------------------------------------- nanoGPT-style loop


def test_nanogpt_loop_converted_and_patched_without_dropout_is_the_same_run():
    _assert_close_fp32(nanogpt_losses(0, fused=True, dropout=0.0), nanogpt_losses(0, fused=False, dropout=0.0))


def test_nanogpt_loop_converted_and_patched_trains_as_the_original():
    finals = {False: [], True: []}
    for seed in SEEDS:
        for fused in (False, True):
            losses = nanogpt_losses(seed, fused=fused)
            assert _final_loss(losses) < losses[0] - 0.5
            finals[fused].append(_final_loss(losses))
    _assert_same_mean(finals[True], finals[False])


# ---------------------------------------------------------------- accelerate


def test_attach_through_accelerates_optimizer_gives_the_separate_calls():
    require("accelerate")
    from accelerate import Accelerator

    def run(glue_by_attach: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        model, opt = Accelerator(cpu=True).prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
        if glue_by_attach:
            handle = fused_optim.attach(opt, l1=1e-3, l2=1e-2, max_norm=0.1)
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(16, 8)).square().mean().backward()
            if not glue_by_attach:
                with torch.no_grad():  # torch's own: the penalty's gradient, then the clip
                    for p in model.parameters():
                        p.grad += 1e-3 * p.sign() + 2 * 1e-2 * p
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            opt.step()
        if glue_by_attach:
            assert type(opt).__name__ == "AcceleratedOptimizer" and handle.steps == 5
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b)
