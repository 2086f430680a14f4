"""The fused_optim op library, in one place: every schema of the `fused_optim` namespace, the
reference kernels (registered for every device), the fake kernels for torch.compile, autograd, and
the loading of the native extension fused_optim._C, whose C++/CUDA kernels take over the devices
they register for.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from . import reference

_lib = torch.library.Library("fused_optim", "DEF")

# One row per op: name -> schema. The reference kernel is reference.<name>.
SCHEMAS = {
    "l1l2_penalty": "l1l2_penalty(Tensor[] tensors, float l1, float l2) -> Tensor",
    "l1l2_penalty_backward": (
        "l1l2_penalty_backward(Tensor grad_out, Tensor[] tensors, float l1, float l2) -> Tensor[]"
    ),
    "l1l2_grad_": "l1l2_grad_(Tensor[] params, Tensor(a!)[] grads, float l1, float l2) -> ()",
    "multi_tensor_norm": (
        "multi_tensor_norm(Tensor[] tensors, float norm_type, bool per_tensor, bool error_if_nonfinite=False)"
        " -> (Tensor, Tensor)"
    ),
    "multi_tensor_scale_": "multi_tensor_scale_(Tensor(a!)[] tensors, Tensor scale) -> ()",
    "clip_grad_norm_": (
        "clip_grad_norm_(Tensor(a!)[] grads, float max_norm, float norm_type, bool error_if_nonfinite)"
        " -> Tensor"
    ),
    "clip_grad_value_": "clip_grad_value_(Tensor(a!)[] grads, float clip_value) -> ()",
    "multi_tensor_weighted_sum": "multi_tensor_weighted_sum(Tensor[] inputs, float[] weights) -> Tensor[]",
    "multi_tensor_weighted_sum_": (
        "multi_tensor_weighted_sum_(Tensor[] inputs, float[] weights, Tensor(a!)[] out) -> ()"
    ),
    "multi_tensor_lerp_": "multi_tensor_lerp_(Tensor(a!)[] self, Tensor[] end, Tensor weight) -> ()",
    "dropout": "dropout(Tensor input, float p, Tensor seed_offset) -> Tensor",
    "dropout_": "dropout_(Tensor(a!) input, float p, Tensor seed_offset) -> ()",
    "dropout_mask": "dropout_mask(Tensor input, float p, Tensor seed_offset) -> Tensor",
}

for _name, _schema in SCHEMAS.items():
    _lib.define(_schema)
    _lib.impl(_name, getattr(reference, _name), "CompositeExplicitAutograd")


# Fake kernels: shapes and dtypes only, with the same device/dtype checks as the real kernels.
@torch.library.register_fake("fused_optim::l1l2_penalty", lib=_lib)
def _(tensors: list[Tensor], l1: float, l2: float) -> Tensor:
    reference.check_floating_list(tensors, "tensors")
    device = tensors[0].device if tensors else None
    return torch.empty((), dtype=reference.reduction_dtype(tensors), device=device)


@torch.library.register_fake("fused_optim::l1l2_penalty_backward", lib=_lib)
def _(grad_out: Tensor, tensors: list[Tensor], l1: float, l2: float) -> list[Tensor]:
    reference.check_floating_list(tensors, "tensors")
    return [torch.empty_like(t) for t in tensors]


@torch.library.register_fake("fused_optim::l1l2_grad_", lib=_lib)
def _(params: list[Tensor], grads: list[Tensor], l1: float, l2: float) -> None:
    reference.check_floating_list(params, "params")
    reference.check_paired_lists(params, grads)


def _load_extension():
    """Imports fused_optim._C once; returns (module or None, why it is absent or None)."""
    if os.environ.get("FUSED_OPTIM_DISABLE_EXT", "0") == "1":
        return None, "disabled by FUSED_OPTIM_DISABLE_EXT=1"
    try:
        from . import _C
    except (ImportError, OSError) as e:
        warnings.warn(
            f"fused_optim: the native extension fused_optim._C failed to load ({e}); "
            "every op runs on the pure-Python reference kernels",
            RuntimeWarning,
            stacklevel=3,
        )
        return None, f"{type(e).__name__}: {e}"
    return _C, None


_C, EXTENSION_ERROR = _load_extension()

@torch.library.register_fake("fused_optim::multi_tensor_norm", lib=_lib)
def _(tensors: list[Tensor], norm_type: float, per_tensor: bool, error_if_nonfinite: bool = False) -> tuple[Tensor, Tensor]:
    reference.check_norm_type(norm_type)
    reference.check_floating_list(tensors, "tensors")
    device = tensors[0].device if tensors else None
    dtype = reference.norm_dtype(tensors)
    total = torch.empty((), dtype=dtype, device=device)
    return total, torch.empty((len(tensors) if per_tensor else 0,), dtype=dtype, device=device)


@torch.library.register_fake("fused_optim::multi_tensor_scale_", lib=_lib)
def _(tensors: list[Tensor], scale: Tensor) -> None:
    reference.check_floating_list(tensors, "tensors")


@torch.library.register_fake("fused_optim::clip_grad_norm_", lib=_lib)
def _(grads: list[Tensor], max_norm: float, norm_type: float, error_if_nonfinite: bool) -> Tensor:
    reference.check_norm_type(norm_type)
    reference.check_floating_list(grads, "grads")
    device = grads[0].device if grads else None
    return torch.empty((), dtype=reference.norm_dtype(grads), device=device)


@torch.library.register_fake("fused_optim::clip_grad_value_", lib=_lib)
def _(grads: list[Tensor], clip_value: float) -> None:
    reference.check_floating_list(grads, "grads")


@torch.library.register_fake("fused_optim::multi_tensor_weighted_sum", lib=_lib)
def _(inputs: list[Tensor], weights: list[float]) -> list[Tensor]:
    out = [torch.empty_like(t) for t in inputs[: reference.num_outputs(inputs, weights)]]
    reference.check_weighted_sum_args(inputs, weights, out)
    return out


@torch.library.register_fake("fused_optim::multi_tensor_weighted_sum_", lib=_lib)
def _(inputs: list[Tensor], weights: list[float], out: list[Tensor]) -> None:
    reference.check_weighted_sum_args(inputs, weights, out)


@torch.library.register_fake("fused_optim::multi_tensor_lerp_", lib=_lib)
def _(self: list[Tensor], end: list[Tensor], weight: Tensor) -> None:
    reference.check_lerp_args(self, end, weight)


@torch.library.register_fake("fused_optim::dropout", lib=_lib)
def _(input: Tensor, p: float, seed_offset: Tensor) -> Tensor:
    reference.check_dropout_args(input, p, seed_offset)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake("fused_optim::dropout_", lib=_lib)
def _(input: Tensor, p: float, seed_offset: Tensor) -> None:
    reference.check_dropout_args(input, p, seed_offset)


@torch.library.register_fake("fused_optim::dropout_mask", lib=_lib)
def _(input: Tensor, p: float, seed_offset: Tensor) -> Tensor:
    reference.check_dropout_args(input, p, seed_offset)
    return torch.empty((input.numel() + 7) // 8, dtype=torch.uint8, device=input.device)


# Dropout's backward regenerates the mask from (seed, offset): the same op applied to the gradient.
# Saved for backward: p and the 2-element seed_offset tensor, nothing the size of the input.
def _dropout_setup_context(ctx, inputs, output) -> None:
    _, ctx.p, seed_offset = inputs
    ctx.save_for_backward(seed_offset)


def _dropout_backward(ctx, grad: Tensor):
    (seed_offset,) = ctx.saved_tensors
    return torch.ops.fused_optim.dropout.default(grad, ctx.p, seed_offset), None, None


torch.library.register_autograd(
    "fused_optim::dropout", _dropout_backward, setup_context=_dropout_setup_context, lib=_lib
)


# Autograd: the native extension registers it in C++ (a Python autograd kernel converts a Tensor[]
# to Python and back on each call: ~290 us for 2000 tensors); without it, the same rule in Python.
# Both call the l1l2_penalty_backward op, which holds the formula.
def _l1l2_penalty_setup_context(ctx, inputs, output) -> None:
    tensors, ctx.l1, ctx.l2 = inputs
    ctx.save_for_backward(*tensors)


def _l1l2_penalty_backward(ctx, grad: Tensor):
    grads = torch.ops.fused_optim.l1l2_penalty_backward(grad, list(ctx.saved_tensors), ctx.l1, ctx.l2)
    return grads, None, None


if not torch._C._dispatch_has_kernel_for_dispatch_key("fused_optim::l1l2_penalty", "Autograd"):
    torch.library.register_autograd(
        "fused_optim::l1l2_penalty",
        _l1l2_penalty_backward,
        setup_context=_l1l2_penalty_setup_context,
        lib=_lib,
    )

DEVICES = ("cpu", "cuda")


def kernel_for(op: str, device: str) -> str:
    """'native' when _C registered a kernel of `op` for `device`, else 'reference'."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[device]
    native = torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_optim::{op}", key)
    return "native" if native else "reference"


def _cpu_kernel_copy() -> str | None:
    """The copy of the CPU kernels ATen's DispatchStub runs here: the CPU capability torch detects
    (ATEN_CPU_CAPABILITY overrides it), or the best built copy below it."""
    if _C is None:
        return None
    built = _C.build_info()["cpu_capabilities"].split(",")
    order = ["DEFAULT", "AVX2", "AVX512"]
    detected = torch.backends.cpu.get_cpu_capability()
    detected = detected if detected in order else "DEFAULT"
    return max((c for c in built if order.index(c) <= order.index(detected)), key=order.index)


def backend_info() -> dict:
    """Which kernel runs each op on each device, with the torch version and the extension's build."""
    return {
        "torch": torch.__version__,
        "extension": {
            "loaded": _C is not None,
            "error": EXTENSION_ERROR,
            "build": _C.build_info() if _C is not None else None,
        },
        "cpu_kernels": _cpu_kernel_copy(),
        "num_threads": torch.get_num_threads(),
        "ops": {op: {dev: kernel_for(op, dev) for dev in DEVICES} for op in SCHEMAS},
    }
