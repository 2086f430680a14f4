"""Rows of real clients' training steps, original against fused_optim's one-line changes: a
nanoGPT-style loop (karpathy/nanoGPT's model.py and train.py, in small) against ``convert(model)``
+ ``patch()``, and a Hugging Face ``Trainer`` step on a GPT-2 against the same plus
:class:`fused_optim.hf.FusedOptimCallback`. The clients' pieces (``NanoGPT``, ``nanogpt_losses``,
``gpt2_trainer``) are also those of tests/integration/test_clients.py."""

from __future__ import annotations

import contextlib
import math
import statistics
import tempfile
import time

import torch
from torch import nn
from torch.nn import functional as F

import fused_optim
from fused_optim.benchmark.timing import Bench, Row
from fused_optim.hf import FusedOptimCallback


# ---------------------------------------------------------------- nanoGPT, in small


class _CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.attn_dropout_p = dropout  # nanoGPT's flash path: SDPA's dropout_p, torch's own kernel
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head = n_head

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout_p if self.training else 0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class _Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = _CausalSelfAttention(n_embd, n_head, dropout)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's GPT: token and position embeddings, embedding dropout, pre-LN blocks (attention
    by SDPA, residual and MLP dropout modules), final LayerNorm, an LM head tied to the embedding;
    nanoGPT's initialization (std 0.02, residual projections scaled by the depth)."""

    def __init__(self, vocab: int = 64, block_size: int = 32, n_layer: int = 2, n_head: int = 2, n_embd: int = 32,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(_Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device)))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def synthetic_tokens(n: int, vocab: int, seed: int) -> torch.Tensor:
    """A learnable token stream: each token the previous one plus a step that changes rarely, mod vocab."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randint(1, 4, (n // 16 + 1,), generator=g).repeat_interleave(16)[:n]
    return (torch.randint(0, vocab, (1,), generator=g) + steps.cumsum(0)) % vocab


def nanogpt_trainer(model: NanoGPT, data: torch.Tensor, *, batch_size: int = 8, block_size: int = 32, accum: int = 2,
                    lr: float = 3e-3, warmup: int = 4, max_iters: int = 40, grad_clip: float = 1.0, seed: int = 0):
    """nanoGPT's train.py loop, one call per iteration (returns the iteration's loss): AdamW with
    weight decay on the matrices only (betas 0.9, 0.95), cosine learning rate after a linear
    warmup, `accum` micro-batches (loss / accum), ``torch.nn.utils.clip_grad_norm_``, step,
    ``zero_grad(set_to_none=True)``. Batches at random offsets from a generator seeded `seed`."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    it = [0]

    def get_lr(i: int) -> float:
        if i < warmup:
            return lr * (i + 1) / (warmup + 1)
        ratio = min(1.0, (i - warmup) / max(1, max_iters - warmup))
        return 0.1 * lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * 0.9 * lr

    def get_batch():
        ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=g)
        x = torch.stack([data[i:i + block_size] for i in ix])
        return x, torch.stack([data[i + 1:i + 1 + block_size] for i in ix])

    def iteration() -> float:
        for group in optimizer.param_groups:
            group["lr"] = get_lr(it[0])
        total = 0.0
        for _ in range(accum):
            loss = model(*get_batch()) / accum
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)  # looked up at call time, as nanoGPT does
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        it[0] += 1
        return total

    return iteration


def nanogpt_losses(seed: int, fused: bool, iters: int = 40, dropout: float = 0.1, **sizes) -> list[float]:
    """A nanoGPT-style run of `iters` iterations under torch.manual_seed(seed): as written, or with
    ``convert(model)`` and inside ``patch()`` (fused=True)."""
    torch.manual_seed(seed)
    model = NanoGPT(dropout=dropout, **sizes).train()
    data = synthetic_tokens(4096, model.wte.num_embeddings, seed)
    if fused:
        fused_optim.convert(model)
    iteration = nanogpt_trainer(model, data, max_iters=iters, seed=seed)
    with fused_optim.patch() if fused else contextlib.nullcontext():
        return [iteration() for _ in range(iters)]


# ---------------------------------------------------------------- Hugging Face Trainer on a GPT-2


class _TokenBlocks(torch.utils.data.Dataset):
    def __init__(self, tokens: torch.Tensor, length: int) -> None:
        self.blocks = tokens[: len(tokens) // length * length].view(-1, length)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def gpt2_trainer(output_dir: str, *, seed: int = 0, fused: bool = False, callback_options: dict | None = None,
                 n_layer: int = 2, n_embd: int = 32, n_head: int = 2, vocab: int = 64, length: int = 32,
                 dropout: float = 0.1, callbacks: list | None = None, **args):
    """A transformers ``Trainer`` of a GPT-2 built from ``GPT2Config`` (eager attention, every
    dropout `dropout`) on the synthetic token stream, CPU, no reporting; `args` go to
    ``TrainingArguments`` (defaults: batch 8, lr 3e-3, max_grad_norm 1.0, a log every step).
    fused=True: the model converted and a :class:`FusedOptimCallback` (``callback_options``) added."""
    from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainingArguments

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=length, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    config._attn_implementation = "eager"
    model = GPT2LMHeadModel(config)
    callbacks = list(callbacks or [])
    if fused:
        fused_optim.convert(model)
        callbacks.append(FusedOptimCallback(**(callback_options or {})))
    defaults = dict(per_device_train_batch_size=8, learning_rate=3e-3, max_grad_norm=1.0, logging_steps=1,
                    report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=seed,
                    dataloader_num_workers=0)
    training_args = TrainingArguments(output_dir=output_dir, **{**defaults, **args})
    data = _TokenBlocks(synthetic_tokens(64 * length, vocab, seed), length)
    trainer = Trainer(model=model, args=training_args, train_dataset=data, eval_dataset=data, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # it prints every log
    return trainer


# ---------------------------------------------------------------- rows


def _interleaved(bench: Bench, variants: dict[str, callable]) -> dict[str, float]:
    """Median seconds per step of each variant: `variants` map a name to a callable returning a
    round's per-step times; the variants alternate, round after round (bench.rounds of them), and
    each round contributes its median."""
    medians: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(bench.rounds):
        for name, run in variants.items():
            medians[name].append(statistics.median(run()))
    return {name: 1e3 * statistics.median(m) for name, m in medians.items()}


def _nanogpt_variant(fused: bool, sizes: dict, iters: int):
    torch.manual_seed(0)
    model = NanoGPT(**sizes).train()
    data = synthetic_tokens(65536, sizes["vocab"], 0)
    if fused:
        fused_optim.convert(model)
    iteration = nanogpt_trainer(model, data, batch_size=16, block_size=sizes["block_size"], max_iters=10**6)
    iteration()  # warm: optimizer state, allocator

    def run() -> list[float]:
        times = []
        with fused_optim.patch() if fused else contextlib.nullcontext():
            for _ in range(iters):
                start = time.perf_counter()
                iteration()
                times.append(time.perf_counter() - start)
        return times

    return run


def _trainer_variant(fused: bool, sizes: dict, steps: int, output_dir: str):
    from transformers import TrainerCallback

    times: list[float] = []

    class StepTimes(TrainerCallback):  # from the step's first micro-batch to after optimizer.step()
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    trainer = gpt2_trainer(output_dir, fused=fused, callbacks=[StepTimes()], max_steps=steps, logging_steps=steps,
                           per_device_train_batch_size=16, **sizes)
    trainer.train()  # warm

    def run() -> list[float]:
        times.clear()
        trainer.train()
        return times[2:]  # the first steps pay the new optimizer's state

    return run


def clients_rows(bench: Bench, case: str) -> list[Row]:
    """One step of each client, original against fused_optim's one-line changes (case a only):
    nanoGPT-style (4 layers, width 128, batch 16 x 64 tokens, 2 micro-batches, dropout 0.1) and a
    transformers Trainer on a GPT-2 of the same size (skipped without transformers)."""
    if case != "a":
        return []
    sizes = dict(vocab=512, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.1)
    nano = _interleaved(bench, {name: _nanogpt_variant(fused, sizes, iters=6)
                                for name, fused in (("original", False), ("fused", True))})
    rows = [Row("nanoGPT-style iteration", "4 x 128, 2 x 16 x 64 tokens", "original vs convert + patch",
                nano["original"], nano["fused"])]
    try:
        import transformers  # noqa: F401
    except ImportError:
        bench.notes.append("clients: transformers is not installed, no Trainer row")
        return rows
    gpt2 = dict(vocab=512, length=64, n_layer=4, n_head=4, n_embd=128, dropout=0.1)
    with tempfile.TemporaryDirectory() as out:
        hf = _interleaved(bench, {name: _trainer_variant(fused, gpt2, steps=8, output_dir=out)
                                  for name, fused in (("original", False), ("fused", True))})
    rows.append(Row("HF Trainer step (GPT-2)", "4 x 128, 16 x 64 tokens", "original vs convert + FusedOptimCallback",
                    hf["original"], hf["fused"]))
    return rows
