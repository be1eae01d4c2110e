"""A napari image layer as an exem input: the one 3D check every widget makes, the voxel size in nm, and the
layer's data as what exem's functions take (the file it came from, or a :class:`~exem.data.volume.Volume`).

:func:`layer_input` runs in the main thread (it reads the layer's attributes) and raises before any work;
:meth:`LayerInput.open` may run in a worker thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from exem.data.volume import Volume, VolumeError, open_volume

__all__ = ["LayerInput", "check_3d", "layer_input", "layer_voxel_size_nm"]

log = logging.getLogger(__name__)

# Relative tolerance when comparing a layer's voxel size with the one in its file's metadata.
SCALE_RTOL = 1e-3


def _level0(layer: Any) -> Any:
    """The full-resolution array of a layer (level 0 of a multiscale layer)."""
    data = layer.data
    return data[0] if getattr(layer, "multiscale", False) else data


def check_3d(layer: Any) -> tuple[int, int, int]:
    """The (Z, Y, X) shape of ``layer`` in voxels, or a one-line ``ValueError`` when it is not a 3D volume.

    Leading singleton axes are dropped (a ``(1, Z, Y, X)`` channel axis), as :func:`~exem.data.volume.open_volume`
    does. Every exem widget calls this before it starts any work.

    Raises:
        ValueError: no layer, an RGB layer, or a layer that is not 3D (``exem: layer 'x' is 2D (shape (64, 64));
            exem works on 3D volumes (Z, Y, X)``).
    """
    if layer is None:
        raise ValueError("exem: no image layer selected; open a 3D volume (Z, Y, X) first")
    shape = tuple(int(s) for s in _level0(layer).shape)
    if getattr(layer, "rgb", False):
        raise ValueError(
            f"exem: layer '{layer.name}' is RGB (shape {shape}); exem works on single-channel 3D volumes (Z, Y, X)"
        )
    squeezed = shape
    while len(squeezed) > 3 and squeezed[0] == 1:
        squeezed = squeezed[1:]
    if len(squeezed) != 3:
        raise ValueError(
            f"exem: layer '{layer.name}' is {len(shape)}D (shape {shape}); exem works on 3D volumes (Z, Y, X)"
        )
    return squeezed  # type: ignore[return-value]


def _nm_per_unit(unit: Any) -> float | None:
    """Nanometres per ``unit`` (a pint unit of a napari layer), or None when it is not a length (``pixel``)."""
    try:
        return float((1 * unit).to("nanometer").magnitude)
    except Exception:  # noqa: BLE001 - pint raises DimensionalityError / UndefinedUnitError / TypeError
        return None


def layer_voxel_size_nm(layer: Any) -> tuple[float, float, float] | None:
    """The (z, y, x) voxel size of a 3D layer in nm, from its ``scale`` and ``units``.

    Length units (napari ≥ 0.6) are converted to nm. Without them (``pixel``), a scale other than 1 is taken to
    be in nm; a scale of 1 on every axis means unknown (None).
    """
    scale = [float(s) for s in layer.scale[-3:]]
    units = list(getattr(layer, "units", ()) or ())[-3:]
    factors = [_nm_per_unit(u) for u in units] if len(units) == 3 else [None] * 3
    if all(f is not None for f in factors):
        return tuple(s * f for s, f in zip(scale, factors, strict=True))  # type: ignore[return-value,operator]
    if all(s == 1.0 for s in scale):
        return None
    return tuple(scale)  # type: ignore[return-value]


@dataclass(frozen=True)
class LayerInput:
    """What a worker needs of a layer, captured in the main thread.

    Attributes:
        name: the layer's name (used for default output names).
        shape: (Z, Y, X) voxels.
        data: the level-0 array, (Z, Y, X) after leading singleton axes (numpy, zarr, dask or any array-like).
        voxel_size_nm: (z, y, x) nm, or None when unknown.
        path: the file or store the layer was read from, when that file holds exactly this volume (same shape and
            voxel size); None for in-memory layers.
    """

    name: str
    shape: tuple[int, int, int]
    data: Any
    voxel_size_nm: tuple[float, float, float] | None
    path: Path | None

    def open(
        self,
        intensity_range: Any | None = None,
        percentiles: Any | None = None,
    ) -> str | Volume:
        """The input for an exem function: the file's path when there is one (exem opens it with its own
        normalisation and voxel size), else a :class:`~exem.data.volume.Volume` of the layer's data at the layer's
        voxel size, normalised with ``intensity_range`` or ``percentiles`` (raw values → [0, 1]; default: the
        dtype range). Dask and other lazy arrays are read into memory.

        Raises:
            VolumeError: data exem cannot use (non-numeric, NaN, float outside [0, 1] without a range, …).
        """
        if self.path is not None:
            return str(self.path)
        data = self.data
        if not isinstance(data, (np.ndarray, zarr.Array)):
            log.info("reading layer '%s' into memory (%s)", self.name, type(data).__name__)
            data = np.asarray(data)
        while data.ndim > 3 and data.shape[0] == 1:
            data = data[0]
        return open_volume(
            data, voxel_size=self.voxel_size_nm, intensity_range=intensity_range, percentiles=percentiles
        )


def _file_of(layer: Any, shape: tuple[int, ...], voxel_nm: tuple[float, float, float] | None) -> Path | None:
    """The local file or store ``layer`` was read from, if it opens as this very volume; else None."""
    source = getattr(getattr(layer, "source", None), "path", None)
    if not source or "://" in str(source) or not Path(source).exists():
        return None
    try:
        volume = open_volume(source, intensity_range=(0.0, 1.0))  # only the shape and the voxel size are used
    except (VolumeError, OSError):
        return None
    if volume.shape != shape:
        return None
    if voxel_nm is not None and volume.voxel_size_nm is not None:
        if not np.allclose(voxel_nm, volume.voxel_size_nm, rtol=SCALE_RTOL):
            return None  # the layer was rescaled in napari: its scale wins, so pass its data
    elif voxel_nm != volume.voxel_size_nm:
        return None
    return Path(source)


def layer_input(layer: Any) -> LayerInput:
    """Check ``layer`` (:func:`check_3d`) and capture what a worker needs of it (main thread).

    Raises:
        ValueError: the layer is missing or not a 3D volume (one line, before any work).
    """
    shape = check_3d(layer)
    voxel_nm = layer_voxel_size_nm(layer)
    return LayerInput(
        name=str(layer.name),
        shape=shape,
        data=_level0(layer),
        voxel_size_nm=voxel_nm,
        path=_file_of(layer, shape, voxel_nm),
    )
