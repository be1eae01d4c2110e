"""Lazy axis views for the volume opener: leading singleton axes dropped, one channel of a ``(C, Z, Y, X)`` array
as exem's ``(Z, Y, X)`` volume.

ExM samples carry the pan-protein stain and antibody channels on one voxel grid. Where the channel axis is
declared it is found here: an OME-Zarr ``c`` axis (``type: channel``, names from ``omero.channels[].label``), a
Zarr v3 array whose first dimension name is ``c``/``channel``, a TIFF series whose axes start with ``C``. A 4D
array without such a declaration is taken as ``(C, Z, Y, X)`` only when the caller names a channel (the user
declares the axis). Used by :func:`exem.data.volume.open_volume` (``channel=``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from exem.data.errors import ChannelNotChosenError, VolumeError
from exem.data.ome import RECORD_ATTRIBUTE

__all__ = [
    "ChannelView",
    "LeadingIndexView",
    "VIRTUAL_EM_CHANNEL",
    "channel_names_of_ome",
    "choose_channel",
    "declared_channel_names",
    "recorded_ranges",
    "squeeze_leading",
]

CHANNEL_DIMENSION_NAMES = ("c", "channel", "channels")
# exem's name for channel 0 of its multi-channel translations (the input's other channels follow it).
VIRTUAL_EM_CHANNEL = "virtual_em"


class LeadingIndexView:
    """Lazy view of an array with its leading axes fixed at ``index`` (zarr, numpy, memory map): e.g. ``(0,)``
    drops a singleton axis of ``(1, Z, Y, X)``, ``(c,)`` takes channel c of ``(C, Z, Y, X)``."""

    def __init__(self, array: Any, index: tuple[int, ...]) -> None:
        self._array = array
        self._index = tuple(int(i) for i in index)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._array.shape[len(self._index) :])

    @property
    def dtype(self) -> np.dtype:
        return self._array.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def chunks(self) -> tuple[int, ...] | None:
        chunks = getattr(self._array, "chunks", None)
        return None if chunks is None else tuple(chunks[len(self._index) :])

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        return np.asarray(self._array[self._index + key])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._array!r}, index={self._index})"


class ChannelView(LeadingIndexView):
    """Lazy ``(Z, Y, X)`` view of channel ``index`` of a ``(C, Z, Y, X)`` array."""

    def __init__(self, array: Any, index: int) -> None:
        super().__init__(array, (int(index),))
        self.index = int(index)


def squeeze_leading(array: Any) -> Any:
    """Drop leading singleton axes while the array has more than 3 dimensions (lazily for zarr)."""
    n = 0
    shape = tuple(array.shape)
    while len(shape) - n > 3 and shape[n] == 1:
        n += 1
    if n == 0:
        return array
    if isinstance(array, np.ndarray):
        return array[(0,) * n]  # a view (memory maps stay memory maps)
    return LeadingIndexView(array, (0,) * n)


def channel_names_of_ome(attributes: dict, multiscales: dict | None) -> list[str] | None:
    """Channel names of an OME-Zarr image with a ``c`` axis (``omero`` labels, else ``c0``, ``c1``, …), or None
    when its axes declare no channel axis."""
    axes = (multiscales or {}).get("axes") or []
    kinds = [a.get("type") if isinstance(a, dict) else None for a in axes]
    if "channel" not in kinds:
        return None
    channels = (attributes.get("omero") or {}).get("channels") or []
    return [
        str(c.get("label") or f"c{i}") if isinstance(c, dict) else f"c{i}" for i, c in enumerate(channels)
    ]


def declared_channel_names(array: Any, tiff_axes: str | None = None) -> list[str] | None:
    """``c0``, ``c1``, … when a plain array declares its first axis a channel axis (Zarr v3 dimension names, TIFF
    series axes), else None."""
    dims = getattr(getattr(array, "metadata", None), "dimension_names", None)
    declared = bool(dims) and str(dims[0]).lower() in CHANNEL_DIMENSION_NAMES
    declared = declared or (tiff_axes is not None and tiff_axes.upper().lstrip("QT").startswith("C"))
    return [f"c{i}" for i in range(int(array.shape[0]))] if declared and len(array.shape) >= 4 else None


def recorded_ranges(attributes: Mapping[str, Any]) -> dict[int, tuple[float, float]]:
    """``{channel index: (lo, hi)}``: the value ranges exem recorded for channels of its own output (its group's
    ``attributes``). A multi-channel translation stores the virtual EM (channel 0, :data:`VIRTUAL_EM_CHANNEL`) in
    a dtype wide enough for the input's other channels, and the virtual EM keeps the values of its own integer
    dtype (uint8: 0…255): that dtype's range, not the store's, is its intensity range. ``{}`` for anything else."""
    record = attributes.get(RECORD_ATTRIBUTE)
    if not isinstance(record, Mapping):
        return {}
    names = record.get("channels")
    if not isinstance(names, list) or not names or names[0] != VIRTUAL_EM_CHANNEL:
        return {}
    try:
        dtype = np.dtype(record.get("dtype", "float32"))
    except TypeError:
        return {}
    if dtype.kind not in "ui":
        return {}
    info = np.iinfo(dtype)
    return {0: (float(info.min), float(info.max))}


def choose_channel(
    array: Any, names: Sequence[str] | None, channel: int | str | None, path: str, prefer: str | None = None
) -> tuple[Any, int | None, tuple[str, ...] | None]:
    """``(the (Z, Y, X) array, channel index, all channel names)`` of ``array`` for ``channel``.

    A 3D array is returned as is (``channel`` may then only be 0 or None). A 4D array is ``(C, Z, Y, X)``: its
    channel is chosen by index or by name; ``names`` (declared, or None) label the channels. With no ``channel``,
    a declared channel named ``prefer`` is taken (e.g. ``virtual_em`` of exem's multi-channel translations).

    Raises:
        ValueError: one line: a channel that does not exist, a 4D array and no channel chosen, a channel asked of
            a single-channel volume.
    """
    shape = tuple(int(s) for s in array.shape)
    if len(shape) == 3:
        if channel not in (None, 0, "0") and not (names and channel in names[:1]):
            raise VolumeError(
                f"{path}: channel {channel!r} asked, but the volume has no channel axis (shape {shape})"
            )
        return array, None, None
    if len(shape) != 4:
        return array, None, None  # the opener's shape check reports it
    count = shape[0]
    labels = (
        tuple(names) if names is not None and len(names) == count else tuple(f"c{i}" for i in range(count))
    )
    listing = ", ".join(f"{i}: {n}" for i, n in enumerate(labels))
    if channel is None and names is not None and prefer is not None and prefer in labels:
        channel = prefer
    if channel is None:
        what = f"{count} channels ({listing})" if names is not None else f"a 4D array of shape {shape}"
        raise ChannelNotChosenError(f"{path}: expected a 3D (Z, Y, X) volume, got {what}")
    if isinstance(channel, str) and not channel.lstrip("-").isdigit():
        if channel not in labels:
            raise VolumeError(f"{path}: no channel {channel!r}; channels are {listing}")
        index = labels.index(channel)
    else:
        index = int(channel)
        if not 0 <= index < count:
            raise VolumeError(f"{path}: no channel {index}; channels are {listing}")
    return ChannelView(array, index), index, labels
