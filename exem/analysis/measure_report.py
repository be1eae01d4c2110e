"""The table of ``exem-measure`` and its files: :class:`MeasureResult`, the columns and their names, CSV, Parquet
and a figure (the measurement itself is :mod:`exem.analysis.measure`).

- ``objects.csv``: a header of the column names (unquoted), then one row per object; floats in their shortest
  round-trip form, booleans ``true``/``false`` (pyarrow's CSV writer).
- ``objects.parquet``: the same table (pyarrow), its schema metadata ``exem`` a JSON record of what was measured
  (labels, images, names, thresholds, voxel size in nm, expansion factor, region).
- ``measure.png``: a histogram of object volumes (µm³, log x when they span more than a decade) and, per image,
  its mean intensity against the volume (positive objects coloured where a threshold is given). Drawn with
  matplotlib's object API (the Agg canvas, no pyplot state); without matplotlib it is left out with a warning.

Every file is written to a temporary name first and renamed, so a failed run leaves no half-written table.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exem.checks import fmt_voxels
from exem.quiet import summary_of

__all__ = [
    "BASE_COLUMNS",
    "FILE_NAMES",
    "MeasureResult",
    "check_channels",
    "check_expansion",
    "check_names",
    "check_thresholds",
    "default_names",
    "object_table",
    "output_paths",
    "write_figure",
    "write_measurements",
    "write_table",
]

log = logging.getLogger(__name__)

FILE_NAMES = {"csv": "objects.csv", "parquet": "objects.parquet", "png": "measure.png"}
# Scatter plots draw at most this many objects (a fixed random subset), so figures of millions stay quick.
MAX_SCATTER = 50_000
POSITIVE, NEGATIVE, PLAIN = "#d62728", "#9a9a9a", "#1f77b4"
BASE_COLUMNS = (
    "label", "voxels", "volume_um3", "centroid_z", "centroid_y", "centroid_x",
    "bbox_z0", "bbox_z1", "bbox_y0", "bbox_y1", "bbox_x0", "bbox_x1", "touches_border",
)  # fmt: skip
# What default_names strips from a file name.
STEM_SUFFIXES = (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif", ".tiff", ".tif")


@dataclass(frozen=True)
class MeasureResult:
    """What :func:`~exem.analysis.measure.measure_objects` measured (and wrote).

    Attributes:
        columns: the table, column name → 1D array (one entry per object), in the order of the files.
        names: the images' column prefixes; thresholds: name → threshold of ``<name>_positive``.
        shape: (Z, Y, X) voxels measured (the ROI's, or the volume's); region: (z0, z1, y0, y1, x0, x1).
        voxel_size_nm: the labels' (z, y, x) voxel size in nm (None: unknown, then ``volume_um3`` is NaN).
        expansion_factor: the divisor of every voxel size (1.0 = the expanded frame).
        csv, parquet, png: the files written (None when not written).
        seconds: wall time of the measurement (reading included, writing not).
    """

    columns: dict[str, np.ndarray]
    names: tuple[str, ...]
    thresholds: dict[str, float]
    shape: tuple[int, int, int]
    region: tuple[int, int, int, int, int, int]
    voxel_size_nm: tuple[float, float, float] | None
    expansion_factor: float
    seconds: float
    csv: Path | None = None
    parquet: Path | None = None
    png: Path | None = None

    @property
    def num_objects(self) -> int:
        return int(len(self.columns["label"]))

    def positive_fraction(self, name: str) -> float:
        """The fraction of objects whose ``<name>_mean`` exceeds ``name``'s threshold (NaN without objects)."""
        col = self.columns[f"{name}_positive"]
        return float(col.mean()) if len(col) else math.nan

    def to_arrow(self) -> Any:
        """The table as a ``pyarrow.Table``."""
        import pyarrow as pa

        return pa.table(self.columns)

    def summary(self, prog: str = "exem-measure") -> str:
        """One line: objects, median volume, the positive fraction per thresholded image, where the files are."""
        vol = self.columns["volume_um3"]
        median = f"{float(np.median(vol)):.4g} µm³" if len(vol) and np.isfinite(vol).all() else "n/a"
        frame = "pre-expansion" if self.expansion_factor != 1.0 else "expanded frame"
        line = (
            f"{prog}: {self.num_objects} objects in {fmt_voxels(self.shape)} voxels ({self.seconds:.1f} s),"
            f" median volume {median} ({frame}, expansion ×{self.expansion_factor:g})"
        )
        for name, thr in self.thresholds.items():
            line += f"; {name} positive {100 * self.positive_fraction(name):.1f} % (mean > {thr:g})"
        written = [p for p in (self.csv, self.parquet, self.png) if p is not None]
        if written:
            line += f" → {written[0].parent}/ ({', '.join(p.name for p in written)})"
        return line


def default_names(sources: Sequence[object], channels: Sequence[int | str | None] | None = None) -> list[str]:
    """Column prefixes from the images' file names: the stem without ``.ome.zarr`` / ``.zarr`` / ``.tif`` …;
    ``image<i>`` (from 1) for arrays. An image's channel given by name gives the name, by index ``<stem>_c<i>``.
    Characters other than letters, digits and ``_`` become ``_`` (``virtual-em.zarr`` → ``virtual_em``)."""
    names = []
    for i, src in enumerate(sources, start=1):
        channel = channels[i - 1] if channels is not None else None
        stem = f"image{i}"
        if isinstance(channel, str):
            stem = channel
        elif isinstance(src, (str, Path)):
            stem = Path(str(src).rstrip("/")).name
            for suffix in STEM_SUFFIXES:
                if stem.lower().endswith(suffix):
                    stem = stem[: -len(suffix)]
                    break
        if channel is not None and not isinstance(channel, str):
            stem = f"{stem}_c{channel}"
        stem = re.sub(r"\W", "_", stem, flags=re.ASCII) or f"image{i}"
        names.append(f"image_{stem}" if stem[0].isdigit() else stem)
    return names


def check_names(names: Sequence[str], count: int) -> tuple[str, ...]:
    """``names`` (one per image, ``count`` of them) as a tuple, checked: identifiers, unique.

    Raises:
        ValueError: the wrong number of names, a name that is no identifier, a name given twice (one line).
    """
    names = tuple(str(n) for n in names)
    if len(names) != count:
        raise ValueError(
            f"names has {len(names)} entries ({', '.join(names)}) but {count} image(s) are given"
        )
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise ValueError(f"names must be identifiers (letters, digits, _; no digit first), got {bad[0]!r}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(
            f"names must be unique, {dup[0]!r} is given more than once; give names=[…] (one per image)"
        )
    return names


# ``positive_threshold`` value: Otsu's threshold of the objects' means (two populations, e.g. marked / unmarked).
OTSU = "otsu"


def resolve_thresholds(
    thresholds: Mapping[str, float | str], means: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """Thresholds as numbers: :data:`OTSU` becomes Otsu's threshold of that image's object means (raw units;
    NaN when fewer than two distinct means)."""
    from skimage.filters import threshold_otsu

    out: dict[str, float] = {}
    for name, value in thresholds.items():
        if value != OTSU:
            out[name] = float(value)
            continue
        m = np.asarray(means[name], dtype=np.float64)
        out[name] = float(threshold_otsu(m)) if np.unique(m).size > 1 else math.nan
    return out


def check_thresholds(
    thresholds: Mapping[str, float | str] | None, names: Sequence[str]
) -> dict[str, float | str]:
    """``positive_threshold`` as name → float (raw units of that image) or :data:`OTSU`; None → none.

    Raises:
        ValueError: a name that is not one of ``names``, a value that is not a finite number (one line).
    """
    out: dict[str, float | str] = {}
    for key, value in dict(thresholds or {}).items():
        if key not in names:
            raise ValueError(
                f"positive_threshold names {key!r}, which is not an image's name ({', '.join(names) or 'none'})"
            )
        if value == OTSU:
            out[key] = OTSU
            continue
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"positive_threshold of {key} must be a number or otsu, got {value!r}") from None
        if not math.isfinite(out[key]):
            raise ValueError(f"positive_threshold of {key} must be finite, got {value!r}")
    return out


def check_channels(channels: Sequence[int | str | None] | None, count: int) -> list[int | str | None]:
    """``channels`` as one entry per image (``count``); None → all None (single-channel images).

    Raises:
        ValueError: the wrong number of entries (one line).
    """
    if channels is None:
        return [None] * count
    channels = [channels] if isinstance(channels, (int, str)) else list(channels)
    if len(channels) != count:
        raise ValueError(
            f"channels has {len(channels)} entries but {count} image(s) are given (null: single channel)"
        )
    return channels


def check_expansion(expansion_factor: float | None) -> float | None:
    """``expansion_factor`` as a float > 0 (None stays None).

    Raises:
        ValueError: not a finite number > 0 (one line).
    """
    if expansion_factor is None:
        return None
    try:
        ef = float(expansion_factor)
    except (TypeError, ValueError):
        raise ValueError(f"expansion_factor must be a number > 0, got {expansion_factor!r}") from None
    if not (math.isfinite(ef) and ef > 0):
        raise ValueError(f"expansion_factor must be a number > 0, got {expansion_factor!r}")
    return ef


def object_table(
    ids: np.ndarray,
    counts: np.ndarray,
    coord_sums: np.ndarray,
    first: np.ndarray,
    last: np.ndarray,
    sums: np.ndarray,
    peaks: np.ndarray,
    *,
    names: Sequence[str],
    image_dtypes: Sequence[np.dtype],
    thresholds: Mapping[str, float],
    region: Sequence[int],
    voxel_um3: float,
) -> dict[str, np.ndarray]:
    """The table's columns (:data:`BASE_COLUMNS`, then ``<name>_mean/_max/_sum[/_positive]`` per image) from
    per-object sums, one row per id (ids ascending).

    Args:
        ids: label ids; counts: voxels per object; coord_sums: (n, 3) Σz, Σy, Σx of its voxel coordinates.
        first, last: (n, 3) smallest and largest z, y, x of its voxels (voxels, in the volume).
        sums, peaks: (n, images) Σ and maximum of each image over its voxels (raw units).
        names, image_dtypes: per image, the column prefix and the stored dtype (integer maxima keep it).
        thresholds: name → threshold of ``<name>_positive`` (``<name>_mean > threshold``).
        region: (z0, z1, y0, y1, x0, x1) voxels measured: objects reaching a face touch the border.
        voxel_um3: the volume of one voxel in µm³ (NaN when unknown).
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        centroid = coord_sums / counts[:, None]
        means = sums / counts[:, None]
    lo, hi = first, last + 1
    touches = np.zeros(len(ids), bool)
    for ax in range(3):
        touches |= (lo[:, ax] == region[2 * ax]) | (hi[:, ax] == region[2 * ax + 1])
    cols: dict[str, np.ndarray] = {
        "label": ids.astype(np.uint64 if ids.dtype == np.uint64 else np.int64),
        "voxels": counts.astype(np.int64),
        "volume_um3": counts * voxel_um3,
    }
    for ax, a in enumerate("zyx"):
        cols[f"centroid_{a}"] = centroid[:, ax]
    for ax, a in enumerate("zyx"):
        cols[f"bbox_{a}0"], cols[f"bbox_{a}1"] = lo[:, ax], hi[:, ax]
    cols["touches_border"] = touches
    for i, (name, dtype) in enumerate(zip(names, image_dtypes, strict=True)):
        cols[f"{name}_mean"] = means[:, i]
        cols[f"{name}_max"] = peaks[:, i].astype(dtype) if np.dtype(dtype).kind in "ui" else peaks[:, i]
        cols[f"{name}_sum"] = sums[:, i]
        if name in thresholds:
            cols[f"{name}_positive"] = means[:, i] > float(thresholds[name])
    return cols


def output_paths(out: str | Path, overwrite: bool) -> dict[str, Path]:
    """The files of ``out`` (:data:`FILE_NAMES` keys → paths), checked but not created.

    Raises:
        FileExistsError: ``out`` is a file, or (without ``overwrite``) one of the files exists (one line).
    """
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"out {folder} is a file, not a folder")
    paths = {key: folder / name for key, name in FILE_NAMES.items()}
    if not overwrite:
        for p in paths.values():
            if p.exists():
                raise FileExistsError(
                    f"{p} exists; give overwrite=true to replace it (or another out folder)"
                )
    return paths


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def write_table(result: MeasureResult, csv_path: Path, parquet_path: Path, record: Mapping) -> None:
    """``result``'s table as CSV and as Parquet (with ``record`` as the schema's ``exem`` metadata)."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    table = pa.table(result.columns)
    table = table.replace_schema_metadata({"exem": json.dumps(dict(record))})
    tmp = _tmp(parquet_path)
    pq.write_table(table, tmp)
    os.replace(tmp, parquet_path)
    tmp = _tmp(csv_path)
    with open(tmp, "wb") as f:
        f.write((",".join(result.columns) + "\n").encode())
        pa_csv.write_csv(table, f, pa_csv.WriteOptions(include_header=False))
    os.replace(tmp, csv_path)


def _sizes(result: MeasureResult) -> tuple[np.ndarray, str]:
    vol = result.columns["volume_um3"]
    if len(vol) and not np.isfinite(vol).all():
        return result.columns["voxels"].astype(np.float64), "voxels"
    frame = "pre-expansion" if result.expansion_factor != 1.0 else "expanded frame"
    return vol, f"µm³, {frame}"


def write_figure(result: MeasureResult, path: Path) -> Path | None:
    """The histogram of object sizes and the per-image mean-vs-size scatters as a PNG; None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed: %s is not drawn (pip install matplotlib)", path)
        return None
    size, unit = _sizes(result)
    log_x = bool(len(size)) and size.min() > 0 and size.max() > 10 * size.min()
    fig = Figure(figsize=(4.2 * (1 + len(result.names)), 3.6), layout="constrained")
    axes = fig.subplots(1, 1 + len(result.names), squeeze=False)[0]
    ax = axes[0]
    if len(size):
        bins = np.geomspace(size.min(), size.max(), 41) if log_x else 40
        ax.hist(size, bins=bins, color=PLAIN)
    else:
        ax.text(0.5, 0.5, "no objects", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel=f"object volume ({unit})", ylabel="objects", title=f"{result.num_objects} objects")
    pick = np.arange(len(size))
    if len(pick) > MAX_SCATTER:
        pick = np.sort(np.random.default_rng(0).choice(len(pick), MAX_SCATTER, replace=False))
    for name, ax in zip(result.names, axes[1:], strict=True):
        mean = result.columns[f"{name}_mean"][pick]
        if name in result.thresholds:
            pos = result.columns[f"{name}_positive"][pick]
            ax.scatter(size[pick][~pos], mean[~pos], s=4, c=NEGATIVE, label=f"negative ({int((~pos).sum())})")
            ax.scatter(size[pick][pos], mean[pos], s=4, c=POSITIVE, label=f"positive ({int(pos.sum())})")
            ax.axhline(result.thresholds[name], color="k", lw=0.8, ls="--")
            ax.legend(loc="best", fontsize="small", markerscale=3)
        else:
            ax.scatter(size[pick], mean, s=4, c=PLAIN)
        ax.set(xlabel=f"object volume ({unit})", ylabel=f"{name} mean (raw units)", title=name)
    for ax in axes:
        if log_x:
            ax.set_xscale("log")
    tmp = _tmp(path)
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, path)
    return path


def write_measurements(
    result: MeasureResult, paths: Mapping[str, Path], *, labels: str, images: Sequence[str]
) -> MeasureResult:
    """Write the table (``paths["csv"]``, ``paths["parquet"]``) and the figure (``paths["png"]``), creating their
    folder; returns ``result`` with the paths written."""
    folder = Path(paths["csv"]).parent
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "labels": str(labels),
        "images": [str(p) for p in images],
        "names": list(result.names),
        "positive_threshold": dict(result.thresholds),
        "voxel_size_nm": None if result.voxel_size_nm is None else list(result.voxel_size_nm),
        "expansion_factor": result.expansion_factor,
        "region": list(result.region),
    }
    write_table(result, paths["csv"], paths["parquet"], record)
    png = write_figure(result, paths["png"])
    log.info(
        "wrote %s, %s%s",
        paths["csv"],
        paths["parquet"],
        f", {png}" if png else "",
        extra=summary_of("exem-measure"),
    )
    return dataclasses.replace(result, csv=paths["csv"], parquet=paths["parquet"], png=png)
