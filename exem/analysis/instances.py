"""Probability maps → instance label volumes (uint32, 0 = background).

Two post-processings, both reading a ``(Z, Y, X)`` probability array (zarr or numpy) and writing an image pyramid
of label levels (level l: Y and X subsampled by 2^l, nearest neighbour, so ids are never mixed):

- :func:`label_components` (foreground maps): ``p > threshold`` then connected components, **blockwise** so that
  memory stays bounded for volumes larger than RAM. Pass 1 labels each block with ``scipy.ndimage.label``
  (provisional ids made unique by a running offset, written straight into the level-0 output), collects the id
  pairs that touch across each block's lower faces (read back from the already written neighbour) and the
  voxel count of every provisional id. The pairs are merged with a union-find (connected components of the
  sparse pair graph), components smaller than ``min_size`` are dropped, and the rest are numbered 1..N in the
  raster (C) order of their first voxel. Pass 2 rewrites every block through that lookup table and writes the
  coarser levels. The result is exactly what ``scipy.ndimage.label`` gives on the whole array (faces-only
  connectivity), whatever the block shape. Memory: one block plus O(number of provisional ids).
- :func:`seeded_watershed` (boundary / membrane maps), in memory: seeds are the connected components of
  ``boundary < threshold`` after ``seed_erosion`` binary erosions (so that thin gaps in a membrane do not merge
  two cells' seeds; the volume border does not erode), seeds smaller than ``min_size`` voxels are dropped, and
  ``skimage.segmentation.watershed`` floods the boundary map from them; every voxel gets the id of a cell. It
  refuses volumes above ``max_voxels`` (about 30 bytes of RAM per voxel) with a one-line error.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy import sparse
from scipy.sparse.csgraph import connected_components as graph_components

from exem.progress import step_bar

__all__ = [
    "CONNECTIVITY",
    "LABEL_DTYPE",
    "block_slices",
    "check_watershed_size",
    "label_components",
    "seeded_watershed",
    "write_label_block",
]

log = logging.getLogger(__name__)

# scipy.ndimage connectivity rank: 1 = voxels touching by a face (the 6-neighbourhood in 3D).
CONNECTIVITY = 1
LABEL_DTYPE = np.uint32
_MAX_ID = int(np.iinfo(LABEL_DTYPE).max)
# Rough peak RAM of the in-memory watershed per voxel (float32 map, int32 markers and output, skimage's queue).
WATERSHED_BYTES_PER_VOXEL = 30


def _structure() -> np.ndarray:
    return ndi.generate_binary_structure(3, CONNECTIVITY)


def block_slices(shape: Sequence[int], block: Sequence[int]) -> list[tuple[slice, slice, slice]]:
    """The boxes of a regular grid of ``block``-sized blocks over ``shape`` (Z, Y, X), in C order (x fastest)."""
    axes = [
        [slice(a, min(a + int(b), int(s))) for a in range(0, int(s), int(b))]
        for s, b in zip(shape, block, strict=True)
    ]
    return [tuple(sl) for sl in itertools.product(*axes)]  # type: ignore[misc]


def write_label_block(levels: Sequence[Any], sl: tuple[slice, slice, slice], data: np.ndarray) -> None:
    """Write ``data`` (a ``(bz, by, bx)`` block at ``sl`` of level 0) to every level (level l: ``[:, ::2^l, ::2^l]``).

    The block's Y and X starts must be multiples of ``2^(len(levels) − 1)``.
    """
    for lvl, arr in enumerate(levels):
        f = 2**lvl
        y0, x0 = sl[1].start, sl[2].start
        if y0 % f or x0 % f:
            raise ValueError(f"label block at y={y0}, x={x0} is not aligned with pyramid level {lvl}")
        sub = data[:, ::f, ::f]
        arr[sl[0], y0 // f : y0 // f + sub.shape[1], x0 // f : x0 // f + sub.shape[2]] = sub


def _first_voxels(
    lab: np.ndarray, n: int, sl: tuple[slice, slice, slice], shape: Sequence[int]
) -> np.ndarray:
    """Raster index in the whole ``shape`` of the first voxel of each local label 1..n of the block ``lab``."""
    flat = lab.ravel()
    nz = np.flatnonzero(flat)
    first_local = np.empty(n + 1, dtype=np.int64)
    first_local[flat[nz][::-1]] = nz[::-1]  # repeated indices: the last assignment (the first voxel) wins
    coords = np.unravel_index(first_local[1:], lab.shape)
    glob = tuple(c + s.start for c, s in zip(coords, sl, strict=True))
    return np.ravel_multi_index(glob, tuple(shape)).astype(np.int64)


def label_components(
    prob: Any,
    levels: Sequence[Any],
    *,
    threshold: float,
    block_shape: Sequence[int],
    min_size: int = 0,
    progress: bool = False,
) -> int:
    """Connected components of ``prob > threshold``, blockwise, written as consecutive ids to ``levels``.

    Args:
        prob: ``(Z, Y, X)`` probabilities (zarr or numpy array; read one block at a time).
        levels: label arrays (uint32), level l of shape ``(Z, ⌈Y/2^l⌉, ⌈X/2^l⌉)``; level 0 also holds the
            provisional ids between the two passes.
        threshold: foreground is ``prob > threshold``.
        block_shape: (z, y, x) voxels per block; Y and X multiples of ``2^(len(levels) − 1)`` (blocks at the far
            edge may be smaller). Ideally whole chunks of every level, so that no chunk is rewritten.
        min_size: components with fewer voxels are set to 0 (background).
        progress: rich progress bar on stderr.

    Returns:
        the number of objects N (ids 1..N in the raster order of their first voxel, as ``scipy.ndimage.label``).

    Raises:
        ValueError: more than 2^32 − 1 provisional components.
    """
    shape = tuple(int(s) for s in prob.shape)
    blocks = block_slices(shape, block_shape)
    structure = _structure()
    out0 = levels[0]
    sizes: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
    # raster index (in the whole volume) of each provisional id's first voxel; id 0 never comes first
    firsts: list[np.ndarray] = [np.full(1, math.prod(shape), dtype=np.int64)]
    pairs: list[np.ndarray] = []
    total = 0
    with step_bar(progress, "labels: components", 2 * len(blocks)) as advance:
        for sl in blocks:
            lab, n = ndi.label(np.asarray(prob[sl]) > threshold, structure=structure)
            if total + n > _MAX_ID:
                raise ValueError(f"more than {_MAX_ID} connected components; raise the threshold or min_size")
            lab = lab.astype(LABEL_DTYPE, copy=False)
            fg = lab > 0
            sizes.append(np.bincount(lab[fg], minlength=n + 1)[1:].astype(np.int64))
            firsts.append(_first_voxels(lab, n, sl, shape))
            lab[fg] += np.uint32(total)
            for ax in range(3):
                start = sl[ax].start
                if start == 0:
                    continue
                before = list(sl)
                before[ax] = slice(start - 1, start)
                neighbour = np.take(np.asarray(out0[tuple(before)]), 0, axis=ax)
                face = np.take(lab, 0, axis=ax)
                both = (face > 0) & (neighbour > 0)
                if both.any():
                    pairs.append(np.unique(np.stack([face[both], neighbour[both]], axis=1), axis=0))
            out0[sl] = lab
            total += n
            advance()

        n_ids = total + 1
        edges = np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=LABEL_DTYPE)
        graph = sparse.coo_matrix(
            (
                np.ones(len(edges), dtype=np.int8),
                (edges[:, 0].astype(np.int64), edges[:, 1].astype(np.int64)),
            ),
            shape=(n_ids, n_ids),
        )
        n_comp, comp = graph_components(graph, directed=False)
        comp_size = np.bincount(comp, weights=np.concatenate(sizes), minlength=n_comp)
        first = np.full(n_comp, math.prod(shape), dtype=np.int64)
        np.minimum.at(first, comp, np.concatenate(firsts))
        keep = comp_size >= max(int(min_size), 1)
        keep[comp[0]] = False  # id 0 is the background, never merged
        order = np.argsort(first, kind="stable")
        kept = order[keep[order]]
        new_id = np.zeros(n_comp, dtype=LABEL_DTYPE)
        new_id[kept] = np.arange(1, len(kept) + 1, dtype=LABEL_DTYPE)
        lut = new_id[comp]
        log.info(
            "connected components: %d provisional in %d block(s), %d merged across faces, %d objects kept",
            total,
            len(blocks),
            len(edges),
            len(kept),
        )

        for sl in blocks:
            write_label_block(levels, sl, lut[np.asarray(out0[sl])])
            advance()
    return int(len(kept))


def check_watershed_size(shape: Sequence[int], max_voxels: int, key: str = "max_watershed_voxels") -> None:
    """Raise a one-line ValueError when a ``shape`` volume is too large for the in-memory watershed."""
    voxels = math.prod(int(s) for s in shape)
    if voxels > int(max_voxels):
        gib = voxels * WATERSHED_BYTES_PER_VOXEL / 2**30
        raise ValueError(
            f"the boundary watershed runs in memory (~{gib:.1f} GiB for {'×'.join(map(str, shape))} ="
            f" {voxels:,} voxels) and the limit is {key}={int(max_voxels):,} voxels;"
            f" raise {key} or segment a smaller roi"
        )


def seeded_watershed(
    boundary: Any,
    levels: Sequence[Any],
    *,
    threshold: float,
    seed_erosion: int = 1,
    min_size: int = 0,
    max_voxels: int,
    max_voxels_key: str = "max_watershed_voxels",
) -> int:
    """Cells from a boundary map: seeded watershed in memory, written as consecutive ids to ``levels``.

    Args:
        boundary: ``(Z, Y, X)`` boundary / membrane probabilities (zarr or numpy; read whole).
        levels: label arrays (uint32) as in :func:`label_components`.
        threshold: seeds grow from ``boundary < threshold``.
        seed_erosion: binary erosions (faces connectivity) of the seed mask before labelling it.
        min_size: seeds with fewer voxels (after erosion) are dropped.
        max_voxels: refuse larger volumes (the watershed holds the whole volume in RAM).
        max_voxels_key: the config key named in the error message.

    Returns:
        the number of cells (ids 1..N, one per surviving seed).

    Raises:
        ValueError: the volume has more than ``max_voxels`` voxels.
    """
    from skimage.segmentation import relabel_sequential, watershed

    shape = tuple(int(s) for s in boundary.shape)
    check_watershed_size(shape, max_voxels, max_voxels_key)
    values = np.asarray(boundary[...], dtype=np.float32)
    structure = _structure()
    seeds = values < threshold
    if int(seed_erosion) > 0:
        seeds = ndi.binary_erosion(seeds, structure=structure, iterations=int(seed_erosion), border_value=1)
    markers, n = ndi.label(seeds, structure=structure)
    if int(min_size) > 0 and n:
        small = np.bincount(markers.ravel(), minlength=n + 1) < int(min_size)
        small[0] = False
        markers[small[markers]] = 0
        markers = relabel_sequential(markers)[0]
        n = int(markers.max())
    labels = watershed(values, markers).astype(LABEL_DTYPE, copy=False) if n else np.zeros(shape, LABEL_DTYPE)
    log.info("seeded watershed: %d cells", n)
    write_label_block(levels, (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2])), labels)
    return int(n)
