"""The napari reader of exem outputs (npe2 ``readers`` contribution).

It opens what exem writes, with the voxel size in nm and every pyramid level:

- a translation (``exem-translate`` / :func:`exem.translate_volume`): the virtual EM, an image layer;
- a reliability map (:func:`exem.reliability_map`): an image layer with the ``magma`` colormap;
- a segmentation folder (:func:`exem.segment_volume`): its ``probabilities/`` as an image layer and its
  ``labels/`` as a labels layer; either sub-folder alone opens as that one layer.

Anything else (a plain OME-Zarr, a TIFF, a folder of other data) gets ``None``, so napari-ome-zarr and other
readers handle it. Metadata are read with exem's own functions (:func:`exem.data.ome.read_multiscales`,
:func:`exem.data.ome.level_scale`, :func:`exem.data.volume.open_volume`), which read OME-Zarr 0.4 (Zarr v2) and
0.5 (Zarr v3) alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from exem.analysis.segment import LABELS, PROBABILITIES
from exem.data.ome import level_scale, ome_attributes, read_multiscales
from exem.data.volume import open_volume
from exem.inference.output import read_record
from exem.inference.uncertainty import UNCERTAINTY_NAME

__all__ = ["LayerData", "get_reader", "output_kind", "read_exem", "read_exem_output"]

log = logging.getLogger(__name__)

LayerData = tuple[Any, dict[str, Any], str]
"""napari's ``(data, kwargs, layer type)``."""

SEGMENT_TASK = "segment"
RELIABILITY_COLORMAP = "magma"
PROBABILITY_COLORMAP = "green"
AXIS_LABELS = ("z", "y", "x")
NM_UNITS = ("nanometer",) * 3
# The reader only reads: a fixed intensity range spares open_volume the sample it would draw to choose one.
READ_ONLY_RANGE = (0.0, 1.0)


def _display_name(path: Path) -> str:
    name = path.name
    for ext in (".ome.zarr", ".zarr"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _physical(
    path: Path, multiscales: dict, channel: int | None = None
) -> tuple[list[Any], tuple[float, float, float], tuple[float, float, float]]:
    """(arrays of every level, level-0 voxel size in nm, translation in nm) of an OME-Zarr image (of one channel
    of a multi-channel image)."""
    levels = [
        open_volume(path, level=lvl, intensity_range=READ_ONLY_RANGE, channel=channel)
        for lvl in range(len(multiscales.get("datasets", [])))
    ]
    _, scale0 = level_scale(multiscales, 0)
    nm = levels[0].voxel_size_nm or (1.0, 1.0, 1.0)
    # nm per stored unit, per axis: converts the translation whatever the axes' units
    per_unit = [n / s for n, s in zip(nm, scale0, strict=True)] if scale0 else [1.0, 1.0, 1.0]
    arrays = [volume.array for volume in levels]
    translation = [0.0, 0.0, 0.0]
    for t in multiscales["datasets"][0].get("coordinateTransformations", []):
        if t.get("type") == "translation":
            translation = [float(v) * f for v, f in zip(list(t["translation"])[-3:], per_unit, strict=True)]
    return arrays, tuple(nm), tuple(translation)  # type: ignore[return-value]


def _channel_layers(path: Path, group: zarr.Group, multiscales: dict, record: dict | None) -> list[LayerData]:
    """A multi-channel translation (virtual EM + the input's other channels): one image layer per channel, in its
    OMERO colour and value window, the companions blended over the virtual EM."""
    channels = (ome_attributes(group).get("omero") or {}).get("channels") or []
    layers: list[LayerData] = []
    for c, entry in enumerate(channels):
        arrays, nm, translate = _physical(path, multiscales, channel=c)
        window = entry.get("window") or {}
        color = str(entry.get("color", "FFFFFF")).upper()
        kwargs: dict[str, Any] = {
            "name": f"{_display_name(path)} {entry.get('label', c)}",
            "scale": nm,
            "translate": translate,
            "units": NM_UNITS,
            "axis_labels": AXIS_LABELS,
            "metadata": {"exem": record or {}, "exem_path": str(path), "channel": c},
            "colormap": "gray"
            if color == "FFFFFF"
            else {"00FF00": "green", "FF00FF": "magenta"}.get(color, "cyan"),
            "blending": "translucent" if c == 0 else "additive",
        }
        if "min" in window and "max" in window:
            kwargs["contrast_limits"] = (float(window["min"]), float(window["max"]))
        if len(arrays) > 1:
            kwargs["multiscale"] = True
        layers.append((arrays if len(arrays) > 1 else arrays[0], kwargs, "image"))
    return layers


def _image_layer(path: Path, group: zarr.Group, multiscales: dict, record: dict | None) -> LayerData:
    """One exem OME-Zarr image as napari layer data: labels, reliability map, probabilities or virtual EM."""
    arrays, nm, translate = _physical(path, multiscales)
    attrs = ome_attributes(group)
    name = str(multiscales.get("name", ""))
    kwargs: dict[str, Any] = {
        "name": _display_name(path),
        "scale": nm,
        "translate": translate,
        "units": NM_UNITS,
        "axis_labels": AXIS_LABELS,
        "metadata": {"exem": record or {}, "exem_path": str(path)},
    }
    data: Any = arrays if len(arrays) > 1 else arrays[0]
    if len(arrays) > 1:
        kwargs["multiscale"] = True
    if "image-label" in attrs or name == LABELS:
        return data, kwargs, "labels"
    dtype = np.dtype(arrays[0].dtype)
    if name == UNCERTAINTY_NAME:
        kwargs.update(colormap=RELIABILITY_COLORMAP, blending="additive")
    elif name == PROBABILITIES:
        kwargs.update(colormap=PROBABILITY_COLORMAP, blending="additive", contrast_limits=(0.0, 1.0))
    elif dtype.kind in "ui":
        info = np.iinfo(dtype)
        kwargs.update(colormap="gray", contrast_limits=(float(info.min), float(info.max)))
    else:
        kwargs.update(colormap="gray", contrast_limits=(0.0, 1.0))
    return data, kwargs, "image"


def _open_group(path: Path) -> zarr.Group | None:
    try:
        node = zarr.open(str(path), mode="r")
    except Exception:  # noqa: BLE001 - anything unreadable is not an exem output
        return None
    return node if isinstance(node, zarr.Group) else None


def output_kind(path: str | Path) -> str | None:
    """What exem output ``path`` is, from its metadata alone: ``"image"`` (a translation, reliability map, or a
    segmentation's ``probabilities/`` or ``labels/``), ``"segmentation"`` (a segmentation folder), or None."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return None
    group = _open_group(p)
    if group is None:
        return None
    record = read_record(p)
    if record is None:
        return None  # not written by exem (a plain OME-Zarr is napari-ome-zarr's)
    if read_multiscales(group) is not None:
        return "image"
    return "segmentation" if record.get("task") == SEGMENT_TASK else None


def read_exem_output(path: str | Path) -> list[LayerData] | None:
    """The layers of an exem output at ``path``, or None when ``path`` is not one.

    Args:
        path: a translation or reliability map (OME-Zarr image with an ``"exem"`` record), a segmentation folder,
            or its ``probabilities/`` or ``labels/`` image.

    Returns:
        napari layer data ``(data, kwargs, type)``: ``data`` the (Z, Y, X) arrays of all levels (lazy zarr
        arrays), ``kwargs["scale"]`` the level-0 voxel size in nm (z, y, x), ``kwargs["translate"]`` the origin in
        nm; None for anything exem did not write.

    Raises:
        VolumeError: an exem output whose image cannot be read (one line).
    """
    p = Path(path).expanduser()
    kind = output_kind(p)
    if kind == "image":
        group = _open_group(p)
        assert group is not None
        multiscales = read_multiscales(group)
        assert multiscales is not None
        if any(a.get("type") == "channel" for a in multiscales.get("axes", []) if isinstance(a, dict)):
            return _channel_layers(p, group, multiscales, read_record(p))
        return [_image_layer(p, group, multiscales, read_record(p))]
    if kind != "segmentation":
        return None
    layers = []
    for sub in (PROBABILITIES, LABELS):
        if output_kind(p / sub) != "image":
            log.warning("%s: segmentation output without %s/ (incomplete run?)", p, sub)
            continue
        data, kwargs, layer_type = read_exem_output(p / sub)[0]  # type: ignore[index]
        kwargs["name"] = f"{_display_name(p)} {sub}"
        layers.append((data, kwargs, layer_type))
    return layers or None


def read_exem(path: str | Sequence[str]) -> list[LayerData]:
    """napari's reader function: the layers of one exem output (or of each output of a list).

    Raises:
        ValueError: a path that is not an exem output (one line).
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    layers: list[LayerData] = []
    for p in paths:
        found = read_exem_output(p)
        if found is None:
            raise ValueError(
                f"exem: {p} is not an exem output (translation, reliability map or segmentation)"
            )
        layers.extend(found)
    return layers


def get_reader(path: str | Sequence[str]) -> Callable[[str | Sequence[str]], list[LayerData]] | None:
    """npe2 reader command: :func:`read_exem` when every path is an exem output, else None (other readers)."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths:
        return None
    return read_exem if all(output_kind(p) is not None for p in paths) else None
