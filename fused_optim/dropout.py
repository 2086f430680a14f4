"""Dropout driven by a counter-based RNG: the mask is regenerated from (seed, offset), never stored.
Drop-in for torch.nn.functional.dropout and torch.nn.Dropout.

The checks, the (seed, offset) draw and the in-place autograd Function here are also those of the
structured forms (fused_optim.structured_dropout), which import them."""

from __future__ import annotations

import numbers
import re

import torch
from torch import Tensor, nn

from . import checks

# Seeds and offsets are drawn below 2**62 so that they fit int64 tensors on every path.
_SEED_BOUND = 2**62


def check_p(p: float, what: str = "dropout probability") -> float:
    """p as a float: TypeError for a non-number (torch's and torchvision's range comparison raises
    TypeError there), ValueError outside [0, 1] with their message (`what`: their word for p)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{what} p must be a real number, got {type(p).__name__}")
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{what} has to be between 0 and 1, but got {p}")
    return p


def check_input(input: Tensor, generator: torch.Generator | None = None) -> None:
    """What the kernels need of the tensor they drop from (and of the generator they draw from)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a tensor, got {type(input).__name__}")
    if input.dtype not in checks.FLOATING:
        raise TypeError(f"input must be a real floating tensor (fp32, fp64, fp16 or bf16), got {input.dtype}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != input.device.type:
            raise ValueError(f"generator is on {generator.device}, but input is on {input.device}")


# torch's refusals (autograd's handle_view_on_rebase) of an in-place write to a view, by how the view
# was created; "{}" is the view's output number and the function that made it.
_VIEW_REFUSALS = {
    "MULTI_OUTPUT_NODE": "Output {} is a view and is being modified inplace. This view is the output of a function "
    "that returns multiple views. Such functions do not allow the output views to be modified inplace. You should "
    "replace the inplace operation by an out-of-place one.",
    "NO_GRAD_MODE": "A view was created in no_grad mode and is being modified inplace with grad mode enabled. Given "
    "that this use case is ambiguous and error-prone, it is forbidden. You can clarify your code by moving both the "
    "view and the inplace either both inside the no_grad block (if you don't want the inplace to be tracked) or both "
    "outside (if you want the inplace to be tracked).",
    "INFERENCE_MODE": "A view was created in inference mode and is being modified inplace in normal mode.",
    "IN_CUSTOM_FUNCTION": "A view was created inside a custom Function (or because an input was returned as-is) and "
    "the autograd logic to handle view+inplace would override the custom backward associated with the custom "
    "Function, leading to incorrect gradients. This behavior is forbidden.",
}


def check_inplace(input: Tensor) -> None:
    """torch's refusals of an in-place op under autograd, in torch's order, made before anything is
    written (autograd itself would raise only once the data is overwritten)."""
    if not (torch.is_grad_enabled() and input.requires_grad):
        return
    if input._base is not None:
        # Dynamo cannot trace the creation meta; a compiled graph functionalizes views anyway.
        meta = "DEFAULT" if torch.compiler.is_compiling() else torch._C._autograd._get_creation_meta(input).name
        if meta in _VIEW_REFUSALS:
            made_by = re.sub(r"Backward\d*$", "", input.grad_fn.name()) if input.grad_fn is not None else "a view"
            raise RuntimeError(_VIEW_REFUSALS[meta].format(f"{input.output_nr} of {made_by}"))
        if input._base.is_leaf:
            raise RuntimeError("a view of a leaf Variable that requires grad is being used in an in-place operation.")
    if input.is_leaf:
        raise RuntimeError("a leaf Variable that requires grad is being used in an in-place operation.")


def draw_seed_offset(generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """(seed, offset) for one dropout call: an int64 tensor of 2 elements drawn from `generator`,
    else from torch's default generator of `device` (torch.manual_seed reproduces the masks), and
    left where it was drawn. On a GPU the kernel reads it from device memory: no host sync, and a
    CUDA graph replays a new draw each time (torch's generators support capture)."""
    device = generator.device if generator is not None else device
    return torch.randint(0, _SEED_BOUND, (2,), generator=generator, device=device, dtype=torch.int64)


class InPlaceDropout(torch.autograd.Function):
    """In-place dropout under autograd, element (dropout_) or structured (drop_groups_): the input
    is marked dirty; backward runs the out-of-place op on the gradient with the same arguments and
    seed_offset, which regenerates the mask."""

    @staticmethod
    def forward(ctx, input: Tensor, name: str, seed_offset: Tensor, *args) -> Tensor:
        getattr(torch.ops.fused_optim, name + "_").default(input, *args, seed_offset)
        ctx.mark_dirty(input)
        ctx.name, ctx.args = name, args
        ctx.save_for_backward(seed_offset)
        return input

    @staticmethod
    def backward(ctx, grad: Tensor):
        (seed_offset,) = ctx.saved_tensors
        out = getattr(torch.ops.fused_optim, ctx.name).default(grad, *ctx.args, seed_offset)
        return (out, None, None) + (None,) * len(ctx.args)


def dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    generator: torch.Generator | None = None,
    return_mask: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Drop-in for ``torch.nn.functional.dropout``: zeroes each element with probability ``p`` and
    scales the others by ``1 / (1 - p)``; the identity (``input`` itself) when ``training`` is False
    or ``p == 0``; zeros when ``p == 1`` (a dropped nan stays nan, as in torch).

    The keep/drop decision of each element depends only on (seed, offset, its index in row-major
    order), with (seed, offset) drawn from ``generator`` (when None, the default generator of the
    input's device, as torch's dropout): ``torch.manual_seed`` reproduces a mask, whatever the
    thread count, layout or backend, and a given (seed, offset) gives the same mask on CPU and
    CUDA. On CUDA the pair stays on the GPU (no host sync) and CUDA graph capture is supported. Backward
    regenerates the mask, so nothing the size of the input is saved for it. ``inplace=True``
    overwrites ``input`` in one pass (under autograd, torch's rules for in-place ops apply: not on
    a leaf that requires grad). fp32, fp64, fp16, bf16; any layout; scalars and empty tensors.

    ``return_mask=True`` also returns the keep mask packed 8 elements a byte (uint8, bit ``i % 8``
    of byte ``i // 8``), see :func:`unpack_dropout_mask`.

    The result has the input's layout (channels_last stays channels_last), as torch's.

    Raises TypeError (non-tensor input, non-numeric p; when it drops or returns a mask: a
    non-floating input, a generator that is not a torch.Generator), ValueError (p outside [0, 1];
    when it drops: a generator on another device type than the input), RuntimeError
    (``inplace=True`` under autograd on a leaf that requires grad or a view of one, torch's
    messages), before anything is written.
    """
    p = check_p(p)
    if (not training or p == 0.0) and not return_mask and isinstance(input, Tensor):
        return input  # torch's identity, whatever the input's dtype
    check_input(input, generator)
    needs_graph = inplace and torch.is_grad_enabled() and input.requires_grad
    if inplace and training and p > 0.0:
        check_inplace(input)
    if not training or p == 0.0:
        out = input
        seed_offset = torch.zeros(2, dtype=torch.int64, device=input.device)
        p = 0.0
    else:
        seed_offset = draw_seed_offset(generator, input.device)
        if not inplace:
            out = torch.ops.fused_optim.dropout.default(input, p, seed_offset)
        elif needs_graph:
            out = InPlaceDropout.apply(input, "dropout", seed_offset, p)
        else:
            torch.ops.fused_optim.dropout_.default(input, p, seed_offset)
            out = input
    if return_mask:
        return out, torch.ops.fused_optim.dropout_mask.default(input, p, seed_offset)
    return out


def unpack_dropout_mask(mask: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """The bool keep mask of `shape` from its packed form (see :func:`dropout`)."""
    bits = (mask.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8, device=mask.device)) & 1
    numel = 1
    for n in shape:
        numel *= n
    return bits.reshape(-1)[:numel].bool().view(shape)


class NamedInRepr:
    """Base of fused_optim's modules: ``print(model)`` shows which modules are ours
    (``fused_optim.Dropout(p=0.1, inplace=False)``), through nn.Module's ``_get_name``, as
    torch's quantized modules name themselves."""

    def _get_name(self) -> str:
        return f"fused_optim.{type(self).__name__}"


class Dropout(NamedInRepr, nn.Dropout):
    """Drop-in for ``torch.nn.Dropout`` (same constructor, attributes and state_dict; works in
    ``nn.Sequential``; its repr says it is ours), running :func:`dropout`: identity in eval mode
    and when p == 0."""

    def forward(self, input: Tensor) -> Tensor:
        return dropout(input, self.p, self.training, self.inplace)


class CustomDropout(Dropout):
    """The seed's ``CustomDropout(p=0.5, training=True)``: :class:`Dropout` whose constructor also
    takes the initial training flag, as the seed's did. ``x * mask / (1 - p)`` semantics."""

    def __init__(self, p: float = 0.5, training: bool = True) -> None:
        super().__init__(p)
        self.training = training
