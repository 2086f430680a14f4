"""Dropout driven by a counter-based RNG: the mask is regenerated from (seed, offset), never stored.
Drop-in for torch.nn.functional.dropout and torch.nn.Dropout."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

# Seeds and offsets are drawn below 2**62 so that they fit int64 tensors on every path.
_SEED_BOUND = 2**62


def _check(input: Tensor, p: float, generator: torch.Generator | None) -> float:
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a tensor, got {type(input).__name__}")
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"dropout probability p must be a real number, got {type(p).__name__}")
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not input.is_floating_point():
        raise TypeError(f"input must be a real floating tensor (fp32, fp64, fp16 or bf16), got {input.dtype}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != input.device.type:
            raise ValueError(f"generator is on {generator.device}, but input is on {input.device}")
    return p


def _check_inplace(input: Tensor) -> None:
    """torch's refusals of an in-place op under autograd, made before anything is written (autograd
    itself would raise only once the data is overwritten)."""
    if not (torch.is_grad_enabled() and input.requires_grad):
        return
    if input.is_leaf:
        raise RuntimeError("a leaf Variable that requires grad is being used in an in-place operation.")
    if input._base is not None and input._base.is_leaf:
        raise RuntimeError("a view of a leaf Variable that requires grad is being used in an in-place operation.")


def draw_seed_offset(generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """(seed, offset) for one dropout call: an int64 tensor of 2 elements drawn from `generator`,
    else from torch's default generator of `device` (torch.manual_seed reproduces the masks), and
    left where it was drawn. On a GPU the kernel reads it from device memory: no host sync, and a
    CUDA graph replays a new draw each time (torch's generators support capture)."""
    device = generator.device if generator is not None else device
    return torch.randint(0, _SEED_BOUND, (2,), generator=generator, device=device, dtype=torch.int64)


class _DropoutInPlace(torch.autograd.Function):
    """In-place dropout under autograd: the input is marked dirty; backward regenerates the mask."""

    @staticmethod
    def forward(ctx, input: Tensor, p: float, seed_offset: Tensor) -> Tensor:
        torch.ops.fused_optim.dropout_.default(input, p, seed_offset)
        ctx.mark_dirty(input)
        ctx.p = p
        ctx.save_for_backward(seed_offset)
        return input

    @staticmethod
    def backward(ctx, grad: Tensor):
        (seed_offset,) = ctx.saved_tensors
        return torch.ops.fused_optim.dropout.default(grad, ctx.p, seed_offset), None, None


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

    Raises TypeError (non-tensor input, non-floating input, non-numeric p, a generator that is not
    a torch.Generator), ValueError (p outside [0, 1], a generator on another device type than the
    input), RuntimeError (``inplace=True`` under autograd on a leaf that requires grad or a view of
    one, torch's messages), before anything is written.
    """
    p = _check(input, p, generator)
    needs_graph = inplace and torch.is_grad_enabled() and input.requires_grad
    if inplace and training and p > 0.0:
        _check_inplace(input)
    if not training or p == 0.0:
        out = input
        seed_offset = torch.zeros(2, dtype=torch.int64, device=input.device)
        p = 0.0
    else:
        seed_offset = draw_seed_offset(generator, input.device)
        if not inplace:
            out = torch.ops.fused_optim.dropout.default(input, p, seed_offset)
        elif needs_graph:
            out = _DropoutInPlace.apply(input, p, seed_offset)
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


class Dropout(nn.Dropout):
    """Drop-in for ``torch.nn.Dropout`` (same constructor, ``extra_repr`` and state_dict; works in
    ``nn.Sequential``), running :func:`dropout`: identity in eval mode and when p == 0."""

    def forward(self, input: Tensor) -> Tensor:
        return dropout(input, self.p, self.training, self.inplace)


class CustomDropout(Dropout):
    """The seed's ``CustomDropout(p=0.5, training=True)``: :class:`Dropout` whose constructor also
    takes the initial training flag, as the seed's did. ``x * mask / (1 - p)`` semantics."""

    def __init__(self, p: float = 0.5, training: bool = True) -> None:
        super().__init__(p)
        self.training = training
