"""Anisotropic 3D U-Net generator of the published ExEM CycleGAN.

The network sees volumes as ``(B, C, Z, Y, X)`` tensors. Pooling and upsampling act on Y and X only (factor 2
per level); Z is never pooled, so any Z >= 1 works (Z = 1 is 2D-as-3D). At the default widths
``(32, 64, 128, 256, 512)`` the state dict has exactly the keys and shapes of a generator written by the
original ExEM code, so its ``G_AB_<iter>.pth`` files load with ``load_state_dict``.

Variant of the residual symmetric U-Net of Lee et al., "Superhuman accuracy on the SNEMI3D connectomics
challenge" (arXiv:1706.00120, 2017).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from exem.checks import check_batch, check_yx_divisible, positive_int

__all__ = ["AnisotropicUNet3D", "ResidualTripleConv3D", "group_count"]

# GroupNorm group counts used by the published code; it raised for any other width.
_PUBLISHED_GROUPS: dict[int, int] = {1: 1, 2: 1, 4: 1, 8: 1, 16: 4, 32: 8, 64: 8, 128: 16, 256: 32, 512: 32}
# Rule for widths outside the published table: aim for at least this many channels per group ...
_MIN_CHANNELS_PER_GROUP = 8
# ... and never more than this many groups.
_MAX_GROUPS = 32


def group_count(width: int) -> int:
    """Number of GroupNorm groups for a layer of ``width`` channels.

    Widths of the published lookup keep its values (1, 2, 4, 8 → 1; 16 → 4; 32, 64 → 8; 128 → 16;
    256, 512 → 32). Any other positive width gets the largest divisor of ``width`` that is at most
    ``min(32, max(1, width // 8))`` — about 8 or more channels per group, at most 32 groups. The result always
    divides ``width``, so this never raises for a valid width.

    Args:
        width: number of channels, a positive int.

    Returns:
        the number of groups, a positive divisor of ``width``.
    """
    width = operator.index(width)
    if width < 1:
        raise ValueError(f"group_count: width must be a positive int, got {width}")
    if width in _PUBLISHED_GROUPS:
        return _PUBLISHED_GROUPS[width]
    cap = min(_MAX_GROUPS, max(1, width // _MIN_CHANNELS_PER_GROUP))
    return next(g for g in range(cap, 0, -1) if width % g == 0)


def _group_norm(width: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(width), width)


class ResidualTripleConv3D(nn.Module):
    """Residual block: an in-plane conv, then two 3×3×3 convs, each followed by GroupNorm and ELU.

    ``a = ELU(GN(conv1(x)))`` with conv1 of kernel (1, 3, 3); ``b = ELU(GN(conv3(ELU(GN(conv2(a))))))`` with
    conv2, conv3 of kernel 3; the output is ``a + b``. Convolutions have no bias (GroupNorm follows).
    Shapes: ``(B, in_channels, Z, Y, X) -> (B, out_channels, Z, Y, X)``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(
            in_channels, out_channels, kernel_size=(1, 3, 3), padding=(0, 1, 1), bias=False
        )
        self.groupnorm1 = _group_norm(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.groupnorm2 = _group_norm(out_channels)
        self.conv3 = nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.groupnorm3 = _group_norm(out_channels)
        # In place is safe: neither GroupNorm nor the next conv needs the overwritten tensor for backward.
        self.elu = nn.ELU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, Z, Y, X) -> (B, out_channels, Z, Y, X)``."""
        a = self.elu(self.groupnorm1(self.conv1(x)))
        b = self.elu(self.groupnorm2(self.conv2(a)))
        b = self.elu(self.groupnorm3(self.conv3(b)))
        return a + b


def _validate_widths(widths: Sequence[int]) -> tuple[int, ...]:
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
        raise ValueError(f"widths must be a sequence of positive ints, got {widths!r}")
    try:
        out = [positive_int("widths", w) for w in widths]
    except ValueError:
        raise ValueError(f"widths must be a sequence of positive ints, got {tuple(widths)!r}") from None
    if len(out) < 2:
        raise ValueError(f"widths needs at least 2 levels (encoder + one pooled level), got {tuple(out)!r}")
    return tuple(out)


class AnisotropicUNet3D(nn.Module):
    """Anisotropic residual 3D U-Net (the published ExEM generator).

    Layers (N = ``len(widths)`` levels):

    - ``first_conv``: conv (1, 5, 5), padding (0, 2, 2), with bias, ``in_channels -> widths[0]``, then ELU;
    - ``tripleconv1..N``: :class:`ResidualTripleConv3D` encoder blocks (``widths[i-1] -> widths[i]``), with
      MaxPool3d (1, 2, 2) between consecutive levels;
    - ``tripleconv_up1..N-1``: decoder blocks, ``up1`` the deepest: trilinear upsampling ×(1, 2, 2)
      (``align_corners=True``), concatenation ``[upsampled, skip]`` along channels, then a block from
      ``deep + skip`` channels down to the skip's width;
    - ``final_conv``: conv (1, 5, 5), padding (0, 2, 2), with bias, ``widths[0] -> widths[0]``, then ELU;
    - ``one_by_one_conv``: 1×1×1 conv with bias to ``out_channels``; the output is linear (no activation).

    Args:
        in_channels: channels of the input volume.
        out_channels: channels of the output volume.
        widths: channels per level, shallow to deep; at least 2 levels.
        activation_checkpointing: while gradients are recorded, keep only each U-Net level's inputs and
            recompute the level in the backward pass (``torch.utils.checkpoint``): less peak memory for large
            patches, about one more forward pass of compute. Outputs and gradients are unchanged.

    Attributes:
        widths: the widths as a tuple.
        divisor: ``2 ** (len(widths) - 1)``; Y and X of the input must be multiples of it.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128, 256, 512),
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.activation_checkpointing = bool(activation_checkpointing)
        self.in_channels = positive_int("in_channels", in_channels)
        self.out_channels = positive_int("out_channels", out_channels)
        self.widths: tuple[int, ...] = _validate_widths(widths)
        self.levels = len(self.widths)
        self.divisor = 2 ** (self.levels - 1)

        w = self.widths
        self.first_conv = nn.Conv3d(
            self.in_channels, w[0], kernel_size=(1, 5, 5), padding=(0, 2, 2), bias=True
        )
        # Registered in the published order: first_conv, tripleconv1..N, tripleconv_up1..N-1, final_conv, 1x1.
        for i in range(self.levels):
            setattr(self, f"tripleconv{i + 1}", ResidualTripleConv3D(w[max(i - 1, 0)], w[i]))
        for j in range(1, self.levels):
            deep, skip = w[self.levels - j], w[self.levels - j - 1]
            setattr(self, f"tripleconv_up{j}", ResidualTripleConv3D(deep + skip, skip))
        self.final_conv = nn.Conv3d(w[0], w[0], kernel_size=(1, 5, 5), padding=(0, 2, 2), bias=True)
        self.one_by_one_conv = nn.Conv3d(w[0], self.out_channels, kernel_size=1, bias=True)

        self.downsample = nn.MaxPool3d(kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.elu = nn.ELU(inplace=True)

    def check_input_shape(self, shape: Sequence[int]) -> None:
        """Raise ``ValueError`` unless the last two entries (Y, X) of ``shape`` are multiples of ``divisor``.

        ``shape`` may be a full ``(B, C, Z, Y, X)`` shape or a patch shape ``(Z, Y, X)``.
        """
        check_yx_divisible(shape, self.divisor, f" (2^(levels-1) for widths {self.widths})")

    def forward(self, x: Tensor) -> Tensor:
        """Translate a batch of volumes.

        Args:
            x: ``(B, in_channels, Z, Y, X)`` float tensor, intensities normalised to [0, 1]; Y and X multiples
                of :attr:`divisor`, any Z >= 1.

        Returns:
            ``(B, out_channels, Z, Y, X)`` float tensor (linear output, same units as the training targets).
        """
        check_batch(x, self.in_channels, "AnisotropicUNet3D")
        self.check_input_shape(x.shape)

        skips: list[Tensor] = []
        for i in range(1, self.levels + 1):
            x = self._run(self._encode, i, x)
            skips.append(x)
        skips.pop()  # the deepest level's output is x itself
        for j in range(1, self.levels):
            x = self._run(self._decode, j, x, skips.pop())
        return x

    def _run(self, level: Any, *args: Any) -> Tensor:
        """Call one U-Net level, through ``torch.utils.checkpoint`` when checkpointing and recording gradients."""
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(level, *args, use_reentrant=False, preserve_rng_state=False)
        return level(*args)

    def _encode(self, i: int, x: Tensor) -> Tensor:
        """Encoder level ``i`` (1-based): the first conv (level 1) or max-pooling, then the level's block."""
        x = self.elu(self.first_conv(x)) if i == 1 else self.downsample(x)
        return getattr(self, f"tripleconv{i}")(x)

    def _decode(self, j: int, x: Tensor, skip: Tensor) -> Tensor:
        """Decoder level ``j`` (1 = deepest): upsample ``x`` to ``skip``, concatenate, block; the last level adds
        the final conv and the 1×1×1 output conv."""
        x = F.interpolate(x, size=skip.shape[-3:], mode="trilinear", align_corners=True)
        x = getattr(self, f"tripleconv_up{j}")(torch.cat([x, skip], dim=1))
        if j == self.levels - 1:
            x = self.one_by_one_conv(self.elu(self.final_conv(x)))
        return x
