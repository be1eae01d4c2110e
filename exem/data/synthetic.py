"""Synthetic neuropil phantoms and their ExM-like and EM-like renderings.

A :class:`Phantom` is a procedurally generated label volume ``(Z, Y, X)`` that looks like neuropil:

- **cells**: a generalised Voronoi tessellation of smooth random curves (neurites: thin axons, thick
  dendrites, spherical varicosities = boutons) computed in physical space (nm), so anisotropic voxels
  only change the sampling;
- **membrane**: the cell boundaries, ``membrane_thickness_nm`` thick;
- **mito**: mitochondria, bent capsules that follow a neurite's axis, kept inside one cell and off its
  membrane, with **cristae** (lamellae across the long axis) inside;
- **vesicles**: clusters of small spheres inside boutons, reaching the bouton's membrane;
- **semantic**: 0 cytoplasm, 1 membrane, 2 mitochondrion, 3 vesicle.

:func:`render_em` and :func:`render_exm` turn ANY phantom into an EM-like ``uint8`` or an ExM-like
(pan-protein fluorescence) ``uint16`` image. The same phantom rendered both ways is a paired ground truth
for evaluation; unpaired training domains come from phantoms with different seeds.
:func:`write_synthetic_dataset` writes such a set as OME-Zarr.

This module writes the datasets and is where users import the names above from; the phantom is generated in
:mod:`exem.data.phantom` (its nm-space geometry in :mod:`exem.data.phantom_geometry`), the renderings are in
:mod:`exem.data.render`.

Every number lives in :class:`PhantomParams`, :class:`EMRenderParams` or :class:`ExMRenderParams`; lengths
are in nm and converted to voxels with the phantom's voxel size. Everything is deterministic for a seed.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import zarr

from exem.data.ome import DEFAULT_NGFF_VERSION, read_multiscales, write_ome_zarr
from exem.data.phantom import (
    SEMANTIC_CLASSES,
    Phantom,
    PhantomParams,
    check_shape,
    check_voxel_size,
    make_phantom,
)
from exem.data.render import (
    AntibodyRenderParams,
    EMRenderParams,
    ExMRenderParams,
    antibody_positive_ids,
    render_antibody,
    render_em,
    render_exm,
)
from exem.quiet import summary_of

log = logging.getLogger(__name__)

# How to replace an existing output, from exem-synth, exem-train (its experiment's `synthetic:` node) or Python.
_REPLACE = "overwrite=true replaces it (exem-train: synthetic.overwrite=true)"

__all__ = [
    "DEFAULT_SEEDS",
    "SAMPLE_CHANNELS",
    "AntibodyRenderParams",
    "antibody_positive_ids",
    "render_antibody",
    "SEMANTIC_CLASSES",
    "SYNTHETIC_VERSION",
    "EMRenderParams",
    "ExMRenderParams",
    "Phantom",
    "PhantomParams",
    "make_phantom",
    "render_em",
    "render_exm",
    "write_synthetic_dataset",
]

SYNTHETIC_VERSION = 3
"""Bumped when the generator's output for a given seed changes; stored in the written groups' attributes."""

DEFAULT_SEEDS: dict[str, int] = {"lm": 1, "em": 2, "test": 3}


# -------------------------------------------------------------------------------------------------------
# datasets on disk
# -------------------------------------------------------------------------------------------------------

# output name → (seed key, kind, what is written)
_OUTPUTS: dict[str, tuple[str, str, str]] = {
    "exm_train": ("lm", "exm", "exm"),
    "em_train": ("em", "em", "em"),
    "em_train_paired": ("lm", "em", "em"),
    "exm_test": ("test", "exm", "exm"),
    "em_test": ("test", "em", "em"),
    "labels_test": ("test", "labels", "semantic"),
    "mito_test": ("test", "labels", "mito"),
    "antibody_test": ("test", "exm", "antibody"),
    "exm_antibody_test": ("test", "exm", "exm+antibody"),
}
# The channel names of the two-channel ExM sample (pan-protein stain, antibody marking some mitochondria).
SAMPLE_CHANNELS = ("nhs_ester", "antibody")


def _content(what: str, phantom: Phantom, seed: int) -> np.ndarray:
    if what == "exm":
        return render_exm(phantom, seed=seed)
    if what == "em":
        return render_em(phantom, seed=seed)
    if what == "antibody":
        return render_antibody(phantom, seed=seed)
    if what == "exm+antibody":
        return np.stack([render_exm(phantom, seed=seed), render_antibody(phantom, seed=seed)])
    if what == "semantic":
        return phantom.semantic
    return phantom.mito.astype(np.uint32, copy=False)


def _existing_matches(path: Path, expected: dict, levels: int) -> bool:
    """Whether ``path`` is a complete output written with ``expected`` settings; raises if it is not.

    False (regenerate) for a complete output of the same settings written by another
    :data:`SYNTHETIC_VERSION`."""
    try:
        group = zarr.open_group(str(path), mode="r")
        found = dict(group.attrs).get("exem_synthetic")
        complete = read_multiscales(group) is not None and all(str(i) in group for i in range(levels))
    except Exception as exc:  # any unreadable store is reported the same way
        raise FileExistsError(
            f"{path} exists but is not a readable OME-Zarr group ({exc}); {_REPLACE}"
        ) from exc
    if not complete or not isinstance(found, dict):
        raise FileExistsError(f"{path} exists but is not a complete exem synthetic output; {_REPLACE}")
    keys = ("seed", "kind", "shape", "voxel_size_nm", "content")
    differ = [k for k in keys if found.get(k) != expected[k]]
    if differ:
        have = ", ".join(f"{k}={found.get(k)}" for k in differ)
        want = ", ".join(f"{k}={expected[k]}" for k in differ)
        raise FileExistsError(f"{path} exists with {have}, not {want}; {_REPLACE}, or use another out_dir")
    if found.get("version") != expected["version"]:  # our own output, from an older phantom generator
        log.info(
            "%s was written by phantom generator version %s; regenerating it", path, found.get("version")
        )
        return False
    return True


def write_synthetic_dataset(
    out_dir: str | Path,
    shape: Sequence[int] = (64, 256, 256),
    seeds: Mapping[str, int] | None = None,
    voxel_size_nm: Sequence[float] = (40.0, 10.0, 10.0),
    overwrite: bool = False,
    *,
    levels: int = 2,
    chunks: Sequence[int] = (16, 128, 128),
    ngff_version: str = DEFAULT_NGFF_VERSION,
) -> dict[str, Path]:
    """Write a synthetic ExM/EM dataset as OME-Zarr groups (0.5 on Zarr v3 by default) under ``out_dir``.

    Outputs (name → ``out_dir/<name>.zarr``):

    - ``exm_train``: ExM rendering (uint16) of phantom ``seeds["lm"]``;
    - ``em_train``: EM rendering (uint8) of phantom ``seeds["em"]``: another phantom, so unpaired;
    - ``em_train_paired``: EM rendering of phantom ``seeds["lm"]`` (the paired truth of ``exm_train``, for
      validation metrics);
    - ``exm_test``, ``em_test``: both renderings of the held-out phantom ``seeds["test"]``;
    - ``antibody_test``: an antibody channel of the held-out phantom (uint16, ExM-like) marking a random 40 % of its
      mitochondria (their ``mito_test`` ids in the attribute ``exem_synthetic.antibody_positive_mito_ids``);
      ``exm_antibody_test``: the two-channel sample (c: ``nhs_ester``, ``antibody``) as one OME-Zarr;
    - ``labels_test``: its semantic labels (uint8, see :data:`SEMANTIC_CLASSES`; an NGFF label image with a
      colour and a name per class); ``mito_test``: its mitochondria instance ids (uint32, a label image).

    Each group has ``levels`` in-plane 2x pyramid levels ``"0", "1", ...``, the voxel size in its multiscales
    metadata and an ``exem_synthetic`` attribute ``{"seed", "kind": "exm"|"em"|"labels", "shape", ...}``.
    Outputs that already exist with the same settings are reused (only missing ones are written) unless
    ``overwrite`` (whatever their NGFF version); an existing output with other settings raises FileExistsError.
    Groups are written to a temporary name and renamed, so an interrupted run leaves no half-written output.

    Args:
        out_dir: folder to write into (created if needed).
        shape: ``(Z, Y, X)`` voxels of every volume.
        seeds: phantom seeds ``{"lm", "em", "test"}``; missing keys take :data:`DEFAULT_SEEDS`.
        voxel_size_nm: ``(z, y, x)`` voxel size in nm.
        overwrite: regenerate everything even if present.
        levels: number of pyramid levels.
        chunks: chunk shape ``(z, y, x)``, clipped to the volume.
        ngff_version: ``"0.5"`` (Zarr v3) or ``"0.4"`` (Zarr v2) for the outputs written.

    Returns:
        output name → path of its ``.zarr`` group.
    """
    shape = check_shape(shape)
    vs = check_voxel_size(voxel_size_nm)
    all_seeds = dict(DEFAULT_SEEDS)
    if seeds:
        unknown = set(seeds) - set(DEFAULT_SEEDS)
        if unknown:
            raise ValueError(f"unknown seed keys {sorted(unknown)}; expected some of {sorted(DEFAULT_SEEDS)}")
        all_seeds.update({k: int(v) for k, v in seeds.items()})
    if all_seeds["lm"] == all_seeds["em"]:
        log.warning("seeds lm and em are equal (%d): the training domains will be paired", all_seeds["lm"])
    if all_seeds["test"] in (all_seeds["lm"], all_seeds["em"]):
        log.warning(
            "the test seed %d is also a training seed: the evaluation is not held out", all_seeds["test"]
        )
    levels = int(levels)
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    chunks = tuple(min(int(c), s) for c, s in zip(chunks, shape, strict=True))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    paths: dict[str, Path] = {}
    todo: list[str] = []
    replace: set[str] = set()
    expected: dict[str, dict] = {}
    for name, (key, kind, what) in _OUTPUTS.items():
        path = out / f"{name}.zarr"
        paths[name] = path
        expected[name] = {
            "seed": all_seeds[key],
            "kind": kind,
            "shape": list(shape),
            "voxel_size_nm": list(vs),
            "content": what,
            "version": SYNTHETIC_VERSION,
        }
        if overwrite or not path.exists():
            todo.append(name)
        elif not _existing_matches(path, expected[name], levels):
            todo.append(name)
            replace.add(name)  # a stale output (older generator) is replaced like an overwrite
    if not todo:
        log.info("reusing the synthetic dataset in %s (all %d outputs exist)", out, len(paths))
        return paths
    if len(todo) < len(paths):
        log.info("synthetic dataset in %s: writing the missing %s", out, ", ".join(todo))

    phantoms: dict[int, Phantom] = {}
    for name in todo:
        key, _kind, what = _OUTPUTS[name]
        seed = all_seeds[key]
        if seed not in phantoms:
            log.info("generating synthetic phantom seed=%d shape=%s voxel=%s nm", seed, shape, vs)
            phantoms[seed] = make_phantom(shape, seed=seed, voxel_size_nm=vs)
        array = _content(what, phantoms[seed], seed)
        meta = dict(expected[name])
        if "antibody" in what:  # the truth: which mitochondria (ids of mito_test) carry the marker
            meta["antibody_positive_mito_ids"] = antibody_positive_ids(phantoms[seed], seed).tolist()
        _write_atomic(
            paths[name], array, vs, chunks, levels, meta, overwrite or name in replace, ngff_version
        )
    return paths


def _write_atomic(
    path: Path,
    array: np.ndarray,
    vs: Sequence[float],
    chunks: Sequence[int],
    levels: int,
    meta: dict,
    overwrite: bool,
    ngff_version: str = DEFAULT_NGFF_VERSION,
) -> None:
    """Write an OME-Zarr group under a temporary name, then rename it to ``path``.

    Label volumes are NGFF label images whose coarser levels are in-plane subsamples (label ids must not be
    averaged); the semantic classes get a colour and a name each.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write_ome_zarr(
            tmp,
            array,
            vs,
            chunks=chunks,
            levels=levels,
            name=path.stem,
            attributes={"exem_synthetic": meta},
            labels=meta["kind"] == "labels",
            label_names=SEMANTIC_CLASSES if meta["content"] == "semantic" else None,
            ngff_version=ngff_version,
            channel_names=SAMPLE_CHANNELS if array.ndim == 4 else None,
        )
        if path.exists() and overwrite:
            shutil.rmtree(path)
        try:
            os.replace(tmp, path)
        except OSError:
            if not path.exists():
                raise
            # another process finished the same output first: keep theirs (same seed and settings)
            log.info("%s was written concurrently; keeping the existing one", path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s", path, extra=summary_of("exem-synth"))
