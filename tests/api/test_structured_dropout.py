"""Structured dropout (one decision per group: DropPath / stochastic depth per sample, channel
dropout per (sample, channel)): exact masks against the stream's formula, statistics, the public
functions against timm's, torchvision's and torch's formulas, the fused residual form, autograd,
in place, layouts, bad input, opcheck and torch.compile, on the native and the reference kernels.
torch's own Dropout1d/2d/3d tests are mirrored in conformance/test_dropout_nd_conformance.py."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_optim
from helpers import DTYPES, HALF_DTYPES, assert_close_to_fp64, native_cuda_test, opcheck
from fused_optim import reference

ops = torch.ops.fused_optim
SEED_OFFSET = torch.tensor([1234567, 89], dtype=torch.int64)


def expected_multipliers(shape, group_dims, p, scale, seed_offset, dtype):
    """The formula: group g (row-major over the first group_dims dims) is kept iff word g of the
    stream is below floor((1 - p) * 2^32); kept groups get 1 / (1 - p) rounded to the dtype."""
    groups = math.prod(shape[:group_dims])
    seed, offset = seed_offset.tolist()
    keep = reference.philox_words(groups, seed, offset) < int((1.0 - p) * 4294967296.0)
    value = 0.0 if p == 1.0 else (1.0 / (1.0 - p) if scale else 1.0)
    m = keep.to(torch.float64) * value
    return m.to(dtype).view(tuple(shape[:group_dims]) + (1,) * (len(shape) - group_dims))


CASES = [((64, 197, 8), 1), ((8, 6, 5, 5), 2), ((3, 4, 5), 0), ((4, 3, 7), 2), ((0, 3), 1), ((70000,), 1)]


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9, 1.0, 1e-12, 1e-17])  # 1e-17: 1 - p rounds to 1 in fp64
@pytest.mark.parametrize("shape, group_dims", CASES, ids=[f"{s}-{g}" for s, g in CASES])
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_masks_out_of_place_in_place_and_residual(backend, device, dtype, shape, group_dims, p, scale):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
    branch = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
    m = expected_multipliers(shape, group_dims, p, scale, SEED_OFFSET, dtype).to(device)
    out = ops.drop_groups(x, group_dims, p, scale, SEED_OFFSET)
    assert torch.equal(out, x * m)  # torch's arithmetic: the multiplier in the dtype, one product
    inplace = x.clone()
    ops.drop_groups_(inplace, group_dims, p, scale, SEED_OFFSET)
    assert torch.equal(inplace, out)
    fused = ops.drop_groups_add(x, branch, group_dims, p, scale, SEED_OFFSET)
    want = x.double() + branch.double() * m.double()
    assert_close_to_fp64(fused, want, x + branch * m, dtype)


def test_masks_do_not_depend_on_threads_or_layout(backend):
    x = torch.randn(32, 64, 9, 9)
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        outs.append(ops.drop_groups(x, 2, 0.4, True, SEED_OFFSET))
    torch.set_num_threads(2)
    channels_last = ops.drop_groups(x.contiguous(memory_format=torch.channels_last), 2, 0.4, True, SEED_OFFSET)
    assert torch.equal(outs[0], outs[1]) and torch.equal(channels_last, outs[0])
    assert channels_last.is_contiguous(memory_format=torch.channels_last)  # the input's layout, as torch's


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_keep_fraction_and_mean_within_five_sigma(backend, device, p):
    # 200000 groups of 4 elements: the kept fraction, and the mean of the scaled output (E = 1).
    x = torch.ones(200000, 4, device=device)
    out = fused_optim.drop_path(x, p, training=True)
    kept = (out[:, 0] != 0).double()
    n = kept.numel()
    assert abs(kept.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    assert torch.all((out == 0) | (out == torch.tensor(1 / (1 - p)))), "one decision a group"
    assert torch.all(out.amin(1) == out.amax(1))
    std = math.sqrt(p / (1 - p))  # of one group's multiplier
    assert abs(out[:, 0].double().mean().item() - 1.0) < 5 * std / math.sqrt(n)


def _timm_drop_path(x, drop_prob, scale_by_keep=True):
    """timm's formula (layers/drop.py), written out: a per-sample bernoulli in x's dtype."""
    keep = 1 - drop_prob
    rnd = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    if keep > 0.0 and scale_by_keep:
        rnd.div_(keep)
    return x * rnd


@pytest.mark.parametrize("scale_by_keep", [True, False])
def test_drop_path_equals_timm_in_distribution_and_expectation(backend, device, scale_by_keep):
    torch.manual_seed(0)
    x = torch.randn(4096, 3, 5, device=device).abs() + 0.5
    ours = fused_optim.drop_path(x, 0.25, True, scale_by_keep)
    theirs = _timm_drop_path(x, 0.25, scale_by_keep)
    # The values a sample can take are the same: 0 or x * (1 / keep, or 1), rounded as timm does.
    scale = 1 / 0.75 if scale_by_keep else 1.0
    for out in (ours, theirs):
        ratio = out / x
        assert torch.all((ratio == 0) | torch.isclose(ratio, torch.tensor(scale, device=device)))
    # Kept fractions agree (two binomials, 4096 samples each) and so do the expectations.
    k_ours, k_theirs = (ours[:, 0, 0] != 0).double().mean(), (theirs[:, 0, 0] != 0).double().mean()
    assert abs(k_ours - k_theirs).item() < 5 * math.sqrt(2 * 0.25 * 0.75 / 4096)
    if scale_by_keep:  # E[out] = x; the mean over samples has variance sum_s mean(x_s)^2 * p / (1 - p) / S^2
        sample_means = x.flatten(1).mean(1).double()
        sigma = math.sqrt(sample_means.square().sum().item() * 0.25 / 0.75) / x.shape[0]
        assert abs(ours.double().mean() - x.double().mean()).item() < 5 * sigma


def test_drop_path_identity_cases_and_module(backend, device):
    x = torch.randn(6, 4, device=device)
    assert fused_optim.drop_path(x, 0.5) is x  # timm's default: training=False
    assert fused_optim.drop_path(x, 0.0, training=True) is x
    module = fused_optim.DropPath(0.1234)
    assert repr(module) == "fused_optim.DropPath(drop_prob=0.123)" and module.scale_by_keep
    module.eval()
    assert module(x) is x
    module.train()
    torch.manual_seed(3)
    a = module(x)
    torch.manual_seed(3)
    assert torch.equal(a, fused_optim.drop_path(x, 0.1234, True))  # torch.manual_seed reproduces


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_stochastic_depth_equals_torchvisions_formula(backend, device, mode):
    torch.manual_seed(0)
    x = torch.rand(2000, 3, 4, device=device) + 0.5
    out = fused_optim.stochastic_depth(x, 0.3, mode, training=True)
    ratio = out / x
    if mode == "row":
        kept = (ratio[:, 0, 0] != 0).double()
        assert abs(kept.mean().item() - 0.7) < 5 * math.sqrt(0.21 / 2000)
        nonzero = (out != 0).flatten(1)
        assert torch.all(nonzero.all(1) | ~nonzero.any(1))  # one decision a sample
    else:  # one decision for the whole batch, kept with probability 0.7 over calls
        assert bool((out != 0).all()) or not bool((out != 0).any())
        kept = [bool(fused_optim.stochastic_depth(x[:2], 0.3, mode).any()) for _ in range(2000)]
        assert abs(sum(kept) / 2000 - 0.7) < 5 * math.sqrt(0.21 / 2000)
    assert torch.all((ratio == 0) | torch.isclose(ratio, torch.tensor(1 / 0.7, device=device)))
    assert fused_optim.stochastic_depth(x, 0.3, mode, training=False) is x
    assert fused_optim.stochastic_depth(x, 0.0, mode) is x
    assert repr(fused_optim.StochasticDepth(0.2, mode)) == f"fused_optim.StochasticDepth(p=0.2, mode={mode})"
    # torchvision's errors
    with pytest.raises(ValueError, match="drop probability has to be between 0 and 1, but got 1.5"):
        fused_optim.stochastic_depth(x, 1.5, mode)
    with pytest.raises(ValueError, match="mode has to be either 'batch' or 'row', but got col"):
        fused_optim.stochastic_depth(x, 0.5, "col")


@pytest.mark.parametrize("fn, dims", [(fused_optim.dropout1d, 3), (fused_optim.dropout2d, 4), (fused_optim.dropout3d, 5)])
def test_channel_dropout_zeroes_whole_channels_like_torch(backend, device, fn, dims):
    shape = (50, 20) + (3,) * (dims - 2)
    x = torch.rand(shape, device=device) + 0.5
    torch.manual_seed(0)
    ours = fn(x, 0.4)
    torch.manual_seed(0)
    theirs = getattr(F, fn.__name__)(x, 0.4)
    for out in (ours, theirs):
        per_channel = (out != 0).flatten(2)
        assert torch.all(per_channel.all(2) | ~per_channel.any(2))  # a channel is all kept or all dropped
    k_ours, k_theirs = (ours.flatten(2)[..., 0] != 0).double().mean(), (theirs.flatten(2)[..., 0] != 0).double().mean()
    assert abs(k_ours - k_theirs).item() < 5 * math.sqrt(2 * 0.24 / 1000)
    torch.testing.assert_close(ours[ours != 0], (x / 0.6)[ours != 0])
    for p, training in ((0.0, True), (0.4, False)):
        assert fn(x, p, training) is x


def test_channel_dropout_warnings_and_errors_match_torch(backend):
    cases = [(fused_optim.dropout2d, (3, 4)), (fused_optim.dropout2d, (2, 3, 4)), (fused_optim.dropout2d, (1, 2, 2, 2, 2)),
             (fused_optim.dropout3d, (5,)), (fused_optim.dropout3d, (2, 3, 4)), (fused_optim.dropout3d, (1, 2, 2, 2, 2, 2))]
    for fn, shape in cases:
        x = torch.ones(shape)
        with warnings.catch_warnings(record=True) as ours:
            warnings.simplefilter("always")
            fn(x, 0.5)
        with warnings.catch_warnings(record=True) as theirs:
            warnings.simplefilter("always")
            getattr(F, fn.__name__)(x, 0.5)
        assert [str(w.message) for w in ours] == [str(w.message) for w in theirs], (fn.__name__, shape)
    for fn, shape in [(fused_optim.dropout1d, (5,)), (fused_optim.dropout1d, (1, 2, 3, 4)),
                      (fused_optim.dropout2d, (5,)), (fused_optim.dropout2d, ()), (fused_optim.dropout3d, ())]:
        x = torch.ones(shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(RuntimeError) as theirs:
                getattr(F, fn.__name__)(x, 0.5)
            with pytest.raises(RuntimeError, match=str(theirs.value)[:40]):
                fn(x, 0.5)
            if fn is not fused_optim.dropout1d:  # p = 1 zeroes any input; nan * 0 stays nan, as torch's
                x = torch.randn(shape)
                x.view(-1)[0] = float("nan")
                torch.testing.assert_close(fn(x, 1.0), getattr(F, fn.__name__)(x, 1.0), rtol=0, atol=0, equal_nan=True)
    for fn in (fused_optim.dropout1d, fused_optim.dropout2d, fused_optim.dropout3d):
        with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1, but got 1.5"):
            fn(torch.ones(2, 3, 4, 5), 1.5)


def test_unbatched_channel_groups_match_the_batched_ones(backend):
    # torch unsqueezes an unbatched input: its channels (dim 0) are the groups, in the same order.
    x = torch.rand(8, 3, 3) + 0.5
    torch.manual_seed(1)
    a = fused_optim.dropout1d(x[:, :, 0], 0.5)
    torch.manual_seed(1)
    b = fused_optim.dropout1d(x[:, :, 0].unsqueeze(0), 0.5).squeeze(0)
    assert torch.equal(a, b)


def test_drop_path_add_equals_the_two_pass_form(backend, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 197, 16, generator=g).to(device)
    branch = torch.randn(64, 197, 16, generator=g).to(device)
    fused = ops.drop_groups_add(x, branch, 1, 0.3, True, SEED_OFFSET)
    two_pass = x + ops.drop_groups(branch, 1, 0.3, True, SEED_OFFSET)
    torch.testing.assert_close(fused, two_pass, rtol=0, atol=1e-6)
    torch.manual_seed(4)
    public = fused_optim.drop_path_add(x, branch, 0.3, training=True)
    torch.manual_seed(4)
    torch.testing.assert_close(public, x + fused_optim.drop_path(branch, 0.3, True), rtol=0, atol=1e-6)
    assert torch.equal(fused_optim.drop_path_add(x, branch, 0.3), x + branch)  # not training
    with pytest.raises(ValueError, match="same shape"):
        fused_optim.drop_path_add(x, branch[:3], 0.3, True)
    with pytest.raises(TypeError, match="same dtype"):
        fused_optim.drop_path_add(x, branch.double(), 0.3, True)


# ---------------------------------------------------------------- autograd


def test_backward_regenerates_the_mask_and_saves_no_activation(backend, device):
    x = torch.randn(16, 8, 5, device=device, requires_grad=True)
    branch = torch.randn(16, 8, 5, device=device, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ops.drop_groups(x, 2, 0.5, True, SEED_OFFSET)
        z = ops.drop_groups_add(x, branch, 1, 0.5, True, SEED_OFFSET)
    assert all(t.numel() == 2 and t.dtype == torch.int64 for t in saved) and saved  # only seed_offset
    grad = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, grad)
    assert torch.equal(gx, ops.drop_groups(grad, 2, 0.5, True, SEED_OFFSET))
    gx, gb = torch.autograd.grad(z, (x, branch), grad)
    assert torch.equal(gx, grad) and torch.equal(gb, ops.drop_groups(grad, 1, 0.5, True, SEED_OFFSET))


def test_gradcheck_and_double_backward(backend, device):
    x = torch.randn(6, 3, 4, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 3, 4, device=device, dtype=torch.float64, requires_grad=True)
    for group_dims in (0, 1, 2):
        fn = lambda t: ops.drop_groups(t, group_dims, 0.4, True, SEED_OFFSET)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))
        fn2 = lambda a, c: ops.drop_groups_add(a, c, group_dims, 0.4, False, SEED_OFFSET)  # noqa: E731
        assert torch.autograd.gradcheck(fn2, (x, b))
        assert torch.autograd.gradgradcheck(fn2, (x, b))


def test_in_place_under_autograd_and_version_counters(backend, device):
    leaf = torch.randn(10, 4, 3, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        fused_optim.dropout1d(leaf, 0.5, inplace=True)
    h = leaf * 2
    before = h._version
    torch.manual_seed(7)
    out = fused_optim.dropout1d(h, 0.5, inplace=True)
    assert out is h and h._version > before
    out.sum().backward()
    torch.manual_seed(7)
    expected = fused_optim.dropout1d(torch.full_like(leaf, 2.0), 0.5)
    torch.testing.assert_close(leaf.grad, expected)
    # A tensor saved for backward and then overwritten in place: autograd refuses the backward.
    w = torch.randn(10, 4, 3, device=device, requires_grad=True)
    t = torch.randn(10, 4, 3, device=device)
    y = (w * t).sum()
    with torch.no_grad():
        fused_optim.dropout1d(t, 0.5, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def _torchvision_stochastic_depth(input, p, mode):
    """torchvision.ops.stochastic_depth's formula in training (torchvision is not installed here)."""
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    survival = 1.0 - p
    noise = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(survival)
    if survival > 0.0:
        noise.div_(survival)
    return input * noise


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_stochastic_depth_equals_torchvision_in_distribution_and_expectation(backend, device, mode):
    torch.manual_seed(0)
    x = torch.rand(64, 3, 4, device=device) + 0.5
    runs = 600
    ours = torch.stack([fused_optim.stochastic_depth(x, 0.3, mode) for _ in range(runs)])
    theirs = torch.stack([_torchvision_stochastic_depth(x, 0.3, mode) for _ in range(runs)])
    for out in (ours, theirs):  # the same values: 0 or x / 0.7 rounded in fp32
        assert torch.all((out == 0) | (out == x * torch.tensor(1 / 0.7, device=device)))
    # Kept fractions agree (per sample in "row" mode, per call in "batch" mode) and E[out] = x.
    draws = runs * (x.shape[0] if mode == "row" else 1)
    k_ours, k_theirs = ((t != 0).flatten(2)[..., 0].double().mean().item() for t in (ours, theirs))
    assert abs(k_ours - k_theirs) < 5 * math.sqrt(2 * 0.21 / draws)
    for out in (ours, theirs):
        sigma = math.sqrt(x.double().square().mean().item() * 0.3 / 0.7 / draws)
        assert abs(out.double().mean() - x.double().mean()).item() < 5 * sigma


def test_eval_and_zero_p_return_the_input_unchecked_as_the_originals(backend):
    ints, scalar = torch.arange(24).view(2, 3, 4), torch.tensor(2.0)
    assert fused_optim.drop_path(ints, 0.5, False) is ints  # timm checks nothing either
    assert fused_optim.drop_path(scalar, 0.5, False) is scalar
    assert fused_optim.drop_path(scalar, 0.0, True) is scalar
    assert fused_optim.stochastic_depth(scalar, 0.5, "row", training=False) is scalar  # torchvision
    assert fused_optim.stochastic_depth(ints, 0.0, "batch") is ints
    assert fused_optim.dropout1d(ints, 0.5, training=False) is ints  # torch's feature dropout
    f8 = torch.zeros(2, 4).to(torch.float8_e4m3fn)
    for x in (ints, f8):  # element dropout too, as torch's F.dropout
        assert fused_optim.dropout(x, 0.5, training=False) is x and fused_optim.dropout(x, 0.0) is x
        assert fused_optim.Dropout(0.5).eval()(x) is x
    with pytest.raises(TypeError, match="floating"):  # dropping needs a floating input
        fused_optim.drop_path(ints, 0.5, True)


@pytest.mark.parametrize("name", ["drop_groups", "drop_groups_add"])
def test_fake_kernels_give_the_kernels_layout(backend, name):
    """torch.compile lays out its buffers from the fake kernels: their strides must be the real
    ones, for expanded, permuted and channels_last inputs too."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    base = torch.randn(4, 3, 1)
    layouts = [
        torch.randn(4, 3, 5),
        torch.randn(5, 3, 4).transpose(0, 2),
        base.expand(4, 3, 5),
        base.expand(4, 3, 5).permute(1, 2, 0),
        torch.randn(1, 1, 5).expand(4, 3, 5),
        torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)[:, :, :, 0],
    ]
    mode = FakeTensorMode()
    for x in layouts:
        for group_dims in range(x.dim() + 1):
            args = (group_dims, 0.3, True)
            if name == "drop_groups":
                inputs = (x,)
            else:
                inputs = (x, torch.randn(x.shape[::-1]).permute(*range(x.dim() - 1, -1, -1)))
            real = getattr(ops, name)(*inputs, *args, SEED_OFFSET)
            with mode:
                fakes = [mode.from_tensor(t) for t in (*inputs, SEED_OFFSET)]
                fake = getattr(ops, name)(*fakes[:-1], *args, fakes[-1])
            assert fake.stride() == real.stride(), (x.stride(), group_dims)


def test_compiled_residual_with_an_expanded_embedding(backend):
    """The reviewer's Inductor case: an expanded positional embedding plus a transposed branch."""
    def f(pos, branch):
        return fused_optim.drop_path_add(pos.expand(6, 8, 5, 4), branch.transpose(0, 3), 0.3, True) * 2

    pos, branch = torch.randn(1, 1, 1, 4), torch.randn(4, 8, 5, 6)
    torch.manual_seed(3)
    eager = f(pos, branch)
    torch.manual_seed(3)
    # Inductor's caches key on the graph, not on the fake kernels' code: compile afresh.
    with torch._inductor.config.patch(force_disable_caches=True):
        torch.testing.assert_close(torch.compile(f, fullgraph=True)(pos, branch), eager)


@pytest.mark.parametrize("fn", [fused_optim.dropout, fused_optim.dropout1d], ids=["element", "channel"])
@pytest.mark.parametrize("view", ["unbind", "split", "no_grad", "leaf-view"])
def test_in_place_on_a_refused_view_raises_torchs_error_before_writing(backend, fn, view):
    leaf = torch.ones(2, 4, 3, requires_grad=True)
    h = leaf * 1
    if view == "unbind":
        v, fragment = h.unbind(0)[0], "Output 0 of Unbind is a view and is being modified inplace"
    elif view == "split":
        v, fragment = h.split(1)[1], "Output 1 of Split is a view and is being modified inplace"
    elif view == "no_grad":
        with torch.no_grad():
            v = h[0]
        fragment = "A view was created in no_grad mode and is being modified inplace with grad mode enabled"
    else:
        v, fragment = leaf[0], "a view of a leaf Variable that requires grad"
    with pytest.raises(RuntimeError, match=fragment):
        fn(v, 0.5, True, inplace=True)
    assert torch.equal(h.detach(), torch.ones(2, 4, 3)) and torch.equal(leaf.detach(), torch.ones(2, 4, 3))
    with pytest.raises(RuntimeError, match=fragment.split(" is ")[0]):  # torch's own in-place refuses it alike
        v.mul_(2)


@pytest.mark.parametrize("p", ["0.5", None, 1 + 0j, [0.5]], ids=["str", "None", "complex", "list"])
def test_non_numeric_p_raises_type_error_as_torch_and_writes_nothing(backend, p):
    for fn, dims in [(fused_optim.dropout1d, 3), (fused_optim.dropout2d, 4), (fused_optim.dropout3d, 5)]:
        x = torch.randn((2, 3) + (4,) * (dims - 2))
        snapshot = x.clone()
        with pytest.raises(TypeError):
            getattr(F, fn.__name__)(x, p)
        with pytest.raises(TypeError, match="dropout probability p must be a real number"):
            fn(x, p, inplace=True)
        assert torch.equal(x, snapshot)
    # torchvision's stochastic_depth compares p < 0.0 first: TypeError there too
    with pytest.raises(TypeError, match="drop probability p must be a real number"):
        fused_optim.stochastic_depth(x, p, "row")
    with pytest.raises(TypeError, match="drop probability p must be a real number"):
        fused_optim.StochasticDepth(p, "batch")(x)
    for name in ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d"):  # torch's constructors (docs/correctness.md, Errors)
        with pytest.raises(TypeError) as theirs:
            getattr(nn, name)(p)
        with pytest.raises(TypeError) as ours:
            getattr(fused_optim, name)(p)
        assert str(ours.value) == str(theirs.value)


def test_bad_input_writes_nothing(backend, device):
    x = torch.randn(4, 3, device=device)
    expanded = torch.randn(1, 3, device=device).expand(4, 3)
    snapshot, expanded_snapshot = x.clone(), expanded.clone()
    for call, exc, fragment in [
        (lambda: ops.drop_groups_(x, 3, 0.5, True, SEED_OFFSET), ValueError, "group_dims"),
        (lambda: ops.drop_groups_(x, 1, 1.5, True, SEED_OFFSET), ValueError, "between 0 and 1"),
        (lambda: ops.drop_groups_(x, 1, 0.5, True, torch.zeros(3, dtype=torch.int64)), RuntimeError, "seed_offset"),
        # p = 0 keeps everything, yet a bad seed_offset is refused by every kernel, as by the reference
        (lambda: ops.drop_groups_(x, 1, 0.0, True, torch.zeros(3, dtype=torch.int64)), RuntimeError, "seed_offset"),
        (lambda: ops.drop_groups(x, 1, 0.0, True, torch.zeros(2)), RuntimeError, "seed_offset"),
        (lambda: ops.drop_groups_add(x, x, 1, 0.0, True, torch.zeros(3, dtype=torch.int64)), RuntimeError, "seed_offset"),
        (lambda: ops.dropout(x, 0.0, torch.zeros(3, dtype=torch.int64)), RuntimeError, "seed_offset"),
        (lambda: ops.drop_groups_(expanded, 1, 0.5, True, SEED_OFFSET), RuntimeError, "memory|overlap"),
        (lambda: ops.drop_groups_(torch.arange(4), 1, 0.5, True, SEED_OFFSET), TypeError, "floating"),
        # fp8 is floating to torch, not to the kernels: the same TypeError on every path
        (lambda: ops.drop_groups(x.to(torch.float8_e4m3fn), 1, 0.5, True, SEED_OFFSET), TypeError, "floating"),
        (lambda: fused_optim.drop_path(x.to(torch.float8_e4m3fn), 0.5, True), TypeError, "floating"),
        (lambda: fused_optim.drop_path(x, "0.5", True), TypeError, "real number"),
        (lambda: fused_optim.drop_path(torch.tensor(1.0, device=device), 0.5, True), ValueError, "sample"),
        (lambda: fused_optim.dropout2d(x, -0.5, inplace=True), ValueError, "between 0 and 1"),
    ]:
        with pytest.raises(exc, match=fragment):
            call()
        assert torch.equal(x, snapshot) and torch.equal(expanded, expanded_snapshot)


def test_opcheck(backend, device):
    x = torch.randn(5, 4, 3, device=device, requires_grad=True)
    b = torch.randn(5, 4, 3, device=device, requires_grad=True)
    opcheck(ops.drop_groups.default, (x, 1, 0.3, True, SEED_OFFSET))
    opcheck(ops.drop_groups.default, (x.detach().transpose(0, 2), 2, 0.3, False, SEED_OFFSET))
    opcheck(ops.drop_groups_.default, (x.detach().clone(), 2, 0.3, True, SEED_OFFSET))
    opcheck(ops.drop_groups_add.default, (x, b, 1, 0.3, True, SEED_OFFSET))


def test_compile_fullgraph_same_masks_as_eager(backend):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.drop = fused_optim.DropPath(0.5)
            self.channel = fused_optim.Dropout1d(0.3)

        def forward(self, x):
            x = self.channel(x)
            return fused_optim.drop_path_add(x, self.fc(x), 0.5, self.training) + self.drop(x)

    model = Block()
    x = torch.randn(16, 4, 8)
    torch.manual_seed(5)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    torch.testing.assert_close(compiled(x), eager)


def test_compile_fullgraph_on_inputs_torch_warns_about(backend):
    """dropout2d on (N, C, L) (torch's historical rule) and dropout3d on 4-D warn in eager, and
    trace without a graph break (the compiled call does not warn), giving eager's masks."""
    for fn, x in [(fused_optim.dropout2d, torch.randn(4, 3, 5)), (fused_optim.dropout3d, torch.randn(2, 3, 4, 5, 6, 1))]:
        torch.manual_seed(2)
        with pytest.warns(UserWarning, match=fn.__name__):
            eager = fn(x, 0.5)
        torch.manual_seed(2)
        compiled = torch.compile(lambda t, fn=fn: fn(t, 0.5), fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), eager)


@native_cuda_test
def test_cuda_drop_path_makes_no_host_sync():
    x = torch.randn(64, 197, 768, device="cuda")
    fused_optim.drop_path(x, 0.1, True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_optim.drop_path(x, 0.1, True)
        fused_optim.drop_path_add(x, x, 0.1, True)
        fused_optim.dropout2d(x.view(64, 197, 24, 32), 0.1, inplace=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
