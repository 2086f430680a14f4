"""The argument checks are written once per language (C++: csrc/common; Python:
fused_optim/checks.py): both must refuse the same inputs with the same exception type and message.
Each bad input runs through the native CPU kernel (the C++ checks; called through the dispatcher's
CPU key, so that a tensor on the 'meta' device stands for a second device) and through the
reference kernel (the Python checks). Without the extension (the FUSED_OPTIM_DISABLE_EXT=1 run) only
the Python half runs, and must raise the expected exception type."""

from __future__ import annotations

import math

import pytest
import torch

from fused_optim import _library, checks, reference

CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
SEED_OFFSET = torch.tensor([1, 2], dtype=torch.int64)


def f(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(shape or (3,), dtype=dtype, device=device)


def meta(*shape, dtype=torch.float32):
    return f(*shape, dtype=dtype, device="meta")


def expanded():
    return torch.zeros(1).expand(3)


def overlapping_pair():
    """(written, read): 3 elements of one storage, shifted by one (a partial overlap)."""
    base = torch.zeros(4)
    return base[1:], base[:3]


def _aliasing_grad_args():
    g, p = overlapping_pair()
    return [p], [g], 0.1, 0.1


def _aliasing_pre_step_args():
    g, p = overlapping_pair()
    return [p], [g], 0.1, 0.1, None, 2.0, None, False


def _aliasing_weighted_sum_args():
    out, x = overlapping_pair()
    return [x], [1.0], [out]


def _aliasing_lerp_args():
    s, e = overlapping_pair()
    return [s], [e], torch.tensor(0.5)


def pre_step(params, grads, l1=0.0, l2=0.0, max_norm=None, norm_type=2.0, clip_value=None):
    return params, grads, l1, l2, max_norm, norm_type, clip_value, False


# (op, case, arguments (built per call: kernels write), exception type). The first section per
# family covers what every op of the family shares.
CASES = [
    # regularization
    ("l1l2_penalty", "int dtype", lambda: ([f(), f(dtype=torch.int32)], 0.1, 0.1), TypeError),
    ("l1l2_penalty", "mixed devices", lambda: ([f(), meta()], 0.1, 0.1), RuntimeError),
    ("l1l2_penalty", "negative l1", lambda: ([f()], -1.0, 0.1), ValueError),
    ("l1l2_penalty", "nan l1", lambda: ([f()], math.nan, 0.1), ValueError),
    ("l1l2_penalty", "inf l2", lambda: ([f()], 0.1, math.inf), ValueError),
    ("l1l2_penalty", "tiny negative l2", lambda: ([f()], 0.1, -1.5e-7), ValueError),
    ("l1l2_penalty_backward", "grad_out of 2 elements", lambda: (f(2), [f()], 0.1, 0.1), RuntimeError),
    ("l1l2_penalty_backward", "int dtype", lambda: (torch.zeros(()), [f(dtype=torch.int64)], 0.1, 0.1), TypeError),
    ("l1l2_penalty_backward", "negative l2", lambda: (torch.zeros(()), [f()], 0.1, -2.0), ValueError),
    ("l1l2_grad_", "int params", lambda: ([f(dtype=torch.int32)], [f(dtype=torch.int32)], 0.1, 0.1), TypeError),
    ("l1l2_grad_", "mixed devices", lambda: ([f(), meta()], [f(), meta()], 0.1, 0.1), RuntimeError),
    ("l1l2_grad_", "length mismatch", lambda: ([f(), f()], [f()], 0.1, 0.1), ValueError),
    ("l1l2_grad_", "empty params", lambda: ([], [f()], 0.1, 0.1), ValueError),
    ("l1l2_grad_", "shape mismatch", lambda: ([f(3)], [f(2, 3)], 0.1, 0.1), RuntimeError),
    ("l1l2_grad_", "dtype mismatch", lambda: ([f()], [f(dtype=torch.float64)], 0.1, 0.1), RuntimeError),
    ("l1l2_grad_", "device mismatch", lambda: ([f()], [meta()], 0.1, 0.1), RuntimeError),
    ("l1l2_grad_", "negative l1", lambda: ([f()], [f()], -0.5, 0.1), ValueError),
    ("l1l2_grad_", "expanded grad", lambda: ([f()], [expanded()], 0.1, 0.1), RuntimeError),
    ("l1l2_grad_", "grad overlapping its param", _aliasing_grad_args, RuntimeError),
    # clip_grad
    ("multi_tensor_norm", "nan norm_type", lambda: ([f()], math.nan, False, False), ValueError),
    ("multi_tensor_norm", "int dtype", lambda: ([f(dtype=torch.int16)], 2.0, False, False), TypeError),
    ("multi_tensor_norm", "bool dtype", lambda: ([f(dtype=torch.bool)], 2.0, False, False), TypeError),
    ("multi_tensor_norm", "mixed devices", lambda: ([f(), meta()], 2.0, True, False), RuntimeError),
    ("multi_tensor_norm", "inf norm of an empty tensor", lambda: ([f(), f(0)], math.inf, False, False), RuntimeError),
    ("multi_tensor_norm", "-1 norm of an empty tensor", lambda: ([f(0)], -1.0, False, False), RuntimeError),
    ("multi_tensor_norm", "-0.5 norm of an empty tensor", lambda: ([f(0)], -0.5, False, False), RuntimeError),
    ("multi_tensor_scale_", "int dtype", lambda: ([f(dtype=torch.uint8)], torch.tensor(0.5)), TypeError),
    ("multi_tensor_scale_", "scale of 2 elements", lambda: ([f()], torch.ones(2)), RuntimeError),
    ("multi_tensor_scale_", "expanded tensor", lambda: ([f(), expanded()], torch.tensor(0.5)), RuntimeError),
    ("clip_grad_norm_", "nan norm_type", lambda: ([f()], 1.0, math.nan, False), ValueError),
    ("clip_grad_norm_", "int dtype", lambda: ([f(dtype=torch.int32)], 1.0, 2.0, False), TypeError),
    ("clip_grad_norm_", "expanded grad", lambda: ([expanded()], 1.0, 2.0, False), RuntimeError),
    ("clip_grad_norm_", "inf norm of an empty grad", lambda: ([f(0)], 1.0, math.inf, False), RuntimeError),
    ("clip_grad_norm_", "nonfinite total", lambda: ([torch.full((3,), math.inf)], 1.0, 2.0, True), RuntimeError),
    ("clip_grad_norm_", "nonfinite 1e16 norm", lambda: ([torch.full((3,), math.nan)], 1.0, 1e16, True), RuntimeError),
    ("clip_grad_norm_", "nonfinite 0.1 norm", lambda: ([torch.full((3,), math.nan)], 1.0, 0.1, True), RuntimeError),
    ("clip_grad_value_", "int dtype", lambda: ([f(dtype=torch.int32)], 1.0), TypeError),
    ("clip_grad_value_", "expanded grad", lambda: ([expanded()], 1.0), RuntimeError),
    ("clip_grad_value_", "clip beyond fp16", lambda: ([f(), f(dtype=torch.float16)], 70000.0), RuntimeError),
    ("clip_grad_value_", "clip beyond -fp16", lambda: ([f(dtype=torch.float16)], -65520.5), RuntimeError),
    ("clip_grad_value_", "clip beyond bf16", lambda: ([f(dtype=torch.bfloat16)], 1e39), RuntimeError),
    ("clip_grad_value_", "clip beyond fp32", lambda: ([f()], 3.5e38), RuntimeError),
    # pre_step
    ("pre_step_", "two clips", lambda: pre_step([f()], [f()], max_norm=1.0, clip_value=1.0), ValueError),
    ("pre_step_", "negative l1", lambda: pre_step([f()], [f()], l1=-1.0), ValueError),
    ("pre_step_", "nan l2", lambda: pre_step([f()], [f()], l2=math.nan), ValueError),
    ("pre_step_", "nan norm_type", lambda: pre_step([f()], [f()], norm_type=math.nan), ValueError),
    ("pre_step_", "int params", lambda: pre_step([f(dtype=torch.int32)], [f(dtype=torch.int32)]), TypeError),
    ("pre_step_", "mixed devices", lambda: pre_step([f(), meta()], [f(), meta()]), RuntimeError),
    ("pre_step_", "length mismatch", lambda: pre_step([f()], []), ValueError),
    ("pre_step_", "shape mismatch", lambda: pre_step([f(3)], [f(4)]), RuntimeError),
    ("pre_step_", "dtype mismatch", lambda: pre_step([f()], [f(dtype=torch.bfloat16)]), RuntimeError),
    ("pre_step_", "device mismatch", lambda: pre_step([f()], [meta()]), RuntimeError),
    ("pre_step_", "-inf norm of an empty grad", lambda: pre_step([f(0)], [f(0)], norm_type=-math.inf), RuntimeError),
    ("pre_step_", "clip beyond fp16", lambda: pre_step([f(dtype=torch.float16)], [f(dtype=torch.float16)],
                                                       clip_value=1e5), RuntimeError),
    ("pre_step_", "expanded grad", lambda: pre_step([f()], [expanded()]), RuntimeError),
    ("pre_step_", "grad overlapping its param", _aliasing_pre_step_args, RuntimeError),
    ("pre_step_", "nonfinite total", lambda: pre_step([f()], [torch.full((3,), math.nan)])[:7] + (True,), RuntimeError),
    # averaging
    ("multi_tensor_weighted_sum_", "no weights", lambda: ([f()], [], [f()]), ValueError),
    ("multi_tensor_weighted_sum_", "nan weight", lambda: ([f(), f()], [0.5, math.nan], [f()]), ValueError),
    ("multi_tensor_weighted_sum_", "inf weight", lambda: ([f()], [-math.inf], [f()]), ValueError),
    ("multi_tensor_weighted_sum_", "inputs length", lambda: ([f(), f(), f()], [0.5, 0.5], [f()]), ValueError),
    ("multi_tensor_weighted_sum_", "int out", lambda: ([f(dtype=torch.int32)], [1.0], [f(dtype=torch.int32)]),
     TypeError),
    ("multi_tensor_weighted_sum_", "mixed devices", lambda: ([f(), meta()], [1.0], [f(), meta()]), RuntimeError),
    ("multi_tensor_weighted_sum_", "shape mismatch", lambda: ([f(), f(4)], [0.5, 0.5], [f()]), RuntimeError),
    ("multi_tensor_weighted_sum_", "dtype mismatch", lambda: ([f(dtype=torch.float16)], [1.0], [f()]), RuntimeError),
    ("multi_tensor_weighted_sum_", "expanded out", lambda: ([f()], [1.0], [expanded()]), RuntimeError),
    ("multi_tensor_weighted_sum_", "out overlapping an input", _aliasing_weighted_sum_args, RuntimeError),
    ("multi_tensor_weighted_sum", "no weights", lambda: ([f()], []), ValueError),
    ("multi_tensor_weighted_sum", "uneven lists", lambda: ([f(), f(), f()], [0.5, 0.5]), ValueError),
    ("multi_tensor_weighted_sum", "nan weight", lambda: ([f()], [math.nan]), ValueError),
    ("multi_tensor_weighted_sum", "int inputs", lambda: ([f(dtype=torch.int64)], [1.0]), TypeError),
    ("multi_tensor_lerp_", "weight of 2 elements", lambda: ([f()], [f()], torch.ones(2)), RuntimeError),
    ("multi_tensor_lerp_", "int weight", lambda: ([f()], [f()], torch.tensor(1)), RuntimeError),
    ("multi_tensor_lerp_", "weight on another device", lambda: ([f()], [f()], torch.zeros((), device="meta")), RuntimeError),
    ("multi_tensor_lerp_", "nan weight", lambda: ([f()], [f()], torch.tensor(math.nan)), ValueError),
    ("multi_tensor_lerp_", "inf weight", lambda: ([f()], [f()], torch.tensor(-math.inf, dtype=torch.float64)),
     ValueError),
    ("multi_tensor_lerp_", "int self", lambda: ([f(dtype=torch.int32)], [f(dtype=torch.int32)], torch.tensor(0.5)),
     TypeError),
    ("multi_tensor_lerp_", "mixed devices", lambda: ([f(), meta()], [f(), meta()], torch.tensor(0.5)), RuntimeError),
    ("multi_tensor_lerp_", "length mismatch", lambda: ([f()], [f(), f()], torch.tensor(0.5)), ValueError),
    ("multi_tensor_lerp_", "shape mismatch", lambda: ([f(2, 2)], [f(4)], torch.tensor(0.5)), RuntimeError),
    ("multi_tensor_lerp_", "expanded self", lambda: ([expanded()], [f()], torch.tensor(0.5)), RuntimeError),
    ("multi_tensor_lerp_", "self overlapping end", _aliasing_lerp_args, RuntimeError),
    # dropout
    ("dropout", "negative p", lambda: (f(), -0.1, SEED_OFFSET), ValueError),
    ("dropout", "p above 1", lambda: (f(), 2.0, SEED_OFFSET), ValueError),
    ("dropout", "nan p", lambda: (f(), math.nan, SEED_OFFSET), ValueError),
    ("dropout", "int input", lambda: (f(dtype=torch.int32), 0.5, SEED_OFFSET), TypeError),
    ("dropout", "int32 seed_offset", lambda: (f(), 0.5, SEED_OFFSET.int()), RuntimeError),
    ("dropout", "seed_offset of 3 elements", lambda: (f(), 0.5, torch.zeros(3, dtype=torch.int64)), RuntimeError),
    ("dropout_", "p above 1", lambda: (f(), 1.5, SEED_OFFSET), ValueError),
    ("dropout_", "int input", lambda: (f(dtype=torch.int64), 0.5, SEED_OFFSET), TypeError),
    ("dropout_", "expanded input", lambda: (expanded(), 0.5, SEED_OFFSET), RuntimeError),
    ("dropout_mask", "p above 1", lambda: (f(), 1.0000001, SEED_OFFSET), ValueError),
    ("dropout_mask", "int input", lambda: (f(dtype=torch.int8), 0.5, SEED_OFFSET), TypeError),
    ("dropout_mask", "seed_offset on another device", lambda: (f(), 0.5, meta(2, dtype=torch.int64)), RuntimeError),
    # structured_dropout
    ("drop_groups", "negative group_dims", lambda: (f(2, 3), -1, 0.5, True, SEED_OFFSET), ValueError),
    ("drop_groups", "group_dims above dim", lambda: (f(2, 3), 3, 0.5, True, SEED_OFFSET), ValueError),
    ("drop_groups", "p above 1", lambda: (f(2, 3), 1, 3.0, True, SEED_OFFSET), ValueError),
    ("drop_groups", "int input", lambda: (f(2, 3, dtype=torch.int32), 1, 0.5, True, SEED_OFFSET), TypeError),
    ("drop_groups_", "group_dims above dim", lambda: (f(2, 3), 5, 0.5, False, SEED_OFFSET), ValueError),
    ("drop_groups_", "expanded input", lambda: (torch.zeros(2, 1).expand(2, 3), 1, 0.5, True, SEED_OFFSET),
     RuntimeError),
    ("drop_groups_add", "shape mismatch", lambda: (f(2, 4), f(2, 3), 1, 0.5, True, SEED_OFFSET), ValueError),
    ("drop_groups_add", "dtype mismatch", lambda: (f(2, 3, dtype=torch.float64), f(2, 3), 1, 0.5, True, SEED_OFFSET),
     TypeError),
    ("drop_groups_add", "device mismatch", lambda: (meta(2, 3), f(2, 3), 1, 0.5, True, SEED_OFFSET), RuntimeError),
    ("drop_groups_add", "group_dims above dim", lambda: (f(2, 3), f(2, 3), 3, 0.5, True, SEED_OFFSET), ValueError),
    ("drop_groups_add", "negative p", lambda: (f(2, 3), f(2, 3), 1, -1.0, True, SEED_OFFSET), ValueError),
]

# Cases where the two sides still differ in wording (same exception type): the CPU kernel's own
# seed_offset check (csrc/cpu/dropout.cpp: "a CPU int64 tensor of 2 elements, got CPUIntType[2]")
# is not the shared one of csrc/common yet.
MESSAGE_DIFFERS = {
    ("dropout", "int32 seed_offset"),
    ("dropout", "seed_offset of 3 elements"),
    ("dropout_mask", "seed_offset on another device"),
}


def _refusal(call) -> tuple[type, str]:
    with pytest.raises(Exception) as info:
        call()
    # TORCH_SHOW_CPP_STACKTRACES=1 appends the C++ stack to c10's messages.
    return info.type, str(info.value).split("\nException raised from ")[0]


def _has_native_cpu_kernel(op: str) -> bool:
    return _library._C is not None and _library.kernel_for(op, "cpu") == "native"


@pytest.mark.parametrize("op, case, args, error", CASES, ids=[f"{op}-{case}" for op, case, _, _ in CASES])
def test_native_and_python_checks_refuse_alike(op, case, args, error):
    python = _refusal(lambda: getattr(reference, op)(*args()))
    assert python[0] is error, python
    if op == "pre_step_" and case != "nonfinite total":
        # What fused_optim/pre_step.py runs before writing in several calls: the same refusal.
        assert _refusal(lambda: checks.check_pre_step_args(*args()[:7])) == python
    if not _has_native_cpu_kernel(op):
        return  # the reference-only run: the Python half alone
    native = _refusal(lambda: getattr(torch.ops.fused_optim, op).default.redispatch(CPU_KEYS, *args()))
    assert native[0] is python[0], (native, python)
    if (op, case) in MESSAGE_DIFFERS:
        assert native[1] != python[1], f"{op}: {case} agrees now: drop it from MESSAGE_DIFFERS"
        pytest.xfail(f"{op}: {case}: the C++ message is still {native[1]!r}")
    assert native[1] == python[1]


@pytest.mark.parametrize("value", [-1.0, -2.0, -0.1, -1e-4, -1e-5, -1.5e-7, -123456.789, -123.0, -1e15, -1e16, -1e22,
                                   -1.7976931348623157e308, -5e-324, -2.0 / 3.0, -65504.0, -0.0 - 70000.0])
def test_native_messages_print_floats_as_python(value):
    # The C++ checks print floats as Python's repr (csrc/common/tensor_list.cpp: python_float).
    if not _has_native_cpu_kernel("l1l2_penalty"):
        pytest.skip("native extension not loaded")
    _, message = _refusal(lambda: torch.ops.fused_optim.l1l2_penalty.default.redispatch(CPU_KEYS, [f()], 0.1, value))
    assert message == f"l2 must be a finite number >= 0, got {value!r}"
