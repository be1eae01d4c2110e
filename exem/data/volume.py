"""Opening volumes: Zarr (v2/v3), OME-Zarr (NGFF 0.4/0.5), TIFF and numpy arrays as lazy ``(Z, Y, X)`` arrays.

``open_volume`` validates a volume once (shape, dtype, voxel size, intensity range, finiteness of a sample)
and returns a :class:`Volume`; reads are lazy (only the requested slices are read). ``normalize`` is the one
intensity normaliser of the codebase: raw values → float32 in [0, 1].
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from exem.checks import fmt_voxels
from exem.data.channels import (
    ChannelView,
    channel_names_of_ome,
    choose_channel,
    declared_channel_names,
    recorded_ranges,
    squeeze_leading,
)
from exem.data.errors import VolumeError
from exem.data.ome import level_scale, ome_attributes, read_multiscales
from exem.errors import exception_line

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")
ZARR_METADATA_FILES = ("zarr.json", ".zarray", ".zgroup")
# Physical unit → nanometres (NGFF axis units).
UNIT_TO_NM = {
    "angstrom": 0.1,
    "picometer": 1e-3,
    "nanometer": 1.0,
    "micrometer": 1e3,
    "micron": 1e3,
    "millimeter": 1e6,
    "centimeter": 1e7,
    "meter": 1e9,
}
# Bounded sample used for percentiles and the float checks: at most SAMPLE_BLOCKS blocks of at most
# SAMPLE_BLOCK voxels each (one block per chosen chunk, so each block decompresses a single chunk).
SAMPLE_BLOCKS = 32
SAMPLE_BLOCK = (16, 128, 128)
SAMPLE_SEED = 0


def normalize(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map raw intensities to float32 in [0, 1]: ``clip((x − lo) / (hi − lo), 0, 1)``.

    Args:
        x: array of any numeric dtype and shape.
        lo, hi: raw values mapped to 0 and 1 (``hi > lo``).

    Returns:
        float32 array of the same shape, values in [0, 1] (NaN stays NaN).
    """
    lo, hi = float(lo), float(hi)
    if not hi > lo:
        raise ValueError(f"normalize needs hi > lo, got lo={lo}, hi={hi}")
    y = np.asarray(x).astype(np.float32, copy=True)
    y -= np.float32(lo)
    y *= np.float32(1.0 / (hi - lo))
    np.clip(y, 0.0, 1.0, out=y)
    return y


@dataclass(frozen=True)
class _Locator:
    """How to reopen a path-backed array (in a DataLoader worker, after unpickling)."""

    kind: str  # "zarr" | "tiff"
    path: str
    key: str = ""
    channel: int | None = None  # of a (C, Z, Y, X) array

    def open(self) -> Any:
        array = (
            _open_tiff(self.path)
            if self.kind == "tiff"
            else zarr.open_array(self.path, path=self.key, mode="r")
        )
        array = squeeze_leading(array)
        return array if self.channel is None else ChannelView(array, self.channel)


def _open_tiff(path: str) -> Any:
    """A TIFF as an array: memory map if possible, else a lazy zarr view (tifffile), else loaded into RAM."""
    import tifffile

    try:
        return tifffile.memmap(path, mode="r")
    except Exception:  # noqa: BLE001 - compressed/tiled data are not memory-mappable; try the next reader
        pass
    try:
        node = zarr.open(tifffile.imread(path, aszarr=True), mode="r")
        if isinstance(node, zarr.Array):
            return node
    except Exception:  # noqa: BLE001
        pass
    try:
        log.info("loading %s into memory (not memory-mappable)", path)
        return tifffile.imread(path)
    except Exception as e:
        raise VolumeError(f"{path}: unreadable TIFF ({exception_line(e, with_type=True)})") from e


@dataclass(eq=False)
class Volume:
    """A validated, lazily read ``(Z, Y, X)`` volume.

    Attributes:
        path: where it came from (a path, URL or ``<numpy array>``), used in messages.
        shape: (Z, Y, X) in voxels.
        dtype: raw numpy dtype.
        voxel_size_nm: (z, y, x) voxel size in nm, or None when unknown.
        intensity_range: (lo, hi) raw values mapped to 0 and 1 by :meth:`read_normalized`.
        level: the OME-Zarr level read (None when not a multiscale).
        channel: the channel read of a multi-channel volume (None: single-channel); channel_names: all of them.

    ``array`` is the lazy array (zarr.Array, numpy array / memory map, or a thin squeezing view). Path-backed
    volumes drop it when pickled and reopen it on first access (e.g. inside a DataLoader worker).
    """

    path: str
    shape: tuple[int, int, int]
    dtype: np.dtype
    voxel_size_nm: tuple[float, float, float] | None
    intensity_range: tuple[float, float]
    level: int | None = None
    channel: int | None = None
    channel_names: tuple[str, ...] | None = None
    _array: Any = field(default=None, repr=False)
    _locator: _Locator | None = field(default=None, repr=False)

    @property
    def array(self) -> Any:
        """The lazy (Z, Y, X) array; reopened from ``path`` on first access after unpickling."""
        if self._array is None:
            if self._locator is None:
                raise VolumeError(f"{self.path}: volume has no array and no path to reopen it from")
            self._array = self._locator.open()
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self._locator is not None:
            state["_array"] = None  # reopen lazily in the receiving process
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def is_float(self) -> bool:
        return bool(np.issubdtype(self.dtype, np.floating))

    def read(self, slices: tuple[slice, slice, slice]) -> np.ndarray:
        """Raw voxels of ``slices`` (z, y, x), in the stored dtype. Only these voxels are read."""
        return np.asarray(self.array[tuple(slices)])

    def read_normalized(self, slices: tuple[slice, slice, slice]) -> np.ndarray:
        """Voxels of ``slices`` (z, y, x) as float32 in [0, 1] (:func:`normalize` with ``intensity_range``).

        Raises:
            VolumeError: the patch contains NaN or Inf.
        """
        raw = self.read(slices)
        if self.is_float and not np.isfinite(raw).all():
            start = tuple(int(s.start or 0) for s in slices)
            raise VolumeError(
                f"{self.path}: non-finite values (NaN/Inf) in the patch starting at (z, y, x) = {start}"
            )
        return normalize(raw, *self.intensity_range)


# ----------------------------------------------------------------------------------------------------
# opening


def _is_zarr_store(p: Path) -> bool:
    return any((p / name).exists() for name in ZARR_METADATA_FILES)


def _collection_children(p: Path) -> list[Path]:
    """The volumes inside a plain folder: ``*.zarr`` stores and ``*.tif``/``*.tiff`` files, sorted by name."""
    children = [
        c
        for c in p.iterdir()
        if (c.is_dir() and c.suffix.lower() == ".zarr") or (c.is_file() and c.suffix.lower() in TIFF_SUFFIXES)
    ]
    return sorted(children)


def _axis_units(multiscales: dict) -> list[str | None]:
    units: list[str | None] = []
    for ax in multiscales.get("axes", []) or []:
        units.append(ax.get("unit") if isinstance(ax, dict) else None)
    return units[-3:]


def _to_nm(scale: Sequence[float], units: Sequence[str | None], path: str) -> tuple[float, ...]:
    out = []
    for i, s in enumerate(scale):
        unit = units[i] if i < len(units) else None
        if unit is None:
            factor = 1.0
        elif unit.lower() in UNIT_TO_NM:
            factor = UNIT_TO_NM[unit.lower()]
        else:
            log.warning("%s: unknown OME-Zarr axis unit %r; assuming nanometer", path, unit)
            factor = 1.0
        out.append(float(s) * factor)
    return tuple(out)


# (array, locator, voxel size in nm from metadata or None, resolved level, declared channel names, the value ranges
# exem recorded for its channels (exem.data.channels.recorded_ranges)) of an opened path
_Opened = tuple[
    Any, _Locator, tuple[float, ...] | None, int | None, list[str] | None, dict[int, tuple[float, float]]
]


def _open_zarr_path(path: str, level: int | None) -> _Opened:
    """:data:`_Opened` of a zarr store path."""
    try:
        node = zarr.open(path, mode="r")
    except Exception as e:
        raise VolumeError(f"{path}: unreadable Zarr metadata ({exception_line(e, with_type=True)})") from e
    if isinstance(node, zarr.Array):
        if level not in (None, 0):
            raise VolumeError(
                f"{path}: level {level} requested but this is a single Zarr array, not an OME-Zarr"
            )
        return node, _Locator("zarr", path), None, None, declared_channel_names(node), {}
    try:
        multiscales = read_multiscales(node)
    except Exception as e:
        raise VolumeError(
            f"{path}: unreadable OME-Zarr metadata ({exception_line(e, with_type=True)})"
        ) from e
    if multiscales is not None:
        lvl = 0 if level is None else int(level)
        try:
            key, scale = level_scale(multiscales, lvl)
        except ValueError as e:
            raise VolumeError(f"{path}: {e}") from e
        except Exception as e:
            raise VolumeError(
                f"{path}: unreadable OME-Zarr metadata ({exception_line(e, with_type=True)})"
            ) from e
        try:
            array = zarr.open_array(path, path=key, mode="r")
        except Exception as e:
            raise VolumeError(f"{path}: OME-Zarr level {lvl} array '{key}' is missing or unreadable") from e
        voxel = _to_nm(scale, _axis_units(multiscales), path) if scale is not None else None
        names = channel_names_of_ome(ome_attributes(node), multiscales)
        return array, _Locator("zarr", path, key), voxel, lvl, names, recorded_ranges(node.attrs)
    try:
        arrays = sorted(name for name, _ in node.arrays())
    except Exception as e:
        raise VolumeError(f"{path}: unreadable Zarr metadata ({exception_line(e, with_type=True)})") from e
    if not arrays:
        raise VolumeError(f"{path}: Zarr group holds no arrays (and no OME-Zarr multiscales)")
    if len(arrays) > 1:
        names = ", ".join(arrays[:5]) + (", …" if len(arrays) > 5 else "")
        raise VolumeError(
            f"{path}: Zarr group is not an OME-Zarr and holds {len(arrays)} arrays ({names}); "
            f"give the array's path, e.g. {path.rstrip('/')}/{arrays[0]}"
        )
    if level not in (None, 0):
        raise VolumeError(f"{path}: level {level} requested but this Zarr group is not a multiscale OME-Zarr")
    try:
        array = zarr.open_array(path, path=arrays[0], mode="r")
    except Exception as e:
        raise VolumeError(
            f"{path}: unreadable Zarr array '{arrays[0]}' ({exception_line(e, with_type=True)})"
        ) from e
    return array, _Locator("zarr", path, arrays[0]), None, None, declared_channel_names(array), {}


def _open_path(source: str | Path, level: int | None) -> tuple[str, _Opened]:
    """(the path as exem names it, :data:`_Opened`) of a file or store path."""
    path = str(source)
    if "://" in path:  # remote (fsspec) store: let zarr tell us what is there
        return path, _open_zarr_path(path, level)
    p = Path(path).expanduser()
    path = str(p)
    if not p.exists():
        raise VolumeError(f"{path}: no such file or directory")
    if p.is_file():
        if p.suffix.lower() not in TIFF_SUFFIXES:
            raise VolumeError(f"{path} is a file, not a Zarr store (nor a .tif/.tiff file)")
        if level not in (None, 0):
            raise VolumeError(f"{path}: level {level} requested but a TIFF file has a single level")
        array = _open_tiff(path)
        return path, (
            array,
            _Locator("tiff", path),
            None,
            None,
            declared_channel_names(array, _tiff_axes(path)),
            {},
        )
    if not _is_zarr_store(p):
        children = _collection_children(p)
        if children:
            raise VolumeError(
                f"{path} is a folder of {len(children)} volumes, not one volume;"
                " use open_volumes() to open them all"
            )
        raise VolumeError(
            f"{path} is not a Zarr store (no zarr.json, .zarray or .zgroup) and holds no *.zarr volumes"
        )
    return path, _open_zarr_path(path, level)


def _tiff_axes(path: str) -> str | None:
    """The axes letters of a TIFF's first series (e.g. ``CZYX``), or None."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return str(tif.series[0].axes)
    except Exception:  # noqa: BLE001 - any unreadable TIFF is reported by the opener itself
        return None


def _pair(values: Sequence[float], what: str, path: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in values)
    except (TypeError, ValueError) as e:
        raise VolumeError(f"{path}: {what} must be two numbers [lo, hi], got {values!r}") from e
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise VolumeError(f"{path}: {what} must be finite, got [{lo}, {hi}]")
    return lo, hi


def _voxel_size(values: Sequence[float], what: str, path: str) -> tuple[float, float, float]:
    try:
        vs = tuple(float(v) for v in values)
    except (TypeError, ValueError) as e:
        raise VolumeError(f"{path}: {what} must be 3 numbers (z, y, x) in nm, got {values!r}") from e
    if len(vs) != 3:
        raise VolumeError(f"{path}: {what} must be 3 numbers (z, y, x) in nm, got {list(vs)}")
    if not all(math.isfinite(v) and v > 0 for v in vs):
        raise VolumeError(f"{path}: {what} must be positive, got {list(vs)} nm")
    return vs  # type: ignore[return-value]


def sample_voxels(
    array: Any,
    *,
    max_blocks: int = SAMPLE_BLOCKS,
    block: Sequence[int] = SAMPLE_BLOCK,
    seed: int = SAMPLE_SEED,
) -> np.ndarray:
    """A bounded, reproducible random sample of a (Z, Y, X) array, flattened (raw dtype).

    Picks up to ``max_blocks`` chunks (the array's own chunks when it has them, else ``block``-sized tiles)
    with a fixed seed and reads at most ``block`` voxels from the corner of each: never the whole volume
    unless it is smaller than that.
    """
    shape = tuple(int(s) for s in array.shape)
    chunks = getattr(array, "chunks", None)
    if not (
        isinstance(chunks, tuple) and len(chunks) == 3 and all(isinstance(c, int) and c > 0 for c in chunks)
    ):
        chunks = tuple(block)
    chunks = tuple(min(int(c), s) for c, s in zip(chunks, shape, strict=True))
    take = tuple(min(c, int(b)) for c, b in zip(chunks, block, strict=True))
    counts = tuple(-(-s // c) for s, c in zip(shape, chunks, strict=True))
    total = int(np.prod(counts, dtype=np.int64))
    rng = np.random.default_rng(seed)
    flat = (
        np.arange(total)
        if total <= max_blocks
        else np.sort(rng.choice(total, size=max_blocks, replace=False))
    )
    parts = []
    for f in flat:
        idx = np.unravel_index(int(f), counts)
        sl = tuple(
            slice(i * c, min(i * c + t, s)) for i, c, t, s in zip(idx, chunks, take, shape, strict=True)
        )
        parts.append(np.asarray(array[sl]).ravel())
    return np.concatenate(parts)


# Integer data whose sample spans less than this fraction of the dtype range get a warning (e.g. 12-bit
# camera data in uint16 would be normalised to a dark sliver of [0, 1]). The check reads NARROW_SAMPLE_BLOCKS
# chunks (a quarter of the percentiles' sample: it runs at every open, and a warning needs no more).
NARROW_RANGE_FRACTION = 0.125
NARROW_SAMPLE_BLOCKS = 8


def _warn_if_narrow(array: Any, path: str, lo: float, hi: float) -> None:
    sample = sample_voxels(array, max_blocks=NARROW_SAMPLE_BLOCKS)
    bound = lo + NARROW_RANGE_FRACTION * (hi - lo)
    # More than 0.2 % of a sample of n ≥ 2000 voxels at or above the bound puts the 99.9th percentile there too
    # (it lies at or above sorted index ⌊0.999 (n − 1)⌋ > 0.998 n): one count instead of a partial sort.
    if sample.size >= 2000 and np.count_nonzero(sample >= bound) > 0.002 * sample.size:
        return
    top = float(np.percentile(sample, 99.9)) if sample.size else hi
    if top < bound:
        log.warning(
            "%s: data use only %.1f%% of the %s range (99.9th percentile %g); normalised patches will be dark. "
            "Consider percentiles: [0.5, 99.8] or an intensity_range for this volume",
            path,
            100 * (top - lo) / (hi - lo),
            array.dtype,
            top,
        )


def open_volume(
    source: str | Path | np.ndarray | zarr.Array,
    *,
    level: int | None = None,
    voxel_size: Sequence[float] | None = None,
    intensity_range: Sequence[float] | None = None,
    percentiles: Sequence[float] | None = None,
    channel: int | str | None = None,
    prefer_channel: str | None = None,
) -> Volume:
    """Open and validate one ``(Z, Y, X)`` volume without reading it (reads a bounded sample at most).

    Args:
        source: a Zarr array store (v2 or v3), an OME-Zarr group (NGFF 0.4/0.5), a Zarr group holding a
            single array, a ``.tif``/``.tiff`` file, a numpy array or a ``zarr.Array``. A 4D array with a
            leading singleton channel is squeezed (lazily) to 3D.
        level: OME-Zarr pyramid level (default 0).
        voxel_size: (z, y, x) in nm; overrides the OME-Zarr metadata.
        intensity_range: raw (lo, hi) mapped to [0, 1]. Default: the dtype's full range for integers, [0, 1]
            for floats (checked on a sample), or ``percentiles``; the virtual EM channel of exem's own
            multi-channel translation (stored wider) takes its own dtype's range (uint8: 0…255), as recorded.
        percentiles: (lo %, hi %) of a bounded random sample (fixed seed) used as the intensity range.
        channel: of a multi-channel ``(C, Z, Y, X)`` volume, by index or name (:mod:`exem.data.channels`: OME-Zarr
            ``c`` axes with ``omero`` names, Zarr v3 ``c`` dimensions, ``CZYX`` TIFFs; any 4D array when given).
            ``prefer_channel``: the channel of that name when none is given and the volume declares it.

    Raises:
        VolumeError: one line naming the path and the problem.
    """
    if level is not None and int(level) < 0:
        raise VolumeError(
            f"{source if isinstance(source, (str, Path)) else '<array>'}: level must be ≥ 0, got {level}"
        )
    locator: _Locator | None = None
    meta_voxel: tuple[float, ...] | None = None
    resolved_level: int | None = None
    declared: list[str] | None = None
    recorded: dict[int, tuple[float, float]] = {}
    if isinstance(source, (str, Path)):
        path, (array, locator, meta_voxel, resolved_level, declared, recorded) = _open_path(source, level)
    elif isinstance(source, np.ndarray):
        array, path = source, "<numpy array>"
    elif isinstance(source, zarr.Array):
        array, path, declared = source, str(source.store_path), declared_channel_names(source)
    else:
        raise VolumeError(
            f"cannot open a volume from a {type(source).__name__}; give a path, numpy or zarr array"
        )
    if not isinstance(source, (str, Path)) and level not in (None, 0):
        raise VolumeError(f"{path}: level {level} requested but an in-memory array has a single level")

    array, channel_index, channel_names = choose_channel(
        squeeze_leading(array), declared, channel, path, prefer_channel
    )
    if locator is not None and channel_index is not None:
        locator = replace(locator, channel=channel_index)
    shape = tuple(int(s) for s in array.shape)
    if len(shape) != 3:
        hint = "; store a 2D image as (1, Y, X)" if len(shape) == 2 else ""
        raise VolumeError(
            f"{path}: expected a 3D (Z, Y, X) volume (or 4D with a singleton channel),"
            f" got shape {shape}{hint}"
        )
    dtype = np.dtype(array.dtype)
    if dtype.kind not in "uif":
        raise VolumeError(f"{path}: dtype {dtype} is not numeric (need an integer or float dtype)")
    if min(shape) == 0:
        raise VolumeError(f"{path}: volume is empty (shape {fmt_voxels(shape)})")

    if voxel_size is not None:
        voxel: tuple[float, float, float] | None = _voxel_size(voxel_size, "voxel size", path)
    elif meta_voxel is not None:
        voxel = _voxel_size(meta_voxel, "OME-Zarr voxel size (scale)", path)
    else:
        voxel = None

    own = recorded.get(channel_index or 0) if intensity_range is None and percentiles is None else None
    if own is not None:  # exem's virtual EM in a wider multi-channel store: its own values' range
        intensity_range = own
    is_float = dtype.kind == "f"
    sample = None
    if is_float or (percentiles is not None and intensity_range is None):
        sample = sample_voxels(array)
        if is_float and not np.isfinite(sample).all():
            raise VolumeError(
                f"{path}: float data contain NaN or Inf (found in a sample); clean the volume first"
            )

    if intensity_range is not None:
        lo, hi = _pair(intensity_range, "intensity range", path)
        if not hi > lo:
            raise VolumeError(f"{path}: intensity range [{lo:g}, {hi:g}] must have hi > lo")
    elif percentiles is not None:
        plo, phi = _pair(percentiles, "percentiles", path)
        if not 0 <= plo < phi <= 100:
            raise VolumeError(f"{path}: percentiles [{plo:g}, {phi:g}] must satisfy 0 ≤ lo < hi ≤ 100")
        assert sample is not None
        lo, hi = (float(v) for v in np.percentile(sample.astype(np.float64), [plo, phi]))
        if not hi > lo:
            raise VolumeError(
                f"{path}: intensity range collapses: percentiles [{plo:g}, {phi:g}] of a sample"
                f" are both {lo:g}"
                " (constant data?); set an intensity range"
            )
    elif not is_float:
        info = np.iinfo(dtype)
        lo, hi = float(info.min), float(info.max)
        _warn_if_narrow(array, path, lo, hi)
    else:
        assert sample is not None
        smin, smax = float(sample.min()), float(sample.max())
        if smin < 0.0 or smax > 1.0:
            raise VolumeError(
                f"{path}: float data outside [0, 1] (sample range [{smin:g}, {smax:g}]); "
                "set an intensity range or percentiles"
            )
        lo, hi = 0.0, 1.0

    vol = Volume(
        path=path,
        shape=shape,  # type: ignore[arg-type]
        dtype=dtype,
        voxel_size_nm=voxel,
        intensity_range=(lo, hi),
        level=resolved_level,
        channel=channel_index,
        channel_names=channel_names,
        _array=array,
        _locator=locator,
    )
    log.debug("opened %s", vol)
    return vol


def expand_volume_paths(source: str | Path) -> list[Path]:
    """A path → the volume paths it stands for: itself, or the sorted ``*.zarr``/TIFF children of a folder.

    Raises:
        VolumeError: missing path, or a folder that is neither a Zarr store nor holds any volumes.
    """
    p = Path(source).expanduser()
    if not p.exists():
        raise VolumeError(f"{p}: no such file or directory")
    if p.is_dir() and not _is_zarr_store(p):
        children = _collection_children(p)
        if not children:
            raise VolumeError(f"{p} is not a Zarr store and holds no *.zarr volumes")
        return children
    return [p]


def open_volumes(
    source: str | Path | np.ndarray | zarr.Array | Sequence[str | Path],
    **kwargs: Any,
) -> list[Volume]:
    """Open one or many volumes: a store/file/array, a plain folder of ``*.zarr`` (and TIFF) volumes, a list.

    ``kwargs`` are passed to :func:`open_volume` (the same settings apply to every volume).

    Raises:
        VolumeError: empty list or folder, or any volume's problem.
    """
    if isinstance(source, (np.ndarray, zarr.Array)):
        return [open_volume(source, **kwargs)]
    sources = [source] if isinstance(source, (str, Path)) else list(source)
    if not sources:
        raise VolumeError("no volume paths given")
    volumes: list[Volume] = []
    for s in sources:
        if isinstance(s, (np.ndarray, zarr.Array)) or isinstance(s, str) and "://" in s:
            volumes.append(open_volume(s, **kwargs))
        else:
            volumes.extend(open_volume(p, **kwargs) for p in expand_volume_paths(s))
    return volumes
