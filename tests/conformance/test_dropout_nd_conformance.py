"""What PyTorch's own tests of channel dropout (test/nn/test_dropout.py: test_Dropout1d,
test_Dropout2d, test_Dropout3d, and the helpers _test_dropout, _test_dropout_discontiguous,
_test_dropoutNd_no_batch, _test_dropoutNd_channel_zero they call, and test_invalid_dropout_p)
assert, checked against fused_optim.Dropout1d/2d/3d, on the native and the reference kernels. Each
test names the upstream test it mirrors; the facts are PyTorch's, the code is ours."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import fused_optim

MODULES = {"1d": fused_optim.Dropout1d, "2d": fused_optim.Dropout2d, "3d": fused_optim.Dropout3d}


@pytest.fixture(autouse=True)
def seeded():
    # PyTorch's TestCase.setUp seeds every test: its mean bounds (0.05 at ~150 channels, ~1.6
    # sigma) hold for the seed, not for every random state the suite's order leaves behind.
    torch.manual_seed(0)


# test_invalid_dropout_p: p outside [0, 1] raises ValueError from Dropout1d/2d/3d (their
# constructors are torch's, inherited) and from the functional forms (ours), before any write.
@pytest.mark.parametrize("dims", list(MODULES))
@pytest.mark.parametrize("p", [-0.1, 1.1])
def test_invalid_dropout_p(backend, dims, p):
    with pytest.raises(ValueError):
        MODULES[dims](p)
    fn = getattr(fused_optim, f"dropout{dims}")
    x = torch.ones((2, 3) + (4,) * int(dims[0]))
    for inplace in (False, True):
        with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
            fn(x, p, inplace=inplace)
    assert torch.equal(x, torch.ones_like(x))


def _check_dropout(cls, device, input, memory_format=torch.contiguous_format):
    """_test_dropout's assertions: p = 0.2 on an input filled with 1 - p: output and gradient keep
    the memory format, with means within 0.05 of 1 - p, out of place and in place (on input + 0);
    eval mode changes nothing, in place or not; repr and str work."""
    p = 0.2
    input = input.to(device).fill_(1 - p)
    for inplace in (False, True):
        module = cls(p, inplace)
        leaf = input.clone(memory_format=memory_format).requires_grad_()
        output = module(leaf + 0 if inplace else leaf)
        assert output.is_contiguous(memory_format=memory_format)
        assert abs(output.detach().mean().item() - (1 - p)) < 0.05
        output.backward(input)
        assert leaf.grad.is_contiguous(memory_format=memory_format)
        assert abs(leaf.grad.mean().item() - (1 - p)) < 0.05
    for inplace in (True, False):
        module = cls(p, inplace).eval()
        torch.testing.assert_close(module(input), input)
    repr(module), str(module)


def _check_discontiguous(cls, device, memory_format):
    """_test_dropout_discontiguous (issue 47176): p = 0 and 1e-10 on inp[..., ::2] of a contiguous
    or channels_last tensor give the input's values; for p != 0 the output is contiguous in that
    memory format."""
    for p in (0.0, 1e-10):
        inp = torch.ones(2, 3, 3, 3, device=device)
        discontiguous = torch.empty(2, 3, 3, 6, device=device, memory_format=memory_format)[..., ::2]
        discontiguous.copy_(inp)
        out = cls(p=p)(discontiguous)
        if p != 0:
            assert out.is_contiguous(memory_format=memory_format)
        torch.testing.assert_close(out, discontiguous)


def _check_no_batch(module, input):
    """_test_dropoutNd_no_batch: with the RNG state frozen, the unbatched input gives what its
    unsqueeze(0) gives, squeezed."""
    torch.manual_seed(1234)  # every device's generator: freeze_rng_state's effect
    res_no_batch = module(input.clone())
    torch.manual_seed(1234)
    res_batched = module(input.clone().unsqueeze(0)).squeeze(0)
    torch.testing.assert_close(res_no_batch, res_batched)


def _check_channel_zero(module, input):
    """_test_dropoutNd_channel_zero: on a positive input, each (sample, channel) has 0 or all of
    its elements non-zero."""
    channel_numel = int(torch.tensor(input.shape[2:]).prod())
    result = module(input.clone())
    for b, c in itertools.product(range(input.shape[0]), range(input.shape[1])):
        assert int(result[b, c].count_nonzero()) in (0, channel_numel)


def test_Dropout1d(backend, device):
    rng = random.Random(0)
    n, c, length = rng.randint(10, 15), rng.randint(10, 15), rng.randint(10, 15)
    _check_dropout(fused_optim.Dropout1d, device, torch.empty(n, c, length, dtype=torch.double))
    with pytest.raises(RuntimeError, match="Expected 2D or 3D input, but received a 4D input"):
        fused_optim.Dropout1d(p=0.5)(torch.rand(1, 2, 2, 2, device=device))
    with pytest.raises(RuntimeError, match="Expected 2D or 3D input, but received a 1D input"):
        fused_optim.Dropout1d(p=0.5)(torch.rand(2, device=device))
    input = torch.rand(50, 2, device=device, dtype=torch.double)
    _check_no_batch(fused_optim.Dropout1d(p=0.5), input)
    _check_no_batch(fused_optim.Dropout1d(p=0.5, inplace=True), input)
    input = torch.ones(10, 4, 2, device=device, dtype=torch.double)
    _check_channel_zero(fused_optim.Dropout1d(p=0.5), input)
    _check_channel_zero(fused_optim.Dropout1d(p=0.5, inplace=True), input)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_Dropout2d(backend, device, memory_format):
    rng = random.Random(1)
    b, w, h = rng.randint(1, 5), rng.randint(1, 5), rng.randint(1, 5)
    _check_dropout(fused_optim.Dropout2d, device, torch.empty(1000, b, w, h), memory_format)
    _check_discontiguous(fused_optim.Dropout2d, device, memory_format)
    with pytest.warns(UserWarning, match="Received a 5-D input to dropout2d"):
        fused_optim.Dropout2d(p=0.5)(torch.rand(1, 2, 2, 2, 2, device=device))
    with pytest.warns(UserWarning, match="Received a 2-D input to dropout2d"):
        fused_optim.Dropout2d(p=0.5)(torch.rand(1, 2, device=device))
    with pytest.warns(UserWarning, match="assuming that channel-wise 1D dropout behavior is desired"):
        fused_optim.Dropout2d(p=0.5)(torch.rand(1, 2, 2, device=device))
    input = torch.ones(10, 4, 2, 2, device=device)
    _check_channel_zero(fused_optim.Dropout2d(p=0.5), input)
    _check_channel_zero(fused_optim.Dropout2d(p=0.5, inplace=True), input)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_Dropout3d(backend, device, memory_format):
    rng = random.Random(2)
    b, w, h, d = rng.randint(1, 5), rng.randint(1, 5), rng.randint(1, 5), rng.randint(1, 2)
    _check_dropout(fused_optim.Dropout3d, device, torch.empty(1000, b, d, w, h))
    _check_discontiguous(fused_optim.Dropout3d, device, memory_format)
    with pytest.warns(UserWarning, match="Received a 6-D input to dropout3d"):
        fused_optim.Dropout3d(p=0.5)(torch.rand(1, 2, 2, 2, 2, 2, device=device))
    with pytest.warns(UserWarning, match="Received a 3-D input to dropout3d"):
        fused_optim.Dropout3d(p=0.5)(torch.rand(1, 2, 2, device=device))
    input = torch.rand(50, 2, 2, 2, device=device)
    _check_no_batch(fused_optim.Dropout3d(p=0.5), input)
    _check_no_batch(fused_optim.Dropout3d(p=0.5, inplace=True), input)
    input = torch.ones(10, 4, 2, 2, 2, device=device)
    _check_channel_zero(fused_optim.Dropout3d(p=0.5), input)
    _check_channel_zero(fused_optim.Dropout3d(p=0.5, inplace=True), input)
