"""``PatchGrid``: the one place that knows patch starts, overlaps and edges.

Training (the validation grid), translation and segmentation all walk a volume with this grid.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from exem.checks import fmt_voxels, triple

AXIS_NAMES = ("z", "y", "x")


def axis_starts(size: int, patch: int, step: int) -> list[int]:
    """Starts ``0, step, 2·step, …`` along one axis; the last clamped to ``size − patch`` (no duplicates)."""
    last = size - patch
    starts = list(range(0, last + 1, step))
    if starts[-1] != last:
        starts.append(last)
    return starts


class PatchGrid:
    """Regular grid of patches over a ``(Z, Y, X)`` volume.

    Per axis the step is ``patch − overlap``; starts are ``0, step, 2·step, …`` and the last start is clamped
    to ``shape − patch`` so the last patch ends exactly at the edge. Every voxel is covered by a patch.

    Args:
        shape: volume shape (Z, Y, X) in voxels.
        patch: patch shape (Z, Y, X) in voxels, ``1 ≤ patch ≤ shape`` on every axis.
        overlap: overlap of neighbouring patches in voxels, one value or (Z, Y, X); ``0 ≤ overlap < patch``.

    Raises:
        ValueError: with a one-line message when the patch or overlap does not fit.
    """

    def __init__(self, shape: Sequence[int], patch: Sequence[int], overlap: Sequence[int] | int = 0) -> None:
        self.shape = triple(shape, "shape")
        self.patch = triple(patch, "patch")
        self.overlap = triple(overlap, "overlap")
        for ax, (s, p, o) in enumerate(zip(self.shape, self.patch, self.overlap, strict=True)):
            name = AXIS_NAMES[ax]
            if p < 1:
                raise ValueError(f"patch {fmt_voxels(self.patch)} must be at least 1 voxel on axis {name}")
            if p > s:
                raise ValueError(
                    f"patch {fmt_voxels(self.patch)} is larger than the volume {fmt_voxels(self.shape)} on axis {name}"
                )
            if not 0 <= o < p:
                raise ValueError(
                    f"overlap {fmt_voxels(self.overlap)} must be ≥ 0 and smaller than the patch"
                    f" {fmt_voxels(self.patch)} on axis {name}"
                )
        self.step = tuple(p - o for p, o in zip(self.patch, self.overlap, strict=True))
        self.starts: tuple[list[int], list[int], list[int]] = tuple(  # type: ignore[assignment]
            axis_starts(s, p, st) for s, p, st in zip(self.shape, self.patch, self.step, strict=True)
        )

    @property
    def num_per_axis(self) -> tuple[int, int, int]:
        """Number of patches along Z, Y and X."""
        return tuple(len(s) for s in self.starts)  # type: ignore[return-value]

    def __len__(self) -> int:
        nz, ny, nx = self.num_per_axis
        return nz * ny * nx

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        """Patch starts (z, y, x) in C order (x fastest)."""
        for z in self.starts[0]:
            for y in self.starts[1]:
                for x in self.starts[2]:
                    yield (z, y, x)

    def __getitem__(self, index: int) -> tuple[int, int, int]:
        """The ``index``-th start in C order (same order as iteration)."""
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"patch index {index} out of range for a grid of {n} patches")
        _, ny, nx = self.num_per_axis
        iz, rem = divmod(index, ny * nx)
        iy, ix = divmod(rem, nx)
        return (self.starts[0][iz], self.starts[1][iy], self.starts[2][ix])

    def slices(self, start: Sequence[int]) -> tuple[slice, slice, slice]:
        """Slices (z, y, x) of the patch that starts at ``start``."""
        z, y, x = (int(v) for v in start)
        pz, py, px = self.patch
        return (slice(z, z + pz), slice(y, y + py), slice(x, x + px))

    def __repr__(self) -> str:
        return (
            f"PatchGrid(shape={fmt_voxels(self.shape)}, patch={fmt_voxels(self.patch)},"
            f" overlap={fmt_voxels(self.overlap)}, patches={fmt_voxels(self.num_per_axis)})"
        )
