"""The shared first half of every whole-volume inference: open the input, check the patch, plan once, record.

Translation, reliability maps and segmentation each do::

    volume = open_input(source, level, intensity_range, percentiles)
    job = plan_job(net, volume, source, patch=…, overlap=…, roi=…, chunks=…, block_shape=…, trainer=…,
                   ngff_version=…, shards=…, output=…, autocast_dtype=…)
    record = job.record(sigma=…, dtype=…, **their own settings)
    action = inspect_output(out, record, …)                    # exem.inference.output
    run_blockwise(net, job.volume, job.plan, out, autocast_dtype=job.autocast_dtype, prepare=…)

and keep only what is theirs (the network, the output layout, post-processing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import lightning as L
from torch import nn

from exem.checks import check_input_shape, triple
from exem.data.ome import DEFAULT_NGFF_VERSION, check_ngff_version, check_shards
from exem.data.volume import Volume, open_volume
from exem.inference.engine import autocast_for, default_block_voxels
from exem.inference.output import grid_record, jsonable, output_voxel_size, read_record
from exem.inference.plan import BlockPlan, plan_volume, resolve_region

__all__ = ["Job", "check_patch", "open_input", "plan_job"]


def open_input(
    source: Any,
    level: int = 0,
    intensity_range: Sequence[float] | None = None,
    percentiles: Sequence[float] | None = None,
    channel: int | str | None = None,
    prefer_channel: str | None = None,
) -> Volume:
    """The input volume of a run: ``open_volume`` for a path (or array), an opened :class:`Volume` as it is.
    ``channel``: of a multi-channel input (index or name; an opened volume keeps its own); ``prefer_channel``: the
    channel of that name when none is given (:func:`~exem.data.volume.open_volume`).

    An opened volume carries its own normalisation: ``intensity_range`` replaces it, ``percentiles`` is refused.

    Raises:
        VolumeError: unreadable or invalid input. ValueError: bad range, or percentiles for an opened volume.
    """
    if isinstance(source, Volume):
        if percentiles is not None:
            raise ValueError(
                "percentiles apply when opening the input; give a path, or open the volume with them"
            )
        if intensity_range is not None:
            lo, hi = (float(v) for v in intensity_range)
            if not hi > lo:
                raise ValueError(f"intensity range [{lo:g}, {hi:g}] must have hi > lo")
            return replace(source, intensity_range=(lo, hi))
        return source
    return open_volume(
        source,
        level=level,
        intensity_range=intensity_range,
        percentiles=percentiles,
        channel=channel,
        prefer_channel=prefer_channel,
    )


def check_patch(net: nn.Module, patch: Sequence[int]) -> tuple[int, int, int]:
    """``patch`` as (z, y, x) positive voxels that ``net`` accepts (its Y/X divisor, :func:`check_input_shape`).

    Raises:
        ValueError: one line naming the patch and the rule.
    """
    patch3 = triple(patch, "patch")
    if min(patch3) < 1:
        raise ValueError(f"patch must be positive, got {list(patch3)}")
    check_input_shape(net, patch3)
    return patch3


@dataclass(frozen=True)
class Job:
    """A planned run: the volume read, its plan (made once), the output's voxel size and the input's identity.

    Attributes:
        volume: the input as the network reads it (possibly a resampled view).
        source: what the user passed as input (its resolved path goes into the record).
        plan: blocks, patch grid, chunks, shards and levels (:func:`~exem.inference.plan.plan_volume`).
        voxel_size_nm: (z, y, x) nm of the output (the volume's; 1 nm when unknown).
        ngff_version: the output's OME-Zarr version, ``"0.5"`` (Zarr v3) or ``"0.4"`` (Zarr v2).
        autocast_dtype: the network's autocast dtype, ``"bfloat16"``/``"float16"``, or None (float32):
            :func:`~exem.inference.engine.autocast_for` the run's trainer.
    """

    volume: Volume
    source: Any
    plan: BlockPlan
    voxel_size_nm: tuple[float, float, float]
    ngff_version: str = DEFAULT_NGFF_VERSION
    autocast_dtype: str | None = None

    def record(self, *, sigma: float, dtype: str, **task: Any) -> dict[str, Any]:
        """The output's record: the grid part (:func:`~exem.inference.output.grid_record`) and ``task``'s keys."""
        base = grid_record(
            self.volume,
            self.source,
            self.plan,
            sigma=sigma,
            dtype=dtype,
            autocast_dtype=self.autocast_dtype,
            ngff_version=self.ngff_version,
        )
        return {**base, **jsonable(task)}


def plan_job(
    net: nn.Module,
    volume: Volume,
    source: Any,
    *,
    patch: Sequence[int],
    overlap: Sequence[int] | None = None,
    roi: Sequence[int] | None = None,
    chunks: Sequence[int] | None = None,
    block_shape: Sequence[int] | None = None,
    trainer: L.Trainer | None = None,
    ngff_version: str | float = DEFAULT_NGFF_VERSION,
    shards: Sequence[int] | None = None,
    output: Any = None,
    autocast_dtype: str | None = None,
) -> Job:
    """Check the patch against ``net``, plan the blocks once (the trainer's device sets the default block budget).

    Args:
        net: the network that will run (its Y/X divisor is checked).
        volume: the input volume; ``source``: what the user gave (for the record).
        patch, overlap, roi, chunks, block_shape: see :func:`~exem.inference.plan.plan_volume` (voxels).
        trainer: the run's trainer (None: CUDA when available).
        ngff_version: the output's OME-Zarr version: ``"0.5"`` (Zarr v3) or ``"0.4"`` (Zarr v2).
        shards: level-0 shard shape (z, y, x) voxels of the output (Zarr v3 only), None: no sharding; blocks
            then follow whole shards (:func:`~exem.inference.plan.plan_blocks`).
        output: the run's output (None when it is to be replaced); without ``block_shape``, an output there is
            resumed with the block shape it was started with (the default depends on the device and the number of
            ranks).
        autocast_dtype: ``bfloat16``/``float16`` for the network; None → the trainer's mixed precision
            (:func:`~exem.inference.engine.autocast_for`).

    Raises:
        ValueError: bad patch / overlap / ROI / chunks / block shape / NGFF version / shards; a trainer precision
            that converts the network's weights (one line).
    """
    version = check_ngff_version(ngff_version)
    shards3 = check_shards(shards, version)
    patch3 = check_patch(net, patch)
    if block_shape is None and output is not None:
        block_shape = (read_record(output) or {}).get("block_shape")
    z0, z1, y0, y1, x0, x1 = resolve_region(volume.shape, roi, patch3)
    plan = plan_volume(
        volume.shape,
        patch3,
        overlap,
        roi=roi,
        chunks=chunks,
        block_shape=block_shape,
        block_voxels=default_block_voxels(trainer, (z1 - z0) * (y1 - y0) * (x1 - x0)),
        shards=shards3,
    )
    return Job(
        volume=volume,
        source=source,
        plan=plan,
        voxel_size_nm=output_voxel_size(volume),
        ngff_version=version,
        autocast_dtype=autocast_for(trainer, autocast_dtype),
    )
