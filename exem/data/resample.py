"""Resampling between voxel sizes, lazily and tile-consistently.

A generator sees the world at the voxel size of its training data. When an input volume has another voxel size,
translation resamples on the fly, in one of two ways (:func:`exem.inference.translate.translate_volume`):

- output at the **model's** scale: :func:`resample_volume` gives a lazy view of the input on the model's voxel
  grid; the engine then runs the generator on that view as on any volume;
- output at the **input's** scale: :class:`RescaledNetwork` wraps the generator so each patch is interpolated to
  the model's voxel size, translated, and interpolated back.

Both use (tri)linear interpolation with the half-voxel convention of ``torch.nn.functional.interpolate(...,
align_corners=False)``: output voxel ``i`` samples input coordinate ``(i + ½)·r − ½`` (``r`` = output voxel size
/ input voxel size), clamped to the volume. The view computes every output voxel from fixed input voxels and
weights, so a block read alone equals the same block cut from a whole-volume resampling: results do not depend
on how the volume is tiled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

from exem.checks import check_input_shape, fmt_voxels
from exem.data.volume import Volume

__all__ = [
    "RescaledNetwork",
    "resample_volume",
    "resampled_shape",
    "same_voxel_size",
    "scale_roi",
]

# Voxel sizes closer than this (relative, per axis) count as equal: no resampling.
VOXEL_SIZE_TOLERANCE = 0.01


def same_voxel_size(a: Sequence[float], b: Sequence[float], tolerance: float = VOXEL_SIZE_TOLERANCE) -> bool:
    """Whether two (z, y, x) voxel sizes agree within ``tolerance`` (relative) on every axis."""
    return all(
        abs(float(x) - float(y)) <= tolerance * max(abs(float(x)), abs(float(y)))
        for x, y in zip(a, b, strict=True)
    )


def _check_sizes(
    from_nm: Sequence[float], to_nm: Sequence[float]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    src = tuple(float(v) for v in from_nm)
    dst = tuple(float(v) for v in to_nm)
    if len(src) != 3 or len(dst) != 3 or min(src) <= 0 or min(dst) <= 0:
        raise ValueError(
            f"voxel sizes must be 3 positive values (z, y, x) nm, got {list(from_nm)} → {list(to_nm)}"
        )
    return src, dst


def resampled_shape(
    shape: Sequence[int], from_nm: Sequence[float], to_nm: Sequence[float]
) -> tuple[int, int, int]:
    """Shape (Z, Y, X) of a volume of ``shape`` voxels of ``from_nm`` resampled to voxels of ``to_nm`` (≥ 1)."""
    src, dst = _check_sizes(from_nm, to_nm)
    return tuple(max(1, round(int(n) * s / d)) for n, s, d in zip(shape, src, dst, strict=True))  # type: ignore[return-value]


def _taps(start: int, stop: int, ratio: float, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For output indices ``start … stop−1``: the two input indices and the weight of the second (float32)."""
    i = np.arange(start, stop, dtype=np.float64)
    c = np.clip((i + 0.5) * ratio - 0.5, 0.0, n_in - 1)
    i0 = np.floor(c).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (c - i0).astype(np.float32)


class _ResampledArray:
    """A lazy ``(Z, Y, X)`` float32 array: ``source`` linearly resampled to another voxel size (see module doc)."""

    def __init__(
        self, source: Volume, shape: tuple[int, int, int], ratio: tuple[float, float, float]
    ) -> None:
        self.source = source
        self.shape = shape
        self.ratio = ratio
        self.dtype = np.dtype(np.float32)
        self.ndim = 3

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple) or len(key) != 3 or not all(isinstance(k, slice) for k in key):
            raise TypeError("a resampled volume is read with 3 slices (z, y, x)")
        ranges = [k.indices(n) for k, n in zip(key, self.shape, strict=True)]
        if any(step != 1 for _, _, step in ranges):
            raise TypeError("a resampled volume is read with unit-step slices")
        taps = [
            _taps(a, max(a, b), r, n)
            for (a, b, _), r, n in zip(ranges, self.ratio, self.source.shape, strict=True)
        ]
        if any(len(t[0]) == 0 for t in taps):
            return np.zeros([len(t[0]) for t in taps], dtype=np.float32)
        lo = [int(t[0].min()) for t in taps]
        hi = [int(t[1].max()) + 1 for t in taps]
        data = self.source.read(tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))).astype(np.float32)
        for ax, (i0, i1, w) in enumerate(taps):
            shape = [1, 1, 1]
            shape[ax] = len(w)
            a0 = np.take(data, i0 - lo[ax], axis=ax)
            a1 = np.take(data, i1 - lo[ax], axis=ax)
            data = a0 + (a1 - a0) * w.reshape(shape)
        return data


def resample_volume(volume: Volume, voxel_size_nm: Sequence[float]) -> Volume:
    """A lazy view of ``volume`` resampled to ``voxel_size_nm`` (z, y, x nm), read as float32 raw intensities.

    The view keeps the volume's ``intensity_range`` (linear interpolation commutes with the linear normaliser),
    so it can be translated like the original. Only the input voxels a read needs are read.

    Raises:
        ValueError: the volume's voxel size is unknown, or a voxel size is not positive.
    """
    if volume.voxel_size_nm is None:
        raise ValueError(f"{volume.path}: voxel size unknown, cannot resample; give voxel_size=[z, y, x] nm")
    src, dst = _check_sizes(volume.voxel_size_nm, voxel_size_nm)
    shape = resampled_shape(volume.shape, src, dst)
    ratio = tuple(n / m for n, m in zip(volume.shape, shape, strict=True))
    array = _ResampledArray(volume, shape, ratio)  # type: ignore[arg-type]
    return replace(
        volume,
        path=f"{volume.path} (resampled to {'×'.join(f'{v:g}' for v in dst)} nm)",
        shape=shape,
        dtype=np.dtype(np.float32),
        voxel_size_nm=dst,  # type: ignore[arg-type]
        _array=array,
        _locator=None,
    )


class RescaledNetwork(nn.Module):
    """A network trained at ``model_nm`` applied to patches of voxels of ``input_nm``.

    ``(B, C, Z, Y, X)`` patches are interpolated (trilinear, ``align_corners=False``) to the model's voxel grid
    (``round(n · input_nm / model_nm)`` voxels per axis), run through ``net``, and the output is interpolated
    back to the patch's shape. Axes whose sizes already match are not interpolated.

    Attributes:
        net: the wrapped network; ``divisor``, ``widths`` and ``voxel_size_nm`` mirror the model's, except that
            ``voxel_size_nm`` is the input's (the scale this module works at).
    """

    def __init__(self, net: nn.Module, input_nm: Sequence[float], model_nm: Sequence[float]) -> None:
        super().__init__()
        src, dst = _check_sizes(input_nm, model_nm)
        self.net = net
        self.input_nm = src
        self.model_nm = dst
        self.widths = getattr(net, "widths", None)
        self.voxel_size_nm = src

    def model_shape(self, patch: Sequence[int]) -> tuple[int, int, int]:
        """The patch (z, y, x) voxels of the input as the model sees it."""
        return resampled_shape(patch, self.input_nm, self.model_nm)

    def input_patch(self, model_patch: Sequence[int]) -> tuple[int, int, int]:
        """The input patch (z, y, x voxels) that covers ``model_patch`` voxels of the model (inverse of
        :meth:`model_shape`, rounded)."""
        return resampled_shape(model_patch, self.model_nm, self.input_nm)

    def check_input_shape(self, patch: Sequence[int]) -> None:
        """Raise ValueError (one line) if the model cannot take ``patch`` (input voxels) once resampled."""
        inner = self.model_shape(patch)
        try:
            check_input_shape(self.net, inner)
        except ValueError as e:
            raise ValueError(
                f"patch {fmt_voxels(patch)} of the input is {fmt_voxels(inner)} voxels at the model's voxel size: {e}"
            ) from None

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, Z, Y, X)`` at the input's voxel size → the network's output at the same size."""
        size = tuple(int(v) for v in x.shape[2:])
        inner = self.model_shape(size)
        y = x if inner == size else F.interpolate(x, size=inner, mode="trilinear", align_corners=False)
        y = self.net(y)
        if inner != size:
            y = F.interpolate(y, size=size, mode="trilinear", align_corners=False)
        return y


def scale_roi(roi: Sequence[int], from_nm: Sequence[float], to_nm: Sequence[float]) -> list[int]:
    """An ROI [z0, z1, y0, y1, x0, x1] in voxels of ``from_nm`` → voxels of ``to_nm`` (outward rounding)."""
    src, dst = _check_sizes(from_nm, to_nm)
    out = []
    for ax in range(3):
        f = src[ax] / dst[ax]
        out += [math.floor(int(roi[2 * ax]) * f), math.ceil(int(roi[2 * ax + 1]) * f)]
    return out
