"""Sharded training on 2 and 4 gloo processes (CPU, localhost), each compared with the unsharded
computation on the same seed (the checks are in tests/integration/distributed_checks.py): FSDP2 (penalty value
and gradient, global norms of every order, clipping, attach(optimizer), shard-local EMA and
averages, gradient accumulation, early stopping with best-weight restore), tensor-parallel DTensors
on 1-D and 2x2 meshes, ZeRO-style flat shards with process_group=, and DDP over flattened
parameters (and FSDP2 refusing them)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import HERE, run_distributed


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_training_matches_unsharded(world):
    run_distributed(
        "fsdp2", "fsdp2_model_ema", "fsdp2_attach", "tensor_parallel", "flat_shards", "fsdp2_early_stopping", "early_stopping",
        "bad_sharded_input", "ddp_flat", "fsdp2_flat", world=world,
    )


# gloo sometimes aborts a process at exit, after its work is done (a known c10d teardown problem,
# seen here about once in 30 runs, with this message): such a run is repeated once.
GLOO_EXIT_ABORT = "terminate called without an active exception"


def test_scale_out_example_runs_under_torchrun():
    example = os.path.join(os.path.dirname(HERE), "examples", "scale_out.py")
    for attempt in range(2):
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", example, "--epochs", "1"],
            capture_output=True, text=True, timeout=300,
        )
        finished = "epoch 0: val loss" in proc.stdout
        if proc.returncode == 0 or not (finished and GLOO_EXIT_ABORT in proc.stderr):
            break
    assert proc.returncode == 0 and finished, proc.stderr[-3000:]
