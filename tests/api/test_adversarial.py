"""Where users break things: version counters and tensors saved for backward, higher-order
autograd, aliased and overlapping inputs, refused calls that must write nothing, edge values,
thread counts. Every test runs on the native and the reference kernels (the `backend` fixture)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fused_optim
from helpers import DTYPES, HALF_DTYPES

ops = torch.ops.fused_optim
SEED_OFFSET = torch.tensor([987654321, 12345], dtype=torch.int64)
BIG = 70_001  # more than two CPU chunks (32 Ki elements): concurrent chunks would race on aliases


def _grad(t):
    return t.grad if t.is_leaf and t.grad is not None else None


def snapshot(tensors):
    """Bitwise copies (NaN-safe) of tensors and of their .grad."""
    return [(t.detach().clone(), None if _grad(t) is None else _grad(t).clone()) for t in tensors]


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.detach().contiguous().reshape(-1).view(torch.uint8), b.detach().contiguous().reshape(-1).view(torch.uint8)
    )


def assert_unchanged(tensors, snap):
    for i, (t, (data, grad)) in enumerate(zip(tensors, snap)):
        assert same_bits(t, data), f"tensor {i} was written"
        assert (_grad(t) is None) == (grad is None) and (grad is None or same_bits(_grad(t), grad)), f"grad {i} was written"


def randn(*shape, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


# ---------------------------------------------------------------- 1. version counters


def writing_calls(device):
    """(name, tensors the call writes, the call) for every op and public function that writes."""
    p = [randn(5, device=device, seed=1), randn(3, 2, device=device, seed=2)]
    g = [randn(5, device=device, seed=3), randn(3, 2, device=device, seed=4)]
    other = [randn(5, device=device, seed=5), randn(3, 2, device=device, seed=6)]
    x = randn(4, 8, device=device, seed=7)
    w = torch.tensor(0.25, dtype=torch.float64)

    def params():
        ps = [t.clone().requires_grad_() for t in p]
        for q, gr in zip(ps, g):
            q.grad = 10 * gr.clone()
        return ps

    ps1, ps2, ps3, ps4 = params(), params(), params(), params()
    g1, g2, g3, g4, g5, g6 = ([t.clone() for t in g] for _ in range(6))
    return [
        ("l1l2_grad_ op", g1, lambda: ops.l1l2_grad_.default(p, g1, 0.1, 0.2)),
        ("multi_tensor_scale_ op", g2, lambda: ops.multi_tensor_scale_.default(g2, torch.tensor(0.5))),
        ("clip_grad_norm_ op", g3, lambda: ops.clip_grad_norm_.default(g3, 0.1, 2.0, False)),
        ("clip_grad_value_ op", g4, lambda: ops.clip_grad_value_.default(g4, 0.1)),
        ("weighted_sum_ op", g5, lambda: ops.multi_tensor_weighted_sum_.default(p + other, [0.5, 0.5], g5)),
        ("lerp_ op", g6, lambda: ops.multi_tensor_lerp_.default(g6, other, w)),
        ("dropout_ op", [x], lambda: ops.dropout_.default(x, 0.5, SEED_OFFSET)),
        ("l1l2_grad_", [q.grad for q in ps1], lambda: fused_optim.l1l2_grad_(ps1, 0.1, 0.2)),
        ("clip_grad_norm_", [q.grad for q in ps2], lambda: fused_optim.clip_grad_norm_(ps2, 0.1)),
        ("clip_grads_with_norm_", [q.grad for q in ps3],
         lambda: fused_optim.clip_grads_with_norm_(ps3, 0.1, torch.tensor(50.0))),
        ("clip_grad_value_", [q.grad for q in ps4], lambda: fused_optim.clip_grad_value_(ps4, 0.1)),
        ("average_tensors(out=)", other, lambda: fused_optim.average_tensors([p, other], out=other)),
        ("ema_update_", p, lambda: fused_optim.ema_update_(p, g, 0.9)),
        ("swa_update_", g, lambda: fused_optim.swa_update_(g, other, 3)),
    ]


CALL_NAMES = [name for name, _, _ in writing_calls("cpu")]


@pytest.mark.parametrize("index", range(len(CALL_NAMES)), ids=CALL_NAMES)
def test_every_write_bumps_the_version_counter(backend, device, index):
    _, written, call = writing_calls(device)[index]
    versions = [t._version for t in written]
    call()
    assert all(t._version > v for t, v in zip(written, versions))


@pytest.mark.parametrize("index", range(len(CALL_NAMES)), ids=CALL_NAMES)
def test_overwriting_a_tensor_saved_for_backward_is_caught(backend, device, index):
    _, written, call = writing_calls(device)[index]
    w = torch.ones_like(written[0], requires_grad=True)
    loss = (w * written[0]).sum()  # saves written[0] for backward
    call()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def raw_write(name, written, read):
    """The raw op `name` writing the list `written` (reading `read` where it reads)."""
    return {
        "l1l2_grad_": lambda: ops.l1l2_grad_.default(read, written, 0.1, 0.2),
        "multi_tensor_scale_": lambda: ops.multi_tensor_scale_.default(written, torch.tensor(0.5)),
        "clip_grad_norm_": lambda: ops.clip_grad_norm_.default(written, 1e-3, 2.0, False),
        "clip_grad_value_": lambda: ops.clip_grad_value_.default(written, 1e-3),
        "multi_tensor_weighted_sum_": lambda: ops.multi_tensor_weighted_sum_.default(read, [1.0], written),
        "multi_tensor_lerp_": lambda: ops.multi_tensor_lerp_.default(written, read, torch.tensor(0.5)),
    }[name]


RAW_LIST_WRITERS = ["l1l2_grad_", "multi_tensor_scale_", "clip_grad_norm_", "clip_grad_value_",
                    "multi_tensor_weighted_sum_", "multi_tensor_lerp_"]


@pytest.mark.parametrize("name", RAW_LIST_WRITERS + ["dropout_"])
@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda t: t.requires_grad_(), "a leaf Variable that requires grad is being used in an in-place operation"),
        (lambda t: t.requires_grad_().view_as(t), "a view of a leaf Variable that requires grad"),
        (lambda t: t.requires_grad_() * 1, "requires grad, and this op writes it in place without a derivative"),
    ],
    ids=["leaf", "view-of-leaf", "non-leaf"],
)
def test_writing_a_tensor_that_requires_grad_is_refused_first(backend, device, name, make, fragment):
    # torch refuses in-place writes to leaves that require grad and to views of them; an op without
    # a derivative that overwrote a non-leaf would silently cut the graph, so it is refused too.
    # The tensor that requires grad comes second: the first must stay unwritten.
    written = [randn(BIG, device=device, seed=1), make(randn(10, device=device, seed=2))]
    read = [randn(BIG, device=device, seed=3), randn(10, device=device, seed=4)]
    if name == "dropout_":
        call = lambda: ops.dropout_.default(written[1], 0.5, SEED_OFFSET)  # noqa: E731
    else:
        call = raw_write(name, written, read)
    before = snapshot(written)
    with pytest.raises(RuntimeError, match=fragment):
        call()
    assert_unchanged(written, before)
    with torch.no_grad():  # what an optimizer or a clipping function does: allowed
        call()
    assert not same_bits(written[1], before[1][0])


def test_inplace_dropout_on_a_view_of_a_grad_leaf_writes_nothing(backend, device):
    leaf = randn(6, 4, device=device).requires_grad_()
    before = snapshot([leaf])
    with pytest.raises(RuntimeError, match="a view of a leaf Variable that requires grad"):
        fused_optim.dropout(leaf[1:], 0.5, inplace=True)
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad"):
        fused_optim.dropout(leaf, 0.5, inplace=True)
    assert_unchanged([leaf], before)
    # as torch: refused by torch too
    with pytest.raises(RuntimeError, match="a view of a leaf Variable"):
        torch.nn.functional.dropout(leaf[1:], 0.5, inplace=True)


def test_inference_tensors_are_refused_outside_inference_mode(backend):
    with torch.inference_mode():
        t = torch.ones(4)
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        ops.multi_tensor_scale_.default([t], torch.tensor(2.0))
    assert torch.equal(t, torch.ones(4))
    with torch.inference_mode():  # inside, as torch allows
        ops.multi_tensor_scale_.default([t], torch.tensor(2.0))
    assert torch.equal(t, torch.full((4,), 2.0))


# ---------------------------------------------------------------- 2. higher-order autograd


@pytest.mark.parametrize("l1, l2", [(0.3, 0.7), (0.0, 1.5), (2.0, 0.0)])
def test_penalty_second_derivatives(backend, device, l1, l2):
    ts = [randn(7, device=device, dtype=torch.float64, seed=1).requires_grad_(),
          randn(3, 4, device=device, dtype=torch.float64, seed=2).requires_grad_()]
    f = lambda a, b: fused_optim.l1l2_penalty([a, b], l1, l2)  # noqa: E731
    assert torch.autograd.gradgradcheck(f, ts)
    # Hessian-vector product: 2 * l2 * v (sign's derivative is 0 away from 0).
    v = [torch.randn_like(t) for t in ts]
    grads = torch.autograd.grad(f(*ts), ts, create_graph=True)
    hvp = torch.autograd.grad(grads, ts, grad_outputs=v)
    for h, vi in zip(hvp, v):
        torch.testing.assert_close(h, 2 * l2 * vi)


@pytest.mark.parametrize("dtype", DTYPES)
def test_penalty_double_backward_in_every_dtype(backend, device, dtype):
    t = randn(50, device=device, dtype=dtype).requires_grad_()
    (g,) = torch.autograd.grad(fused_optim.l1l2_penalty(t, 0.1, 0.4), t, create_graph=True)
    (h,) = torch.autograd.grad(g.float().sum(), t)
    torch.testing.assert_close(h, torch.full((50,), 0.8, dtype=dtype))


def test_dropout_second_derivative(backend, device):
    x = randn(40, device=device, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: ops.dropout.default(t, 0.4, SEED_OFFSET) ** 2, (x,))


@pytest.mark.parametrize(
    "call",
    [
        lambda t: ops.multi_tensor_norm.default([t], 2.0, False)[0],
        lambda t: ops.multi_tensor_norm.default([t], 2.0, True)[1].sum(),
        lambda t: ops.multi_tensor_weighted_sum.default([t, t], [0.5, 0.5])[0].sum(),
        lambda t: ops.l1l2_penalty_backward.default(torch.tensor(1.0), [t], 0.1, 0.2)[0].sum(),
    ],
    ids=["norm", "per-tensor-norms", "weighted-sum", "penalty-backward"],
)
def test_ops_without_a_derivative_raise_in_backward(backend, device, call):
    t = randn(6, device=device).requires_grad_()
    out = call(t)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="derivative for fused_optim::.* is not implemented"):
        out.backward()


def test_the_packed_mask_is_not_differentiable(backend):
    t = randn(20).requires_grad_()
    _, mask = fused_optim.dropout(t, 0.5, return_mask=True)
    assert mask.dtype == torch.uint8 and not mask.requires_grad


# ---------------------------------------------------------------- 3. aliasing


def sequential(fn, *lists):
    """Runs fn on one position at a time, in order: torch's foreach semantics."""
    for items in zip(*lists):
        fn(*[[x] for x in items])


def test_same_gradient_twice_in_clip_grad_norm_matches_torch(backend, device):
    p = torch.zeros(BIG, device=device, requires_grad=True)
    q = torch.zeros(BIG, device=device, requires_grad=True)
    p.grad, q.grad = randn(BIG, device=device, seed=1), randn(BIG, device=device, seed=2)
    theirs = [t.detach().clone().requires_grad_() for t in (p, q)]
    for a, b in zip(theirs, (p, q)):
        a.grad = b.grad.clone()
    ours_norm = fused_optim.clip_grad_norm_([p, q, p], 1.0)
    torch_norm = torch.nn.utils.clip_grad_norm_([theirs[0], theirs[1], theirs[0]], 1.0)
    torch.testing.assert_close(ours_norm, torch_norm)
    # torch scales a gradient listed twice twice (foreach), so do we: deterministically.
    torch.testing.assert_close(p.grad, theirs[0].grad)
    torch.testing.assert_close(q.grad, theirs[1].grad)


def test_same_tensor_twice_in_every_writing_op_is_sequential(backend, device):
    a, b = randn(BIG, device=device, seed=1), randn(BIG, device=device, seed=2)
    p = randn(BIG, device=device, seed=3)
    w = torch.tensor(0.3, dtype=torch.float64)
    cases = [
        (lambda x, y: ops.multi_tensor_scale_.default(x, torch.tensor(0.5)), None),
        (lambda x, y: ops.clip_grad_value_.default(x, 0.5), None),
        (lambda x, y: ops.l1l2_grad_.default(y, x, 0.1, 0.2), "read"),
        (lambda x, y: ops.multi_tensor_lerp_.default(x, y, w), "read"),
    ]
    for fn, reads in cases:
        x, expected = [a.clone(), b.clone()], [a.clone(), b.clone()]
        x_lists = [x[0], x[1], x[0]]
        e_lists = [expected[0], expected[1], expected[0]]
        if reads:
            fn(x_lists, [p, p, p])
            sequential(fn, e_lists, [p, p, p])
        else:
            fn(x_lists, None)
            sequential(lambda xs: fn(xs, None), e_lists)
        for got, want in zip(x, expected):
            assert same_bits(got, want)


def test_output_aliasing_another_positions_input(backend, device):
    # out[0] is inputs[1]: position 0 writes what position 1 then reads, as a sequential loop does.
    a, b, c, d = (randn(BIG, device=device, seed=s) for s in range(4))
    out = [b, c]
    inputs = [a, b, c, d]  # list 0: (a, b), list 1: (c, d)
    expected = [b.clone(), c.clone()]
    e_in = [a.clone(), expected[0], expected[1], d.clone()]
    for i in range(2):
        expected[i].copy_(0.25 * e_in[i].double() + 0.75 * e_in[2 + i].double())
    ops.multi_tensor_weighted_sum_.default(inputs, [0.25, 0.75], out)
    torch.testing.assert_close(out[0], expected[0])
    torch.testing.assert_close(out[1], expected[1])
    # lerp: end[1] is self[0]
    s0, s1 = randn(BIG, device=device, seed=5), randn(BIG, device=device, seed=6)
    e0 = randn(BIG, device=device, seed=7)
    want0 = torch.lerp(s0, e0, 0.5)
    want1 = torch.lerp(s1, want0, 0.5)
    ops.multi_tensor_lerp_.default([s0, s1], [e0, s0], torch.tensor(0.5))
    assert same_bits(s0, want0) and same_bits(s1, want1)


def test_scale_reads_its_coefficient_before_writing_and_walks_strided_views(backend, device):
    # The scale tensor is itself the last tensor scaled: every tensor gets the original value
    # (the CUDA kernels read a copy of it). Strided views of disjoint parts of one buffer (a
    # slice, a transpose, windows apart) are scaled in place through their strides, and left
    # bitwise unchanged at a coefficient of 1.
    base = randn(4 * BIG, device=device)
    views = [base[: BIG][1::3], base[BIG : 3 * BIG].view(2, BIG).t(), base[3 * BIG :].unfold(0, 4, 4)]
    scale = torch.tensor([0.5], device=device)
    tensors = [randn(BIG, device=device), *views, scale]
    expected = [t.clone() * 0.5 for t in tensors]
    ops.multi_tensor_scale_.default(tensors, scale)
    for t, e in zip(tensors, expected):
        assert same_bits(t, e)
    before = base.clone()
    ops.multi_tensor_scale_.default(views, torch.tensor(1.0, device=device))
    assert same_bits(base, before)


def test_disjoint_and_interleaved_views_of_one_buffer(backend, device):
    flat = randn(4 * BIG, device=device)
    views = list(flat.split(BIG))
    expected = [v.clone() * 0.5 for v in views]
    ops.multi_tensor_scale_.default(views, torch.tensor(0.5))
    assert all(same_bits(v, e) for v, e in zip(views, expected))
    m = randn(BIG, 2, device=device)
    cols = [m[:, 0], m[:, 1]]  # byte ranges interleave; elements do not
    want = [torch.clamp(c, -0.5, 0.5) for c in cols]
    ops.clip_grad_value_.default(cols, 0.5)
    assert all(same_bits(c, w) for c, w in zip(cols, want))


@pytest.mark.parametrize(
    "call",
    [
        lambda buf: ops.l1l2_grad_.default([buf[1:]], [buf[:-1]], 0.1, 0.2),
        lambda buf: ops.multi_tensor_lerp_.default([buf[:-1]], [buf[1:]], torch.tensor(0.5)),
        lambda buf: ops.multi_tensor_weighted_sum_.default([buf[1:]], [1.0], [buf[:-1]]),
    ],
    ids=["l1l2_grad_", "lerp_", "weighted_sum_"],
)
def test_partial_overlap_at_one_position_is_refused(backend, device, call):
    buf = randn(BIG, device=device)
    before = buf.clone()
    with pytest.raises(RuntimeError, match="some elements of the input tensor and the written-to tensor"):
        call(buf)
    assert same_bits(buf, before)


def test_results_do_not_depend_on_the_thread_count(backend):
    ts = [randn(BIG, seed=s) for s in range(3)]
    aliased = [ts[0], ts[1], ts[0], ts[2]]

    def run():
        xs = [t.clone() for t in ts]
        lists = [xs[0], xs[1], xs[0], xs[2]]
        ops.multi_tensor_scale_.default(lists, torch.tensor(0.7))
        ops.l1l2_grad_.default(aliased, lists, 0.1, 0.2)
        # The reference's norms are torch's own reductions, which may add up in another order with
        # more threads; the native kernels combine fixed chunks in a fixed order.
        norm = ops.multi_tensor_norm.default(lists, 3.0, True) if backend == "native" else ()
        return xs + list(norm)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(threads, 2))
        many = run()
    finally:
        torch.set_num_threads(threads)
    assert all(same_bits(a, b) for a, b in zip(one, many))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    picks=st.lists(st.integers(0, 3), min_size=1, max_size=6),
    reads=st.lists(st.integers(0, 3), min_size=6, max_size=6),
    op=st.sampled_from(["scale", "clamp", "l1l2", "lerp", "weighted"]),
)
def test_any_aliasing_pattern_equals_the_sequential_loop(backend, picks, reads, op):
    # Positions draw their tensors from a small pool (views of one buffer among them), so lists
    # repeat tensors and outputs alias other positions' inputs; the fused call must equal the
    # loop over positions.
    def pool():
        flat = randn(3 * 40_000, seed=1)
        return list(flat.split(40_000)) + [randn(40_000, seed=2)]

    def run(fused):
        ts = pool()
        written = [ts[i] for i in picks]
        read = [ts[reads[k]] for k in range(len(picks))]
        fn = {
            "scale": lambda w, r: ops.multi_tensor_scale_.default(w, torch.tensor(0.9)),
            "clamp": lambda w, r: ops.clip_grad_value_.default(w, 0.8),
            "l1l2": lambda w, r: ops.l1l2_grad_.default(r, w, 0.01, 0.1),
            "lerp": lambda w, r: ops.multi_tensor_lerp_.default(w, r, torch.tensor(0.3)),
            "weighted": lambda w, r: ops.multi_tensor_weighted_sum_.default(r + w, [0.4, 0.6], w),
        }[op]
        if fused:
            fn(written, read)
        else:
            for w, r in zip(written, read):
                same = w.data_ptr() == r.data_ptr()
                if op in ("l1l2", "lerp", "weighted") and not same and _overlaps(w, r):
                    return None  # partial overlap at one position: refused, tested above
                fn([w], [r])
        return ts

    expected = run(fused=False)
    if expected is None:
        return
    got = run(fused=True)
    assert all(torch.allclose(g, e, rtol=1e-6, atol=1e-7) for g, e in zip(got, expected))


def _overlaps(a, b):
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


# ---------------------------------------------------------------- 4. nothing written before an error


def _expanded(like):
    return like.new_ones(1).expand_as(like)


@pytest.mark.parametrize(
    "kind, exc, fragment",
    [
        ("expanded", RuntimeError, "more than one element of the written-to tensor"),
        ("int", TypeError, "real floating"),
        ("other-device", RuntimeError, "device"),
        ("other-shape", RuntimeError, "must match"),
    ],
)
@pytest.mark.parametrize("name", RAW_LIST_WRITERS)
def test_a_bad_tensor_after_good_ones_writes_nothing(backend, device, name, kind, exc, fragment):
    good_w, good_r = randn(BIG, device=device, seed=1), randn(BIG, device=device, seed=2)
    w, r = randn(10, device=device, seed=3), randn(10, device=device, seed=4)
    if kind == "expanded":
        w = w[:1].expand(10)
    elif kind == "int":
        w, r = torch.ones(10, dtype=torch.int32, device=device), torch.ones(10, dtype=torch.int32, device=device)
    elif kind == "other-device":
        w, r = torch.ones(10, device="meta"), torch.ones(10, device="meta")
    elif name in ("multi_tensor_scale_", "clip_grad_norm_", "clip_grad_value_"):
        pytest.skip("one list: no pairing to break")
    else:
        r = randn(11, device=device)
    watched = [t for t in (good_w, good_r, w, r) if t.device.type != "meta"]
    before = snapshot(watched)
    with pytest.raises(exc, match=fragment):
        raw_write(name, [good_w, w], [good_r, r])()
    assert_unchanged(watched, before)


def _params(*specs):
    params = []
    for dtype, n in specs:
        p = torch.zeros(n, dtype=dtype, requires_grad=True)
        p.grad = randn(n, dtype=dtype, seed=n) * 100
        params.append(p)
    return params


@pytest.mark.parametrize(
    "call, exc, fragment",
    [
        (lambda ps: fused_optim.clip_grad_value_(ps, 1e5), RuntimeError, r"clip_value 100000(\.0)? cannot be converted to type .* of grads\[1\] without overflow"),
        (lambda ps: fused_optim.clip_grad_norm_(ps, 0.1, math.inf), RuntimeError, "on an empty tensor"),
        (lambda ps: fused_optim.clip_grad_norm_(ps[:2] + [_nan_grad()], 0.1, error_if_nonfinite=True),
         RuntimeError, "non-finite"),
    ],
    ids=["clip-value-overflows-fp16", "inf-norm-of-empty", "nonfinite"],
)
def test_public_clipping_refusals_write_nothing(backend, call, exc, fragment):
    params = _params((torch.float32, BIG), (torch.float16, 10), (torch.float32, 0))
    before = snapshot(params)
    with pytest.raises(exc, match=fragment):
        call(params)
    assert_unchanged(params, before)


def _nan_grad():
    (p,) = _params((torch.float32, 5))
    p.grad[2] = math.nan
    return p


def test_state_dict_and_ema_mismatches_write_nothing(backend):
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = fused_optim.ModelEMA(model, decay=0.5)
    before = snapshot(list(ema.module.parameters()) + list(ema.module.buffers()))
    smaller = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="model has 2 parameters, the EMA 4"):
        ema.update(smaller)
    wider = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5))
    with pytest.raises(ValueError, match=r"'0.weight' is torch.float32\[5, 4\]"):
        ema.update(wider)
    assert_unchanged(list(ema.module.parameters()) + list(ema.module.buffers()), before)
    assert ema.step.item() == 0


# ---------------------------------------------------------------- 5. edge values


@pytest.mark.parametrize("norm_type", [1.0, 0.5, 0.01, 3.0, 2.0])
def test_totals_beyond_fp32_follow_torch(backend, device, norm_type):
    grads = [torch.full((10,), 3e37, device=device) for _ in range(10)]
    ours = fused_optim.get_total_norm(grads, norm_type)
    theirs = torch.nn.utils.get_total_norm(grads, norm_type)
    assert ours.dtype == theirs.dtype and (ours.isinf() == theirs.isinf())
    if not theirs.isinf():
        torch.testing.assert_close(ours, theirs)
    assert torch.equal(fused_optim.l1l2_penalty(grads, 1.0, 0.0), torch.tensor(math.inf))


def test_huge_finite_weights_still_average(backend):
    a, b = torch.full((5,), 2.0), torch.full((5,), 4.0)
    torch.testing.assert_close(fused_optim.average_tensors([[a], [b]], [1e308, 1e308])[0], torch.full((5,), 3.0))
    torch.testing.assert_close(fused_optim.average_tensors([[a], [b]], [1e308, 1.5e308])[0], torch.full((5,), 3.2))


@pytest.mark.parametrize("p", [1e-17, 1e-300, 5e-324])
def test_dropout_probability_too_small_to_drop_anything(backend, device, p):
    x = randn(1000, device=device)
    out = fused_optim.dropout(x, p)
    assert torch.equal(out, x) and out is not x
    y = x.clone()
    fused_optim.dropout(y, p, inplace=True)
    assert torch.equal(y, x)
    _, mask = fused_optim.dropout(x, p, return_mask=True)
    assert fused_optim.unpack_dropout_mask(mask, x.shape).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_zero_coefficient_adds_nothing_even_for_a_nonfinite_parameter(backend, device, bad):
    # The documented exception (docs/correctness.md): the seed's formula gives 0 * nan = 0 * inf = nan. The
    # gradient is no exception: autograd of the seed's formula, element by element.
    p = torch.tensor([bad, 1.0, -2.0], device=device, requires_grad=True)
    q = p.detach().clone().requires_grad_(True)
    value = fused_optim.l1l2_penalty(p, 0.0, 0.0)
    assert value.item() == 0.0
    assert (0.0 * q.abs().sum() + 0.0 * q.square().sum()).isnan()
    value.backward()
    (0.0 * q.abs().sum() + 0.0 * q.square().sum()).backward()
    torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "clip_value", [math.nan, -1.0, -0.0, 0.0, 2.0**-25, 1e-8, 65504.0, 3e38, math.inf, -math.inf, 1e5, 65520.0, 1e39]
)
def test_clip_grad_value_edges_follow_torch(backend, device, dtype, clip_value):
    values = [-7e4, -3.0, -0.5, 0.5, 3.0, 7e4, math.nan, math.inf, -math.inf, 1e-6, -1e-6] * 7
    ours = torch.zeros(len(values), dtype=dtype, device=device, requires_grad=True)
    theirs = torch.zeros_like(ours, requires_grad=True)
    ours.grad = torch.tensor(values, device=device).to(dtype)
    theirs.grad = ours.grad.clone()
    try:
        torch.nn.utils.clip_grad_value_([theirs], clip_value, foreach=False)
    except RuntimeError as e:
        assert "cannot be converted" in str(e)
        before = snapshot([ours])
        with pytest.raises(RuntimeError, match="cannot be converted to type"):
            fused_optim.clip_grad_value_([ours], clip_value)
        assert_unchanged([ours], before)
        return
    fused_optim.clip_grad_value_([ours], clip_value)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=0, equal_nan=True)  # NaN bits may differ


@pytest.mark.parametrize("norm_type", [-1.0, -2.0, -math.inf, math.inf])
def test_norms_without_identity_on_empty_gradients_follow_torch(backend, device, norm_type):
    p = torch.zeros(3, device=device, requires_grad=True)
    e = torch.zeros(0, device=device, requires_grad=True)
    p.grad, e.grad = torch.ones(3, device=device), torch.zeros(0, device=device)
    with pytest.raises(RuntimeError, match="on an empty tensor"):
        torch.nn.utils.get_total_norm([p.grad, e.grad], norm_type)
    with pytest.raises(RuntimeError, match="on an empty tensor"):
        fused_optim.get_total_norm([p.grad, e.grad], norm_type)
    with pytest.raises(RuntimeError, match="on an empty tensor"):
        fused_optim.clip_grad_norm_([p, e], 1.0, norm_type)


# ---------------------------------------------------------------- 6. modules


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_model_ema_is_a_real_module(backend):
    model = bn_model()
    ema = fused_optim.ModelEMA(model, decay=0.9)
    names = [n for n, _ in ema.named_buffers()]
    assert "module.1.running_mean" in names and "step" in names
    assert len(list(ema.buffers())) == len(names)
    ema.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in ema.module.parameters())
    averaged = torch.optim.swa_utils.AveragedModel(ema)
    averaged.update_parameters(ema)
    assert ema.buffer_mode == "copy"


@pytest.mark.parametrize("ours_fn, torch_fn", [
    (lambda: fused_optim.get_ema_multi_avg_fn(0.9), lambda: torch.optim.swa_utils.get_ema_multi_avg_fn(0.9)),
])
def test_averaged_model_with_buffers_and_batchnorm_matches_torch(backend, ours_fn, torch_fn):
    model = bn_model()
    ours = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ours_fn(), use_buffers=True)
    theirs = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch_fn(), use_buffers=True)
    for step in range(4):
        model.train()
        model(torch.randn(8, 3))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * step)
        ours.update_parameters(model)
        theirs.update_parameters(model)
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_swa_on_integer_buffers_is_refused_as_torch_refuses_it(backend):
    model = bn_model()
    for fn, exc in ((fused_optim.get_swa_multi_avg_fn(), TypeError),
                    (torch.optim.swa_utils.get_swa_multi_avg_fn(), RuntimeError)):
        averaged = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=fn, use_buffers=True)
        averaged.update_parameters(model)
        with pytest.raises(exc):
            averaged.update_parameters(model)


# ---------------------------------------------------------------- 7. drop-in parity


@pytest.mark.parametrize("norm_type", ["inf", "2", 2, "-inf", True])
def test_norm_type_read_as_torch_reads_it(backend, norm_type):
    grads = [randn(10, seed=1), randn(3, seed=2)]
    ps = [torch.zeros_like(g, requires_grad=True) for g in grads]
    qs = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for p, q, g in zip(ps, qs, grads):
        p.grad, q.grad = g.clone(), g.clone()
    torch.testing.assert_close(
        fused_optim.clip_grad_norm_(ps, 0.5, norm_type), torch.nn.utils.clip_grad_norm_(qs, 0.5, norm_type)
    )
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.grad, q.grad)
    torch.testing.assert_close(fused_optim.get_total_norm(grads, norm_type), torch.nn.utils.get_total_norm(grads, norm_type))


@pytest.mark.parametrize("make", [
    lambda x: x.to(memory_format=torch.channels_last),
    lambda x: x.permute(0, 2, 3, 1),
    lambda x: x[:, :, ::2],
    lambda x: x.transpose(1, 3),
], ids=["channels_last", "permuted", "sliced", "transposed"])
def test_dropout_keeps_the_layout_torch_keeps(backend, device, make):
    x = make(randn(2, 3, 8, 5, device=device))
    for module in (fused_optim.Dropout(0.5), nn.Dropout(0.5)):
        out = module(x)
        assert out.stride() == torch.empty_like(x).stride()
    ours = fused_optim.dropout(x, 0.3, generator=torch.Generator(device=device).manual_seed(3))
    again = fused_optim.dropout(x.contiguous(), 0.3, generator=torch.Generator(device=device).manual_seed(3))
    assert torch.equal(ours, again)  # the mask follows logical order, whatever the layout


# ---------------------------------------------------------------- 8. error quality


@pytest.mark.parametrize(
    "call, exc, fragment",
    [
        (lambda: fused_optim.dropout(torch.ones(3), "0.5"), TypeError, "dropout probability p"),
        (lambda: fused_optim.dropout(torch.ones(3), 0.5, generator=123), TypeError, "generator must be a torch.Generator"),
        (lambda: fused_optim.ema_update_([torch.ones(2)], [torch.ones(2)], "0.9"), TypeError, "decay"),
        (lambda: fused_optim.ema_update_([torch.ones(2)], [torch.ones(2)], torch.ones(2)), ValueError, "decay"),
        (lambda: fused_optim.swa_update_([torch.ones(2)], [torch.ones(2)], -1), ValueError, "num_averaged"),
        (lambda: fused_optim.ModelEMA(nn.Linear(2, 2), decay="high"), TypeError, "decay"),
        (lambda: fused_optim.get_ema_multi_avg_fn(1.5), ValueError, "decay"),
        (lambda: fused_optim.GradientAccumulator(nn.Linear(2, 2), 2.5), TypeError, "accumulation_steps"),
        (lambda: fused_optim.GradientAccumulator(nn.Linear(2, 2), 0), ValueError, "accumulation_steps"),
        (lambda: fused_optim.GradientAccumulator(nn.Linear(2, 2), 2, total_steps="10"), TypeError, "total_steps"),
        (lambda: fused_optim.GradientAccumulator("model", 2), TypeError, "model"),
        (lambda: fused_optim.clip_grads_with_norm_(_with_grad(), 1.0, 3.0), TypeError, "total_norm"),
        (lambda: fused_optim.clip_grads_with_norm_(_with_grad(), 1.0, torch.ones(2)), TypeError, "total_norm"),
        (lambda: fused_optim.clip_grad_norm_(None, 1.0), TypeError, "parameters must be a tensor or an iterable"),
        (lambda: fused_optim.clip_grad_norm_([_with_grad()[0], 3], 1.0), TypeError, r"parameters\[1\] must be a tensor"),
        (lambda: fused_optim.clip_grad_value_([_with_grad()[0], "x"], 1.0), TypeError, r"parameters\[1\] must be a tensor"),
        (lambda: fused_optim.average_state_dicts([{"a": torch.ones(1), "b": 3}, {"a": torch.ones(1), "b": 3}]),
         TypeError, r"state_dicts\[0\]\['b'\] is a int"),
        (lambda: fused_optim.EarlyStopping(patience=2.5), TypeError, "patience"),
        (lambda: fused_optim.EarlyStopping(min_delta="0"), TypeError, "min_delta"),
        (lambda: fused_optim.EarlyStopping()("low"), ValueError, "val_loss"),
        (lambda: fused_optim.L1L2Regularizer(l1_lambda=-1.0), ValueError, "l1_lambda"),
        (lambda: fused_optim.L1L2Regularizer(l2_lambda="x"), TypeError, "l2_lambda"),
    ],
)
def test_bad_arguments_name_themselves(backend, call, exc, fragment):
    with pytest.raises(exc, match=fragment):
        call()


def _with_grad():
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    return [p]


def test_state_dicts_with_reordered_keys_average(backend):
    a = {"x": torch.ones(2), "y": torch.zeros(3)}
    b = {"y": torch.full((3,), 2.0), "x": torch.full((2,), 3.0)}
    out = fused_optim.average_state_dicts([a, b])
    assert list(out) == ["x", "y"]
    torch.testing.assert_close(out["x"], torch.full((2,), 2.0))
    torch.testing.assert_close(out["y"], torch.full((3,), 1.0))


# ---------------------------------------------------------------- 9. non-finite training signals


@pytest.mark.parametrize("mode, sign", [("min", 1.0), ("max", -1.0)])
def test_nan_is_never_an_improvement(backend, mode, sign):
    model = nn.Linear(2, 1)
    stopper = fused_optim.EarlyStopping(patience=3, mode=mode, restore_best_weights=True, model=model)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    assert not stopper(sign * 5.0)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(math.nan)
    assert [stopper(math.nan) for _ in range(3)] == [False, False, True]
    assert stopper.best_loss == sign * 5.0 and stopper.counter == 3
    for k, v in model.state_dict().items():  # the best weights, not the NaN ones
        assert torch.equal(v, good[k])


def test_a_first_nan_does_not_become_the_best(backend):
    stopper = fused_optim.EarlyStopping(patience=2)
    assert not stopper(math.nan) and stopper.best_loss is None and stopper.counter == 1
    assert not stopper(4.0) and stopper.best_loss == 4.0 and stopper.counter == 0
    assert not stopper(4.0) and stopper.counter == 0  # the seed's rule: equal to the best improves
    stopper_finite = fused_optim.EarlyStopping(patience=2, check_finite=True)
    assert not stopper_finite(1.0)
    assert stopper_finite(math.nan) and "not finite" in stopper_finite.reason


def test_calls_from_many_threads_match_one_thread(backend):
    # Python threads each clipping and averaging their own tensors at the same time (torch's
    # intra-op pool is shared): every result equals the same calls made one after another.
    import threading

    def work(seed):
        params = _params((torch.float32, BIG), (torch.float16, 300), (torch.float32, 7))
        for p in params:
            p.grad = randn(p.numel(), dtype=p.dtype, seed=seed + p.numel()) * 10
        norm = fused_optim.clip_grad_norm_(params, 1.0)
        avg = [torch.zeros_like(p) for p in params]
        fused_optim.ema_update_(avg, [p.grad for p in params], 0.5)
        return [norm] + [p.grad for p in params] + avg

    expected = [work(seed) for seed in range(6)]
    results = [None] * 6

    def run(i):
        results[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        assert all(same_bits(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("dtype", DTYPES)
def test_penalty_and_its_gradient_at_the_edges_of_each_dtype(backend, device, dtype):
    info = torch.finfo(dtype)
    values = torch.tensor([info.max, -info.max, info.tiny, info.tiny / 4, 0.0, -0.0, 1.0], dtype=torch.float64)
    p = values.to(device=device, dtype=dtype)
    l1, l2 = 0.5, 0.25
    exact = (l1 * values.to(dtype).double().abs().sum() + l2 * values.to(dtype).double().square().sum())
    got = fused_optim.l1l2_penalty(p, l1, l2)
    if dtype == torch.float64:
        torch.testing.assert_close(got, exact.to(got.dtype))
    else:  # the fp32 result overflows as torch's fp32 sum of squares does
        assert got.isinf() == torch.isinf(exact.float())
    g = torch.ones_like(p)
    ops.l1l2_grad_.default([p], [g], l1, l2)
    x = p.double()
    want = (1.0 + l1 * torch.sign(x) + 2 * l2 * x).to(dtype)  # one rounding, inf beyond the range
    torch.testing.assert_close(g.cpu(), want, rtol=0, atol=0, equal_nan=True)
