"""Geometry in physical space (nm) on voxel grids, for the synthetic phantoms of :mod:`exem.data.synthetic`.

Points, radii and distances are in nm; voxel ``i`` of a ``(Z, Y, X)`` volume with voxel size ``vs`` (z, y, x) nm
is centred at ``i · vs``. Flat voxel indices are C-order indices into that volume.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def random_walks(
    rng: np.random.Generator,
    start: np.ndarray,
    direction: np.ndarray,
    n_steps: int,
    step: float,
    sigma: float,
) -> np.ndarray:
    """Smooth random walks ``(n, n_steps + 1, 3)`` nm from ``start (n, 3)`` along unit ``direction``."""
    noise = rng.standard_normal((n_steps, *start.shape)) * sigma
    dirs = np.empty_like(noise)
    d = direction.copy()
    for k in range(n_steps):
        d = d + noise[k]
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        dirs[k] = d
    pts = start[None] + step * np.cumsum(dirs, axis=0)
    return np.concatenate([start[None], pts], axis=0).transpose(1, 0, 2)


def inside_volume(points_nm: np.ndarray, shape: Sequence[int], vs: np.ndarray) -> np.ndarray:
    """Whether points ``(..., 3)`` nm (voxel i is centred at ``i · vs``) fall inside the volume: bool ``(...)``."""
    vox = np.rint(points_nm / vs)
    return np.all((vox >= 0) & (vox < np.asarray(shape)), axis=-1)


def ball_pairs(
    centers_nm: np.ndarray,
    radii_nm: np.ndarray | float,
    vs: np.ndarray,
    shape: Sequence[int],
    z_slack_nm: float = 0.0,
    max_pairs: int = 2_000_000,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All (voxel, ball) pairs with the voxel centre within a ball, for balls given in nm.

    ``z_slack_nm`` shortens z distances by that much (at most to 0) for the test: with half a Z voxel, a
    ball is in every slice whose thickness it intersects (a projection through a thick section), not only in
    those whose centre plane it cuts.

    Returns flat voxel indices ``(P,)``, ball indices ``(P,)``, squared (true) distances ``(P,)`` nm² and
    offsets voxel − centre ``(P, 3)`` nm.
    """
    centers_nm = np.asarray(centers_nm, dtype=np.float64).reshape(-1, 3)
    radii_nm = np.broadcast_to(np.asarray(radii_nm, dtype=np.float64), (len(centers_nm),))
    empty = (np.zeros(0, np.intp), np.zeros(0, np.intp), np.zeros(0), np.zeros((0, 3)))
    if len(centers_nm) == 0:
        return empty
    rmax = float(radii_nm.max())
    slack = np.array([z_slack_nm, 0.0, 0.0])
    half = np.floor((rmax + slack) / vs + 0.5).astype(int)
    grids = np.meshgrid(*(np.arange(-h, h + 1) for h in half), indexing="ij")
    offsets = np.stack([g.ravel() for g in grids], axis=1)
    # a voxel within rmax of a centre is within rmax + half a voxel diagonal of the centre's nearest voxel
    reach = rmax + float(np.linalg.norm(vs)) / 2
    offsets = offsets[((np.maximum(np.abs(offsets * vs) - slack, 0)) ** 2).sum(axis=1) <= reach**2]
    per = max(1, max_pairs // len(offsets))
    shape_arr = np.asarray(shape)
    out: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for i in range(0, len(centers_nm), per):
        c = centers_nm[i : i + per]
        base = np.rint(c / vs).astype(np.intp)
        vox = base[:, None, :] + offsets[None]
        diff = vox * vs - c[:, None, :]
        d2 = np.einsum("kmi,kmi->km", diff, diff)
        test = d2
        if z_slack_nm > 0:
            dz = np.maximum(np.abs(diff[..., 0]) - z_slack_nm, 0)
            test = d2 - diff[..., 0] ** 2 + dz**2
        ok = (test <= radii_nm[i : i + per, None] ** 2) & np.all((vox >= 0) & (vox < shape_arr), axis=-1)
        which = np.broadcast_to(np.arange(i, i + len(c))[:, None], ok.shape)[ok]
        lin = np.ravel_multi_index(tuple(vox[ok].T), tuple(shape))
        out.append((lin, which, d2[ok], diff[ok]))
    return tuple(np.concatenate(parts) for parts in zip(*out, strict=True))  # type: ignore[return-value]


def ball_voxels(centers_nm: np.ndarray, radius_nm: float, vs: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Flat indices ``(M,)`` of the voxels within ``radius_nm`` of the voxels nearest to centres ``(n, 3)`` nm;
    may repeat."""
    half = np.floor(radius_nm / vs).astype(int)
    grids = np.meshgrid(*(np.arange(-h, h + 1) for h in half), indexing="ij")
    offsets = np.stack([g.ravel() for g in grids], axis=1)
    offsets = offsets[((offsets * vs) ** 2).sum(axis=1) <= radius_nm**2]
    base = np.rint(np.asarray(centers_nm, dtype=np.float64).reshape(-1, 3) / vs).astype(np.intp)
    vox = (base[:, None, :] + offsets[None]).reshape(-1, 3)
    ok = np.all((vox >= 0) & (vox < np.asarray(shape)), axis=1)
    return np.ravel_multi_index(tuple(vox[ok].T), tuple(shape))


def nearest_per_voxel(
    lin: np.ndarray, d2: np.ndarray, *others: np.ndarray
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    """Deduplicate (voxel, ball) pairs keeping, per voxel, the pair with the nearest ball centre.

    ``lin``, ``d2`` and each of ``others`` are indexed by pair ``(P, ...)``; returned likewise, one pair per voxel.
    """
    order = np.lexsort((d2, lin))
    lin_s = lin[order]
    first = np.ones(len(lin_s), dtype=bool)
    first[1:] = lin_s[1:] != lin_s[:-1]
    keep = order[first]
    return lin[keep], d2[keep], tuple(o[keep] for o in others)


def dilate(mask: np.ndarray, radius_nm: float, vs: np.ndarray, inplane: bool = False) -> np.ndarray:
    """Binary dilation of a ``(Z, Y, X)`` mask by a ball of ``radius_nm`` (anisotropic in voxels).

    ``inplane``: by a disk in each slice instead.
    """
    half = np.floor(radius_nm / vs).astype(int)
    if inplane:
        half[0] = 0
    grids = np.meshgrid(*(np.arange(-h, h + 1) for h in half), indexing="ij")
    offsets = np.stack([g.ravel() for g in grids], axis=1)
    offsets = offsets[((offsets * vs) ** 2).sum(axis=1) <= radius_nm**2 + 1e-9]
    out = mask.copy()
    for off in offsets:
        if not off.any():
            continue
        dst = tuple(slice(max(o, 0), s + min(o, 0)) for o, s in zip(off, mask.shape, strict=True))
        src = tuple(slice(max(-o, 0), s - max(o, 0)) for o, s in zip(off, mask.shape, strict=True))
        out[dst] |= mask[src]
    return out


def interfaces(labels: np.ndarray, vs: np.ndarray, enface_reach_nm: float) -> np.ndarray:
    """One-sided boundary voxels (bool ``(Z, Y, X)``) of a label volume ``(Z, Y, X)``: voxels whose +1 neighbour on
    some axis has another label.

    Boundaries between slices (along Z) only count within ``enface_reach_nm`` (in-plane) of an in-plane
    boundary of this or the next slice: steep membranes stay closed, shallow (en-face) ones are left out, as
    they blur out within a thick section instead of covering whole areas of a slice.
    """
    inplane = np.zeros(labels.shape, dtype=bool)
    inplane[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    inplane[:, :, :-1] |= labels[:, :, :-1] != labels[:, :, 1:]
    between = np.zeros(labels.shape, dtype=bool)
    between[:-1] = labels[:-1] != labels[1:]
    if between.any():
        pair = inplane.copy()
        pair[:-1] |= inplane[1:]
        between &= dilate(pair, enface_reach_nm, vs, inplane=True)
    return inplane | between


def distance_to_mask(mask: np.ndarray, point_nm: np.ndarray, vs: np.ndarray, radius_nm: float) -> float:
    """Distance (nm) from a point ``(3,)`` nm to the nearest True voxel centre of ``mask`` ``(Z, Y, X)``, capped at
    ``radius_nm``."""
    c = np.rint(point_nm / vs).astype(int)
    h = np.ceil(radius_nm / vs).astype(int)
    lo = np.maximum(c - h, 0)
    hi = np.minimum(c + h + 1, mask.shape)
    box = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    idx = np.argwhere(box)
    if len(idx) == 0:
        return float(radius_nm)
    d = np.sqrt(((((idx + lo) * vs) - point_nm) ** 2).sum(axis=1)).min()
    return float(min(d, radius_nm))


def perpendicular(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """A random unit vector ``(3,)`` perpendicular to the unit vector ``t`` ``(3,)``."""
    for _ in range(10):
        v = rng.standard_normal(3)
        v -= v.dot(t) * t
        n = np.linalg.norm(v)
        if n > 1e-6:
            return v / n
    return np.array([1.0, 0.0, 0.0])
