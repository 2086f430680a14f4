"""The fused_optim op library, in one place, in the order it is built (top to bottom):

1. the schemas of every op of the `fused_optim` namespace (SCHEMAS);
2. the native extension fused_optim._C, loaded once the schemas exist: its static registrations
   (the CPU/CUDA kernels, and l1l2_penalty's C++ autograd) attach to the ops defined in 1;
3. the reference kernels (registered for every device; _C's kernels take over the devices they
   register for);
4. the fake kernels for torch.compile;
5. autograd: first the ops with a derivative, each registered explicitly (l1l2_penalty in C++
   when _C is loaded, else in Python; dropout, drop_groups, drop_groups_add in Python), then every
   other op by the rule its schema decides (_C.register_autograd_for_namespace in C++, the Python
   kernels below for whatever key is still empty): an op that writes (a mutable schema) refuses
   grad-requiring writes and bumps versions, any other takes torch's NotImplemented fallback.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from . import checks, reference

_lib = torch.library.Library("fused_optim", "DEF")

# Every op, by family (the family names its files in every layer: CONTRIBUTING.md): name -> schema.
# The reference kernel is reference.<name>.
FAMILIES = {
    "regularization": {
        "l1l2_penalty": "l1l2_penalty(Tensor[] tensors, float l1, float l2) -> Tensor",
        "l1l2_penalty_backward": (
            "l1l2_penalty_backward(Tensor grad_out, Tensor[] tensors, float l1, float l2) -> Tensor[]"
        ),
        "l1l2_grad_": "l1l2_grad_(Tensor[] params, Tensor(a!)[] grads, float l1, float l2) -> ()",
    },
    "clip_grad": {
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
    },
    "pre_step": {
        "pre_step_": (
            "pre_step_(Tensor[] params, Tensor(a!)[] grads, float l1, float l2, float? max_norm, float norm_type,"
            " float? clip_value, bool error_if_nonfinite) -> Tensor"
        ),
    },
    "averaging": {
        "multi_tensor_weighted_sum": "multi_tensor_weighted_sum(Tensor[] inputs, float[] weights) -> Tensor[]",
        "multi_tensor_weighted_sum_": (
            "multi_tensor_weighted_sum_(Tensor[] inputs, float[] weights, Tensor(a!)[] out) -> ()"
        ),
        "multi_tensor_lerp_": "multi_tensor_lerp_(Tensor(a!)[] self, Tensor[] end, Tensor weight) -> ()",
    },
    "dropout": {
        "dropout": "dropout(Tensor input, float p, Tensor seed_offset) -> Tensor",
        "dropout_": "dropout_(Tensor(a!) input, float p, Tensor seed_offset) -> ()",
        "dropout_mask": "dropout_mask(Tensor input, float p, Tensor seed_offset) -> Tensor",
    },
    "structured_dropout": {
        "drop_groups": "drop_groups(Tensor input, int group_dims, float p, bool scale, Tensor seed_offset) -> Tensor",
        "drop_groups_": "drop_groups_(Tensor(a!) input, int group_dims, float p, bool scale, Tensor seed_offset) -> ()",
        "drop_groups_add": (
            "drop_groups_add(Tensor x, Tensor branch, int group_dims, float p, bool scale, Tensor seed_offset) -> Tensor"
        ),
    },
}
SCHEMAS = {name: schema for ops in FAMILIES.values() for name, schema in ops.items()}

for _schema in SCHEMAS.values():
    _lib.define(_schema)


def _load_extension():
    """Imports fused_optim._C once; returns (module or None, why it is absent or None)."""
    if os.environ.get("FUSED_OPTIM_DISABLE_EXT", "0") == "1":
        return None, "disabled by FUSED_OPTIM_DISABLE_EXT=1"
    try:
        # import_module, not `from . import _C`: during the package's own import, a missing _C then
        # reads "No module named 'fused_optim._C'" instead of a circular-import message.
        _C = importlib.import_module(f"{__package__}._C")
    except (ImportError, OSError) as e:
        warnings.warn(
            f"fused_optim: the native extension fused_optim._C failed to load ({e}); "
            "every op runs on the pure-Python reference kernels",
            RuntimeWarning,
            stacklevel=3,
        )
        return None, f"{type(e).__name__}: {e}"
    return _C, None


# After the schemas (its static registrations could come first, the dispatcher keeps kernels for
# ops defined later, but its register_autograd_for_namespace, called at the end of this file, needs
# every op defined) and before any Python kernel, so that _has_kernel sees what _C registered.
_C, EXTENSION_ERROR = _load_extension()


def _has_kernel(name: str, key: str) -> bool:
    """Whether a kernel of op `name` is registered for dispatch key `key` (by _C, or above)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_optim::{name}", key)


for _name in SCHEMAS:
    _lib.impl(_name, getattr(reference, _name), "CompositeExplicitAutograd")


# Fake kernels: shapes and dtypes only, with the same device/dtype checks as the real kernels.
@torch.library.register_fake("fused_optim::l1l2_penalty", lib=_lib)
def _(tensors: list[Tensor], l1: float, l2: float) -> Tensor:
    checks.check_floating_list(tensors, "tensors")
    device = tensors[0].device if tensors else None
    return torch.empty((), dtype=checks.reduction_dtype(tensors), device=device)


@torch.library.register_fake("fused_optim::l1l2_penalty_backward", lib=_lib)
def _(grad_out: Tensor, tensors: list[Tensor], l1: float, l2: float) -> list[Tensor]:
    checks.check_floating_list(tensors, "tensors")
    return [torch.empty_like(t) for t in tensors]


@torch.library.register_fake("fused_optim::l1l2_grad_", lib=_lib)
def _(params: list[Tensor], grads: list[Tensor], l1: float, l2: float) -> None:
    checks.check_floating_list(params, "params")
    checks.check_paired_lists(params, grads)


@torch.library.register_fake("fused_optim::multi_tensor_norm", lib=_lib)
def _(tensors: list[Tensor], norm_type: float, per_tensor: bool, error_if_nonfinite: bool = False) -> tuple[Tensor, Tensor]:
    checks.check_norm_type(norm_type)
    checks.check_floating_list(tensors, "tensors")
    checks.check_norm_defined(tensors, norm_type)
    device = tensors[0].device if tensors else None
    dtype = checks.norm_dtype(tensors)
    total = torch.empty((), dtype=dtype, device=device)
    return total, torch.empty((len(tensors) if per_tensor else 0,), dtype=dtype, device=device)


@torch.library.register_fake("fused_optim::multi_tensor_scale_", lib=_lib)
def _(tensors: list[Tensor], scale: Tensor) -> None:
    checks.check_floating_list(tensors, "tensors")


@torch.library.register_fake("fused_optim::clip_grad_norm_", lib=_lib)
def _(grads: list[Tensor], max_norm: float, norm_type: float, error_if_nonfinite: bool) -> Tensor:
    checks.check_norm_type(norm_type)
    checks.check_floating_list(grads, "grads")
    checks.check_norm_defined(grads, norm_type)
    device = grads[0].device if grads else None
    return torch.empty((), dtype=checks.norm_dtype(grads), device=device)


@torch.library.register_fake("fused_optim::clip_grad_value_", lib=_lib)
def _(grads: list[Tensor], clip_value: float) -> None:
    checks.check_floating_list(grads, "grads")
    checks.check_clip_value(grads, clip_value)


@torch.library.register_fake("fused_optim::pre_step_", lib=_lib)
def _(params: list[Tensor], grads: list[Tensor], l1: float, l2: float, max_norm: float | None, norm_type: float,
      clip_value: float | None, error_if_nonfinite: bool) -> Tensor:
    checks.check_pre_step_meta(params, grads, l1, l2, max_norm, norm_type, clip_value)
    device = grads[0].device if grads else None
    return torch.empty((), dtype=checks.norm_dtype(grads), device=device)


@torch.library.register_fake("fused_optim::multi_tensor_weighted_sum", lib=_lib)
def _(inputs: list[Tensor], weights: list[float]) -> list[Tensor]:
    out = [torch.empty_like(t) for t in inputs[: checks.num_outputs(inputs, weights)]]
    checks.check_weighted_sum_args(inputs, weights, out)
    return out


@torch.library.register_fake("fused_optim::multi_tensor_weighted_sum_", lib=_lib)
def _(inputs: list[Tensor], weights: list[float], out: list[Tensor]) -> None:
    checks.check_weighted_sum_args(inputs, weights, out)


@torch.library.register_fake("fused_optim::multi_tensor_lerp_", lib=_lib)
def _(self: list[Tensor], end: list[Tensor], weight: Tensor) -> None:
    checks.check_lerp_args(self, end, weight)


@torch.library.register_fake("fused_optim::dropout", lib=_lib)
def _(input: Tensor, p: float, seed_offset: Tensor) -> Tensor:
    checks.check_dropout_args(input, p, seed_offset)
    return torch.empty_like(input)


@torch.library.register_fake("fused_optim::dropout_", lib=_lib)
def _(input: Tensor, p: float, seed_offset: Tensor) -> None:
    checks.check_dropout_args(input, p, seed_offset)


@torch.library.register_fake("fused_optim::dropout_mask", lib=_lib)
def _(input: Tensor, p: float, seed_offset: Tensor) -> Tensor:
    checks.check_dropout_args(input, p, seed_offset)
    return torch.empty((input.numel() + 7) // 8, dtype=torch.uint8, device=input.device)


# The structured forms' results take the layout of the broadcast multiply the kernels run (which
# differs from empty_like's for expanded inputs): the fakes run that multiply on fake multipliers.
@torch.library.register_fake("fused_optim::drop_groups", lib=_lib)
def _(input: Tensor, group_dims: int, p: float, scale: bool, seed_offset: Tensor) -> Tensor:
    checks.check_drop_groups_args(input, group_dims, p, seed_offset)
    return input * reference.group_multipliers_like(input, group_dims)


@torch.library.register_fake("fused_optim::drop_groups_", lib=_lib)
def _(input: Tensor, group_dims: int, p: float, scale: bool, seed_offset: Tensor) -> None:
    checks.check_drop_groups_args(input, group_dims, p, seed_offset)


@torch.library.register_fake("fused_optim::drop_groups_add", lib=_lib)
def _(x: Tensor, branch: Tensor, group_dims: int, p: float, scale: bool, seed_offset: Tensor) -> Tensor:
    checks.check_drop_groups_add_args(x, branch, group_dims, p, seed_offset)
    return torch.addcmul(x, branch, reference.group_multipliers_like(branch, group_dims))


# Autograd, 1: the ops with a derivative, each registered here explicitly (the only place that
# says which ops have one). l1l2_penalty's derivative calls the l1l2_penalty_backward op, which
# holds the formula; under create_graph the reference formula (differentiable torch ops) runs, so
# higher orders are right. csrc/autograd.cpp registers the same in C++ when _C is loaded (a Python
# autograd kernel costs ~290 us for 2000 tensors), so Python registers it only when none is.
def _l1l2_penalty_setup_context(ctx, inputs, output) -> None:
    tensors, ctx.l1, ctx.l2 = inputs
    ctx.save_for_backward(*tensors)


def _l1l2_penalty_backward(ctx, grad: Tensor):
    tensors = list(ctx.saved_tensors)
    if torch.is_grad_enabled():  # create_graph
        return reference.l1l2_penalty_backward(grad, tensors, ctx.l1, ctx.l2), None, None
    return torch.ops.fused_optim.l1l2_penalty_backward(grad, tensors, ctx.l1, ctx.l2), None, None


if not _has_kernel("l1l2_penalty", "Autograd"):
    torch.library.register_autograd(
        "fused_optim::l1l2_penalty",
        _l1l2_penalty_backward,
        setup_context=_l1l2_penalty_setup_context,
        lib=_lib,
    )


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


# The structured forms regenerate their group mask the same way: d input = drop_groups(grad), and
# for the residual form d x = grad, d branch = drop_groups(grad). Saved: the 2-element seed_offset.
def _drop_groups_setup_context(ctx, inputs, output) -> None:
    *_, ctx.group_dims, ctx.p, ctx.scale, seed_offset = inputs
    ctx.save_for_backward(seed_offset)


def _drop_groups_of(ctx, grad: Tensor) -> Tensor:
    (seed_offset,) = ctx.saved_tensors
    return torch.ops.fused_optim.drop_groups.default(grad, ctx.group_dims, ctx.p, ctx.scale, seed_offset)


torch.library.register_autograd(
    "fused_optim::drop_groups",
    lambda ctx, grad: (_drop_groups_of(ctx, grad), None, None, None, None),
    setup_context=_drop_groups_setup_context,
    lib=_lib,
)
torch.library.register_autograd(
    "fused_optim::drop_groups_add",
    lambda ctx, grad: (grad, _drop_groups_of(ctx, grad), None, None, None, None),
    setup_context=_drop_groups_setup_context,
    lib=_lib,
)


# Autograd, 2 (the kernels, as csrc/autograd.cpp's): with grad mode on, an op that writes a tensor
# refuses to write one that requires grad, and bumps the version of what it wrote once its kernel
# has succeeded; an op without a derivative that writes nothing gives outputs whose backward raises
# (torch's NotImplemented).
def _written(schema, args) -> list[tuple[str, int | None, Tensor]]:
    """(argument name, index in its list or None, tensor) of every tensor the op writes."""
    written = []
    for a, value in zip(schema.arguments, args):
        if a.alias_info is not None and a.alias_info.is_write:
            if isinstance(value, Tensor):
                written.append((a.name, None, value))
            else:
                written.extend((a.name, i, t) for i, t in enumerate(value))
    return written


def _describe(name: str, arg: str, i: int | None) -> str:
    return f"fused_optim::{name}: {arg}" + ("" if i is None else f"[{i}]")


def _refuse_grad_requiring_writes(name: str, op):
    def kernel(keyset, *args):
        if torch.is_grad_enabled():
            for arg, i, t in _written(op._schema, args):
                if not t.requires_grad:
                    continue
                what = _describe(name, arg, i)
                if t.is_leaf:
                    raise RuntimeError(f"{what}: a leaf Variable that requires grad is being used in an in-place operation.")
                if t._base is not None and t._base.is_leaf:
                    raise RuntimeError(
                        f"{what}: a view of a leaf Variable that requires grad is being used in an in-place operation."
                    )
                raise RuntimeError(
                    f"{what} requires grad, and this op writes it in place without a derivative: call it under "
                    "torch.no_grad() or on a detached tensor"
                )
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    return kernel


def _bump_written_versions(name: str, op):
    def kernel(keyset, *args):
        written = _written(op._schema, args)
        for arg, i, t in written:
            if t.is_inference():
                raise RuntimeError(
                    f"{_describe(name, arg, i)}: Inplace update to inference tensor outside InferenceMode is not "
                    "allowed. Make a clone to get a normal tensor before the in-place update"
                )
        with torch._C._AutoDispatchBelowADInplaceOrView():
            result = op.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args)
        torch.autograd.graph.increment_version([t for _, _, t in written])
        return result

    return kernel


class _NoDerivative(torch.autograd.Function):
    """Runs an op without a derivative on tensors that require grad: its floating outputs join
    the graph with a backward that raises, as torch's NotImplemented node does."""

    @staticmethod
    def forward(ctx, name, run, *inputs):
        ctx.name = name
        outputs = tuple(run())
        ctx.mark_non_differentiable(*(o for o in outputs if not o.is_floating_point()))
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"derivative for fused_optim::{ctx.name} is not implemented")


def _no_derivative(name: str, op):
    def kernel(keyset, *args):
        def run():
            with torch._C._AutoDispatchBelowAutograd():
                return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

        inputs = [t for t in pytree.tree_leaves(args) if isinstance(t, Tensor) and t.requires_grad]
        if not (torch.is_grad_enabled() and inputs):
            return run()
        spec = []

        def run_flat():
            flat, out_spec = pytree.tree_flatten(run())
            spec.append(out_spec)
            return flat

        return pytree.tree_unflatten(list(_NoDerivative.apply(name, run_flat, *inputs)), spec[0])

    return kernel


# The ops with a derivative: those given an Autograd kernel above (or by _C for l1l2_penalty).
DIFFERENTIABLE = frozenset(name for name in SCHEMAS if _has_kernel(name, "Autograd"))

# Autograd, 2: every other op, by what its schema says. With _C loaded, C++ registers these kernels
# (csrc/autograd.cpp: a Python kernel converts a Tensor[] to Python and back on every call) for
# every op of the namespace that the dispatcher knows, which is why it runs here, after the schemas
# and the explicit registrations above and not when _C is imported; the Python kernels fill what it
# left empty (everything, without _C).
if _C is not None:
    _C.register_autograd_for_namespace("fused_optim")

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*Warning only once for all operators.*")
    for _name in SCHEMAS:
        _op = getattr(torch.ops.fused_optim, _name).default
        if not _has_kernel(_name, "Autograd"):
            _make = _refuse_grad_requiring_writes if _op._schema.is_mutable else _no_derivative
            _lib.impl(_name, _make(_name, _op), "Autograd", with_keyset=True)
        if _op._schema.is_mutable and not _has_kernel(_name, "ADInplaceOrView"):
            _lib.impl(_name, _bump_written_versions(_name, _op), "ADInplaceOrView", with_keyset=True)

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
