"""Resumable outputs, one implementation for every task (translation, reliability maps, segmentation).

An exem output is a local Zarr group whose attribute ``"exem"`` is its *record*: the settings it was computed
with (input fingerprint, region, patch grid, network fingerprint, task options, …), ``complete``, the exem
version. Before any compute, :func:`inspect_output` decides, read-only, what a run does with the path:

- nothing there (or an empty folder) → ``create`` (the nearest existing parent must be writable);
- ``overwrite=True`` → ``overwrite`` (the path and its parent must be writable);
- an exem output of this task, incomplete, same settings → ``resume`` (the engine skips blocks whose
  done-markers exist);
- complete with the same settings → ``complete`` where the task allows it (nothing to compute), else refused;
- anything else (a foreign folder, other settings) → one-line ``FileExistsError`` naming what differs.

:func:`create_image` then writes the empty OME-Zarr pyramid (on global rank 0, inside the engine's run),
:func:`update_record` marks it complete (or adds results), :func:`read_record` reads it back. The record is a
plain group attribute in both formats: in ``.zattrs`` (NGFF 0.4, Zarr v2) or beside ``"ome"`` in ``zarr.json``
(NGFF 0.5, Zarr v3), whose metadata writes are atomic (a temporary file, then a rename).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import zarr

from exem.data.ome import DEFAULT_NGFF_VERSION, RECORD_ATTRIBUTE, check_ngff_version, create_ome_zarr
from exem.data.volume import Volume
from exem.inference.plan import BlockPlan

__all__ = [
    "Action",
    "create_image",
    "describe_differences",
    "grid_record",
    "input_id",
    "inspect_output",
    "jsonable",
    "local_output",
    "output_voxel_size",
    "read_record",
    "remove_output",
    "update_record",
]

log = logging.getLogger(__name__)

Action = Literal["create", "overwrite", "resume", "complete"]

# The record keys of the patch grid and the input, shared by every task (tasks add their own keys).
GRID_KEYS = (
    "input",
    "input_level",
    "roi",
    "shape",
    "patch",
    "overlap",
    "sigma",
    "dtype",
    "autocast_dtype",
    "intensity_range",
    "block_shape",
    "chunks",
    "levels",
    "shards",
    "ngff_version",
)
# What records written before these keys existed hold instead (all exem outputs were NGFF 0.4 and unsharded).
LEGACY_RECORD = {"ngff_version": "0.4", "shards": None}


def jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples → lists, numpy scalars refused early)."""
    return json.loads(json.dumps(value))


def local_output(output: str | Path) -> Path:
    """An output path made absolute; refuses URLs (done-markers are files).

    Raises:
        ValueError: ``output`` is a URL.
    """
    if "://" in str(output):
        raise ValueError(f"output {output}: only local paths are supported (done-markers are files)")
    return Path(output).expanduser().absolute()


def input_id(volume: Volume, source: Any) -> str:
    """What identifies the input in a record: the resolved local path, else the volume's own description."""
    if isinstance(source, (str, Path)) and "://" not in str(source):
        return str(Path(source).expanduser().resolve())
    return volume.path


def output_voxel_size(volume: Volume) -> tuple[float, float, float]:
    """The output's (z, y, x) voxel size in nm: the input's; 1 nm with a warning when unknown."""
    if volume.voxel_size_nm is None:
        log.warning("%s: voxel size unknown; the output says 1 nm per voxel", volume.path)
        return (1.0, 1.0, 1.0)
    return tuple(float(v) for v in volume.voxel_size_nm)  # type: ignore[return-value]


def grid_record(
    volume: Volume,
    source: Any,
    plan: BlockPlan,
    *,
    sigma: float,
    dtype: str,
    autocast_dtype: str | None,
    ngff_version: str | float = DEFAULT_NGFF_VERSION,
) -> dict[str, Any]:
    """The :data:`GRID_KEYS` part of a record: input, region, patch grid, blending, storage (JSON values)."""
    return jsonable(
        {
            "input": input_id(volume, source),
            "input_level": volume.level,
            "roi": list(plan.region),
            "shape": list(plan.shape),
            "patch": list(plan.grid.patch),
            "overlap": list(plan.grid.overlap),
            "sigma": float(sigma),
            "dtype": dtype,
            "autocast_dtype": None if autocast_dtype is None else str(autocast_dtype),
            "intensity_range": list(volume.intensity_range),
            "block_shape": list(plan.block_shape),
            "chunks": None if plan.chunks is None else list(plan.chunks),
            "levels": int(plan.levels),
            "shards": None if plan.shards is None else list(plan.shards),
            "ngff_version": check_ngff_version(ngff_version),
        }
    )


def read_record(path: str | Path) -> dict[str, Any] | None:
    """The ``"exem"`` attribute of the group at ``path``; None when unreadable or absent."""
    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:  # noqa: BLE001 - anything unreadable is "not an exem output"
        return None
    meta = attrs.get(RECORD_ATTRIBUTE)
    return meta if isinstance(meta, dict) else None


def update_record(path: str | Path, **fields: Any) -> None:
    """Add ``fields`` to the record of the group at ``path`` (e.g. ``complete=True``)."""
    group = zarr.open_group(str(path), mode="r+")
    group.attrs[RECORD_ATTRIBUTE] = {
        **jsonable(dict(group.attrs.get(RECORD_ATTRIBUTE, {}) or {})),
        **jsonable(fields),
    }


def describe_differences(stored: Mapping[str, Any], settings: Mapping[str, Any], keys: Sequence[str]) -> str:
    """``"sigma 0.5 (now 0.4); generator fingerprint ab12 (now cd34)"``: the keys whose values differ.

    For a dict value (e.g. the network's widths and fingerprint) only the differing sub-keys are named.
    """
    diffs = []
    for key in keys:
        old, new = stored.get(key), settings.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            sub = [k for k in new if old.get(k) != new.get(k)] or [k for k in old if k not in new]
            diffs.append(f"{key} " + ", ".join(f"{k} {old.get(k)} (now {new.get(k)})" for k in sub))
        else:
            diffs.append(f"{key} {old} (now {new})")
    return "; ".join(diffs)


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def inspect_output(
    out: Path,
    settings: Mapping[str, Any],
    *,
    keys: Sequence[str],
    overwrite: bool,
    what: str,
    owned: Callable[[Mapping[str, Any]], bool],
    complete_ok: bool,
) -> Action:
    """Decide (read-only) what a run does with the output ``out``: ``create`` | ``overwrite`` | ``resume`` |
    ``complete``; or raise.

    Args:
        out: the output folder (absolute).
        settings: this run's record (JSON values).
        keys: the record keys a resume must match.
        overwrite: the user asked to replace the output.
        what: the task's noun in messages (``translation``, ``segmentation``).
        owned: whether a stored record belongs to this task.
        complete_ok: a complete output with the same settings is ``complete`` (nothing to do) instead of refused.

    Raises:
        PermissionError: the output cannot be created / replaced / resumed (not writable).
        FileExistsError: a foreign output, a complete one (``complete_ok`` false), or other settings.
    """
    exists = out.exists() and not (out.is_dir() and not any(out.iterdir()))
    if not exists:
        anchor = _nearest_existing(out.parent)
        if not os.access(anchor, os.W_OK | os.X_OK):
            raise PermissionError(f"output {out}: cannot create it, {anchor} is not writable")
        return "create"
    if overwrite:
        for p in (out.parent, out):
            if not os.access(p, os.W_OK | os.X_OK):
                raise PermissionError(f"output {out}: cannot replace it, {p} is not writable")
        return "overwrite"
    stored = read_record(out)
    if stored is None or not owned(stored):
        raise FileExistsError(
            f"output {out} exists and is not an exem {what}; use overwrite=true or another output"
        )
    stored = {**LEGACY_RECORD, **stored}
    diff = describe_differences(stored, settings, keys)
    if stored.get("complete"):
        if complete_ok and not diff:
            log.info("%s is complete with the same settings; not recomputed", out)
            return "complete"
        if not complete_ok:
            raise FileExistsError(f"output {out} exists (complete); use overwrite=true")
        raise FileExistsError(
            f"output {out} exists (complete) with other settings: {diff}; use overwrite=true"
        )
    if diff:
        raise FileExistsError(
            f"output {out} exists (incomplete) with other settings: {diff}; use overwrite=true to start over"
        )
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"output {out}: cannot resume, it is not writable")
    return "resume"


def remove_output(out: Path) -> None:
    """Delete an output folder (or a file / link in its place)."""
    if out.is_dir() and not out.is_symlink():
        shutil.rmtree(out)
    elif out.exists() or out.is_symlink():
        out.unlink()


def create_image(
    path: str | Path,
    plan: BlockPlan,
    dtype: str,
    voxel_size_nm: Sequence[float],
    attributes: Mapping[str, Any],
    *,
    name: str,
    replace: bool = False,
    ngff_version: str | float = DEFAULT_NGFF_VERSION,
    channels: Sequence[Mapping[str, Any]] | None = None,
) -> zarr.Group:
    """Create the empty OME-Zarr pyramid an engine run writes into (global rank 0, inside the run).

    The image has the plan's region shape, chunks, shards and ``levels`` (level l halves Y and X l times), the
    record ``attributes`` as its ``"exem"`` attribute, and, for an ROI, a translation placing it where it lies in
    the input (NGFF: scale, then translation, in physical units).

    Args:
        path: the image folder.
        plan: the run's plan (planned with the output's chunks).
        dtype: the stored dtype.
        voxel_size_nm: (z, y, x) nm.
        attributes: the record.
        name: the multiscales name.
        replace: delete what is at ``path`` first.
        ngff_version: ``"0.5"`` (Zarr v3, the default) or ``"0.4"`` (Zarr v2; not with ``plan.shards``).
        channels: OMERO entries of a multi-channel image (``(C, Z, Y, X)`` levels, one chunk per channel): the
            engine writes the first channels, the others are written by the caller.
    """
    out = Path(path)
    if replace:
        remove_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    chunks = plan.chunks if plan.chunks is not None else plan.block_shape
    offset = [float(o) * float(v) for o, v in zip(plan.origin, voxel_size_nm, strict=True)]
    return create_ome_zarr(
        out,
        plan.shape,
        dtype,
        tuple(float(v) for v in voxel_size_nm),
        chunks=chunks,
        factors=[(1, 2**lvl, 2**lvl) for lvl in range(plan.levels)],
        name=name,
        attributes={RECORD_ATTRIBUTE: dict(attributes)},
        ngff_version=ngff_version,
        shards=plan.shards,
        origin_nm=offset if any(plan.origin) else None,
        channels=channels,
    )
