"""Multi-scale 3D PatchGAN discriminator of the published ExEM CycleGAN.

Each scale is a PatchGAN on ``(B, C, Z, Y, X)`` volumes that strides over Y and X only; scale ``s`` sees the
input average-pooled ``s`` times by (1, 2, 2). The forward pass returns one score map per scale (least-squares
GAN scores, no final activation).
"""

from __future__ import annotations

from torch import Tensor, nn

from exem.checks import check_batch, positive_int

__all__ = ["MultiScaleDiscriminator3D", "PatchDiscriminator3D"]

_NEGATIVE_SLOPE = 0.2  # LeakyReLU slope of the published discriminator
_NUM_BLOCKS = 4  # stride-2 blocks per scale: widths f, 2f, 4f, 8f
_BLOCK_KERNEL = (3, 4, 4)
_BLOCK_STRIDE = (1, 2, 2)
_BLOCK_PADDING = (1, 1, 1)


class PatchDiscriminator3D(nn.Module):
    """One scale of the discriminator.

    Four blocks conv k=(3, 4, 4) s=(1, 2, 2) p=(1, 1, 1) with bias → InstanceNorm3d (affine=False; not on the
    first block) → LeakyReLU(0.2), widths f, 2f, 4f, 8f; then a conv k=(1, 3, 3) p=(0, 1, 1) to one channel.
    Shapes: ``(B, in_channels, Z, Y, X) -> (B, 1, Z, Y // 16, X // 16)`` (for Y, X >= 16).
    """

    def __init__(self, in_channels: int = 1, base_filters: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for i in range(_NUM_BLOCKS):
            c_out = base_filters * 2**i
            layers.append(
                nn.Conv3d(
                    c_in, c_out, kernel_size=_BLOCK_KERNEL, stride=_BLOCK_STRIDE, padding=_BLOCK_PADDING
                )
            )
            if i > 0:
                layers.append(nn.InstanceNorm3d(c_out, affine=False))
            layers.append(nn.LeakyReLU(_NEGATIVE_SLOPE, inplace=True))
            c_in = c_out
        layers.append(nn.Conv3d(c_in, 1, kernel_size=(1, 3, 3), padding=(0, 1, 1)))
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, Z, Y, X) -> (B, 1, Z, Y // 16, X // 16)`` score map."""
        return self.model(x)


def _block_out(n: int) -> int:
    """Size along Y or X after one stride-2 block (k=4, s=2, p=1); 0 when the input is too small."""
    k, s, p = _BLOCK_KERNEL[-1], _BLOCK_STRIDE[-1], _BLOCK_PADDING[-1]
    return max(0, (n + 2 * p - k) // s + 1)


class MultiScaleDiscriminator3D(nn.Module):
    """PatchGAN discriminators at ``num_scales`` in-plane resolutions.

    Scale 0 sees the full-resolution input; scale ``s`` sees it after ``s`` AvgPool3d k=(1, 2, 2) s=(1, 2, 2).

    Args:
        in_channels: channels of the input volume.
        num_scales: number of scales (>= 1).
        base_filters: width ``f`` of the first block; blocks have widths f, 2f, 4f, 8f.
    """

    def __init__(self, in_channels: int = 1, num_scales: int = 2, base_filters: int = 64) -> None:
        super().__init__()
        self.in_channels = positive_int("in_channels", in_channels)
        self.num_scales = positive_int("num_scales", num_scales)
        self.base_filters = positive_int("base_filters", base_filters)
        self.scales = nn.ModuleList(
            PatchDiscriminator3D(self.in_channels, self.base_filters) for _ in range(self.num_scales)
        )
        self.downsample = nn.AvgPool3d(kernel_size=(1, 2, 2), stride=(1, 2, 2), count_include_pad=False)

    def min_yx(self, z: int = 1) -> int:
        """Smallest Y (= X) that every scale can score, for an input of depth ``z``.

        Each scale needs Y, X >= 16 (four stride-2 blocks) and, because InstanceNorm needs more than one voxel
        per channel, more than one voxel in its last block's output (Y, X >= 32 at the coarsest scale when
        z = 1).
        """
        factor = 2 ** (self.num_scales - 1)
        per_scale = 2**_NUM_BLOCKS if z > 1 else 2 ** (_NUM_BLOCKS + 1)
        return per_scale * factor

    def check_input_shape(self, shape: tuple[int, ...]) -> None:
        """Raise ``ValueError`` if a ``(B, C, Z, Y, X)`` input is too small for some scale."""
        z, y, x = (int(v) for v in shape[-3:])
        for s in range(self.num_scales):
            sy, sx = y // 2**s, x // 2**s
            ok = True
            norm_voxels = []
            for _ in range(_NUM_BLOCKS):
                sy, sx = _block_out(sy), _block_out(sx)
                ok = ok and sy > 0 and sx > 0
                norm_voxels.append(z * sy * sx)
            # InstanceNorm follows blocks 2..4 and needs more than one voxel per channel.
            if not ok or min(norm_voxels[1:]) <= 1:
                raise ValueError(
                    f"discriminator input Z×Y×X = {z}×{y}×{x} is too small for scale {s} "
                    f"of {self.num_scales}: "
                    "its last blocks would have no or a single voxel; "
                    f"use Y and X >= {self.min_yx(z)}"
                )

    def forward(self, x: Tensor) -> list[Tensor]:
        """Score a batch of volumes at every scale.

        Args:
            x: ``(B, in_channels, Z, Y, X)`` float tensor, intensities normalised to [0, 1].

        Returns:
            list of ``num_scales`` score maps; entry ``s`` has shape ``(B, 1, Z, Y_s // 16, X_s // 16)`` with
            ``Y_s = Y // 2**s`` (scale 0 = full resolution).
        """
        check_batch(x, self.in_channels, "MultiScaleDiscriminator3D")
        self.check_input_shape(tuple(x.shape))
        outputs: list[Tensor] = []
        for s, disc in enumerate(self.scales):
            if s > 0:
                x = self.downsample(x)
            outputs.append(disc(x))
        return outputs
