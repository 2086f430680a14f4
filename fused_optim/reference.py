"""Pure-Python kernels of every fused_optim op: the fallback when the native extension is absent
(or has no kernel for a device), and the readable specification the native kernels must match.

Math runs in the op-math type (fp32 for fp16/bf16, else the input dtype); totals across tensors
are combined in fp64, as the native kernels combine their per-chunk partial sums. The argument
checks and dtype rules the kernels start with live in fused_optim/checks.py (shared with the fake
kernels and the Python wrappers).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import checks
from .checks import opmath_dtype, reduction_dtype


def sum_in_opmath_range(total: Tensor, dtype: torch.dtype) -> Tensor:
    """A sum of non-negative terms taken in fp64, as a sum in op-math type `dtype` holds it: inf
    beyond fp32's range when that type is fp32, as torch's fp32 sums (the native kernels' rule)."""
    if dtype == torch.float64:
        return total
    return torch.where(total > torch.finfo(torch.float32).max, math.inf, total)


# ---------------------------------------------------------------- regularization


def l1l2_penalty(tensors: list[Tensor], l1: float, l2: float) -> Tensor:
    """l1 * sum|p| + l2 * sum p^2 over every element of every tensor (0-dim), the sums taken in
    fp64, those of the fp32-op-math tensors (fp16/bf16/fp32) apart and held as fp32 holds them
    (sum_in_opmath_range), as the native kernels, which add such tensors in short fp32 runs."""
    checks.check_penalty_args(tensors, l1, l2)
    device = tensors[0].device if tensors else None
    sums = {dt: torch.zeros(2, dtype=torch.float64, device=device) for dt in (torch.float32, torch.float64)}
    for t in tensors:
        x = t.to(opmath_dtype(t.dtype))
        # squares rounded in the op-math type, as the kernels'
        sums[x.dtype] += torch.stack([x.abs().sum(dtype=torch.float64), (x * x).sum(dtype=torch.float64)])
    abs_sum, square_sum = sum_in_opmath_range(sums[torch.float32], torch.float32) + sums[torch.float64]
    total = torch.zeros((), dtype=torch.float64, device=device)
    # A zero coefficient adds nothing, even where its sum overflowed (0 * inf would be nan).
    if l1:
        total += l1 * abs_sum
    if l2:
        total += l2 * square_sum
    return total.to(reduction_dtype(tensors))


def _penalty_grad(g: Tensor, x: Tensor, a, b) -> Tensor:
    """(g + a * sign(x)) + b * x, each operation rounded in x's (op-math) dtype: the kernels'
    penalty_grad (a * sign(x) is exact). a, b: Python floats or 0-dim tensors of x's dtype."""
    return g + a * torch.sign(x) + b * x


def l1l2_penalty_backward(grad_out: Tensor, tensors: list[Tensor], l1: float, l2: float) -> list[Tensor]:
    """grad_out * (l1 * sign(p) + 2 * l2 * p) for each tensor p, in p's dtype: the coefficients
    grad_out * l1 and 2 * grad_out * l2 in fp64, each rounded once to the op-math type, then
    _penalty_grad from a zero gradient."""
    checks.check_penalty_backward_args(grad_out, tensors, l1, l2)
    grads = []
    for t in tensors:
        x = t.to(opmath_dtype(t.dtype))
        g = grad_out.to(device=x.device, dtype=torch.float64)
        a, b = (g * l1).to(x.dtype), (2.0 * g * l2).to(x.dtype)
        grads.append(_penalty_grad(torch.zeros_like(x), x, a, b).to(t.dtype))
    return grads


def l1l2_grad_(params: list[Tensor], grads: list[Tensor], l1: float, l2: float) -> None:
    """grads[i] += l1 * sign(params[i]) + 2 * l2 * params[i] (_penalty_grad, the coefficients l1 and
    2 * l2 rounded to the op-math type), rounded once to the grad's dtype."""
    checks.check_l1l2_grad_args(params, grads, l1, l2)
    for p, g in zip(params, grads):
        x = p.to(opmath_dtype(p.dtype))
        g.copy_(_penalty_grad(g.to(x.dtype), x, l1, 2.0 * l2))


# ---------------------------------------------------------------- clip_grad


def _norm(t: Tensor, norm_type: float, opmath: torch.dtype) -> Tensor:
    """t's norm in fp64, its sum of |x|^p held as op-math type `opmath` holds it
    (sum_in_opmath_range: inf beyond fp32's range, as torch's sums and the native kernels')."""
    exact = torch.linalg.vector_norm(t, norm_type, dtype=torch.float64)
    if norm_type in (0.0, math.inf, -math.inf):  # counts, max, min: no sum to overflow
        return exact
    x = t.to(opmath).abs()
    terms = x * x if norm_type == 2.0 else x if norm_type == 1.0 else x.double() ** norm_type
    overflowed = torch.isinf(sum_in_opmath_range(terms.sum(dtype=torch.float64), opmath))
    # The norm of an inf sum: its root, inf for p > 0, 0 for p < 0.
    return torch.where(overflowed & torch.isfinite(exact), math.inf if norm_type > 0 else 0.0, exact)


def multi_tensor_norm(
    tensors: list[Tensor], norm_type: float, per_tensor: bool, error_if_nonfinite: bool = False
) -> tuple[Tensor, Tensor]:
    """(total, per-tensor norms) of order norm_type. The total is defined as torch.nn.utils'
    get_total_norm does: the norm of the vector of per-tensor norms (so for norm_type=0, the number
    of tensors with a non-zero element); empty tensors contribute nothing. Computed in fp64 here
    (see _norm for overflow); both results have the tensors' promoted dtype; per-tensor norms are empty unless per_tensor.
    RuntimeError (torch's message) for a nan or infinite total when error_if_nonfinite: inside the
    op, so that torch.compile traces it without a data-dependent branch."""
    checks.check_norm_args(tensors, norm_type)
    dtype = checks.norm_dtype(tensors)
    device = tensors[0].device if tensors else None
    norms = [_norm(t, norm_type, opmath_dtype(t.dtype)) for t in tensors]
    if not norms:
        return torch.zeros((), dtype=dtype, device=device), torch.empty(0, dtype=dtype, device=device)
    stacked = torch.stack(norms)
    total = _norm(stacked, norm_type, opmath_dtype(dtype)).to(dtype)  # torch sums the norms in their dtype
    if error_if_nonfinite and not math.isfinite(total.item()):
        raise RuntimeError(checks.nonfinite_norm_message(norm_type))
    return total, (stacked if per_tensor else stacked[:0]).to(dtype)


def multi_tensor_scale_(tensors: list[Tensor], scale: Tensor) -> None:
    """tensors[i] *= scale (a one-element tensor); nothing is written when scale is 1."""
    checks.check_scale_args(tensors, scale)
    if scale.item() == 1.0:
        return
    for t in tensors:
        t.mul_(scale.to(t.device))


def clip_grad_norm_(grads: list[Tensor], max_norm: float, norm_type: float, error_if_nonfinite: bool) -> Tensor:
    """Scales grads by min(1, max_norm / (total + 1e-6)), in the total's dtype as torch does;
    returns the total norm (before clipping)."""
    checks.check_floating_list(grads, "grads")
    checks.check_writable(grads, "grads")
    total, _ = multi_tensor_norm(grads, norm_type, False, error_if_nonfinite)
    if not grads:
        return total
    multi_tensor_scale_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


def clip_grad_value_(grads: list[Tensor], clip_value: float) -> None:
    """grads[i] = clamp(grads[i], -clip_value, clip_value) as torch.clamp_: min(max(g, lo), hi), so
    -|clip_value| everywhere for a negative one; a NaN element stays NaN; a NaN clip_value makes
    every element NaN."""
    checks.check_clip_value_args(grads, clip_value)
    for g in grads:
        g.clamp_(min=-clip_value, max=clip_value)


# ---------------------------------------------------------------- pre_step


def pre_step_(params, grads, l1, l2, max_norm, norm_type, clip_value, error_if_nonfinite) -> Tensor:
    """The glue before an optimizer step as its sequence of ops: l1l2_grad_ (skipped when l1 = l2 =
    0), the total norm of the resulting gradients (returned), then clip_grad_norm_'s scaling by that
    total (max_norm) or clip_grad_value_'s clamp (clip_value). With error_if_nonfinite, a nan or inf
    total raises RuntimeError (torch's message) and every gradient is left as it was."""
    checks.check_pre_step_args(params, grads, l1, l2, max_norm, norm_type, clip_value)
    saved = [g.clone() for g in grads] if error_if_nonfinite else []
    if l1 != 0.0 or l2 != 0.0:
        l1l2_grad_(params, grads, l1, l2)
    total, _ = multi_tensor_norm(grads, norm_type, False)
    if error_if_nonfinite and not math.isfinite(total.item()):
        for g, s in zip(grads, saved):
            g.copy_(s)
        raise RuntimeError(checks.nonfinite_norm_message(norm_type))
    if max_norm is not None and grads:
        multi_tensor_scale_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    elif clip_value is not None:
        clip_grad_value_(grads, clip_value)
    return total


# ---------------------------------------------------------------- averaging


def multi_tensor_weighted_sum(inputs: list[Tensor], weights: list[float]) -> list[Tensor]:
    """New tensors out[i] = sum_m weights[m] * inputs[m * n + i], n = len(inputs) / len(weights)."""
    out = [torch.empty_like(t) for t in inputs[: checks.num_outputs(inputs, weights)]]
    multi_tensor_weighted_sum_(inputs, weights, out)
    return out


def multi_tensor_weighted_sum_(inputs: list[Tensor], weights: list[float], out: list[Tensor]) -> None:
    """out[i] = sum_m weights[m] * inputs[m * len(out) + i], in the op-math type; out[i] may be one
    of its own inputs."""
    checks.check_weighted_sum_args(inputs, weights, out)
    checks.check_weighted_sum_memory(inputs, weights, out)
    n = len(out)
    for i, o in enumerate(out):
        acc = sum(w * inputs[m * n + i].to(opmath_dtype(o.dtype)) for m, w in enumerate(weights))
        o.copy_(acc)


def multi_tensor_lerp_(self: list[Tensor], end: list[Tensor], weight: Tensor) -> None:
    """self[i] = torch.lerp(self[i], end[i], weight), in place: the EMA and SWA update. The weight
    is read as a Python float (a host sync for a GPU weight: the native kernel reads it on the
    device), rounded to the op-math type by torch.lerp_ as by the native kernels."""
    checks.check_lerp_args(self, end, weight)
    checks.check_lerp_memory(self, end)
    w = checks.check_lerp_weight_value(weight)
    for s, e in zip(self, end):
        s.lerp_(e, w)


# ---------------------------------------------------------------- dropout
# The random stream (the native kernels produce it bit for bit): element i of the input, in
# row-major logical order, takes 32-bit word k = (i % 32) // 8 of Philox4x32-10 block
# b = 8 * (i // 32) + i % 8, with key = seed and counter = (lo32(b), hi32(b), lo32(offset),
# hi32(offset)): ATen's philox_engine(seed, offset, b). It is kept iff that word is below
# floor((1 - p) * 2**32). Values are uint32 held in int64 tensors.

_PHILOX_MUL_A, _PHILOX_MUL_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def _mulhilo(m: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """Low and high 32 bits of m * x (32-bit m, x), without overflowing int64."""
    high_part, low_part = m * (x >> 16), m * (x & 0xFFFF)  # each < 2**48
    return (((high_part & 0xFFFF) << 16) + low_part) & _U32, (high_part + (low_part >> 16)) >> 16


def philox_words(numel: int, seed: int, offset: int) -> Tensor:
    """The stream's 32-bit word of each of numel elements (int64 tensor on the CPU)."""
    groups = -(-numel // 32)
    block = torch.arange(8 * groups, dtype=torch.int64)  # block 8g + j: group g, lane j
    c0, c1 = block & _U32, block >> 32
    c2, c3 = torch.full_like(block, offset & _U32), torch.full_like(block, (offset >> 32) & _U32)
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(10):
        lo0, hi0 = _mulhilo(_PHILOX_MUL_A, c0)
        lo1, hi1 = _mulhilo(_PHILOX_MUL_B, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_KEY_A) & _U32, (k1 + _PHILOX_KEY_B) & _U32
    # words[k][8g + j] belongs to element 32g + 8k + j.
    return torch.stack([c0, c1, c2, c3]).view(4, groups, 8).transpose(0, 1).reshape(-1)[:numel]


def dropout_keep(input: Tensor, p: float, seed_offset: Tensor) -> Tensor:
    """Bool tensor of input's shape: which elements the stream keeps."""
    seed, offset = seed_offset.tolist()  # a host sync for a GPU pair: the native kernel reads it there
    threshold = int((1.0 - p) * 4294967296.0)
    return (philox_words(input.numel(), seed, offset) < threshold).view(input.shape).to(input.device)


def dropout(input: Tensor, p: float, seed_offset: Tensor) -> Tensor:
    """input * keep / (1 - p), in the op-math type; dropped elements are multiplied by 0 (a nan
    stays nan, as in torch). The result has the input's layout (torch.empty_like's), as torch's."""
    checks.check_dropout_args(input, p, seed_offset)
    x = input.to(opmath_dtype(input.dtype))
    scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
    multiplier = dropout_keep(input, p, seed_offset).to(x.dtype) * scale
    return torch.empty_like(input).copy_(x * multiplier)


def dropout_(input: Tensor, p: float, seed_offset: Tensor) -> None:
    checks.check_dropout_args(input, p, seed_offset)
    checks.check_writable([input], "input")
    input.copy_(dropout(input, p, seed_offset))


def dropout_mask(input: Tensor, p: float, seed_offset: Tensor) -> Tensor:
    """The keep mask packed 8 elements a byte: bit i % 8 of byte i // 8 (uint8, zero-padded)."""
    checks.check_dropout_args(input, p, seed_offset)
    keep = dropout_keep(input, p, seed_offset).reshape(-1).to(torch.uint8)
    padded = torch.zeros(-(-keep.numel() // 8) * 8, dtype=torch.uint8, device=keep.device)
    padded[: keep.numel()] = keep
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=keep.device)
    return (padded.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


# ---------------------------------------------------------------- structured_dropout


def group_multipliers_like(input: Tensor, group_dims: int) -> Tensor:
    """An uninitialized tensor of the groups' multipliers' shape (the input's first group_dims
    sizes, then ones: it broadcasts against the input) and dtype, contiguous."""
    shape = tuple(input.shape[:group_dims]) + (1,) * (input.dim() - group_dims)
    return torch.empty(shape, dtype=input.dtype, device=input.device)


def group_multipliers(input: Tensor, group_dims: int, p: float, scale: bool, seed_offset: Tensor) -> Tensor:
    """One multiplier per group (an index into the first group_dims dims, in row-major order):
    element g of the dropout stream decides group g; kept groups get 1 / (1 - p) rounded to the
    input's dtype (1 without `scale`), dropped ones 0. Shaped as group_multipliers_like."""
    m = dropout(torch.ones_like(group_multipliers_like(input, group_dims)), p, seed_offset)
    return m if scale else (m != 0).to(input.dtype)


def drop_groups(input: Tensor, group_dims: int, p: float, scale: bool, seed_offset: Tensor) -> Tensor:
    checks.check_drop_groups_args(input, group_dims, p, seed_offset)
    return input * group_multipliers(input, group_dims, p, scale, seed_offset)


def drop_groups_(input: Tensor, group_dims: int, p: float, scale: bool, seed_offset: Tensor) -> None:
    checks.check_drop_groups_args(input, group_dims, p, seed_offset)
    checks.check_writable([input], "input")
    input.mul_(group_multipliers(input, group_dims, p, scale, seed_offset))


def drop_groups_add(x: Tensor, branch: Tensor, group_dims: int, p: float, scale: bool, seed_offset: Tensor) -> Tensor:
    """x + drop_groups(branch), in one addcmul (the product is not rounded before the sum)."""
    checks.check_drop_groups_add_args(x, branch, group_dims, p, seed_offset)
    return torch.addcmul(x, branch, group_multipliers(branch, group_dims, p, scale, seed_offset))
