"""The argument checks of every fused_optim op in Python, and the dtype rules they and the kernels
share: what the reference kernels, the fake kernels (torch.compile) and the Python wrappers refuse,
with the exception types and messages of the native checks (csrc/common; tests/ops/test_check_parity.py
holds the two to the same inputs). Where torch has a message for the same refusal, it is torch's.

Sections follow the op families: dtypes and lists (shared), regularization, clip_grad, pre_step,
averaging, dropout, structured_dropout.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# ---------------------------------------------------------------- dtypes and lists (shared)

FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
"""The dtypes every op takes (not fp8, which the kernels are not built for)."""


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype math is done in for tensors of `dtype`."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def reduction_dtype(tensors: list[Tensor]) -> torch.dtype:
    """Dtype of a reduction over `tensors`: promoted op-math type, fp32 for an empty list."""
    dtype = torch.float32 if not tensors else opmath_dtype(tensors[0].dtype)
    for t in tensors:
        dtype = torch.promote_types(dtype, opmath_dtype(t.dtype))
    return dtype


def check_floating_list(tensors: list[Tensor], name: str) -> None:
    for i, t in enumerate(tensors):
        if t.dtype not in FLOATING:
            raise TypeError(
                f"{name}[{i}] must be a real floating tensor (fp32, fp64, fp16 or bf16), got {t.dtype}"
            )
        if t.device != tensors[0].device:
            raise RuntimeError(
                f"{name} must all be on one device, but {name}[0] is on {tensors[0].device} "
                f"and {name}[{i}] is on {t.device}"
            )


def check_paired_lists(params: list[Tensor], grads: list[Tensor], names=("params", "grads")) -> None:
    if len(params) != len(grads):
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same length, got {len(params)} and {len(grads)}"
        )
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.shape != g.shape or p.dtype != g.dtype or p.device != g.device:
            raise RuntimeError(
                f"{names[1]}[{i}] must match {names[0]}[{i}] in shape, dtype and device: got "
                f"{g.dtype}{list(g.shape)} on {g.device} for {p.dtype}{list(p.shape)} on {p.device}"
            )


def check_writable(tensors: list[Tensor], name: str) -> None:
    """No two elements of a written tensor share memory (an expanded tensor, say), as torch
    requires of the target of an in-place op (ATen's has_internal_overlap == YES)."""
    for i, t in enumerate(tensors):
        strides = t.stride()
        if 0 in strides and any(stride == 0 and size > 1 for size, stride in zip(t.shape, strides)):
            raise RuntimeError(
                f"{name}[{i}]: unsupported operation: more than one element of the written-to tensor refers to a "
                "single memory location. Please clone() the tensor before performing the operation."
            )


def non_overlapping_and_dense(t: Tensor) -> bool:
    """Whether t's elements fill one block of memory in some order of its dims (ATen's rule)."""
    expected = 1
    for size, stride in sorted(((n, s) for n, s in zip(t.shape, t.stride()) if n != 1), key=lambda d: (d[1], d[0])):
        if stride != expected:
            return False
        expected *= size
    return True


def _partially_overlap(a: Tensor, b: Tensor) -> bool:
    """ATen's get_overlap_status(a, b) == PARTIAL: dense tensors of one storage whose byte ranges
    meet without being the same memory laid out the same way (other layouts are not decided)."""
    # Tensors of two storages cannot overlap: the usual case, decided first.
    if a is b or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    if not a.numel() or not b.numel():
        return False
    if not (non_overlapping_and_dense(a) and non_overlapping_and_dense(b)):
        return False
    a_begin, b_begin = a.data_ptr(), b.data_ptr()
    a_end, b_end = a_begin + a.numel() * a.element_size(), b_begin + b.numel() * b.element_size()
    if (a_begin, a_end) == (b_begin, b_end):
        return a.stride() != b.stride()
    return a_begin < b_end and b_begin < a_end


def check_same_or_disjoint(written: list[Tensor], written_name: str, read: list[Tensor], read_name: str) -> None:
    """Each read[i] that written[i] is computed from is the same memory or disjoint from it."""
    for i, (w, r) in enumerate(zip(written, read)):
        if _partially_overlap(w, r):
            raise RuntimeError(
                f"{written_name}[{i}] and {read_name}[{i}]: unsupported operation: some elements of the input "
                "tensor and the written-to tensor refer to a single memory location. Please clone() the tensor "
                "before performing the operation."
            )


# ---------------------------------------------------------------- regularization


def check_coefficient(value: float, name: str) -> None:
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def check_penalty_args(tensors: list[Tensor], l1: float, l2: float) -> None:
    """l1l2_penalty's checks."""
    check_coefficient(l1, "l1")
    check_coefficient(l2, "l2")
    check_floating_list(tensors, "tensors")


def check_penalty_backward_args(grad_out: Tensor, tensors: list[Tensor], l1: float, l2: float) -> None:
    """l1l2_penalty_backward's checks: the penalty's, and a one-element grad_out."""
    check_penalty_args(tensors, l1, l2)
    if grad_out.numel() != 1:
        raise RuntimeError(f"grad_out must hold one element, got shape {list(grad_out.shape)}")


def check_l1l2_grad_meta(params: list[Tensor], grads: list[Tensor], l1: float, l2: float) -> None:
    """l1l2_grad_'s checks that read no memory (the fake kernel's)."""
    check_coefficient(l1, "l1")
    check_coefficient(l2, "l2")
    check_floating_list(params, "params")
    check_paired_lists(params, grads)


def check_l1l2_grad_args(params: list[Tensor], grads: list[Tensor], l1: float, l2: float) -> None:
    """l1l2_grad_'s checks: the above, and the gradients' memory (writable, apart from params)."""
    check_l1l2_grad_meta(params, grads, l1, l2)
    check_writable(grads, "grads")
    check_same_or_disjoint(grads, "grads", params, "params")


# ---------------------------------------------------------------- clip_grad


def norm_dtype(tensors: list[Tensor]) -> torch.dtype:
    """Dtype of a norm over `tensors`, as torch.nn.utils.get_total_norm returns it: the promoted
    dtype of the tensors (fp16 for fp16 gradients), fp32 for an empty list."""
    dtype = tensors[0].dtype if tensors else torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def check_norm_type(norm_type: float) -> None:
    if math.isnan(norm_type):
        raise ValueError("norm_type must be a number, got nan")


def check_norm_defined(tensors: list[Tensor], norm_type: float) -> None:
    """inf, -inf and p < 0 (a max, a min, a sum of 1/|x|^|p|) have no identity: an empty tensor has
    no such norm, and torch.linalg.vector_norm refuses it."""
    if norm_type < 0 or norm_type == math.inf:
        for i, t in enumerate(tensors):
            if t.numel() == 0:
                raise RuntimeError(
                    f"tensors[{i}] is empty: linalg.vector_norm cannot compute the {norm_type:g} norm on an empty "
                    "tensor because the operation does not have an identity"
                )


def check_norm_args(tensors: list[Tensor], norm_type: float) -> None:
    """multi_tensor_norm's checks."""
    check_norm_type(norm_type)
    check_floating_list(tensors, "tensors")
    check_norm_defined(tensors, norm_type)


def nonfinite_norm_message(norm_type: float) -> str:
    """torch.nn.utils' error for a non-finite total norm."""
    return (
        f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it "
        "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
        "anyway, set `error_if_nonfinite=False`"
    )


def check_scale_args(tensors: list[Tensor], scale: Tensor) -> None:
    """multi_tensor_scale_'s checks."""
    check_floating_list(tensors, "tensors")
    check_writable(tensors, "tensors")
    if scale.numel() != 1:
        raise RuntimeError(f"scale must hold one element, got shape {list(scale.shape)}")


def check_clip_value(grads: list[Tensor], clip_value: float) -> None:
    """clip_value converts to every gradient's dtype, as torch.clamp_'s scalar bounds must (nan and
    +-inf do; a finite value beyond the dtype's range does not)."""
    for i, g in enumerate(grads):
        if math.isfinite(clip_value) and abs(clip_value) > torch.finfo(g.dtype).max:
            raise RuntimeError(
                f"clip_value {clip_value} cannot be converted to type {g.dtype} of grads[{i}] without overflow"
            )


def check_clip_value_args(grads: list[Tensor], clip_value: float) -> None:
    """clip_grad_value_'s checks (the fake kernel's without the memory rule)."""
    check_floating_list(grads, "grads")
    check_writable(grads, "grads")
    check_clip_value(grads, clip_value)


# ---------------------------------------------------------------- pre_step


def check_one_clip(max_norm, clip_value) -> None:
    if max_norm is not None and clip_value is not None:
        raise ValueError("pre_step_: pass max_norm or clip_value, not both")


def check_pre_step_meta(params, grads, l1, l2, max_norm, norm_type, clip_value) -> None:
    """pre_step_'s checks that read no memory (the fake kernel's): l1l2_grad_'s, the norm's, and
    the clamp's for clip_value."""
    check_coefficient(l1, "l1")
    check_coefficient(l2, "l2")
    check_norm_type(norm_type)
    check_one_clip(max_norm, clip_value)
    check_floating_list(params, "params")
    check_paired_lists(params, grads)
    check_norm_defined(grads, norm_type)
    if clip_value is not None:
        check_clip_value(grads, clip_value)


def check_pre_step_args(params, grads, l1, l2, max_norm, norm_type, clip_value) -> None:
    """pre_step_'s checks: the above, and the gradients' memory (writable, apart from params).
    fused_optim/pre_step.py runs them alone before the paths that write in several calls."""
    check_pre_step_meta(params, grads, l1, l2, max_norm, norm_type, clip_value)
    check_writable(grads, "grads")
    check_same_or_disjoint(grads, "grads", params, "params")


# ---------------------------------------------------------------- averaging


def check_weighted_sum_args(inputs: list[Tensor], weights: list[float], out: list[Tensor]) -> None:
    """multi_tensor_weighted_sum_'s checks that read no memory (the fake kernel's)."""
    if not weights:
        raise ValueError("weights must hold one weight per input list, got none")
    for m, w in enumerate(weights):
        if not math.isfinite(w):
            raise ValueError(f"weights[{m}] must be finite, got {w}")
    if len(inputs) != len(weights) * len(out):
        raise ValueError(
            f"inputs must hold len(weights) * len(out) = {len(weights) * len(out)} tensors "
            f"(one list per weight, laid end to end), got {len(inputs)}"
        )
    check_floating_list(out, "out")
    n = len(out)
    for m in range(len(weights)):
        check_paired_lists(out, inputs[m * n : (m + 1) * n], names=("out", f"inputs (list {m})"))


def check_weighted_sum_memory(inputs: list[Tensor], weights: list[float], out: list[Tensor]) -> None:
    """The rest: out writable, each input out[i] itself or disjoint from it."""
    n = len(out)
    check_writable(out, "out")
    for m in range(len(weights)):
        check_same_or_disjoint(out, "out", inputs[m * n : (m + 1) * n], f"inputs (list {m})")


def num_outputs(inputs: list[Tensor], weights: list[float]) -> int:
    """len(inputs) / len(weights): the length of each of the lists laid end to end."""
    if not weights or len(inputs) % len(weights):
        raise ValueError(
            f"inputs must hold len(weights) lists of equal length, got {len(inputs)} tensors for {len(weights)} weights"
        )
    return len(inputs) // len(weights)


def check_lerp_args(self: list[Tensor], end: list[Tensor], weight: Tensor) -> None:
    """multi_tensor_lerp_'s checks that read no memory (the fake kernel's). weight: a one-element
    floating tensor on the CPU or on self's device (a weight computed on the GPU spares a host
    sync). Its value is checked by check_lerp_weight_value, not here (fake tensors)."""
    if weight.numel() != 1 or not weight.is_floating_point():
        raise RuntimeError(f"weight must be a floating tensor of one element, got {weight.dtype}{list(weight.shape)}")
    if self and weight.device.type != "cpu" and weight.device != self[0].device:
        raise RuntimeError(f"weight must be on the CPU or on {self[0].device} (self's device), got {weight.device}")
    check_floating_list(self, "self")
    check_paired_lists(self, end, names=("self", "end"))


def check_lerp_memory(self: list[Tensor], end: list[Tensor]) -> None:
    """self writable, each end[i] self[i] itself or disjoint from it."""
    check_writable(self, "self")
    check_same_or_disjoint(self, "self", end, "end")


def check_lerp_weight_value(weight: Tensor) -> float:
    """The weight's value (a host sync for a GPU weight); a CPU weight must be finite (the kernels
    read only a CPU weight on the host)."""
    w = weight.item()
    if weight.device.type == "cpu" and not math.isfinite(w):
        raise ValueError(f"weight must be finite, got {w}")
    return w


# ---------------------------------------------------------------- dropout


def check_dropout_args(input: Tensor, p: float, seed_offset: Tensor) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if input.dtype not in FLOATING:
        raise TypeError(f"input must be a real floating tensor (fp32, fp64, fp16 or bf16), got {input.dtype}")
    if (
        seed_offset.dtype != torch.int64
        or seed_offset.numel() != 2
        or not (seed_offset.device.type == "cpu" or seed_offset.device == input.device)  # the native ops' rule
    ):
        raise RuntimeError(
            f"seed_offset must be an int64 tensor of 2 elements on the CPU or on {input.device}, got "
            f"{seed_offset.dtype}{list(seed_offset.shape)} on {seed_offset.device}"
        )


# ---------------------------------------------------------------- structured_dropout


def check_drop_groups_args(input: Tensor, group_dims: int, p: float, seed_offset: Tensor) -> None:
    check_dropout_args(input, p, seed_offset)
    if not 0 <= group_dims <= input.dim():
        raise ValueError(f"group_dims must be between 0 and input.dim() = {input.dim()}, got {group_dims}")


def check_drop_groups_add_args(x: Tensor, branch: Tensor, group_dims: int, p: float, seed_offset: Tensor) -> None:
    check_drop_groups_args(branch, group_dims, p, seed_offset)
    if x.shape != branch.shape:
        raise ValueError(f"x and branch must have the same shape, got {list(x.shape)} and {list(branch.shape)}")
    if x.dtype != branch.dtype:
        raise TypeError(f"x and branch must have the same dtype, got {x.dtype} and {branch.dtype}")
    if x.device != branch.device:
        raise RuntimeError(f"x and branch must be on the same device, got {x.device} and {branch.device}")
