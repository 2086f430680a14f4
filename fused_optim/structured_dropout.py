"""Structured dropout: one keep/drop decision per group of elements (the op drop_groups), drawn
from dropout's counter-based stream and regenerated in backward, never stored. Drop-ins for timm's
DropPath / drop_path, torchvision's StochasticDepth / stochastic_depth and torch's
Dropout1d/2d/3d / dropout1d/2d/3d (channel dropout)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from . import checks
from .dropout import InPlaceDropout, NamedInRepr, check_inplace, check_input, check_p, draw_seed_offset

# One keep/drop decision per group of elements, from the same stream: group g of the first
# `group_dims` dims (row-major) takes element g of the stream drawn for the call (the op
# drop_groups). Backward regenerates the group mask from (seed, offset): 16 bytes saved.


def _drop_groups(input: Tensor, group_dims: int, p: float, training: bool, inplace: bool, scale: bool = True,
                 generator: torch.Generator | None = None) -> Tensor:
    """input with each group (an index into its first group_dims dims) zeroed with probability p,
    the others scaled by 1 / (1 - p) when `scale`; `input` itself when not training or p == 0
    (or it is empty), as torch's feature dropout, whatever its dtype. p is checked by the caller."""
    if not training or p == 0.0 or input.numel() == 0:
        return input
    check_input(input, generator)
    if inplace:
        check_inplace(input)
    seed_offset = draw_seed_offset(generator, input.device)
    if not inplace:
        return torch.ops.fused_optim.drop_groups.default(input, group_dims, p, scale, seed_offset)
    if torch.is_grad_enabled() and input.requires_grad:
        return InPlaceDropout.apply(input, "drop_groups", seed_offset, group_dims, p, scale)
    torch.ops.fused_optim.drop_groups_.default(input, group_dims, p, scale, seed_offset)
    return input


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True) -> Tensor:
    """timm's ``drop_path`` (stochastic depth per sample): each sample (index of dim 0) is zeroed
    with probability ``drop_prob``, the kept ones scaled by ``1 / (1 - drop_prob)`` when
    ``scale_by_keep``; ``x`` itself when ``drop_prob == 0`` or not ``training`` (timm's default
    ``training=False``). One pass, the per-sample mask drawn from the counter-based stream (so
    ``torch.manual_seed`` reproduces it) and regenerated in backward, not stored.

    When it drops (``training`` and ``drop_prob > 0``), raises TypeError (non-floating ``x``,
    non-numeric ``drop_prob``), ValueError (``drop_prob`` outside [0, 1]; a 0-dim ``x``, which has
    no sample dimension); otherwise it returns ``x`` unchecked, as timm's."""
    if drop_prob == 0.0 or not training:
        return x
    drop_prob = check_p(drop_prob)
    check_input(x)
    if x.dim() == 0:
        raise ValueError("drop_path: x must have a sample (batch) dimension, got a 0-dim tensor")
    return _drop_groups(x, 1, drop_prob, training, False, scale_by_keep)


def drop_path_add(x: Tensor, branch: Tensor, drop_prob: float = 0.0, training: bool = False,
                  scale_by_keep: bool = True) -> Tensor:
    """``x + drop_path(branch, drop_prob, training, scale_by_keep)`` in one pass (the residual of
    every block with stochastic depth: read x, read branch, write the sum; torch's form makes two
    passes and a temporary). The product is not rounded before the sum (fp16/bf16: one rounding,
    not two). Backward: ``grad`` for ``x``, ``drop_path(grad)`` with the same mask for ``branch``.
    ``x`` and ``branch``: the same shape, dtype and device, in training and in eval alike (unlike
    ``x + branch``, no broadcasting and no type promotion: ValueError/TypeError/RuntimeError)."""
    drop_prob = check_p(drop_prob)
    check_input(branch)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if branch.dim() == 0:
        raise ValueError("drop_path_add: branch must have a sample (batch) dimension, got a 0-dim tensor")
    if not training or drop_prob == 0.0 or branch.numel() == 0:
        checks.check_drop_groups_add_args(x, branch, 1, drop_prob, torch.zeros(2, dtype=torch.int64))
        return x + branch
    seed_offset = draw_seed_offset(None, branch.device)
    return torch.ops.fused_optim.drop_groups_add.default(x, branch, 1, drop_prob, scale_by_keep, seed_offset)


class DropPath(NamedInRepr, nn.Module):
    """timm's ``DropPath(drop_prob=0.0, scale_by_keep=True)``: :func:`drop_path` in training mode,
    the identity in eval mode; the same ``extra_repr``."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        check_p(drop_prob)
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


def stochastic_depth(input: Tensor, p: float, mode: str, training: bool = True) -> Tensor:
    """torchvision's ``stochastic_depth``: ``mode="row"`` zeroes each sample with probability
    ``p``, ``mode="batch"`` the whole batch at once; survivors are scaled by ``1 / (1 - p)``;
    ``input`` itself when not ``training`` or ``p == 0``. torchvision's errors: ValueError for
    ``p`` outside [0, 1] ("drop probability has to be between 0 and 1, but got ...") and for
    another mode, TypeError for a ``p`` that is not a number. When it drops, TypeError for a
    non-floating input and ValueError for a 0-dim one in ``"row"`` mode."""
    p = check_p(p, "drop probability")
    if mode not in ("batch", "row"):
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    if not training or p == 0.0:
        return input
    check_input(input)
    if mode == "row" and input.dim() == 0:
        raise ValueError("stochastic_depth: mode='row' needs a sample (batch) dimension, got a 0-dim tensor")
    return _drop_groups(input, 1 if mode == "row" else 0, p, training, False)


class StochasticDepth(NamedInRepr, nn.Module):
    """torchvision's ``StochasticDepth(p, mode)``: :func:`stochastic_depth` with the module's
    training flag; torchvision's repr."""

    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, input: Tensor) -> Tensor:
        return stochastic_depth(input, self.p, self.mode, self.training)

    def __repr__(self) -> str:
        return f"{self._get_name()}(p={self.p}, mode={self.mode})"


def _channel_dropout(name: str, input: Tensor, p: float, training: bool, inplace: bool, batched_dim: int) -> Tensor:
    """torch's dropout1d/2d/3d: channels (dim 1 of an input with batched_dim dims, dim 0 of an
    unbatched one) zeroed with probability p, torch's warnings and errors. An unbatched input
    (dropout1d: 2-D; dropout3d: any but 5-D) is one sample: its groups are its first dim, as torch's
    unsqueeze(0) makes them; dropout2d keeps torch's historical rule (any input: dims 0 and 1)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a tensor, got {type(input).__name__}")
    p = check_p(p)
    # torch warns at run time, also in compiled code; Dynamo cannot trace warnings.warn, so a
    # compiled call does not warn (fullgraph works, as with torch's).
    warn = warnings.warn if not torch.compiler.is_compiling() else lambda *args, **kwargs: None
    dim = input.dim()
    spatial = batched_dim - 2
    if name == "dropout1d" and dim not in (2, 3):
        raise RuntimeError(
            f"dropout1d: Expected 2D or 3D input, but received a {dim}D input. Note that dropout1d exists to "
            "provide channel-wise dropout on inputs with 1 spatial dimension, a channel dimension, and an "
            "optional batch dimension (i.e. 2D or 3D inputs)."
        )
    if name != "dropout1d" and dim not in (batched_dim - 1, batched_dim):
        warn(
            f"{name}: Received a {dim}-D input to {name}, which is deprecated and will result in an error in a "
            f"future release. To retain the behavior and silence this warning, please use dropout instead. Note "
            f"that {name} exists to provide channel-wise dropout on inputs with {spatial} spatial dimensions, a "
            f"channel dimension, and an optional batch dimension (i.e. {batched_dim - 1}D or {batched_dim}D inputs).",
            stacklevel=3,
        )
    if name == "dropout2d" and dim == 3:
        warn(
            "dropout2d: Received a 3D input to dropout2d and assuming that channel-wise 1D dropout behavior is "
            "desired - input is interpreted as shape (N, C, L), where C is the channel dim. This behavior will "
            "change in a future release to interpret the input as one without a batch dimension, i.e. shape "
            "(C, H, W). To maintain the 1D channel-wise dropout behavior, please switch to using dropout1d instead.",
            stacklevel=3,
        )
    batched = name == "dropout2d" or dim == batched_dim
    group_dims = 2 if batched else 1
    dropping = training and 0.0 < p < 1.0 and input.numel() > 0
    if dropping and dim + (0 if batched else 1) < 2:
        raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
    # p = 1 zeroes everything whatever the groups: torch accepts any dims then.
    return _drop_groups(input, min(group_dims, dim), p, training, inplace)


def dropout1d(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """Drop-in for ``torch.nn.functional.dropout1d``: each channel of an (N, C, L) or (C, L) input
    zeroed with probability ``p`` (the others scaled by ``1 / (1 - p)``), in one pass, the mask
    drawn from the counter-based stream and regenerated in backward; torch's errors."""
    return _channel_dropout("dropout1d", input, p, training, inplace, 3)


def dropout2d(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """Drop-in for ``torch.nn.functional.dropout2d``: channels of an (N, C, H, W) input, and torch's
    historical rule for others (a 3-D input is (N, C, L), with torch's warning)."""
    return _channel_dropout("dropout2d", input, p, training, inplace, 4)


def dropout3d(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """Drop-in for ``torch.nn.functional.dropout3d``: channels of an (N, C, D, H, W) or (C, D, H, W)
    input; torch's warnings for other dims."""
    return _channel_dropout("dropout3d", input, p, training, inplace, 5)


class Dropout1d(NamedInRepr, nn.Dropout1d):
    """Drop-in for ``torch.nn.Dropout1d`` (same constructor, repr), running :func:`dropout1d`."""

    def forward(self, input: Tensor) -> Tensor:
        return dropout1d(input, self.p, self.training, self.inplace)


class Dropout2d(NamedInRepr, nn.Dropout2d):
    """Drop-in for ``torch.nn.Dropout2d``, running :func:`dropout2d`."""

    def forward(self, input: Tensor) -> Tensor:
        return dropout2d(input, self.p, self.training, self.inplace)


class Dropout3d(NamedInRepr, nn.Dropout3d):
    """Drop-in for ``torch.nn.Dropout3d``, running :func:`dropout3d`."""

    def forward(self, input: Tensor) -> Tensor:
        return dropout3d(input, self.p, self.training, self.inplace)
