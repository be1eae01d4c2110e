"""Seam visibility: is there a jump in the output where patches begin and end?

A blockwise result has seams when neighbouring patches disagree (a GroupNorm generator normalises each patch with
its own statistics, so the same voxel comes out differently in two patches) and the blending does not hide it.
:func:`seam_visibility` compares, along each axis, the mean absolute intensity step across the planes where a patch
of the grid starts or ends ("border" planes) with the same figure between every other pair of neighbouring planes
("interior"). A ratio near 1 means the borders look like the rest of the image; a visible seam gives a ratio well
above 1. ``benchmarks/seams.py`` uses it to choose the default translation overlap (``conf/translate.yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from exem.data.grid import AXIS_NAMES, PatchGrid

__all__ = ["SeamReport", "border_steps", "seam_visibility"]


@dataclass(frozen=True)
class SeamReport:
    """Per-axis seam figures of one volume.

    Attributes:
        border: per axis (z, y, x), the largest mean |step| across a patch border plane, or None when the grid has
            no border inside the volume on that axis.
        interior: per axis, the largest mean |step| between any other two neighbouring planes.
        ratio: ``max over axes of border / interior`` (1.0 when no axis has borders): the seam visibility.
    """

    border: tuple[float | None, float | None, float | None]
    interior: tuple[float, float, float]
    ratio: float

    def axis_ratio(self, axis: int) -> float | None:
        """``border / interior`` on one axis (None without borders there)."""
        b = self.border[axis]
        return None if b is None else _ratio(b, self.interior[axis])

    def __str__(self) -> str:
        parts = [
            f"{AXIS_NAMES[a]} {r:.3f}" if (r := self.axis_ratio(a)) is not None else f"{AXIS_NAMES[a]} -"
            for a in range(3)
        ]
        return f"seam visibility {self.ratio:.3f} (border/interior step: {', '.join(parts)})"


def _ratio(border: float, interior: float) -> float:
    """``border / interior``; a step where the rest is flat is infinitely visible, none at all is 1."""
    if interior > 0:
        return border / interior
    return float("inf") if border > 0 else 1.0


def border_steps(grid: PatchGrid) -> tuple[list[int], list[int], list[int]]:
    """Indices ``i`` of the steps ``v[i] → v[i + 1]`` that cross a patch start or end, per axis (sorted).

    A patch starting at ``s > 0`` contributes step ``s − 1``; one ending at ``e = s + patch < size`` contributes
    step ``e − 1``.
    """
    out: list[list[int]] = []
    for axis in range(3):
        size, patch = grid.shape[axis], grid.patch[axis]
        starts = grid.starts[axis]
        steps = {s - 1 for s in starts if s > 0} | {s + patch - 1 for s in starts if s + patch < size}
        out.append(sorted(steps))
    return out[0], out[1], out[2]


def seam_visibility(volume: np.ndarray | Tensor, grid: PatchGrid) -> SeamReport:
    """How much larger the intensity steps across the patch borders of ``grid`` are than anywhere else.

    Args:
        volume: the blockwise result, ``(Z, Y, X)``, any real dtype (compared as float64), the shape of
            ``grid.shape`` (its origin at the grid's origin).
        grid: the patch grid the result was computed on (same patch and overlap).

    Returns:
        A :class:`SeamReport`; ``ratio`` is the figure to compare (≈ 1: no visible seam).

    Raises:
        ValueError: ``volume`` is not 3D or its shape differs from the grid's.
    """
    v = torch.as_tensor(np.asarray(volume) if not isinstance(volume, Tensor) else volume).to(torch.float64)
    if v.ndim != 3 or tuple(v.shape) != tuple(grid.shape):
        raise ValueError(f"seam_visibility: volume shape {tuple(v.shape)} is not the grid's {grid.shape}")
    borders = border_steps(grid)
    border: list[float | None] = []
    interior: list[float] = []
    ratios: list[float] = []
    for axis in range(3):
        if v.shape[axis] < 2:
            border.append(None)
            interior.append(0.0)
            continue
        others = tuple(a for a in range(3) if a != axis)
        profile = v.diff(dim=axis).abs().mean(dim=others)  # (size − 1,): mean |step| between planes i, i+1
        mask = torch.zeros(profile.shape[0], dtype=torch.bool)
        mask[borders[axis]] = True
        inner = float(profile[~mask].mean()) if (~mask).any() else 0.0
        interior.append(inner)
        if not mask.any():
            border.append(None)
            continue
        b = float(profile[mask].mean())
        border.append(b)
        ratios.append(_ratio(b, inner))
    return SeamReport(
        border=(border[0], border[1], border[2]),
        interior=(interior[0], interior[1], interior[2]),
        ratio=max(ratios, default=1.0),
    )
