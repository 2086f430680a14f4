"""What PyTorch's own tests of element dropout (test/nn/test_dropout.py) assert, checked against
fused_optim.Dropout / fused_optim.dropout, on the native and the reference kernels. Each test names
the upstream test it mirrors; the facts are PyTorch's, the code is ours.

Channel dropout (test_Dropout1d, test_Dropout2d, test_Dropout3d) is mirrored in
test_dropout_nd_conformance.py. Upstream items for things fused_optim does not provide (listed,
not tested here):
- test_AlphaDropout, test_FeatureAlphaDropout: alpha dropout (nn.AlphaDropout, FeatureAlphaDropout).
- test_native_dropout_corner_case: torch.native_dropout against torch.dropout on CUDA.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import fused_optim


# test_invalid_dropout_p: p outside [0, 1] raises ValueError, from the module and the function.
@pytest.mark.parametrize("p", [-0.1, 1.1])
def test_invalid_dropout_p(backend, p):
    with pytest.raises(ValueError):
        fused_optim.Dropout(p)
    with pytest.raises(ValueError):
        fused_optim.dropout(torch.ones(1), p)


def _check_dropout(device, input, memory_format):
    """TestDropoutNNDeviceType._test_dropout's assertions: with p = 0.2 on an input filled with
    1 - p, the output and the input's gradient keep the memory format and have a mean within 0.05
    of 1 - p, out of place and in place (on `input + 0`); eval mode is the identity, in place or
    not; repr and str work."""
    p = 0.2
    input = input.to(device).fill_(1 - p)
    for inplace in (False, True):
        module = fused_optim.Dropout(p, inplace)
        leaf = input.clone(memory_format=memory_format).requires_grad_()
        output = module(leaf + 0 if inplace else leaf)
        assert output.is_contiguous(memory_format=memory_format)
        assert abs(output.detach().float().mean().item() - (1 - p)) < 0.05
        output.backward(input)
        assert leaf.grad.is_contiguous(memory_format=memory_format)
        assert abs(leaf.grad.float().mean().item() - (1 - p)) < 0.05
    for inplace in (True, False):
        module = fused_optim.Dropout(p, inplace).eval()
        torch.testing.assert_close(module(input), input)
    repr(module), str(module)


# test_Dropout (_test_dropout part): a 1000-element fp32 input, then the same in bf16.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_Dropout_statistics_layout_and_eval(backend, device, dtype):
    _check_dropout(device, torch.empty(1000, dtype=dtype), torch.contiguous_format)


# test_Dropout2d / test_Dropout3d run the same checks on 4-d inputs, channels_last included; our
# element dropout must keep those layouts too.
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_Dropout_on_4d_inputs_keeps_the_memory_format(backend, device, memory_format):
    _check_dropout(device, torch.empty(100, 3, 4, 5), memory_format)


# test_Dropout (_test_dropout_discontiguous, issue 47176): p = 0 and p = 1e-10 on a discontiguous
# input ([..., ::2] of a contiguous or channels_last tensor) give the input's values; for p != 0 the
# output is contiguous in that memory format.
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("p", [0.0, 1e-10])
def test_Dropout_discontiguous(backend, device, memory_format, p):
    inp = torch.ones(2, 3, 3, 3, device=device)
    discontiguous = torch.empty(2, 3, 3, 6, device=device, memory_format=memory_format)[..., ::2]
    discontiguous.copy_(inp)
    out = fused_optim.Dropout(p=p)(discontiguous)
    if p != 0:
        assert out.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(out, discontiguous)


def _inverse(perm):
    return tuple(perm.index(i) for i in range(len(perm)))


# test_Dropout (_test_dropout_stride_mean_preserve): for every permutation of a (2, 3, 4, 5)
# tensor's dims, with or without a shift of the first two dims, and p in {1e-10, 0.3, 0.5, 0.7}:
# the output is dense in the input's dim order, its mean within 0.5 of the input's, equal to the
# input for p = 1e-10 and different from it otherwise.
def test_Dropout_stride_mean_preserve(backend, device):
    inp = torch.ones(2, 3, 4, 5, device=device)
    for perm in itertools.permutations((0, 1, 2, 3)):
        for shift in [(0, 0), (1, 0), (0, 1), (1, 1)]:
            for p in [1e-10, 0.3, 0.5, 0.7]:
                permuted = inp.permute(perm).contiguous().permute(_inverse(perm))[shift[0]:, shift[1]:]
                out = fused_optim.Dropout(p=p)(permuted)
                assert out.permute(perm).is_contiguous()
                assert abs(out.mean().item() - inp.mean().item()) <= 0.5 + 0.5 * inp.mean().item()
                if p == 1e-10:
                    torch.testing.assert_close(out, permuted)
                else:
                    assert not torch.equal(out, permuted)


# test_empty_dropout: an empty input gives an empty output of the same size.
def test_empty_dropout(backend, device):
    x = torch.tensor([], device=device)
    assert fused_optim.dropout(x).size() == x.size()
    assert F.dropout(x).size() == x.size()
