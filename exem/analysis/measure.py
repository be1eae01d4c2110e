"""Per-object measurements of an instance-label volume: size, place, shape box and intensities, out of core.

:func:`measure_objects` reads the labels (and every intensity image) block by block and reduces each block to
runs: maximal stretches of one label along X. A run gives its voxel count, coordinate sums, bounding box and
(``np.add.reduceat`` / ``np.maximum.reduceat``) each image's sum and maximum at once; runs are then grouped by label
id (a sort and ``reduceat``, all integers exact). The per-block partial tables are merged by label id, so objects
that span blocks are measured exactly as a whole. Memory: one block of every volume plus O(objects).

One row per object (label ids ascending), columns in this order (:data:`BASE_COLUMNS`, then per image):

- ``label``: the id; ``voxels``: its voxel count (inside the ROI);
- ``volume_um3``: voxels × voxel volume in µm³ in the sample's **pre-expansion** frame (each voxel size in nm
  divided by ``expansion_factor``; 1 nm³ = 1e-9 µm³);
- ``centroid_z, centroid_y, centroid_x``: mean voxel coordinate (voxels, of the whole volume, not the ROI);
- ``bbox_z0, bbox_z1, bbox_y0, bbox_y1, bbox_x0, bbox_x1``: bounding box in voxels, end exclusive (as
  ``skimage.measure.regionprops``'s ``bbox``, in the volume's coordinates);
- ``touches_border``: a voxel of the object lies on a face of the volume (or of the ROI);
- ``<name>_mean, <name>_max, <name>_sum``: intensities of image ``name`` over the object's voxels, in the image's
  own raw units (never normalised); ``<name>_positive`` (with a threshold for ``name``): ``<name>_mean > threshold``.

The files (``objects.csv``, ``objects.parquet``, ``measure.png``) are written by :mod:`exem.analysis.measure_report`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from exem.analysis.instances import block_slices
from exem.analysis.measure_report import (
    BASE_COLUMNS,
    MeasureResult,
    check_channels,
    check_expansion,
    check_names,
    check_thresholds,
    default_names,
    object_table,
    output_paths,
    resolve_thresholds,
    write_measurements,
)
from exem.checks import fmt_voxels, positive_ints
from exem.data.errors import channel_option
from exem.data.ome import RECORD_ATTRIBUTE, is_group, ome_attributes, read_multiscales
from exem.data.volume import Volume, VolumeError, open_volume
from exem.progress import step_bar

__all__ = [
    "BASE_COLUMNS",
    "DEFAULT_BLOCK_SHAPE",
    "MeasureResult",
    "default_names",
    "labels_source",
    "measure_objects",
    "recorded_expansion_factor",
]

log = logging.getLogger(__name__)

# Blocks of 2^24 voxels: ~0.5 GB at peak with uint32 labels and two images (~30 bytes per voxel in all).
DEFAULT_BLOCK_SHAPE = (64, 512, 512)
NM3_TO_UM3 = 1e-9
# Voxel sizes of labels and images agree when within this relative difference.
VOXEL_SIZE_RTOL = 1e-3
# Partial per-block tables are merged once they hold this many rows (or more rows than the merged table).
MERGE_ROWS = 1 << 18
VolumeSource = str | Path | np.ndarray | zarr.Array | Volume


def labels_source(source: VolumeSource) -> VolumeSource:
    """The label image a path stands for: an ``exem-segment`` output folder (or any Zarr group that lists one
    NGFF label image and is no image itself) → its label image; anything else → itself."""
    if not isinstance(source, (str, Path)) or "://" in str(source) or not is_group(source):
        return source
    group = zarr.open_group(str(source), mode="r")
    if read_multiscales(group) is not None:
        return source
    listed = ome_attributes(group).get("labels") or []
    if len(listed) > 1:
        raise VolumeError(
            f"{source} lists {len(listed)} label images ({', '.join(map(str, listed))}); give one, e.g."
            f" {Path(source) / str(listed[0])}"
        )
    return Path(source) / str(listed[0]) if listed else source


def recorded_expansion_factor(source: VolumeSource) -> float | None:
    """The ``expansion_factor`` recorded with a Zarr / OME-Zarr volume: in its group's (or, for a label image
    inside a segmentation folder, the folder's) attributes, under ``exem`` or at the top level (also inside
    NGFF 0.5's ``ome``); None when none is recorded."""
    if not isinstance(source, (str, Path)) or "://" in str(source):
        return None
    for path in (Path(source), Path(source).parent):
        if not is_group(path):
            continue
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
        for where in (attrs.get(RECORD_ATTRIBUTE), attrs, ome_attributes(group)):
            value = where.get("expansion_factor") if isinstance(where, Mapping) else None
            if value is not None:
                try:
                    return float(value)
                except (TypeError, ValueError):
                    raise ValueError(
                        f"{path}: the recorded expansion_factor {value!r} is not a number"
                    ) from None
    return None


def _open(
    source: VolumeSource, voxel_size: Sequence[float] | None = None, channel: int | str | None = None
) -> Volume:
    if isinstance(source, Volume):
        return source
    # raw values are measured: the intensity range (normalisation) is irrelevant, and giving one skips its checks
    return open_volume(source, voxel_size=voxel_size, intensity_range=(0.0, 1.0), channel=channel)


def _check_same_grid(labels: Volume, image: Volume, name: str, voxel: tuple[float, ...] | None) -> None:
    if image.shape != labels.shape:
        raise ValueError(
            f"image {name} ({image.path}) has shape {fmt_voxels(image.shape)} but the labels ({labels.path})"
            f" have {fmt_voxels(labels.shape)}; give volumes on the same voxel grid"
        )
    other = image.voxel_size_nm
    if (
        voxel is not None
        and other is not None
        and not all(math.isclose(a, b, rel_tol=VOXEL_SIZE_RTOL) for a, b in zip(voxel, other, strict=True))
    ):
        raise ValueError(
            f"image {name} ({image.path}) has voxel size {list(other)} nm but the labels have {list(voxel)} nm;"
            " give volumes on the same voxel grid"
        )


def _region(shape: Sequence[int], roi: Sequence[int] | None) -> tuple[int, int, int, int, int, int]:
    if roi is None:
        return (0, int(shape[0]), 0, int(shape[1]), 0, int(shape[2]))
    from exem.inference.plan import resolve_region  # (imports torch: only when an ROI is given)

    return resolve_region(shape, roi, (1, 1, 1))


# ----------------------------------------------------------------------------------------------------
# the blockwise reduction: per block voxels → runs → labels; partial tables merged by label id


@dataclass
class _Partial:
    """Per-label sums of part of the volume (``ids`` ascending, unique).

    ``adds``: (n, 4) int64 voxels, Σz, Σy, Σx; ``mins``/``maxs``: (n, 3) int64 first/last z, y, x;
    ``sums``/``peaks``: (n, images) float64 intensity sums / maxima."""

    ids: np.ndarray
    adds: np.ndarray
    mins: np.ndarray
    maxs: np.ndarray
    sums: np.ndarray
    peaks: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def arrays(self) -> tuple[np.ndarray, ...]:
        return (self.ids, self.adds, self.mins, self.maxs, self.sums, self.peaks)


def _group(p: _Partial) -> _Partial:
    """Rows with equal ids combined (sums added, minima, maxima), ids ascending."""
    if len(p) == 0:
        return p
    order = np.argsort(p.ids, kind="stable")
    p = _Partial(*(a[order] for a in p.arrays()))
    first = np.flatnonzero(np.concatenate(([True], p.ids[1:] != p.ids[:-1])))
    if len(first) == len(p):
        return p
    return _Partial(
        p.ids[first],
        np.add.reduceat(p.adds, first, axis=0),
        np.minimum.reduceat(p.mins, first, axis=0),
        np.maximum.reduceat(p.maxs, first, axis=0),
        np.add.reduceat(p.sums, first, axis=0),
        np.maximum.reduceat(p.peaks, first, axis=0),
    )


def _merge(parts: Sequence[_Partial]) -> _Partial:
    return _group(_Partial(*(np.concatenate(a) for a in zip(*(p.arrays() for p in parts), strict=True))))


def _empty(images: int, id_dtype: np.dtype) -> _Partial:
    i3 = np.zeros((0, 3), np.int64)
    f = np.zeros((0, images), np.float64)
    return _Partial(np.zeros(0, id_dtype), np.zeros((0, 4), np.int64), i3, i3.copy(), f, f.copy())


def _block_partial(lab: np.ndarray, images: Sequence[np.ndarray], origin: Sequence[int]) -> _Partial:
    """Per-label sums of one block ``lab`` (Z, Y, X) whose first voxel is ``origin`` (z, y, x) in the volume;
    ``images``: intensity blocks of the same shape (raw values). Label 0 is background."""
    bz, by, bx = lab.shape
    flat = lab.reshape(-1)
    n = flat.size
    change = np.empty(n, dtype=bool)
    change[0] = True
    np.not_equal(flat[1:], flat[:-1], out=change[1:])
    change[::bx] = True  # runs never continue onto the next row
    starts = np.flatnonzero(change)
    ids = flat[starts]
    keep = ids != 0
    length = np.diff(starts, append=n)[keep]
    sums = np.empty((int(keep.sum()), len(images)), np.float64)
    peaks = np.empty_like(sums)
    for i, img in enumerate(images):
        values = img.reshape(-1)
        sums[:, i] = np.add.reduceat(values, starts, dtype=np.float64)[keep]
        peaks[:, i] = np.maximum.reduceat(values, starts)[keep]
    s = starts[keep]
    z, rest = np.divmod(s, by * bx)
    y, x0 = np.divmod(rest, bx)
    z += int(origin[0])
    y += int(origin[1])
    x0 += int(origin[2])
    x1 = x0 + length - 1
    adds = np.stack([length, z * length, y * length, (x0 + x1) * length // 2], axis=1)
    runs = _Partial(ids[keep], adds, np.stack([z, y, x0], axis=1), np.stack([z, y, x1], axis=1), sums, peaks)
    return _group(runs)


def _measure_blocks(
    labels: Volume,
    images: Sequence[Volume],
    region: Sequence[int],
    boxes: Sequence[tuple[slice, slice, slice]],
    progress: bool,
) -> _Partial:
    """Per-label sums over the ``boxes`` (slices of the ``region``), merged by label id."""
    merged, pending, rows = _empty(len(images), labels.dtype), [], 0
    with step_bar(progress, "measure", len(boxes)) as advance:
        for box in boxes:
            sl = tuple(slice(b.start + region[2 * ax], b.stop + region[2 * ax]) for ax, b in enumerate(box))
            lab = labels.read(sl)
            if lab.dtype.kind == "i" and lab.size and lab.min() < 0:
                raise ValueError(
                    f"labels {labels.path}: negative ids (e.g. {int(lab.min())}); ids must be ≥ 0"
                )
            pending.append(_block_partial(lab, [v.read(sl) for v in images], [s.start for s in sl]))
            rows += len(pending[-1])
            if rows > max(MERGE_ROWS, len(merged)):  # bounded memory: merge the partial tables now and then
                merged, pending, rows = _merge([merged, *pending]), [], 0
            advance()
    return _merge([merged, *pending])


def measure_objects(
    labels: VolumeSource,
    images: Sequence[VolumeSource] = (),
    out: str | Path | None = None,
    *,
    names: Sequence[str] | None = None,
    expansion_factor: float | None = None,
    positive_threshold: Mapping[str, float | str] | None = None,
    channels: Sequence[int | str | None] | None = None,
    voxel_size: Sequence[float] | None = None,
    block_shape: Sequence[int] = DEFAULT_BLOCK_SHAPE,
    roi: Sequence[int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> MeasureResult:
    """One row per object of an instance-label volume: size, centroid, box, border contact, intensities.

    Args:
        labels: integer instance ids (0 = background): an ``exem-segment`` output folder (its ``labels`` image is
            used), a Zarr / OME-Zarr / TIFF volume, an array or a :class:`~exem.data.volume.Volume`.
        images: intensity volumes on the labels' voxel grid (antibody channels, virtual EM, a reliability map);
            (Z, Y, X), or one channel of a (C, Z, Y, X) image (``channels``). Measured in their raw units.
        out: folder for ``objects.csv``, ``objects.parquet`` and ``measure.png``; None: write nothing.
        names: column prefix per image (identifiers, unique); None: the images' file stems
            (:func:`default_names`).
        expansion_factor: the gel's linear expansion; voxel sizes are divided by it for ``volume_um3``. None: the
            value recorded with the labels (or images) (:func:`recorded_expansion_factor`), else 1.0 with a
            warning (volumes in the expanded frame).
        positive_threshold: image name → threshold in that image's raw units, or ``"otsu"`` (Otsu's threshold of
            the objects' means: two populations, marked and unmarked): ``<name>_positive`` is
            ``<name>_mean > threshold``; the result records the number used.
        channels: per image, the channel of a multi-channel ``(C, Z, Y, X)`` image (index, or name as
            :func:`~exem.data.volume.open_volume` reads them: OME-Zarr ``omero`` labels, …) or None (single
            channel); None: every image single-channel.
        voxel_size: the labels' (z, y, x) voxel size in nm; None: from their OME-Zarr metadata, else from the
            images' (unknown: ``volume_um3`` is NaN, with a warning).
        block_shape: (z, y, x) voxels read at a time. Peak memory is about 30 bytes per block voxel with uint32
            labels and two images (0.5 GB at the default 64×512×512), plus a few hundred bytes per object.
        roi: (z0, z1, y0, y1, x0, x1) voxels to measure; objects are cut at its faces (``touches_border``).
            Coordinates in the table stay the volume's.
        overwrite: replace existing files in ``out``.
        progress: a rich progress bar over the blocks on stderr.

    Returns:
        a :class:`MeasureResult` (the table in ``columns``; ``summary()`` is what ``exem-measure`` prints).

    Raises:
        ValueError (VolumeError) / FileExistsError: one line, before anything is written: a volume that cannot
        be read, labels that are not integers, images of another shape or voxel size, names that do not match the
        images, a bad threshold or expansion factor, existing files without ``overwrite``.
    """
    t0 = time.perf_counter()
    images = [images] if isinstance(images, (str, Path, np.ndarray, zarr.Array, Volume)) else list(images)
    channels = check_channels(channels, len(images))
    names = [names] if isinstance(names, str) else names
    names = check_names(default_names(images, channels) if names is None else names, len(images))
    thresholds = check_thresholds(positive_threshold, names)
    ef = check_expansion(expansion_factor)
    block = positive_ints(block_shape, 3, "block_shape", "z, y, x")
    labels = labels_source(labels)
    lab_vol = _open(labels, voxel_size)
    if lab_vol.dtype.kind not in "ui":
        raise ValueError(
            f"labels {lab_vol.path}: dtype {lab_vol.dtype} is not an integer dtype; instance labels are integer ids"
        )
    voxel = lab_vol.voxel_size_nm
    with channel_option("channels=[…] (one entry per image)"):
        img_vols = [_open(src, channel=ch) for src, ch in zip(images, channels, strict=True)]
    for name, vol in zip(names, img_vols, strict=True):
        _check_same_grid(lab_vol, vol, name, voxel)
        if voxel is None and vol.voxel_size_nm is not None:
            voxel = vol.voxel_size_nm
    region = _region(lab_vol.shape, roi)
    paths = output_paths(out, overwrite) if out is not None else None
    if ef is None:
        found = [f for f in map(recorded_expansion_factor, [labels, *images]) if f is not None]
        ef = check_expansion(found[0]) if found else None
    if ef is None:
        log.warning(
            "no expansion_factor given or recorded with %s: volumes are in the expanded frame (give"
            " expansion_factor=… for the sample's own µm³)",
            lab_vol.path,
        )
        ef = 1.0
    if voxel is None:
        log.warning("%s: voxel size unknown: volume_um3 is NaN (give voxel_size=[z, y, x] nm)", lab_vol.path)
    voxel_um3 = math.prod(v / ef for v in voxel) * NM3_TO_UM3 if voxel is not None else math.nan

    shape = (region[1] - region[0], region[3] - region[2], region[5] - region[4])
    boxes = block_slices(shape, block)
    merged = _measure_blocks(lab_vol, img_vols, region, boxes, progress)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = {n: merged.sums[:, i] / merged.adds[:, 0] for i, n in enumerate(names)}
    thresholds = resolve_thresholds(thresholds, means)  # "otsu" → a number from the object means
    cols = object_table(
        merged.ids,
        merged.adds[:, 0],
        merged.adds[:, 1:],
        merged.mins,
        merged.maxs,
        merged.sums,
        merged.peaks,
        names=names,
        image_dtypes=[v.dtype for v in img_vols],
        thresholds=thresholds,
        region=region,
        voxel_um3=voxel_um3,
    )
    seconds = time.perf_counter() - t0
    voxels = math.prod(shape)
    log.info(
        "measured %d objects in %s voxels (%d block(s)) in %.1f s (%.1f Mvox/s)",
        len(merged), fmt_voxels(shape), len(boxes), seconds, voxels / max(seconds, 1e-9) / 1e6,
    )  # fmt: skip
    result = MeasureResult(
        columns=cols,
        names=names,
        thresholds=thresholds,
        shape=shape,
        region=region,
        voxel_size_nm=voxel,
        expansion_factor=ef,
        seconds=seconds,
    )
    if paths is None:
        return result
    return write_measurements(result, paths, labels=lab_vol.path, images=[v.path for v in img_vols])
