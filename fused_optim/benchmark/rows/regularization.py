"""Rows of the L1/L2 penalty (``l1l2_penalty``, its gradient ``l1l2_grad_``, forward + backward)
against the seed's L1L2Regularizer loop and torch's multi-tensor (``_foreach_*``) ops; those
baselines (``seed_penalty``, ``foreach_penalty``, ``seed_grad_``, ``foreach_grad_``) are used by
the other suites and the pytest-benchmark files too."""

from __future__ import annotations

import torch

import fused_optim
from fused_optim.benchmark.cases import L1, L2, make_case, nbytes
from fused_optim.benchmark.timing import Bench, Row


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
