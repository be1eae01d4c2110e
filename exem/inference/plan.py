"""The plan of a whole-volume inference: which blocks, which patches, which chunks; computed once per run.

- The region (the volume or an ROI, :func:`resolve_region`) is walked by ONE global
  :class:`~exem.data.grid.PatchGrid`.
- The region is split into output blocks at multiples of ``block_shape``; block sizes are rounded up to whole
  chunks of every pyramid level (:func:`chunk_alignment`), so no two blocks share a chunk (any number of
  processes can write at once, and a written block is final).
- A block's output is ``Σ_p w·net(patch p) / Σ_p w`` over ALL global-grid patches ``p`` that intersect the
  block (in the grid's fixed order), restricted to the block, so the result does not depend on the block split.
  Patches straddling a block border are computed by every block they touch: along an axis of size S cut into
  n blocks the extra work is about ``(n − 1)(patch − 1) / S`` (:attr:`BlockPlan.duplicate_fraction` gives the
  exact figure). The default block shape minimises it within a voxel budget (:data:`DEFAULT_BLOCK_VOXELS`):
  0 % for volumes up to 2^29 voxels (one block), ~16 % for 200×4000×4000, ~25-30 % for very large volumes
  (patch 16×256×256, 25 % overlap).
- :func:`plan_volume` adds the output defaults every task shares: chunks ``(2·patch_z, 256, 256)``, 25 %
  overlap, two pyramid levels.
- Sharded outputs (Zarr v3, ``shards``): a shard file holds many chunks and writing one chunk rewrites its shard,
  so block borders then follow whole shards of every level (:func:`level_shards`): no two blocks, ranks or writer
  threads ever write into the same shard.

Pure Python (no torch, no Lightning): plans are cheap and testable on their own.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from exem.checks import fmt_voxels, triple
from exem.data.grid import AXIS_NAMES, PatchGrid
from exem.data.ome import level_layout

__all__ = [
    "CPU_BLOCK_VOXELS",
    "DEFAULT_BLOCK_VOXELS",
    "DEFAULT_CHUNK_YX",
    "DEFAULT_OVERLAP_FRACTION",
    "LEVELS",
    "Block",
    "BlockPlan",
    "align_block",
    "chunk_alignment",
    "default_chunks",
    "default_overlap",
    "level_chunks",
    "level_shards",
    "plan_blocks",
    "plan_volume",
    "resolve_region",
    "round_up",
]

log = logging.getLogger(__name__)

# Default block size budget in voxels (2^29 = 537 M) on an accelerator. A block holds its raw context and its cast
# output on the device (~2-6 bytes per voxel); the float32 blending sums exist for one patch depth of Z slices at a
# time (ZStreamBlender): ~2-3 GB besides the network for uint8 in and out. Duplicate work at block borders for
# patch 16×256×256 with 25 % overlap: 0 % up to 2^29 voxels (one block), ~16 % for 200×4000×4000, ~24-31 %
# for very large volumes (blocks of 128×2048×2048).
DEFAULT_BLOCK_VOXELS = 2**29
# Default block budget on the CPU, where the block buffers live in RAM: with 2^26 voxels a translation peaked at
# 1.17 GiB RSS on a 2-core machine (benchmarks/RESULTS.md), 2^27 at 1.58 GiB; the target is < 2 GiB.
CPU_BLOCK_VOXELS = 2**26
# Pyramid levels of every output: "0" (full resolution) and "1" (Y and X halved, 2×2 mean).
LEVELS = 2
# In-plane output chunk size (voxels); Z chunks are two patches deep.
DEFAULT_CHUNK_YX = 256
# Default overlap of neighbouring patches, as a fraction of the patch (rounded to an even number of voxels).
DEFAULT_OVERLAP_FRACTION = 0.25


def round_up(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple`` (both integers)."""
    return -(-int(value) // int(multiple)) * int(multiple)


@dataclass(frozen=True)
class Block:
    """One output block: a box of the region and the global-grid patches that intersect it.

    All coordinates are voxels relative to the region's origin (the ROI's first voxel).

    Attributes:
        index: position in :attr:`BlockPlan.blocks`.
        start, stop: the block's box (z, y, x), ``stop`` exclusive.
        patch: the patch shape (z, y, x).
        patch_starts: per axis, the global grid's starts of the patches that intersect the block (sorted).
    """

    index: int
    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    patch: tuple[int, int, int]
    patch_starts: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.start, self.stop, strict=True))  # type: ignore[return-value]

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)

    @property
    def id(self) -> str:
        """A file-name-safe id naming the box, e.g. ``z0-16_y0-512_x512-1024`` (unambiguous across plans)."""
        return "_".join(f"{n}{a}-{b}" for n, a, b in zip(AXIS_NAMES, self.start, self.stop, strict=True))

    @property
    def num_patches(self) -> int:
        return math.prod(len(s) for s in self.patch_starts)

    @property
    def context_start(self) -> tuple[int, int, int]:
        """First voxel (z, y, x) of the union of the block's patches."""
        return tuple(s[0] for s in self.patch_starts)  # type: ignore[return-value]

    @property
    def context_stop(self) -> tuple[int, int, int]:
        """End (exclusive) of the union of the block's patches."""
        return tuple(s[-1] + p for s, p in zip(self.patch_starts, self.patch, strict=True))  # type: ignore[return-value]

    def slices(self) -> tuple[slice, slice, slice]:
        """The block's box as slices (z, y, x) of the region (= of the output array)."""
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop, strict=True))  # type: ignore[return-value]

    def patches(self) -> Iterator[tuple[int, int, int]]:
        """Starts (z, y, x) of the block's patches, in the global grid's order (C order, x fastest)."""
        return itertools.product(*self.patch_starts)  # type: ignore[return-value]


@dataclass(frozen=True)
class BlockPlan:
    """The region, its global patch grid and its output blocks.

    Attributes:
        region: (z0, z1, y0, y1, x0, x1) voxels of the input volume (the ROI, or the whole volume).
        grid: the global :class:`PatchGrid` over the region's shape.
        block_shape: (z, y, x) block size in voxels (the last block along an axis may be smaller).
        align: (z, y, x) multiple that block borders respect (whole chunks of every pyramid level).
        blocks: the blocks in C order (x fastest).
        chunks: level-0 chunk shape (z, y, x) of the output the plan was made for (None: not aligned).
        levels: pyramid levels of that output (level l halves Y and X l times).
        shards: level-0 shard shape (z, y, x) of that output (whole chunks), or None (not sharded).
    """

    region: tuple[int, int, int, int, int, int]
    grid: PatchGrid
    block_shape: tuple[int, int, int]
    align: tuple[int, int, int]
    blocks: tuple[Block, ...]
    chunks: tuple[int, int, int] | None = None
    levels: int = 1
    shards: tuple[int, int, int] | None = None

    @property
    def origin(self) -> tuple[int, int, int]:
        """First voxel (z, y, x) of the region in the input volume."""
        return (self.region[0], self.region[2], self.region[4])

    @property
    def shape(self) -> tuple[int, int, int]:
        """Region (= output) shape (Z, Y, X)."""
        r = self.region
        return (r[1] - r[0], r[3] - r[2], r[5] - r[4])

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)

    @property
    def patches_computed(self) -> int:
        """Patch evaluations summed over all blocks (≥ ``len(grid)``)."""
        return sum(b.num_patches for b in self.blocks)

    @property
    def duplicate_fraction(self) -> float:
        """Extra network work caused by the block split: ``patches_computed / len(grid) − 1``."""
        return self.patches_computed / len(self.grid) - 1.0


def resolve_region(
    volume_shape: Sequence[int], roi: Sequence[int] | None, patch: Sequence[int]
) -> tuple[int, int, int, int, int, int]:
    """Validate an ROI (z0, z1, y0, y1, x0, x1) against the volume and the patch; None → the whole volume.

    Raises:
        ValueError: one line naming the axis and the problem.
    """
    shape = triple(volume_shape, "volume shape")
    patch = triple(patch, "patch")
    if roi is None:
        region = (0, shape[0], 0, shape[1], 0, shape[2])
    else:
        try:
            region = tuple(int(v) for v in roi)
        except (TypeError, ValueError):
            raise ValueError(f"ROI must be 6 integers [z0, z1, y0, y1, x0, x1], got {roi!r}") from None
        if len(region) != 6:
            raise ValueError(f"ROI must be 6 integers [z0, z1, y0, y1, x0, x1], got {list(roi)}")
    for ax, name in enumerate(AXIS_NAMES):
        a, b = region[2 * ax], region[2 * ax + 1]
        if roi is not None:
            if a >= b:
                raise ValueError(f"ROI {name} {a}:{b} is empty or reversed (need {name}0 < {name}1)")
            if a < 0 or b > shape[ax]:
                raise ValueError(f"ROI {name} {a}:{b} is outside the volume ({name} size {shape[ax]})")
        if b - a < patch[ax]:
            what = f"ROI {name} {a}:{b}" if roi is not None else f"volume {fmt_voxels(shape)}"
            raise ValueError(
                f"patch {fmt_voxels(patch)} is larger than the {what} on axis {name}"
                f" ({patch[ax]} > {b - a} voxels); use a smaller patch"
            )
    return region  # type: ignore[return-value]


def level_chunks(shape: Sequence[int], chunks: Sequence[int], levels: int) -> list[tuple[int, int, int]]:
    """Chunk shapes of pyramid levels ``0 … levels−1`` (level l: Y and X halved l times, rounded up).

    The rule of :func:`exem.data.ome.level_layout` (what the arrays are created with): each level's chunk is
    ``chunks`` capped by the level's shape.
    """
    return [level_layout(shape, (1, 2**lvl, 2**lvl), chunks)[1] for lvl in range(int(levels))]  # type: ignore[misc]


def level_shards(
    shape: Sequence[int], chunks: Sequence[int], shards: Sequence[int], levels: int
) -> list[tuple[int, int, int]]:
    """Shard shapes of pyramid levels ``0 … levels−1`` (:func:`exem.data.ome.level_layout`): each covers the region
    of a level-0 shard (Y and X halved per level), in whole chunks of its level."""
    out = []
    for lvl in range(int(levels)):
        lshards = level_layout(shape, (1, 2**lvl, 2**lvl), chunks, shards)[2]
        assert lshards is not None
        out.append(lshards)
    return out  # type: ignore[return-value]


def chunk_alignment(chunks_per_level: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    """Per axis, the least multiple of every level's chunk (in level-0 voxels): ``lcm_l(2^l · chunk_l)``."""
    align = [1, 1, 1]
    for lvl, c in enumerate(chunks_per_level):
        f = (1, 2**lvl, 2**lvl)
        for ax in range(3):
            align[ax] = math.lcm(align[ax], int(c[ax]) * f[ax])
    return tuple(align)  # type: ignore[return-value]


def _axis_sizes(size: int, align: int) -> list[int]:
    """Candidate block sizes along one axis: for n = 1, 2, … blocks, ``⌈size / n⌉`` rounded up to ``align``."""
    out: set[int] = set()
    for n in range(1, -(-size // align) + 1):
        out.add(min(size, round_up(-(-size // n), align)))
    return sorted(out)


def _border_cost(size: int, block: int, patch: int) -> float:
    """Estimated extra work along one axis: each interior border re-computes ≈ (patch − 1) / size of the axis."""
    return (-(-size // block) - 1) * (patch - 1) / size


def _default_block_shape(
    shape: Sequence[int], patch: Sequence[int], align: Sequence[int], budget: int
) -> tuple[int, int, int]:
    """The block of at most ``budget`` voxels (sides multiples of ``align``) with the least duplicate work.

    Along an axis of size S split into n blocks, about ``(n − 1)(patch − 1)/S`` of the patches are computed
    twice; the estimate ``Π(1 + that) − 1`` is minimised over all splits (fewest blocks breaks ties). Blocks are
    as even as the alignment allows (no sliver blocks at the far edge).
    """
    shape = tuple(int(s) for s in shape)
    if math.prod(shape) <= budget:
        return shape  # type: ignore[return-value]
    cand = [_axis_sizes(s, a) for s, a in zip(shape, align, strict=True)]
    best: tuple[float, int, tuple[int, int, int]] | None = None
    for bz in cand[0]:
        for by in cand[1]:
            room = budget // (bz * by)
            fits = [bx for bx in cand[2] if bx <= room]
            if not fits:
                continue
            bx = fits[-1]  # the largest x size that fits is the cheapest for this (bz, by)
            dims = (bz, by, bx)
            cost = math.prod(1 + _border_cost(s, b, p) for s, b, p in zip(shape, dims, patch, strict=True))
            nblocks = math.prod(-(-s // b) for s, b in zip(shape, dims, strict=True))
            key = (round(cost, 9), nblocks, dims)
            if best is None or key[:2] < best[:2]:
                best = key
    if best is None:  # even the smallest aligned block is over budget: take it
        return tuple(c[0] for c in cand)  # type: ignore[return-value]
    return best[2]


def plan_blocks(
    volume_shape: Sequence[int],
    patch: Sequence[int],
    overlap: Sequence[int] | int = 0,
    *,
    roi: Sequence[int] | None = None,
    block_shape: Sequence[int] | None = None,
    chunks: Sequence[int] | None = None,
    levels: int = 1,
    block_voxels: int = DEFAULT_BLOCK_VOXELS,
    shards: Sequence[int] | None = None,
) -> BlockPlan:
    """Plan the blocks of a region.

    Args:
        volume_shape: input volume shape (Z, Y, X).
        patch, overlap: of the global patch grid (voxels).
        roi: (z0, z1, y0, y1, x0, x1) voxels of the input, or None for the whole volume.
        block_shape: (z, y, x) voxels per block, rounded up to whole chunks (see ``chunks``) and capped by the
            region; None → the largest block of ≤ ``block_voxels`` voxels with sides proportional to the patch.
        chunks: level-0 chunk shape of the output (None: no alignment); with ``levels`` it fixes the
            alignment of the block borders so that no two blocks share a chunk of any pyramid level.
        levels: number of pyramid levels written (level l halves Y and X l times).
        block_voxels: budget for the default block shape.
        shards: level-0 shard shape (z, y, x) of a sharded output (needs ``chunks``; rounded up to whole chunks of
            every level, capped by the region): block borders then follow whole shards of every level
            (:func:`level_shards`).

    Raises:
        ValueError: bad ROI, patch larger than the region, bad overlap, block shape or shards.
    """
    patch = triple(patch, "patch")
    region = resolve_region(volume_shape, roi, patch)
    shape = (region[1] - region[0], region[3] - region[2], region[5] - region[4])
    grid = PatchGrid(shape, patch, overlap)
    shards0: tuple[int, int, int] | None = None
    if chunks is None:
        if shards is not None:
            raise ValueError("shards need the output's chunks (plan with chunks)")
        align: tuple[int, int, int] = (1, 1, 1)
    else:
        chunk0 = triple(chunks, "chunks")
        if min(chunk0) < 1:
            raise ValueError(f"chunks must be positive, got {list(chunk0)}")
        align = chunk_alignment(level_chunks(shape, chunk0, levels))
        if shards is not None:
            requested_shards = triple(shards, "shards")
            if min(requested_shards) < 1:
                raise ValueError(f"shards must be positive, got {list(requested_shards)}")
            # whole chunks of every level (so that level l's shards are level 0's halved l times), capped by the region
            shards0 = tuple(  # type: ignore[assignment]
                min(round_up(h, a), round_up(s, c))
                for h, a, s, c in zip(requested_shards, align, shape, chunk0, strict=True)
            )
            align = chunk_alignment(level_shards(shape, chunk0, shards0, levels))  # type: ignore[arg-type]
            smallest = math.prod(min(a, s) for a, s in zip(align, shape, strict=True))
            if block_shape is None and smallest > block_voxels:
                log.warning(
                    "shards %s make every block at least %s voxels, over the block budget of %d voxels;"
                    " smaller shards use less memory",
                    fmt_voxels(shards0),  # type: ignore[arg-type]
                    fmt_voxels(tuple(min(a, s) for a, s in zip(align, shape, strict=True))),
                    block_voxels,
                )
    if block_shape is None:
        bshape = _default_block_shape(shape, patch, align, int(block_voxels))
    else:
        requested = triple(block_shape, "block_shape")
        if min(requested) < 1:
            raise ValueError(f"block_shape must be positive, got {list(requested)}")
        bshape = tuple(min(s, round_up(b, a)) for s, b, a in zip(shape, requested, align, strict=True))  # type: ignore[assignment]

    per_axis: list[list[tuple[int, int, tuple[int, ...]]]] = []
    for ax in range(3):
        s, b, p = shape[ax], bshape[ax], patch[ax]
        entries = []
        for b0 in range(0, s, b):
            b1 = min(b0 + b, s)
            starts = tuple(st for st in grid.starts[ax] if st < b1 and st + p > b0)
            entries.append((b0, b1, starts))
        per_axis.append(entries)
    blocks = []
    for i, (ez, ey, ex) in enumerate(itertools.product(*per_axis)):
        blocks.append(
            Block(
                index=i,
                start=(ez[0], ey[0], ex[0]),
                stop=(ez[1], ey[1], ex[1]),
                patch=patch,
                patch_starts=(ez[2], ey[2], ex[2]),
            )
        )
    return BlockPlan(
        region=region,
        grid=grid,
        block_shape=bshape,  # type: ignore[arg-type]
        align=align,
        blocks=tuple(blocks),
        chunks=None if chunks is None else chunk0,
        levels=int(levels),
        shards=shards0,
    )


def align_block(
    shape: Sequence[int],
    chunks: Sequence[int],
    levels: int,
    requested: Sequence[int],
    name: str = "block",
    shards: Sequence[int] | None = None,
) -> tuple[int, int, int]:
    """``requested`` (z, y, x) voxels rounded up to whole chunks of every pyramid level (to whole ``shards``, the
    plan's level-0 shard shape, when the output is sharded), capped by ``shape``.

    Raises:
        ValueError: ``requested`` is not three positive integers (one line naming ``name``).
    """
    align = tuple(shards) if shards is not None else chunk_alignment(level_chunks(shape, chunks, levels))
    req = triple(requested, name)
    if min(req) < 1:
        raise ValueError(f"{name} must be positive, got {list(req)}")
    return tuple(min(int(s), round_up(b, a)) for s, b, a in zip(shape, req, align, strict=True))  # type: ignore[return-value]


def default_overlap(patch: Sequence[int]) -> tuple[int, int, int]:
    """25 % of the patch per axis, rounded to an even number of voxels (0 for an axis of size 1)."""
    out = []
    for p in triple(patch, "patch"):
        o = 2 * round(p * DEFAULT_OVERLAP_FRACTION / 2)
        out.append(min(o, p - 1) if p > 1 else 0)
    return tuple(out)  # type: ignore[return-value]


def default_chunks(shape: Sequence[int], patch: Sequence[int]) -> tuple[int, int, int]:
    """Output chunks ``(2·patch_z, 256, 256)`` capped by the output shape."""
    pz = triple(patch, "patch")[0]
    want = (2 * pz, DEFAULT_CHUNK_YX, DEFAULT_CHUNK_YX)
    return tuple(min(int(c), int(s)) for c, s in zip(want, shape, strict=True))  # type: ignore[return-value]


def plan_volume(
    volume_shape: Sequence[int],
    patch: Sequence[int],
    overlap: Sequence[int] | None = None,
    *,
    roi: Sequence[int] | None = None,
    chunks: Sequence[int] | None = None,
    block_shape: Sequence[int] | None = None,
    block_voxels: int = DEFAULT_BLOCK_VOXELS,
    levels: int = LEVELS,
    shards: Sequence[int] | None = None,
) -> BlockPlan:
    """The plan of an inference run that writes an OME-Zarr pyramid: :func:`plan_blocks` with the outputs' defaults.

    Args:
        volume_shape: input (Z, Y, X) voxels.
        patch: (z, y, x) voxels per network call.
        overlap: (z, y, x) voxels; None → :func:`default_overlap`.
        roi: (z0, z1, y0, y1, x0, x1) voxels of the input; None → the whole volume.
        chunks: output chunks (z, y, x), capped by the output shape; None → :func:`default_chunks`.
        block_shape, block_voxels: as :func:`plan_blocks`.
        levels: pyramid levels written.
        shards: level-0 shards (z, y, x) of a sharded output; None: not sharded (see :func:`plan_blocks`).

    Raises:
        ValueError: bad ROI / patch / overlap / chunks / block shape (one line).
    """
    patch3 = triple(patch, "patch")
    region = resolve_region(volume_shape, roi, patch3)
    shape = (region[1] - region[0], region[3] - region[2], region[5] - region[4])
    if chunks is None:
        chunks3 = default_chunks(shape, patch3)
    else:
        chunks3 = tuple(min(int(c), s) for c, s in zip(triple(chunks, "chunks"), shape, strict=True))
        if min(chunks3) < 1:
            raise ValueError(f"chunks must be positive, got {list(chunks)}")
    return plan_blocks(
        volume_shape,
        patch3,
        default_overlap(patch3) if overlap is None else triple(overlap, "overlap"),
        roi=roi,
        block_shape=block_shape,
        chunks=chunks3,
        levels=levels,
        block_voxels=block_voxels,
        shards=shards,
    )
