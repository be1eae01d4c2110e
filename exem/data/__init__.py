"""Data: volumes (Zarr / OME-Zarr / TIFF), the patch grid and the Lightning datamodule.

``exem.data.volume`` and ``exem.data.grid`` are light (numpy + zarr); the datamodule (torch, Lightning,
torchio) is imported on first use of its names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from exem.data.grid import PatchGrid
from exem.data.volume import Volume, VolumeError, normalize, open_volume, open_volumes

if TYPE_CHECKING:
    from exem.data.datamodule import (
        EpochSampler,
        ExEMDataModule,
        UnpairedPatchDataset,
        ValidationPatchDataset,
    )

__all__ = [
    "EpochSampler",
    "ExEMDataModule",
    "PatchGrid",
    "UnpairedPatchDataset",
    "ValidationPatchDataset",
    "Volume",
    "VolumeError",
    "normalize",
    "open_volume",
    "open_volumes",
]

_LAZY = {"EpochSampler", "ExEMDataModule", "UnpairedPatchDataset", "ValidationPatchDataset"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from exem.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module 'exem.data' has no attribute {name!r}")
