"""What PyTorch's own tests of gradient clipping (test/test_nn.py: test_clip_grad_norm,
test_clip_grad_value, test_clip_grad_norm_error_if_nonfinite) assert, checked against
fused_optim.clip_grad_norm_ / get_total_norm + clip_grads_with_norm_ / clip_grad_value_, on the
native and the reference kernels. Each test names the upstream test it mirrors; the facts are
PyTorch's, the code is ours. Where upstream states an expectation as a table (which norm orders
must give a non-finite norm), torch's own clip_grad_norm_ is run on the same gradients as well, so
the table cannot drift from the torch we are tested against.

Upstream items for things fused_optim does not provide (listed, not tested here):
- test_clip_grad_norm_multi_device: gradients on two CUDA devices in one call (fused_optim's ops
  take the tensors of one device per call; the tests need two GPUs).
- The foreach=True/False parametrization selects torch's implementation; fused_optim accepts the
  argument and always runs its one fused kernel, so every test here runs with each value.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import fused_optim

NORM_TYPES = [0.5, 1.5, 2, 4, "inf"]
FOREACH = [None, False, True]


def _norm(grads, norm_type):
    """The upstream test's own compute_norm, in fp64: (sum |g|^p)^(1/p), or max |g|."""
    norm_type = float(norm_type)
    flat = torch.cat([g.detach().double().flatten() for g in grads])
    if norm_type == math.inf:
        return flat.abs().max()
    return flat.abs().pow(norm_type).sum().pow(1.0 / norm_type)


def _single_scale(model, grads):
    """compare_scaling: every gradient element was multiplied by the same number (up to the fp32
    rounding of each product, which upstream's assertEqual(scale.std(), 0) allows too); returns it."""
    ratios = torch.cat([(p.grad / g).flatten() for p, g in zip(model.parameters(), grads)])
    torch.testing.assert_close(ratios, ratios[0].expand_as(ratios))
    return ratios[0].item()


def _clip(model, max_norm, norm_type, foreach, split):
    if split:  # torch >= 2.6 splits clip_grad_norm_ into these two; ours provides both
        grads = [p.grad for p in model.parameters()]
        norm = fused_optim.get_total_norm(grads, norm_type, foreach=foreach)
        fused_optim.clip_grads_with_norm_(model.parameters(), max_norm, norm, foreach=foreach)
        return norm
    return fused_optim.clip_grad_norm_(model.parameters(), max_norm, norm_type=norm_type, foreach=foreach)


# test_clip_grad_norm: large gradients are scaled, all by one coefficient, to exactly max_norm; the
# returned norm is the one from before clipping; small gradients are left unchanged.
@pytest.mark.parametrize("split", [False, True], ids=["clip_grad_norm_", "get_total_norm+clip_grads_with_norm_"])
@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_grad_norm(backend, device, norm_type, foreach, split):
    model = nn.Linear(10, 10).to(device)
    max_norm = 2

    grads = torch.arange(1.0, 101, device=device).view(10, 10), torch.ones(10, device=device).div(1000)
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone().view_as(p)
    norm_before = _norm(grads, norm_type)
    norm = _clip(model, max_norm, norm_type, foreach, split)
    norm_after = _norm([p.grad for p in model.parameters()], norm_type)
    torch.testing.assert_close(norm.double(), norm_before, rtol=1.3e-6, atol=1e-5)  # fp32 result
    torch.testing.assert_close(norm_after, torch.tensor(float(max_norm), dtype=torch.float64, device=device),
                               rtol=1.3e-6, atol=1e-5)
    assert norm_after <= norm_before
    _single_scale(model, grads)

    grads = torch.rand(10, 10, device=device).div(10000), torch.ones(10, device=device).div(500)
    for p, g in zip(model.parameters(), grads):
        p.grad.copy_(g)
    norm_before = _norm(grads, norm_type)
    norm = _clip(model, max_norm, norm_type, foreach, split)
    norm_after = _norm([p.grad for p in model.parameters()], norm_type)
    torch.testing.assert_close(norm.double(), norm_before, rtol=1.3e-6, atol=1e-5)
    assert torch.equal(norm_after, norm_before)
    assert norm_after <= max_norm
    assert _single_scale(model, grads) == 1


# test_clip_grad_norm, last part: a single tensor is accepted and clipped as a one-element list.
@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_grad_norm_accepts_a_single_tensor(backend, device, norm_type, foreach):
    p1, p2 = torch.randn(10, 10, device=device), torch.randn(10, 10, device=device)
    g = torch.arange(1.0, 101, device=device).view(10, 10)
    p1.grad, p2.grad = g.clone(), g.clone()
    fused_optim.clip_grad_norm_(p1, 2, norm_type=norm_type, foreach=foreach)
    fused_optim.clip_grad_norm_([p2], 2, norm_type=norm_type, foreach=foreach)
    assert torch.equal(p1.grad, p2.grad)


# test_clip_grad_value: every gradient ends within [-clip_value, clip_value], parameters without a
# gradient are skipped, and a single tensor is accepted.
@pytest.mark.parametrize("foreach", FOREACH)
def test_clip_grad_value(backend, device, foreach):
    model = nn.Linear(10, 10).to(device)
    clip_value = 2.5
    grad_w = torch.arange(-50.0, 50, device=device).view(10, 10).div_(5)
    grad_b = torch.ones(10, device=device).mul_(2)
    for grad_list in [[grad_w, grad_b], [grad_w, None]]:
        for p, g in zip(model.parameters(), grad_list):
            p.grad = g.clone().view_as(p) if g is not None else g
        fused_optim.clip_grad_value_(model.parameters(), clip_value, foreach=foreach)
        for p in filter(lambda p: p.grad is not None, model.parameters()):
            assert p.grad.max() <= clip_value
            assert p.grad.min() >= -clip_value
        # and, beyond upstream's bounds, the values torch's clamp gives
        torch.testing.assert_close(model.weight.grad, grad_w.clamp(-clip_value, clip_value), rtol=0, atol=0)
    assert model.bias.grad is None

    p1, p2 = torch.randn(10, 10, device=device), torch.randn(10, 10, device=device)
    g = torch.arange(-50.0, 50, device=device).view(10, 10).div_(5)
    p1.grad, p2.grad = g.clone(), g.clone()
    fused_optim.clip_grad_value_(p1, clip_value, foreach=foreach)
    fused_optim.clip_grad_value_([p2], clip_value, foreach=foreach)
    assert torch.equal(p1.grad, p2.grad)


# test_clip_grad_norm_error_if_nonfinite: which norm orders give a non-finite total norm for a grad
# of inf, nan, 2e22 or 2e200 (fp64), alone or after a finite one, in every element or one; with
# error_if_nonfinite=True exactly those raise torch's message, and a refused call leaves the
# gradients bitwise unchanged; with False nothing raises.
_POS = [0.1, 1, 2, 3.5, math.inf]
_NEG = [-0.1, -1, -2, -3.5]
_EXCEPT_0 = _POS + _NEG
_ALL = _EXCEPT_0 + [0]
_INF, _NAN = math.inf, math.nan
# (grad only in one element, a finite-grad parameter listed first, scalars, non-finite orders, finite orders)
_NONFINITE_CASES = [
    (False, False, [_INF, -_INF], _EXCEPT_0, [0]),
    (False, True, [_INF, -_INF], _POS, _NEG + [0]),
    (True, False, [_INF, -_INF], _POS, _NEG + [0]),
    (True, True, [_INF, -_INF], _POS, _NEG + [0]),
    (False, False, [_NAN], _EXCEPT_0, [0]),
    (False, True, [_NAN], _EXCEPT_0, [0]),
    (True, False, [_NAN], _EXCEPT_0, [0]),
    (True, True, [_NAN], _EXCEPT_0, [0]),
    (False, False, [2e22, -2e22], [], _ALL),
    (False, True, [2e22, -2e22], [], _ALL),
    (True, False, [2e22, -2e22], [], _ALL),
    (True, True, [2e22, -2e22], [], _ALL),
    (False, False, [2e200, -2e200], [3.5, 2, -2, -3.5], [_INF, 1, 0.1, 0, -1, -0.1]),
    (False, True, [2e200, -2e200], [3.5, 2], _NEG + [_INF, 1, 0.1, 0]),
    (True, False, [2e200, -2e200], [3.5, 2], _NEG + [_INF, 1, 0.1, 0]),
    (True, True, [2e200, -2e200], [3.5, 2], _NEG + [_INF, 1, 0.1, 0]),
]


def _nonfinite_params(device, scalar, one_elem, prefix_finite):
    param = torch.ones(10, dtype=torch.float64, device=device, requires_grad=True)
    (param[1] if one_elem else param).mul(scalar).sum().backward()
    if not prefix_finite:
        return [param]
    prefix = torch.ones(1, dtype=torch.float64, device=device, requires_grad=True)
    prefix.mul(1).sum().backward()
    return [prefix, param]


def _torch_raises(params, norm_type):
    copies = [p.detach().clone().requires_grad_() for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.clone()
    try:
        torch.nn.utils.clip_grad_norm_(copies, 1, norm_type=norm_type, error_if_nonfinite=True)
    except RuntimeError:
        return True
    return False


@pytest.mark.parametrize("case", range(len(_NONFINITE_CASES)))
def test_clip_grad_norm_error_if_nonfinite(backend, device, case):
    one_elem, prefix_finite, scalars, nonfinite, finite = _NONFINITE_CASES[case]
    checked = 0
    for error_if_nonfinite in (False, True):
        for expect_nonfinite, orders in ((True, nonfinite), (False, finite)):
            for norm_type, scalar in itertools.product(orders, scalars):
                params = _nonfinite_params(device, scalar, one_elem, prefix_finite)
                what = f"norm_type={norm_type} scalar={scalar} error_if_nonfinite={error_if_nonfinite}"
                assert _torch_raises(params, norm_type) == expect_nonfinite, f"upstream table vs torch: {what}"
                if expect_nonfinite and error_if_nonfinite:
                    before = [p.grad.clone() for p in params]
                    with pytest.raises(RuntimeError, match=f"The total norm of order {float(norm_type)} for gradients"):
                        fused_optim.clip_grad_norm_(params, 1, norm_type=norm_type, error_if_nonfinite=True)
                    for b, p in zip(before, params):
                        assert torch.equal(b.view(torch.int64), p.grad.view(torch.int64)), what
                else:
                    fused_optim.clip_grad_norm_(params, 1, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite)
                checked += 1
    assert checked == 2 * len(scalars) * (len(nonfinite) + len(finite))
