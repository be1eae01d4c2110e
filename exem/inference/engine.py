"""Blockwise, out-of-core, resumable application of a network to a whole volume (or a region of it).

Used by translation (``G_AB``) and, later, segmentation and test-time-augmentation reliability maps: the network
is any ``torch.nn.Module`` mapping ``(B, 1, Z, Y, X)`` float32 in [0, 1] to ``(B, C, Z, Y, X)``.

How it works
------------
- The region (the volume or an ROI) is walked by ONE global :class:`~exem.data.grid.PatchGrid`.
- The region is split into output blocks at multiples of ``block_shape``; block sizes are rounded up to whole
  chunks of every pyramid level, so no two blocks share a chunk (any number of processes can write at once,
  and a written block is final).
- A block's output is ``Σ_p w·net(patch p) / Σ_p w`` over ALL global-grid patches ``p`` that intersect the
  block (in the grid's fixed order), restricted to the block. The result therefore does not depend on the
  block split, nor on which process computed which block. Patches straddling a block border are computed by
  every block they touch: along an axis of size S cut into n blocks the extra work is about
  ``(n − 1)(patch − 1) / S`` (:attr:`BlockPlan.duplicate_fraction` gives the exact figure). The default block
  shape minimises it within :data:`DEFAULT_BLOCK_VOXELS`: 0 % for volumes up to 2^29 voxels (one block),
  ~16 % for 200×4000×4000, ~25-30 % for very large volumes (patch 16×256×256, 25 % overlap).
- The network is always called with ``batch_size`` patches (the last batch of a block repeats its last patch),
  so a patch's prediction does not depend on its batch neighbours: on x86 CPUs different block splits give
  bit-identical outputs.
- Reading: :class:`BlockDataset` (one item = one block's context in the raw dtype) in DataLoader workers.
- Compute: :class:`BlockPredictor` (a LightningModule) normalises on the device, cuts the patches, runs the
  network in batches, blends on the device streaming along Z (float32 sums for one patch depth of slices at a
  time, :class:`~exem.inference.blend.ZStreamBlender`) and casts each finished slab into the block's output.
- Writing: :class:`BlockWriter` (a ``BasePredictionWriter``) writes each block, and its in-plane 2× pyramid
  levels, on a background thread and only then creates the block's done-markers
  ``<output>/.exem_done/<level>/<block-id>`` (atomically). A rerun skips blocks whose markers all exist.
- Many devices / nodes: ``Trainer.predict`` under DDP. :class:`BlockDataModule` prepares the output on global
  rank 0 once the process group exists, every rank then reads the markers (before any rank writes) and takes
  every ``world_size``-th remaining block. The per-block computation does not depend on the rank, so a DDP run
  is bit-identical to a single-process run.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import queue
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import zarr
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from exem.checks import fmt_voxels, triple
from exem.data.grid import AXIS_NAMES, PatchGrid
from exem.data.ome import downsample_inplane
from exem.data.volume import Volume
from exem.inference.blend import ZStreamBlender, gaussian_window
from exem.quiet import lightning_announcements_muted, lightning_noise_silenced

__all__ = [
    "DEFAULT_BLOCK_VOXELS",
    "DEFAULT_NUM_WORKERS",
    "DONE_DIR",
    "OUT_DTYPES",
    "Block",
    "BlockDataModule",
    "BlockDataset",
    "BlockPlan",
    "BlockPredictor",
    "BlockWriter",
    "BlockwiseResult",
    "default_trainer",
    "done_blocks",
    "level_chunks",
    "module_state_kept",
    "plan_blocks",
    "resolve_region",
    "run_blockwise",
]

log = logging.getLogger(__name__)

# Default block size budget in voxels (2^29 = 537 M). A block holds its raw context and its cast output on the
# device (~2-6 bytes per voxel); the float32 blending sums exist for one patch depth of Z slices at a time
# (ZStreamBlender): ~2-3 GB besides the network for uint8 in and out. Duplicate work at block borders for
# patch 16×256×256 with 25 % overlap: 0 % up to 2^29 voxels (one block), ~16 % for 200×4000×4000, ~24-31 %
# for very large volumes (blocks of 128×2048×2048).
DEFAULT_BLOCK_VOXELS = 2**29
DEFAULT_NUM_WORKERS = 2
# Blocks waiting to be written (each holds a whole block on the host).
WRITE_QUEUE_SIZE = 2
DONE_DIR = ".exem_done"
OUT_DTYPES = ("uint8", "float16", "float32")


def _round_up(value: int, multiple: int) -> int:
    return -(-int(value) // int(multiple)) * int(multiple)


# ----------------------------------------------------------------------------------------------------------
# the plan


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
    """

    region: tuple[int, int, int, int, int, int]
    grid: PatchGrid
    block_shape: tuple[int, int, int]
    align: tuple[int, int, int]
    blocks: tuple[Block, ...]

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

    The same rule as :func:`exem.data.ome.create_ome_zarr`: each level's chunk is ``chunks`` capped by the
    level's shape.
    """
    out = []
    for lvl in range(int(levels)):
        f = (1, 2**lvl, 2**lvl)
        lshape = tuple(-(-int(s) // k) for s, k in zip(shape, f, strict=True))
        out.append(tuple(min(int(c), s) for c, s in zip(chunks, lshape, strict=True)))
    return out  # type: ignore[return-value]


def _alignment(chunks_per_level: Sequence[Sequence[int]]) -> tuple[int, int, int]:
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
        out.add(min(size, _round_up(-(-size // n), align)))
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

    Raises:
        ValueError: bad ROI, patch larger than the region, bad overlap or block shape.
    """
    patch = triple(patch, "patch")
    region = resolve_region(volume_shape, roi, patch)
    shape = (region[1] - region[0], region[3] - region[2], region[5] - region[4])
    grid = PatchGrid(shape, patch, overlap)
    if chunks is None:
        align: tuple[int, int, int] = (1, 1, 1)
    else:
        chunk0 = triple(chunks, "chunks")
        if min(chunk0) < 1:
            raise ValueError(f"chunks must be positive, got {list(chunk0)}")
        align = _alignment(level_chunks(shape, chunk0, levels))
    if block_shape is None:
        bshape = _default_block_shape(shape, patch, align, int(block_voxels))
    else:
        requested = triple(block_shape, "block_shape")
        if min(requested) < 1:
            raise ValueError(f"block_shape must be positive, got {list(requested)}")
        bshape = tuple(min(s, _round_up(b, a)) for s, b, a in zip(shape, requested, align, strict=True))  # type: ignore[assignment]

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
    )


# ----------------------------------------------------------------------------------------------------------
# done-markers


def _marker(root: Path, level: int, block: Block) -> Path:
    return root / DONE_DIR / str(level) / block.id


def done_blocks(root: str | Path, plan: BlockPlan, levels: int) -> set[int]:
    """Indices of the plan's blocks whose done-markers exist for every level (one directory listing per level)."""
    root = Path(root)
    names: list[set[str]] = []
    for lvl in range(levels):
        d = root / DONE_DIR / str(lvl)
        names.append(set(os.listdir(d)) if d.is_dir() else set())
    return {b.index for b in plan.blocks if all(b.id in n for n in names)}


def _touch_atomic(path: Path) -> None:
    """Create the empty file ``path`` atomically (temporary file in the same folder, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    os.close(fd)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# reading


def _raw_tensor(raw: np.ndarray) -> Tensor:
    """A raw block context as a CPU tensor in native byte order, without widening it.

    uint16/uint32 are reinterpreted (not converted) as int16/int32 (CUDA kernels lack the unsigned types);
    :meth:`BlockPredictor.normalize` undoes this with ``raw_dtype``. uint64 becomes float64.
    """
    a = np.asarray(raw)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype in (np.uint16, np.uint32):
        a = a.view(f"i{a.dtype.itemsize}")
    elif a.dtype == np.uint64:
        a = a.astype(np.float64)
    return torch.from_numpy(np.ascontiguousarray(a))


class BlockDataset(Dataset):
    """Blocks of a plan, one item per block: the raw voxels of the block's context.

    Args:
        volume: the input volume (picklable; path-backed volumes reopen in DataLoader workers).
        plan: the block plan.
        indices: block indices (into ``plan.blocks``) served by this dataset, in order.

    Items are ``(block index, raw context)`` with the context a ``(cz, cy, cx)`` CPU tensor of the raw bytes
    (uint16/uint32 viewed as int16/int32, see :meth:`BlockPredictor.normalize`), read with ``Volume.read`` (only
    those voxels are read).
    """

    def __init__(self, volume: Volume, plan: BlockPlan, indices: Sequence[int]) -> None:
        self.volume = volume
        self.plan = plan
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, Tensor]:
        block = self.plan.blocks[self.indices[i]]
        origin = self.plan.origin
        sl = tuple(
            slice(o + a, o + b)
            for o, a, b in zip(origin, block.context_start, block.context_stop, strict=True)
        )
        return block.index, _raw_tensor(self.volume.read(sl))  # type: ignore[arg-type]


def _single(batch: list[Any]) -> Any:
    """Collate for one item per batch: the item itself (keeps ints and tensors as they are)."""
    return batch[0]


def _open_levels(root: Path, levels: int) -> list[zarr.Array]:
    group = zarr.open_group(str(root), mode="r+")
    return [group[str(lvl)] for lvl in range(levels)]  # type: ignore[misc]


def _check_output(arrays: Sequence[zarr.Array], plan: BlockPlan, root: Path, out_dtype: str) -> None:
    """The output arrays must have the region's shape per level, ``out_dtype`` and chunks aligned with the blocks."""
    for lvl, arr in enumerate(arrays):
        if np.dtype(arr.dtype) != np.dtype(out_dtype):
            raise ValueError(f"{root}: level {lvl} has dtype {arr.dtype}, expected {out_dtype}")
        f = (1, 2**lvl, 2**lvl)
        want = tuple(-(-s // k) for s, k in zip(plan.shape, f, strict=True))
        got = tuple(arr.shape[-3:])
        if got != want or arr.ndim not in (3, 4):
            raise ValueError(
                f"{root}: level {lvl} has shape {tuple(arr.shape)}, expected (C,) {fmt_voxels(want)}"
            )
        chunks = tuple(arr.chunks[-3:])
        for ax in range(3):
            step = chunks[ax] * f[ax]
            if plan.block_shape[ax] % step and plan.block_shape[ax] < plan.shape[ax]:
                raise ValueError(
                    f"{root}: level {lvl} chunks {fmt_voxels(chunks)} are not aligned with blocks of"
                    f" {fmt_voxels(plan.block_shape)}; blocks would share chunks"
                )
        if arr.ndim == 4 and arr.chunks[0] != arr.shape[0]:
            raise ValueError(f"{root}: level {lvl} must hold all channels in one chunk")


class BlockDataModule(L.LightningDataModule):
    """Serves this rank's share of the blocks that are not done yet.

    ``setup`` runs inside ``Trainer.predict`` once the process group exists: global rank 0 runs ``prepare``
    (e.g. create the output), all ranks wait, check the output, read the done-markers, and wait again, so the
    markers are read before any rank writes and all ranks agree on the remaining blocks. Rank ``r`` of ``n``
    takes every n-th remaining block starting at r, wrapped in a one-replica ``DistributedSampler`` so that
    Lightning does not shard it again (its ``UnrepeatedDistributedSamplerWrapper`` asserts that every rank gets
    at least one item, which fails when fewer blocks than ranks remain).
    """

    def __init__(
        self,
        volume: Volume,
        plan: BlockPlan,
        output: str | Path,
        *,
        levels: int,
        out_dtype: str,
        num_workers: int = DEFAULT_NUM_WORKERS,
        prepare: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.out_dtype = out_dtype
        self.volume = volume
        self.plan = plan
        self.output = Path(output)
        self.levels = int(levels)
        self.num_workers = int(num_workers)
        self.prepare = prepare
        self.allow_zero_length_dataloader_with_multiple_devices = True
        self.skipped: int | None = None
        self.todo: list[int] = []
        self.shard: list[int] = []

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        assert trainer is not None
        if self.prepare is not None and trainer.global_rank == 0:
            self.prepare()
        trainer.strategy.barrier("exem_prepare_output")
        _check_output(_open_levels(self.output, self.levels), self.plan, self.output, self.out_dtype)
        done = done_blocks(self.output, self.plan, self.levels)
        todo = [b.index for b in self.plan.blocks if b.index not in done]
        self.skipped = len(self.plan.blocks) - len(todo)
        self.todo = todo
        self.shard = todo[trainer.global_rank :: trainer.world_size]
        trainer.strategy.barrier("exem_markers_read")
        if trainer.is_global_zero:
            log.info(
                "%d of %d blocks to compute (%d already done)", len(todo), len(self.plan.blocks), self.skipped
            )

    def predict_dataloader(self) -> DataLoader:
        dataset = BlockDataset(self.volume, self.plan, self.shard)
        trainer = self.trainer
        cuda = trainer is not None and trainer.strategy.root_device.type == "cuda"
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs.update(prefetch_factor=2, persistent_workers=False)
        return DataLoader(
            dataset,
            batch_size=1,
            sampler=DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=False),
            collate_fn=_single,
            num_workers=self.num_workers,
            pin_memory=cuda,
            **kwargs,
        )


# ----------------------------------------------------------------------------------------------------------
# compute


def _torch_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    table = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if str(name) not in table:
        raise ValueError(f"autocast_dtype must be bfloat16 or float16 (or None), got {name!r}")
    return table[str(name)]


class BlockPredictor(L.LightningModule):
    """Computes one block per ``predict_step``: normalise, cut patches, run the network, blend, cast.

    Args:
        net: ``(B, 1, Z, Y, X)`` float32 in [0, 1] → ``(B, C, Z, Y, X)``; registered as a submodule (Lightning
            moves it to the device and puts it in eval mode).
        plan: the block plan (its global grid gives the patches and their order).
        intensity_range: raw (lo, hi) mapped to [0, 1], exactly as :func:`exem.data.volume.normalize`.
        sigma, floor: Gaussian window (:func:`~exem.inference.blend.gaussian_window`).
        batch_size: patches per network call.
        out_dtype: ``uint8`` (``clip(round(255·x), 0, 255)``), ``float16`` or ``float32`` (unclipped).
        autocast_dtype: run the network under ``torch.autocast`` with this dtype (``bfloat16``/``float16``);
            None: float32. Blending is always float32.
        raw_dtype: dtype of the volume; uint16/uint32 contexts arrive as int16/int32 views (:class:`BlockDataset`)
            and are read back as unsigned.
        compile: ``torch.compile`` the network in place (``nn.Module.compile``) when the run sets up; the
            network always gets full batches of one patch shape, so it compiles once. Worth it on a GPU for
            large volumes; the first batch pays the compilation (tens of seconds).

    ``predict_step(batch)`` takes ``(block index, raw context (cz, cy, cx))`` and returns
    ``(block index, (C, bz, by, bx) numpy array of out_dtype)``.
    """

    def __init__(
        self,
        net: nn.Module,
        plan: BlockPlan,
        intensity_range: Sequence[float],
        *,
        sigma: float = 0.5,
        batch_size: int = 8,
        out_dtype: str = "uint8",
        autocast_dtype: str | torch.dtype | None = None,
        floor: float = 1e-4,
        raw_dtype: np.dtype | str | None = None,
        compile: bool = False,  # noqa: A002 - the config key's name
    ) -> None:
        super().__init__()
        if out_dtype not in OUT_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(OUT_DTYPES)}, got {out_dtype!r}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        lo, hi = (float(v) for v in intensity_range)
        if not hi > lo:
            raise ValueError(f"intensity range needs hi > lo, got [{lo}, {hi}]")
        self.net = net
        self.plan = plan
        # float32 constants exactly as normalize() uses them: (x − f32(lo)) · f32(1 / (hi − lo)).
        self._lo = float(np.float32(lo))
        self._scale = float(np.float32(1.0 / (hi - lo)))
        self.sigma = float(sigma)
        self.floor = float(floor)
        self.batch_size = int(batch_size)
        self.out_dtype = out_dtype
        self.autocast_dtype = _torch_dtype(autocast_dtype)
        dt = None if raw_dtype is None else np.dtype(raw_dtype)
        self._unsigned_mask = (
            (1 << (8 * dt.itemsize)) - 1 if dt is not None and dt.kind == "u" and dt.itemsize in (2, 4) else 0
        )
        gaussian_window(plan.grid.patch, self.sigma, self.floor)  # validate sigma/floor early
        self._windows: dict[torch.device, Tensor] = {}
        self.allow_zero_length_dataloader_with_multiple_devices = True
        self.compile_net = bool(compile)

    def configure_model(self) -> None:
        """Lightning hook (once per run, on every rank): compile the network when asked (idempotent)."""
        if self.compile_net and not getattr(self.net, "_compiled_call_impl", None):
            self.net.compile()

    def forward(self, x: Tensor) -> Tensor:
        """The network: ``(B, 1, Z, Y, X)`` in [0, 1] → ``(B, C, Z, Y, X)``."""
        return self.net(x)

    def window(self, device: torch.device) -> Tensor:
        """The ``(pz, py, px)`` float32 Gaussian window on ``device`` (cached)."""
        if device not in self._windows:
            self._windows[device] = gaussian_window(
                self.plan.grid.patch, self.sigma, self.floor, device=device
            )
        return self._windows[device]

    def normalize(self, raw: Tensor) -> Tensor:
        """Raw voxels → float32 in [0, 1], bit-identical to :func:`exem.data.volume.normalize`.

        ``(x − f32(lo)) · f32(1 / (hi − lo))`` in float32, clipped to [0, 1]; int16/int32 views of
        uint16/uint32 data (``raw_dtype``) are read back as unsigned first.
        """
        if self._unsigned_mask and raw.dtype in (torch.int16, torch.int32):
            raw = raw.to(torch.int64).bitwise_and_(self._unsigned_mask)
        return raw.to(torch.float32, copy=True).sub_(self._lo).mul_(self._scale).clamp_(0.0, 1.0)

    def predict_block(self, block: Block, raw: Tensor) -> Tensor:
        """The blended, cast prediction of one block.

        Patches run through the network in batches, in the global grid's order; the Gaussian blend is streamed
        along Z (:class:`~exem.inference.blend.ZStreamBlender`), so the float32 sums exist for one patch depth
        of Z slices at a time, and each finished slab is checked and cast straight into the output.

        Args:
            block: a block of :attr:`plan`.
            raw: the block's raw context ``(cz, cy, cx)`` (any device; moved to this module's device).

        Returns:
            ``(C, bz, by, bx)`` tensor of ``out_dtype`` on the device.

        Raises:
            ValueError: non-finite values in the blended output (the block is not written).
        """
        device = self.device
        raw = raw.to(device, non_blocking=True)
        c0 = block.context_start
        pz, py, px = block.patch
        blender = ZStreamBlender(block.start, block.shape, self.window(device))
        result: Tensor | None = None

        def emit(slabs: list[tuple[int, Tensor]]) -> None:
            nonlocal result
            for z0, values in slabs:
                if not bool(torch.isfinite(values).all()):
                    self._non_finite(block)
                if result is None:
                    out_dtype = getattr(torch, self.out_dtype)
                    result = torch.empty((values.shape[0], *block.shape), dtype=out_dtype, device=device)
                result[:, z0 : z0 + values.shape[1]] = self.cast(values)

        starts = list(block.patches())
        autocast = torch.autocast(
            device_type=device.type,
            dtype=self.autocast_dtype or torch.bfloat16,
            enabled=self.autocast_dtype is not None,
        )
        for i in range(0, len(starts), self.batch_size):
            chunk = starts[i : i + self.batch_size]
            x = torch.stack(
                [
                    raw[
                        sz - c0[0] : sz - c0[0] + pz,
                        sy - c0[1] : sy - c0[1] + py,
                        sx - c0[2] : sx - c0[2] + px,
                    ]
                    for sz, sy, sx in chunk
                ]
            )
            if len(chunk) < self.batch_size:
                # Always call the network with the same batch size (repeat the last patch): a patch's output
                # then does not depend on which other patches share its batch, i.e. on the block split.
                x = torch.cat([x, x[-1:].expand(self.batch_size - len(chunk), *x.shape[1:])])
            x = self.normalize(x).unsqueeze(1)
            with autocast:
                out = self.net(x)
            for j, start in enumerate(chunk):
                emit(blender.add(out[j], start))
        emit(blender.finish())
        assert result is not None
        return result

    def _non_finite(self, block: Block) -> None:
        o = self.plan.origin
        where = ", ".join(
            f"{n} {o[ax] + block.start[ax]}:{o[ax] + block.stop[ax]}" for ax, n in enumerate(AXIS_NAMES)
        )
        raise ValueError(
            f"non-finite values (NaN/Inf) in the output of block {block.id} (input {where});"
            " is the input finite? The block is not marked done"
        )

    def cast(self, out: Tensor) -> Tensor:
        """Cast blended float32 values on their device: uint8 ``clip(round(255·x), 0, 255)``, else as is."""
        if self.out_dtype == "uint8":
            return out.mul_(255.0).round_().clamp_(0.0, 255.0).to(torch.uint8)
        if self.out_dtype == "float16":
            return out.to(torch.float16)
        return out

    def predict_step(
        self, batch: tuple[int, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> tuple[int, Any]:
        index, raw = batch
        block = self.plan.blocks[int(index)]
        return int(index), self.predict_block(block, raw).cpu().numpy()


# ----------------------------------------------------------------------------------------------------------
# writing


# Z slices downsampled at a time (bounds the float64 temporaries of downsample_inplane).
_DOWNSAMPLE_SLAB = 8


def _downsample(data: np.ndarray) -> np.ndarray:
    """2× in-plane mean of a ``(C, Z, Y, X)`` block: :func:`downsample_inplane` per channel, a few Z at a time."""
    c, z, y, x = data.shape
    out = np.empty((c, z, -(-y // 2), -(-x // 2)), dtype=data.dtype)
    for ci in range(c):
        for z0 in range(0, z, _DOWNSAMPLE_SLAB):
            out[ci, z0 : z0 + _DOWNSAMPLE_SLAB] = downsample_inplane(data[ci, z0 : z0 + _DOWNSAMPLE_SLAB])
    return out


class BlockWriter(BasePredictionWriter):
    """Writes each computed block (and its pyramid levels) on a background thread, then marks it done.

    Per block: level 0 is written, then its marker ``<output>/.exem_done/0/<block-id>``; level l is the 2×
    in-plane mean (:func:`~exem.data.ome.downsample_inplane`, rounded for integers) of level l−1, written,
    then its marker. Markers are created atomically and only after the data call returned, so a killed run
    leaves for every block either all of its data and markers, or possibly partial data and missing markers.

    A bounded queue (``queue_size`` blocks) lets writes overlap the next blocks' compute. The first write error
    is re-raised in the main thread (at the next block, or at the end of ``predict``).

    Args:
        output: local folder of the output group (arrays ``"0"``, ``"1"``, …).
        plan: the block plan.
        levels: number of pyramid levels to write.
        progress: show a rich progress bar (blocks, Mvox/s) on stderr on global rank 0.
    """

    def __init__(
        self,
        output: str | Path,
        plan: BlockPlan,
        levels: int,
        *,
        queue_size: int = WRITE_QUEUE_SIZE,
        progress: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self.plan = plan
        self.levels = int(levels)
        self.queue_size = int(queue_size)
        self.progress = bool(progress)
        self.written = 0
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._arrays: list[zarr.Array] = []
        self._bar: Any = None
        self._task: Any = None
        self._t0 = 0.0
        self._voxels = 0

    # lifecycle -------------------------------------------------------------------------------------------
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._arrays = _open_levels(self.output, self.levels)
        self._error = None
        self._queue = queue.Queue(maxsize=max(1, self.queue_size))
        self._thread = threading.Thread(target=self._run, name="exem-block-writer", daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        self._voxels = 0
        if self.progress and trainer.is_global_zero:
            self._start_bar(trainer)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(raise_error=True)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # Write what was computed before the failure (those blocks are valid), then let the exception propagate.
        self._finish(raise_error=False)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._finish(raise_error=False)

    # the queue -------------------------------------------------------------------------------------------
    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._raise_if_failed()
        assert self._queue is not None, "BlockWriter: on_predict_start was not called"
        index, data = prediction
        item = (int(index), np.asarray(data))
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self._finish(raise_error=False)
            raise error

    def _run(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # keep draining so the producer never blocks on a dead consumer
            try:
                self.write_block(*item)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self._error = e

    def _finish(self, raise_error: bool) -> None:
        if self._thread is not None and self._queue is not None:
            self._queue.put(None)
            self._thread.join()
        self._thread = None
        self._queue = None
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if raise_error and self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._error is not None:
            log.error("writing a block failed: %s", self._error)
            self._error = None

    # one block -------------------------------------------------------------------------------------------
    def write_block(self, index: int, data: np.ndarray) -> None:
        """Write block ``index`` (``(C, bz, by, bx)`` data) to every level, each followed by its marker."""
        block = self.plan.blocks[index]
        if data.ndim == 3:
            data = data[None]
        if tuple(data.shape[1:]) != block.shape:
            raise ValueError(
                f"block {block.id}: data of shape {data.shape} for a block of {fmt_voxels(block.shape)}"
            )
        level_data = data
        for lvl, arr in enumerate(self._arrays):
            if lvl:
                level_data = _downsample(level_data)
            f = 2**lvl
            sl = (
                slice(block.start[0], block.stop[0]),
                slice(block.start[1] // f, block.start[1] // f + level_data.shape[2]),
                slice(block.start[2] // f, block.start[2] // f + level_data.shape[3]),
            )
            if arr.ndim == 3:
                if level_data.shape[0] != 1:
                    raise ValueError(
                        f"the network returned {level_data.shape[0]} channels but output level {lvl} is 3D"
                    )
                arr[sl] = level_data[0]
            else:
                arr[(slice(None), *sl)] = level_data
            _touch_atomic(_marker(self.output, lvl, block))
        self.written += 1
        self._voxels += block.voxels
        if self._bar is not None:
            elapsed = max(time.perf_counter() - self._t0, 1e-9)
            self._bar.update(self._task, advance=1, rate=f"{self._voxels / elapsed / 1e6:.2f} Mvox/s")

    def _start_bar(self, trainer: L.Trainer) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        dm = trainer.datamodule
        total = len(dm.shard) if isinstance(dm, BlockDataModule) else None
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("blocks"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        who = f" (rank 0 of {trainer.world_size})" if trainer.world_size > 1 else ""
        self._task = self._bar.add_task(f"{self.output.name}{who}", total=total, rate="")
        self._bar.start()


# ----------------------------------------------------------------------------------------------------------
# running


@dataclass(frozen=True)
class BlockwiseResult:
    """What :func:`run_blockwise` did.

    Attributes:
        plan: the block plan.
        blocks_total: blocks in the plan.
        blocks_skipped: blocks already done before this run (resume).
        blocks_done: blocks computed by this run (all ranks).
        voxels_done: output voxels of those blocks.
        seconds: wall time of the run.
        global_rank, world_size: of this process.
    """

    plan: BlockPlan
    blocks_total: int
    blocks_skipped: int
    blocks_done: int
    voxels_done: int
    seconds: float
    global_rank: int
    world_size: int


def default_trainer(**overrides: Any) -> L.Trainer:
    """A Trainer for inference: auto accelerator, one device, no logger, no checkpoints, no Lightning bar.

    Built quietly: Lightning's "GPU available …" lines and tips are not logged (a notebook that translates several
    volumes would otherwise repeat them for every call); warnings still are.
    """
    kwargs: dict[str, Any] = {
        "accelerator": "auto",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    kwargs.update(overrides)
    with lightning_announcements_muted():
        return L.Trainer(**kwargs)


@contextlib.contextmanager
def module_state_kept(net: nn.Module) -> Iterator[None]:
    """Give the caller's ``net`` back as it came: each parameter and buffer on its device and in its dtype, each
    submodule in its train/eval mode.

    Lightning puts the module it predicts with in eval mode and, when the run ends, moves it to the CPU; ``net``
    is a submodule of that module and is the caller's own (e.g. a generator still being trained on a GPU).
    Tensors are moved back through ``.data``, so parameter objects (and optimizers holding them) stay valid.
    """
    params = [(p, p.device, p.dtype) for p in net.parameters()]
    buffers = [
        (m, name, b.device, b.dtype) for m in net.modules() for name, b in m.named_buffers(recurse=False)
    ]
    modes = [(m, m.training) for m in net.modules()]
    try:
        yield
    finally:
        for p, device, dtype in params:  # .to()/.cpu() change parameters in place (p.data)
            if p.device != device or p.dtype != dtype:
                p.data = p.data.to(device=device, dtype=dtype)
        for m, name, device, dtype in buffers:  # ... and replace buffers by new tensors
            b = getattr(m, name)
            if isinstance(b, Tensor) and (b.device != device or b.dtype != dtype):
                setattr(m, name, b.to(device=device, dtype=dtype))
        for m, training in modes:
            m.training = training


def _local_root(output: str | Path | zarr.Group) -> Path:
    if isinstance(output, zarr.Group):
        root = getattr(output.store, "root", None)
        if root is None:
            raise ValueError(
                "run_blockwise needs an output group on the local file system (for done-markers)"
            )
        return Path(root) / output.path if output.path else Path(root)
    text = str(output)
    if "://" in text:
        raise ValueError(f"output {text}: only local paths are supported (done-markers are files)")
    return Path(text).expanduser()


def run_blockwise(
    net: nn.Module,
    volume: Volume,
    output: str | Path | zarr.Group,
    *,
    patch: Sequence[int],
    overlap: Sequence[int] | int = 0,
    sigma: float = 0.5,
    batch_size: int = 8,
    out_dtype: str = "float32",
    roi: Sequence[int] | None = None,
    block_shape: Sequence[int] | None = None,
    num_workers: int = DEFAULT_NUM_WORKERS,
    trainer: L.Trainer | None = None,
    autocast_dtype: str | torch.dtype | None = None,
    chunks: Sequence[int] | None = None,
    levels: int | None = None,
    prepare: Callable[[], None] | None = None,
    progress: bool = False,
    floor: float = 1e-4,
    block_voxels: int = DEFAULT_BLOCK_VOXELS,
    compile: bool = False,  # noqa: A002 - the config key's name
) -> BlockwiseResult:
    """Apply ``net`` to a whole volume (or an ROI), block by block, and write an image pyramid.

    Args:
        net: ``(B, 1, Z, Y, X)`` float32 in [0, 1] → ``(B, C, Z, Y, X)``.
        volume: the input (its ``intensity_range`` normalises the raw voxels).
        output: local folder (or a ``zarr.Group`` on a local store) of a group whose arrays ``"0"``, ``"1"``, …
            are the levels: level l is ``(Z, ⌈Y/2^l⌉, ⌈X/2^l⌉)`` of the region (or ``(C, …)``), of ``out_dtype``.
            With ``prepare``, the group is created by ``prepare()`` (run on global rank 0 only, inside the
            Lightning run), and ``chunks`` and ``levels`` must describe it; otherwise it must exist and they are
            read from it.
        patch, overlap: the global patch grid (voxels).
        sigma, floor: the Gaussian blending window.
        batch_size: patches per network call.
        out_dtype: ``uint8`` | ``float16`` | ``float32`` (must match the arrays).
        roi: (z0, z1, y0, y1, x0, x1) voxels of the input; None → the whole volume.
        block_shape: voxels per block (rounded up to whole chunks of every level); None → a default of at most
            ``block_voxels`` voxels.
        num_workers: DataLoader reader processes (0: read in the main process).
        trainer: a Lightning Trainer (e.g. ``strategy="ddp"``); None → :func:`default_trainer`.
        autocast_dtype: ``bfloat16``/``float16`` to run the network under autocast; None → float32.
        progress: rich progress bar on stderr (global rank 0).
        compile: ``torch.compile`` the network (see :class:`BlockPredictor`).

    Returns:
        a :class:`BlockwiseResult`. Every rank returns after all blocks are written and rank 0 has set the
        group attribute ``exem.complete = true``.

    Raises:
        ValueError: bad ROI / patch / overlap / dtype; non-finite network output in a block.
        RuntimeError: blocks still missing after the run.
    """
    root = _local_root(output)
    patch = triple(patch, "patch")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(OUT_DTYPES)}, got {out_dtype!r}")
    if prepare is None:
        group = zarr.open_group(str(root), mode="r")
        if levels is None:
            levels = 0
            while str(levels) in group:
                levels += 1
            if levels == 0:
                raise ValueError(f"{root}: the output group has no level array '0'")
        if chunks is None:
            chunks = tuple(group["0"].chunks[-3:])  # type: ignore[union-attr]
    elif chunks is None or levels is None:
        raise ValueError("run_blockwise: with prepare=..., give the output's chunks and levels")
    plan = plan_blocks(
        volume.shape,
        patch,
        overlap,
        roi=roi,
        block_shape=block_shape,
        chunks=chunks,
        levels=int(levels),
        block_voxels=block_voxels,
    )
    log.info(
        "%s: %d block(s) of ≤ %s voxels, %d patches of %s (%.1f%% extra work at block borders)",
        root,
        len(plan.blocks),
        fmt_voxels(plan.block_shape),
        len(plan.grid),
        fmt_voxels(patch),
        100 * plan.duplicate_fraction,
    )
    predictor = BlockPredictor(
        net,
        plan,
        volume.intensity_range,
        sigma=sigma,
        batch_size=batch_size,
        out_dtype=out_dtype,
        autocast_dtype=autocast_dtype,
        floor=floor,
        raw_dtype=volume.dtype,
        compile=compile,
    )
    datamodule = BlockDataModule(
        volume, plan, root, levels=int(levels), out_dtype=out_dtype, num_workers=num_workers, prepare=prepare
    )
    writer = BlockWriter(root, plan, int(levels), progress=progress)
    trainer = trainer if trainer is not None else default_trainer()
    t0 = time.perf_counter()
    trainer.callbacks.append(writer)
    try:
        with lightning_noise_silenced(), module_state_kept(net):
            warnings.filterwarnings("ignore", message=".*across ranks is zero.*")  # every block already done
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")  # num_workers is ours
            trainer.predict(predictor, datamodule=datamodule, return_predictions=False)
    finally:
        trainer.callbacks.remove(writer)

    strategy = trainer.strategy
    strategy.barrier("exem_blocks_written")
    done = done_blocks(root, plan, int(levels))
    missing = [b.id for b in plan.blocks if b.index not in done]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise RuntimeError(
            f"{root}: {len(missing)} block(s) were not written ({', '.join(missing[:3])}{more}); rerun to resume"
        )
    if trainer.is_global_zero:
        group = zarr.open_group(str(root), mode="r+")
        meta = dict(group.attrs.get("exem", {}) or {})
        meta.update({"complete": True, "blocks": len(plan.blocks), "block_shape": list(plan.block_shape)})
        group.attrs["exem"] = meta
    strategy.barrier("exem_complete")
    skipped = datamodule.skipped if datamodule.skipped is not None else 0
    return BlockwiseResult(
        plan=plan,
        blocks_total=len(plan.blocks),
        blocks_skipped=skipped,
        blocks_done=len(plan.blocks) - skipped,
        voxels_done=sum(plan.blocks[i].voxels for i in datamodule.todo),
        seconds=time.perf_counter() - t0,
        global_rank=int(trainer.global_rank),
        world_size=int(trainer.world_size),
    )
