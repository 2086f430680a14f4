"""fused_optim.patch(): torch's clipping functions and dropout modules made ours for a scope, then
put back exactly; a script run under it gives torch's results."""

from __future__ import annotations

import torch
import torch.nn.utils.clip_grad
from torch import nn

import fused_optim

TORCH_FUNCTIONS = {
    name: getattr(torch.nn.utils, name)
    for name in ("clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_")
}
TORCH_MODULE_FUNCTIONS = {name: getattr(torch.nn.utils.clip_grad, name) for name in ("clip_grad_norm_", "clip_grad_value_")}


def _script(seed: int = 0):
    """An unmodified torch training script: a model with dropout, clipping with torch's names."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.0), nn.Tanh(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    norms = []
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(32, 8)).square().mean().backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05))
        torch.nn.utils.clip_grad_value_(model.parameters(), 0.01)
        opt.step()
    return model, torch.stack(norms)


def test_inside_ours_after_torchs():
    with fused_optim.patch() as handle:
        for name in TORCH_FUNCTIONS:
            assert getattr(torch.nn.utils, name) is getattr(fused_optim, name)
        for name in TORCH_MODULE_FUNCTIONS:
            assert getattr(torch.nn.utils.clip_grad, name) is getattr(fused_optim, name)
        assert type(nn.Dropout(0.1)) is fused_optim.Dropout and type(nn.Dropout3d()) is fused_optim.Dropout3d
        assert type(fused_optim.Dropout(0.1)) is fused_optim.Dropout
    assert all(getattr(torch.nn.utils, n) is f for n, f in TORCH_FUNCTIONS.items())
    assert all(getattr(torch.nn.utils.clip_grad, n) is f for n, f in TORCH_MODULE_FUNCTIONS.items())
    assert type(nn.Dropout(0.1)) is nn.Dropout and "__init__" not in vars(nn.Dropout)
    handle.unpatch()  # twice: nothing
    assert "undone" in repr(handle)


def test_a_script_under_the_patch_gives_torchs_results():
    theirs, their_norms = _script()
    with fused_optim.patch():
        ours, our_norms = _script()
    assert type(ours[1]) is fused_optim.Dropout and type(theirs[1]) is nn.Dropout
    torch.testing.assert_close(our_norms, their_norms)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b)


def test_patches_nest_and_parts_can_be_left_out():
    outer = fused_optim.patch(dropout=False)
    inner = fused_optim.patch(clip=False)
    assert type(nn.Dropout()) is fused_optim.Dropout and torch.nn.utils.get_total_norm is fused_optim.get_total_norm
    inner.unpatch()
    assert type(nn.Dropout()) is nn.Dropout and torch.nn.utils.get_total_norm is fused_optim.get_total_norm
    outer.unpatch()
    assert torch.nn.utils.get_total_norm is TORCH_FUNCTIONS["get_total_norm"]


def test_nothing_is_patched_at_import():
    import subprocess
    import sys

    code = (
        "import torch, torch.nn.utils as u; before = u.clip_grad_norm_; import fused_optim; "
        "assert u.clip_grad_norm_ is before and type(torch.nn.Dropout()) is torch.nn.Dropout"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
