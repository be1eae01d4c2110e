"""The other channels of a multi-channel ExM input, written beside the virtual EM on its voxel grid.

An ExM sample carries a pan-protein channel (translated) and antibody channels (molecular identity). When
``translate_volume`` translates one channel of a ``(C, Z, Y, X)`` input, the output is one multi-channel OME-Zarr
``(C, Z, Y, X)``: channel 0 the virtual EM (written by the engine), then the input's other channels in their
own intensity units (copied block by block over the run's plan, resampled with the translation when the output
is at the model's voxel size), with OMERO names and colours so napari shows the antibodies over the virtual EM.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from exem.data.channels import VIRTUAL_EM_CHANNEL
from exem.data.ome import CHANNEL_COLORS, downsample_inplane
from exem.data.volume import Volume, open_volume
from exem.inference.output import read_record, update_record
from exem.inference.plan import Block, BlockPlan
from exem.inference.ranks import together
from exem.progress import step_bar

__all__ = [
    "channel_entries",
    "companion_channels",
    "copy_companions",
    "storage_dtype",
    "write_companions",
]

log = logging.getLogger(__name__)


def companion_channels(volume: Volume) -> list[int]:
    """Indices of the input's channels other than the translated one (empty for a single-channel input)."""
    if volume.channel is None or not volume.channel_names:
        return []
    return [i for i in range(len(volume.channel_names)) if i != volume.channel]


def storage_dtype(out_dtype: str, source_dtype: Any) -> str:
    """The one dtype of a multi-channel output: the virtual EM's, widened to hold the other channels' values.
    The virtual EM keeps its own values (uint8: 0…255), so models with a fixed raw range (EM: [0, 255]) read it
    as they would a single-channel translation, and :func:`~exem.data.volume.open_volume` takes that range for it
    (:func:`~exem.data.channels.recorded_ranges`)."""
    return str(np.promote_types(np.dtype(out_dtype), np.dtype(source_dtype)))


def _window(dtype: Any) -> dict[str, float]:
    dt = np.dtype(dtype)
    lo, hi = (float(np.iinfo(dt).min), float(np.iinfo(dt).max)) if dt.kind in "ui" else (0.0, 1.0)
    return {"min": lo, "max": hi, "start": lo, "end": hi}


def channel_entries(volume: Volume, companions: Sequence[int], out_dtype: str) -> list[dict[str, Any]]:
    """OMERO channel entries: the virtual EM (grey, its value range), then the companions (colours cycled)."""
    names = volume.channel_names or ()
    entries = [
        {"label": VIRTUAL_EM_CHANNEL, "color": "FFFFFF", "active": True, "window": _window(out_dtype)},
    ]
    for k, c in enumerate(companions):
        entries.append(
            {
                "label": str(names[c]),
                "color": CHANNEL_COLORS[k % len(CHANNEL_COLORS)],
                "active": True,
                "window": _window(volume.dtype),
            }
        )
    return entries


def copy_companions(
    trainer: Any,
    volume: Volume,
    companions: Sequence[int],
    plan: BlockPlan,
    output: str | Path,
    resample_to_nm: Sequence[float] | None = None,
    *,
    progress: bool = True,
) -> bool:
    """Every rank of a translation: copy the other channels unless the output's record says they are there.

    Rank 0 reads the record and tells the others; rank ``r`` of ``n`` copies every n-th block (each block's chunks
    are its own: one chunk per channel); when all are done, rank 0 records ``channels_written``. A rank that fails
    stops the others (:func:`~exem.inference.ranks.together`). Without a process group (the translation found its
    output complete, so Lightning started no ranks) rank 0 copies every block and the other ranks none.

    Args:
        trainer: the translation's Lightning Trainer; None: this process alone.
        volume, companions, plan, output, resample_to_nm: as :func:`write_companions`.
        progress: a bar over the blocks on rank 0.

    Returns:
        whether channels were copied (False: the record said they were already).
    """
    rank = int(getattr(trainer, "global_rank", 0))
    world = int(getattr(trainer, "world_size", 1))
    if world > 1 and not torch.distributed.is_initialized():
        # no ranks were started (a complete output: no prediction ran), so no other rank copies a share: rank 0
        # copies them all (a rank started by a launcher such as srun leaves it to rank 0)
        if rank:
            return False
        trainer, world = None, 1
    todo = not (read_record(output) or {}).get("channels_written") if rank == 0 else None
    if world > 1:
        todo = trainer.strategy.broadcast(todo, src=0)
    if not todo:
        return False
    with together(trainer, "while copying the other channels", output):
        blocks = plan.blocks[rank::world]
        with step_bar(progress and rank == 0, "other channels", len(blocks) * len(companions)) as advance:
            write_companions(volume, companions, plan, output, resample_to_nm, blocks=blocks, advance=advance)
    if rank == 0:
        update_record(output, channels_written=True)
    return True


def write_companions(
    volume: Volume,
    companions: Sequence[int],
    plan: BlockPlan,
    output: str | Path,
    resample_to_nm: Sequence[float] | None = None,
    *,
    blocks: Sequence[Block] | None = None,
    advance: Callable[..., None] | None = None,
) -> None:
    """Copy channels ``companions`` of ``volume``'s source into channels 1, 2, … of ``output`` (every level).

    Args:
        volume: the translated channel's volume (its path, level and voxel size locate the others).
        companions: input channel indices, in the output's order.
        plan: the translation's plan (its region and blocks: the same voxels as the virtual EM's).
        output: the multi-channel OME-Zarr the engine wrote channel 0 of.
        resample_to_nm: the model's voxel size when the output is at the model's scale (``output_scale=model``);
            None: the input's grid.
        blocks: the plan's blocks to copy (None: all).
        advance: called after each block of each channel (a progress bar's step).
    """
    from exem.data.resample import resample_volume

    group = zarr.open_group(str(output), mode="r+")
    levels = [group[str(lvl)] for lvl in range(plan.levels)]
    o = plan.origin
    for k, c in enumerate(companions, start=1):
        source = open_volume(
            volume.path,
            level=volume.level,
            channel=c,
            voxel_size=volume.voxel_size_nm,
            intensity_range=(0, 1),
        )
        if resample_to_nm is not None:
            source = resample_volume(source, resample_to_nm)
        for block in plan.blocks if blocks is None else blocks:
            box = tuple(
                slice(a + o[i], b + o[i])
                for i, (a, b) in enumerate(zip(block.start, block.stop, strict=True))
            )
            data = source.read(box)  # type: ignore[arg-type]
            for lvl, arr in enumerate(levels):
                if lvl:
                    data = downsample_inplane(data)
                f = 2**lvl
                sl = (
                    slice(block.start[0], block.start[0] + data.shape[0]),
                    slice(block.start[1] // f, block.start[1] // f + data.shape[1]),
                    slice(block.start[2] // f, block.start[2] // f + data.shape[2]),
                )
                arr[(k, *sl)] = data.astype(arr.dtype, copy=False)
            if advance is not None:
                advance()
        log.info("%s: channel %s written beside the virtual EM", output, (volume.channel_names or ())[c])
