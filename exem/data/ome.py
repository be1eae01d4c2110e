"""Minimal OME-Zarr (NGFF 0.4) reading and writing: the only place that knows the multiscale metadata layout.

We write NGFF 0.4 (zarr format 2), the version that napari-ome-zarr, neuroglancer and Fiji all open; we read
0.4 (``.zattrs["multiscales"]``) and 0.5 (zarr format 3, ``attributes["ome"]["multiscales"]``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr

log = logging.getLogger(__name__)

AXES = [
    {"name": "z", "type": "space", "unit": "nanometer"},
    {"name": "y", "type": "space", "unit": "nanometer"},
    {"name": "x", "type": "space", "unit": "nanometer"},
]


def multiscales_metadata(
    voxel_size_nm: Sequence[float], factors: Sequence[Sequence[int]], name: str = "image"
) -> dict:
    """NGFF 0.4 ``multiscales`` entry for levels ``"0", "1", ...``.

    ``factors[i]`` is the cumulative downsampling factor (z, y, x) of level i relative to level 0.
    """
    datasets = []
    for i, f in enumerate(factors):
        scale = [float(v) * int(k) for v, k in zip(voxel_size_nm, f, strict=True)]
        datasets.append({"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    return {"version": "0.4", "name": name, "axes": copy.deepcopy(AXES), "datasets": datasets}


def create_ome_zarr(
    path: str | Path,
    shape: Sequence[int],
    dtype: np.dtype | str,
    voxel_size_nm: Sequence[float],
    *,
    chunks: Sequence[int],
    factors: Sequence[Sequence[int]] = ((1, 1, 1),),
    name: str = "image",
    overwrite: bool = False,
    attributes: dict | None = None,
) -> zarr.Group:
    """Create an empty OME-Zarr group with one array per level (level i is ``shape // factors[i]``, rounded up).

    Returns the group; arrays are ``group["0"]``, ``group["1"]``, ...
    """
    group = zarr.open_group(str(path), mode="w" if overwrite else "w-", zarr_format=2)
    for i, f in enumerate(factors):
        lshape = tuple(-(-int(s) // int(k)) for s, k in zip(shape, f, strict=True))
        lchunks = tuple(min(int(c), s) for c, s in zip(chunks, lshape, strict=True))
        group.create_array(str(i), shape=lshape, chunks=lchunks, dtype=dtype, fill_value=0)
    attrs = {"multiscales": [multiscales_metadata(voxel_size_nm, factors, name)]}
    if attributes:
        attrs.update(attributes)
    group.attrs.update(attrs)
    return group


def write_ome_zarr(
    path: str | Path,
    array: np.ndarray,
    voxel_size_nm: Sequence[float],
    *,
    chunks: Sequence[int] = (32, 128, 128),
    levels: int = 2,
    name: str = "image",
    overwrite: bool = False,
    attributes: dict | None = None,
    labels: bool = False,
) -> Path:
    """Write a whole in-memory ``(Z, Y, X)`` array as an OME-Zarr pyramid.

    Levels beyond the first halve Y and X only (ExM/EM volumes are anisotropic: Z is already coarse): images by
    2x2 mean, label volumes (``labels=True``) by nearest subsampling so that ids are never averaged.
    """
    if array.ndim != 3:
        raise ValueError(f"write_ome_zarr expects a 3D (Z, Y, X) array, got shape {array.shape}")
    factors = [(1, 2**i, 2**i) for i in range(levels)]
    group = create_ome_zarr(
        path,
        array.shape,
        array.dtype,
        voxel_size_nm,
        chunks=chunks,
        factors=factors,
        name=name,
        overwrite=overwrite,
        attributes=attributes,
    )
    level = array
    for i in range(levels):
        group[str(i)][...] = level
        level = level[:, ::2, ::2] if labels else downsample_inplane(level)
    log.debug("wrote %s %s %s", path, array.shape, array.dtype)
    return Path(path)


def downsample_inplane(array: np.ndarray) -> np.ndarray:
    """2× mean downsampling in Y and X of a ``(Z, Y, X)`` array (odd edges padded by edge replication).

    Integers: the mean of each 2×2 square rounded half to even (``np.round``), computed exactly in integers (the
    sum in a wider type, then quotient and remainder by 4); floats: ``(a + b + c + d) · 0.25`` in the array's
    precision (float64 for float16 input). Output dtype = input dtype; ``(Z, ⌈Y/2⌉, ⌈X/2⌉)``.
    """
    z, y, x = array.shape
    if y % 2 or x % 2:
        array = np.pad(array, ((0, 0), (0, y % 2), (0, x % 2)), mode="edge")
    corners = (array[:, 0::2, 0::2], array[:, 0::2, 1::2], array[:, 1::2, 0::2], array[:, 1::2, 1::2])
    if np.issubdtype(array.dtype, np.integer):
        wide = {1: np.int16, 2: np.int32}.get(array.dtype.itemsize, np.int64)
        total = corners[0].astype(wide)
        for c in corners[1:]:
            total += c
        # round half to even of total / 4: with total = 4q + r, (total + 1 + (q & 1)) >> 2 is q for r < 2, q + 1 for
        # r = 3, and for r = 2 the even one of q, q + 1 (floor shifts: also right for negative totals)
        odd = total >> 2
        odd &= 1
        total += odd
        total += 1
        total >>= 2
        return total.astype(array.dtype)
    work = np.float64 if array.dtype == np.float64 or array.dtype.itemsize < 4 else array.dtype
    total = corners[0].astype(work)
    for c in corners[1:]:
        total += c
    total *= 0.25
    return total.astype(array.dtype)


def read_multiscales(group: zarr.Group) -> dict | None:
    """The first ``multiscales`` entry of an OME-Zarr group (NGFF 0.4 or 0.5), or None if it is not OME-Zarr."""
    attrs = dict(group.attrs)
    if "ome" in attrs and isinstance(attrs["ome"], dict):
        attrs = attrs["ome"]
    ms = attrs.get("multiscales")
    if not ms:
        return None
    return ms[0]


def level_scale(multiscales: dict, level: int) -> tuple[str, tuple[float, ...] | None]:
    """(array path, voxel size of the spatial axes in the stored units) of one multiscale level."""
    datasets = multiscales["datasets"]
    if not 0 <= level < len(datasets):
        raise ValueError(f"OME-Zarr has {len(datasets)} level(s); level {level} does not exist")
    ds = datasets[level]
    scale = None
    for t in ds.get("coordinateTransformations", []):
        if t.get("type") == "scale":
            scale = tuple(float(v) for v in t["scale"])
    if scale is not None:
        scale = scale[-3:]
    return ds["path"], scale
