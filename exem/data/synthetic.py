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

Every number lives in :class:`PhantomParams`, :class:`EMRenderParams` or :class:`ExMRenderParams`; lengths
are in nm and converted to voxels with the phantom's voxel size. Everything is deterministic for a seed.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from scipy import ndimage as ndi

from exem.data.ome import read_multiscales, write_ome_zarr

log = logging.getLogger(__name__)

SEMANTIC_CLASSES: dict[int, str] = {0: "cytoplasm", 1: "membrane", 2: "mitochondrion", 3: "vesicle"}
"""Class index → name of :attr:`Phantom.semantic`."""

SYNTHETIC_VERSION = 3
"""Bumped when the generator's output for a given seed changes; stored in the written groups' attributes."""

DEFAULT_SEEDS: dict[str, int] = {"lm": 1, "em": 2, "test": 3}

# Independent random streams per purpose: the phantom of seed s and its renderings never share random numbers.
_STREAM_PHANTOM, _STREAM_EM, _STREAM_EXM = 0, 1, 2


# -------------------------------------------------------------------------------------------------------
# parameters
# -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhantomParams:
    """Knobs of :func:`make_phantom`. Lengths in nm, densities per µm³, ``(lo, hi)`` pairs uniform ranges."""

    # cells: smooth random curves (neurites) whose generalised Voronoi regions are the cells
    cell_diameter_nm: float = 320.0
    """Mean spacing of neurite centre lines: the total curve length per volume is ``1 / cell_diameter²``."""
    neurite_step_nm: float = 10.0
    """Sampling step along a neurite curve (at most the smallest voxel size)."""
    neurite_persistence_nm: float = 2000.0
    """Persistence length of the curves' random walk: larger is straighter."""
    neurite_z_bias: float = 1.5
    """Scale of the z component of the curves' initial direction: > 1 favours neurites running along Z."""
    thick_fraction: float = 0.15
    """Fraction of neurites that are thick (dendrites): their seed is a tube, so their cell is larger."""
    thick_radius_nm: tuple[float, float] = (100.0, 300.0)
    """Radius range of the thick neurites' seed tubes."""
    membrane_thickness_nm: float = 30.0
    """Membrane thickness (the boundary surface ± half of it)."""
    membrane_enface_reach_nm: float = 40.0
    """Boundaries between slices are membrane only this close (in-plane) to a boundary within a slice:
    shallower, en-face membrane parts are not drawn (they would cover whole areas of a slice)."""
    # mitochondria
    mito_per_um3: float = 5.0
    """Number of mitochondria per µm³ (at least one is attempted in any volume); with the radii below about 6 % of
    the volume, as in cortical neuropil."""
    mito_radius_nm: tuple[float, float] = (70.0, 140.0)
    """Radius range; a mitochondrion is made thinner where its neurite is thin."""
    mito_min_radius_nm: float = 35.0
    """Mitochondria that would need to be thinner than this to fit are not placed."""
    mito_length_nm: tuple[float, float] = (300.0, 1200.0)
    """Length range along the neurite axis (caps included)."""
    mito_membrane_gap_nm: float = 10.0
    """Minimal distance kept between a mitochondrion and the cell membrane."""
    mito_max_offset_frac: float = 0.7
    """How far off the neurite axis a mitochondrion may sit, as a fraction of the free room."""
    cristae_period_nm: float = 50.0
    """Spacing of the cristae lamellae along the mitochondrion's long axis."""
    cristae_duty: float = 0.35
    """Fraction of each period that is crista."""
    cristae_rim_nm: float = 12.0
    """Cristae stay this far inside the mitochondrion's outer membrane."""
    cristae_tilt: float = 0.3
    """Largest tilt (slope) of the lamellae away from perpendicular to the long axis."""
    # vesicle clusters (each sits in a bouton: a spherical swelling of a thin neurite)
    vesicle_clusters_per_um3: float = 0.8
    """Number of vesicle clusters (= boutons) per µm³ (at least one in any volume)."""
    bouton_radius_nm: tuple[float, float] = (180.0, 320.0)
    """Radius range of the boutons' spherical seeds."""
    vesicle_cluster_radius_nm: tuple[float, float] = (150.0, 250.0)
    """Radius range of a cluster (a ball off the bouton centre, towards its membrane)."""
    vesicle_cluster_offset_frac: float = 0.5
    """Cluster centre offset from the bouton centre, as a fraction of the bouton radius."""
    vesicles_per_cluster: tuple[int, int] = (80, 200)
    """Range of the number of vesicles tried per cluster."""
    vesicle_radius_nm: tuple[float, float] = (17.0, 24.0)
    """Radius range of one vesicle."""
    vesicle_spacing_nm: float = 4.0
    """Minimal gap between two vesicles."""


@dataclass(frozen=True)
class EMRenderParams:
    """Knobs of :func:`render_em`. Grey levels are uint8 values, lengths nm."""

    cytoplasm: float = 162.0
    """Mean cytoplasm grey."""
    cell_jitter: float = 5.0
    """Standard deviation of the per-cell cytoplasm grey."""
    texture_amplitude: float = 7.0
    """Standard deviation of the smooth cytoplasm texture."""
    texture_scale_nm: float = 25.0
    """Correlation length (Gaussian sigma) of the texture."""
    membrane: float = 55.0
    """Membrane grey."""
    mito_matrix: float = 118.0
    """Mitochondrial matrix grey."""
    mito_membrane: float = 70.0
    """Mitochondrial outer membrane grey (the in-plane edge of a mitochondrion)."""
    cristae: float = 78.0
    """Cristae grey."""
    vesicle_rim: float = 70.0
    """Vesicle membrane grey (the in-plane edge of a vesicle)."""
    vesicle_lumen: float = 175.0
    """Vesicle lumen grey."""
    blur_sigma_nm: tuple[float, float, float] = (0.0, 5.0, 5.0)
    """Gaussian blur sigma (z, y, x): EM is sharp, at most a tiny blur."""
    noise_std: float = 5.0
    """Gaussian grain noise standard deviation (grey levels)."""
    slice_brightness_std: float = 3.0
    """Standard deviation of an additive per-slice brightness offset (section-to-section variation)."""
    slice_contrast_std: float = 0.02
    """Standard deviation of a relative per-slice contrast change."""


@dataclass(frozen=True)
class ExMRenderParams:
    """Knobs of :func:`render_exm`: relative protein densities (mitochondrion = 1), PSF in nm, camera in counts.

    As in pan-protein (NHS-ester) ExM of neuropil: mitochondria are the densest, brightest structures, their
    cristae barely resolved at this PSF; plasma membranes are thin and dimmer; vesicle clusters bright-ish.
    """

    cytoplasm: float = 0.12
    """Mean cytoplasm density."""
    cell_jitter: float = 0.03
    """Standard deviation of the per-cell cytoplasm density."""
    texture_amplitude: float = 0.04
    """Standard deviation of the smooth density texture."""
    texture_scale_nm: float = 40.0
    """Correlation length (Gaussian sigma) of the texture."""
    membrane: float = 0.6
    """Membrane density."""
    mito: float = 1.0
    """Mitochondrion (matrix) density."""
    cristae: float = 1.1
    """Cristae density (a little above the matrix; lost in the PSF)."""
    vesicle: float = 0.7
    """Vesicle density (clusters blur into bright-ish blobs)."""
    psf_sigma_nm: tuple[float, float, float] = (45.0, 25.0, 25.0)
    """Gaussian PSF sigma (z, y, x) in nm (in the expanded sample's frame, i.e. divided by the expansion)."""
    photons: float = 150.0
    """Expected photons per voxel at density 1 (shot noise: lower is noisier)."""
    background_photons: float = 8.0
    """Expected background photons per voxel (autofluorescence, out-of-focus light)."""
    gain: float = 20.0
    """Camera counts per photon."""
    offset: float = 100.0
    """Camera offset (counts)."""
    read_noise: float = 4.0
    """Gaussian read noise (counts)."""
    slice_brightness_std: float = 0.03
    """Standard deviation of a relative per-slice brightness change."""


# -------------------------------------------------------------------------------------------------------
# the phantom
# -------------------------------------------------------------------------------------------------------


@dataclass
class Phantom:
    """A synthetic neuropil label volume; all arrays are ``(Z, Y, X)`` of the same shape.

    Attributes:
        cells: uint32 instance ids ``1..N`` of the cells (neurites); every voxel (membranes too) has one.
        membrane: bool, cell boundaries.
        mito: uint32 instance ids of mitochondria (0 = none); each lies in one cell, off its membrane.
        cristae: bool, cristae inside mitochondria (a subset of ``mito > 0``).
        vesicles: bool, synaptic vesicles (disjoint from membrane and mitochondria).
        semantic: uint8 classes, see :data:`SEMANTIC_CLASSES`.
        voxel_size_nm: (z, y, x) voxel size in nm.
        seed: the seed it was generated from.
    """

    cells: np.ndarray
    membrane: np.ndarray
    mito: np.ndarray
    cristae: np.ndarray
    vesicles: np.ndarray
    semantic: np.ndarray
    voxel_size_nm: tuple[float, float, float]
    seed: int = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(Z, Y, X)`` in voxels."""
        return tuple(int(s) for s in self.cells.shape)  # type: ignore[return-value]


def _rng(seed: int, stream: int) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), stream]))


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    values = tuple(int(s) for s in shape)
    if len(values) != 3 or any(s < 1 for s in values):
        raise ValueError(f"shape must be 3 positive integers (z, y, x), got {list(shape)}")
    return values  # type: ignore[return-value]


def _check_voxel_size(voxel_size_nm: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(v) for v in voxel_size_nm)
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"voxel_size_nm must be 3 positive numbers (z, y, x), got {list(voxel_size_nm)}")
    return values  # type: ignore[return-value]


def _uniform(
    rng: np.random.Generator, bounds: Sequence[float], size: int | None = None
) -> np.ndarray | float:
    lo, hi = float(bounds[0]), float(bounds[1])
    return rng.uniform(lo, hi, size)


def _random_walks(
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


def _inside(points_nm: np.ndarray, shape: Sequence[int], vs: np.ndarray) -> np.ndarray:
    """Whether points (nm; voxel i is centred at ``i · vs``) fall inside the volume."""
    vox = np.rint(points_nm / vs)
    return np.all((vox >= 0) & (vox < np.asarray(shape)), axis=-1)


def _neurites(
    rng: np.random.Generator, shape: tuple[int, int, int], vs: np.ndarray, p: PhantomParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Curves through the volume until their in-volume length reaches ``volume / cell_diameter²``.

    Returns points ``(n, m, 3)`` nm, unit tangents ``(n, m, 3)`` and the in-volume mask ``(n, m)``.
    """
    extent = np.asarray(shape) * vs
    lo = -vs / 2
    step = min(float(p.neurite_step_nm), float(vs.min()))
    volume = float(np.prod(extent))
    target = volume / p.cell_diameter_nm**2
    surface = 2 * (extent[0] * extent[1] + extent[1] * extent[2] + extent[0] * extent[2])
    mean_chord = 4 * volume / surface
    n_half = int(math.ceil(float(np.linalg.norm(extent)) / step)) + 1
    sigma = math.sqrt(step / p.neurite_persistence_nm)
    batch = max(4, int(math.ceil(1.5 * target / mean_chord)) + 2)

    chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    total = 0.0
    while True:
        start = lo + rng.random((batch, 3)) * extent
        d0 = rng.standard_normal((batch, 3)) * np.array([p.neurite_z_bias, 1.0, 1.0])
        d0 /= np.linalg.norm(d0, axis=1, keepdims=True)
        fwd = _random_walks(rng, start, d0, n_half, step, sigma)
        bwd = _random_walks(rng, start, -d0, n_half, step, sigma)
        pts = np.concatenate([bwd[:, :0:-1], fwd], axis=1)
        tangent = np.gradient(pts, axis=1)
        tangent /= np.maximum(np.linalg.norm(tangent, axis=-1, keepdims=True), 1e-12)
        inside = _inside(pts, shape, vs)
        lengths = inside.sum(axis=1) * step
        cum = total + np.cumsum(lengths)
        done = np.flatnonzero(cum >= target)
        n_take = int(done[0]) + 1 if done.size else batch
        if sum(len(c[0]) for c in chunks) + n_take < 2:  # at least two cells
            n_take = min(batch, 2 - sum(len(c[0]) for c in chunks))
        chunks.append((pts[:n_take], tangent[:n_take], inside[:n_take]))
        total = float(cum[n_take - 1])
        if total >= target and sum(len(c[0]) for c in chunks) >= 2:
            break
    return tuple(np.concatenate(parts, axis=0) for parts in zip(*chunks, strict=True))  # type: ignore[return-value]


def _ball_pairs(
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


def _ball_voxels(
    centers_nm: np.ndarray, radius_nm: float, vs: np.ndarray, shape: Sequence[int]
) -> np.ndarray:
    """Flat indices of the voxels within ``radius_nm`` of the voxels nearest to centres (nm); may repeat."""
    half = np.floor(radius_nm / vs).astype(int)
    grids = np.meshgrid(*(np.arange(-h, h + 1) for h in half), indexing="ij")
    offsets = np.stack([g.ravel() for g in grids], axis=1)
    offsets = offsets[((offsets * vs) ** 2).sum(axis=1) <= radius_nm**2]
    base = np.rint(np.asarray(centers_nm, dtype=np.float64).reshape(-1, 3) / vs).astype(np.intp)
    vox = (base[:, None, :] + offsets[None]).reshape(-1, 3)
    ok = np.all((vox >= 0) & (vox < np.asarray(shape)), axis=1)
    return np.ravel_multi_index(tuple(vox[ok].T), tuple(shape))


def _nearest_per_voxel(
    lin: np.ndarray, d2: np.ndarray, *others: np.ndarray
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    """Deduplicate (voxel, ball) pairs keeping, per voxel, the pair with the nearest ball centre."""
    order = np.lexsort((d2, lin))
    lin_s = lin[order]
    first = np.ones(len(lin_s), dtype=bool)
    first[1:] = lin_s[1:] != lin_s[:-1]
    keep = order[first]
    return lin[keep], d2[keep], tuple(o[keep] for o in others)


def _dilate(mask: np.ndarray, radius_nm: float, vs: np.ndarray, inplane: bool = False) -> np.ndarray:
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


def _interfaces(labels: np.ndarray, vs: np.ndarray, enface_reach_nm: float) -> np.ndarray:
    """One-sided boundary voxels of a label volume: voxels whose +1 neighbour on some axis has another label.

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
        between &= _dilate(pair, enface_reach_nm, vs, inplane=True)
    return inplane | between


def _distance_to_mask(mask: np.ndarray, point_nm: np.ndarray, vs: np.ndarray, radius_nm: float) -> float:
    """Distance (nm) from a point to the nearest True voxel centre of ``mask``, capped at ``radius_nm``."""
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


def _perpendicular(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """A random unit vector perpendicular to unit vector ``t``."""
    for _ in range(10):
        v = rng.standard_normal(3)
        v -= v.dot(t) * t
        n = np.linalg.norm(v)
        if n > 1e-6:
            return v / n
    return np.array([1.0, 0.0, 0.0])


def make_phantom(
    shape: Sequence[int] = (128, 256, 256),
    seed: int = 0,
    voxel_size_nm: Sequence[float] = (40.0, 10.0, 10.0),
    params: PhantomParams | None = None,
) -> Phantom:
    """Generate a neuropil-like label volume.

    Args:
        shape: ``(Z, Y, X)`` in voxels.
        seed: non-negative integer; the same seed (and shape, voxel size, params) gives identical arrays.
        voxel_size_nm: ``(z, y, x)`` voxel size in nm; geometry is defined in nm, so coarse Z voxels only
            change the sampling.
        params: geometry knobs, :class:`PhantomParams` defaults when None.

    Returns:
        a :class:`Phantom` with ``(Z, Y, X)`` arrays.
    """
    shape = _check_shape(shape)
    vs_t = _check_voxel_size(voxel_size_nm)
    vs = np.asarray(vs_t)
    p = params or PhantomParams()
    rng = _rng(seed, _STREAM_PHANTOM)
    extent = np.asarray(shape) * vs
    volume_um3 = float(np.prod(extent)) * 1e-9

    # --- seeds: thin curves, thick tubes (dendrites) and spheres (boutons on thin curves) -------------------
    pts, tangents, inside = _neurites(rng, shape, vs, p)
    n_curves = len(pts)
    thick = rng.random(n_curves) < p.thick_fraction
    thick_r = _uniform(rng, p.thick_radius_nm, n_curves)
    curve_label = np.arange(1, n_curves + 1, dtype=np.uint32)
    seeds = np.zeros(shape, dtype=np.uint32)
    vox = np.rint(pts[inside] / vs).astype(np.intp)
    seeds[tuple(vox.T)] = np.broadcast_to(curve_label[:, None], inside.shape)[inside]
    for i in np.flatnonzero(thick):
        r = float(thick_r[i])
        near = np.all((pts[i] >= -r - vs / 2) & (pts[i] <= extent - vs / 2 + r), axis=-1)
        every = max(1, int(r / 2 / min(p.neurite_step_nm, float(vs.min()))))
        centers = pts[i][near][::every]
        seeds.ravel()[_ball_voxels(centers, r, vs, shape)] = curve_label[i]

    n_boutons = max(1, round(p.vesicle_clusters_per_um3 * volume_um3))
    host_curves = np.flatnonzero(~thick & inside.any(axis=1))
    if host_curves.size == 0:
        host_curves = np.flatnonzero(inside.any(axis=1))
    boutons: list[tuple[np.ndarray, float, int]] = []
    for _ in range(n_boutons):
        i = int(rng.choice(host_curves))
        j = int(rng.choice(np.flatnonzero(inside[i])))
        r = float(_uniform(rng, p.bouton_radius_nm))
        boutons.append((pts[i, j].copy(), r, i))
        seeds.ravel()[_ball_voxels(pts[i, j], r, vs, shape)] = curve_label[i]

    # --- cells: nearest seed in physical space (generalised Voronoi) -----------------------------------
    ind = ndi.distance_transform_edt(seeds == 0, sampling=vs_t, return_distances=False, return_indices=True)
    cells = seeds[ind[0], ind[1], ind[2]]
    del ind
    present = np.unique(seeds[seeds > 0])
    lut = np.zeros(n_curves + 1, dtype=np.uint32)
    lut[present] = np.arange(1, len(present) + 1, dtype=np.uint32)
    cells = lut[cells]
    curve_label = lut[curve_label]
    del seeds

    # --- membranes -----------------------------------------------------------------------------------------
    membrane = _dilate(_interfaces(cells, vs, p.membrane_enface_reach_nm), p.membrane_thickness_nm / 2, vs)
    near_membrane = _dilate(membrane, p.mito_membrane_gap_nm, vs)
    flat_cells = cells.ravel()

    # --- mitochondria: bent capsules along neurite axes ------------------------------------------------
    mito = np.zeros(shape, dtype=np.uint32)
    cristae = np.zeros(shape, dtype=bool)
    flat_mito, flat_cristae = mito.ravel(), cristae.ravel()
    n_mito = max(1, round(p.mito_per_um3 * volume_um3))
    candidates = np.argwhere(inside)
    step = min(float(p.neurite_step_nm), float(vs.min()))
    search_nm = p.mito_radius_nm[1] + p.mito_membrane_gap_nm + 2 * float(vs.max())
    placed, attempts = 0, 0
    while placed < n_mito and attempts < 30 * n_mito and len(candidates):
        attempts += 1
        i, j = candidates[rng.integers(len(candidates))]
        host = int(curve_label[i])
        c = pts[i, j]
        cv = np.rint(c / vs).astype(int)
        if host == 0 or int(cells[tuple(cv)]) != host or near_membrane[tuple(cv)]:
            continue
        free = _distance_to_mask(membrane, c, vs, search_nm) - p.mito_membrane_gap_nm - float(vs.min()) / 2
        r = min(float(_uniform(rng, p.mito_radius_nm)), free)
        length = float(_uniform(rng, p.mito_length_nm))
        if r < p.mito_min_radius_nm:
            continue
        t = tangents[i, j]
        shift = _perpendicular(rng, t) * rng.uniform(0, p.mito_max_offset_frac * max(free - r, 0.0))
        half_n = max(0, int(round((length / 2 - r) / step)))
        k = np.arange(max(j - half_n, 0), min(j + half_n, pts.shape[1] - 1) + 1)
        every = max(1, int(r / 3 / step))
        k = np.unique(np.append(k[::every], k[-1]))
        centers = pts[i, k] + shift
        arc = (k - j) * step
        lin, which, d2, diff = _ball_pairs(centers, r, vs, shape)
        lin, d2, (which, diff) = _nearest_per_voxel(lin, d2, which, diff)
        ok = (flat_cells[lin] == host) & ~near_membrane.ravel()[lin] & (flat_mito[lin] == 0)
        if ok.sum() < 0.5 * len(lin) or ok.sum() == 0:
            continue
        placed += 1
        flat_mito[lin[ok]] = placed
        # cristae: lamellae across the long axis (slightly tilted), inside the outer membrane
        tan = tangents[i, k][which]
        axial = arc[which] + np.einsum("pi,pi->p", diff, tan)
        tilt = rng.uniform(-p.cristae_tilt, p.cristae_tilt) * (diff @ _perpendicular(rng, t))
        phase = rng.uniform(0, 2 * np.pi)
        stripes = np.cos(2 * np.pi * (axial + tilt) / p.cristae_period_nm + phase) > np.cos(
            np.pi * p.cristae_duty
        )
        inner = d2 <= (r - p.cristae_rim_nm) ** 2
        flat_cristae[lin[ok & stripes & inner]] = True
    if placed < n_mito:
        log.debug("placed %d of %d mitochondria (neurites too thin or crowded)", placed, n_mito)

    # --- vesicle clusters in boutons, reaching the bouton membrane -------------------------------------
    vesicles = np.zeros(shape, dtype=bool)
    flat_ves = vesicles.ravel()
    flat_membrane = membrane.ravel()
    for center, rb, i in boutons:
        host = int(curve_label[i])
        u = rng.standard_normal(3)
        u /= np.linalg.norm(u)
        cc = center + u * p.vesicle_cluster_offset_frac * rb
        rc = float(_uniform(rng, p.vesicle_cluster_radius_nm))
        n_try = int(rng.integers(p.vesicles_per_cluster[0], p.vesicles_per_cluster[1] + 1))
        cand = rng.standard_normal((4 * n_try, 3))
        cand /= np.linalg.norm(cand, axis=1, keepdims=True)
        cand = cc + cand * (rc * rng.random((4 * n_try, 1)) ** (1 / 3))
        radii = _uniform(rng, p.vesicle_radius_nm, 4 * n_try)
        chosen: list[int] = []
        for q in range(len(cand)):
            if len(chosen) >= n_try:
                break
            gap = np.linalg.norm(cand[chosen] - cand[q], axis=1) - radii[chosen] - radii[q]
            if not chosen or gap.min() >= p.vesicle_spacing_nm:
                chosen.append(q)
        lin, _, _, _ = _ball_pairs(cand[chosen], radii[chosen], vs, shape, z_slack_nm=float(vs[0]) / 2)
        ok = (flat_cells[lin] == host) & ~flat_membrane[lin] & (flat_mito[lin] == 0)
        flat_ves[lin[ok]] = True

    semantic = np.zeros(shape, dtype=np.uint8)
    semantic[membrane] = 1
    semantic[mito > 0] = 2
    semantic[vesicles] = 3
    return Phantom(
        cells=cells,
        membrane=membrane,
        mito=mito,
        cristae=cristae,
        vesicles=vesicles,
        semantic=semantic,
        voxel_size_nm=vs_t,
        seed=int(seed),
    )


# -------------------------------------------------------------------------------------------------------
# renderings
# -------------------------------------------------------------------------------------------------------


def _smooth_noise(
    shape: Sequence[int], scale_nm: float, vs: Sequence[float], rng: np.random.Generator
) -> np.ndarray:
    """Zero-mean, unit-std noise ``(Z, Y, X)`` float32, Gaussian-correlated with sigma ``scale_nm``."""
    noise = rng.standard_normal(tuple(shape), dtype=np.float32)
    sigma = [scale_nm / v for v in vs]
    noise = ndi.gaussian_filter(noise, sigma, mode="reflect", truncate=3.0)
    std = float(noise.std())
    if std > 0:
        noise /= std
    return noise


def _inplane_edge(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with an in-plane 4-neighbour outside it (the image border counts as inside)."""
    inner = mask.copy()
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    inner[:, :, 1:] &= mask[:, :, :-1]
    inner[:, :, :-1] &= mask[:, :, 1:]
    return mask & ~inner


def _check_phantom(phantom: Phantom) -> tuple[float, float, float]:
    arrays = (phantom.cells, phantom.membrane, phantom.mito, phantom.cristae, phantom.vesicles)
    if phantom.cells.ndim != 3 or any(a.shape != phantom.cells.shape for a in arrays):
        raise ValueError("phantom arrays must all be 3D (Z, Y, X) of the same shape")
    return _check_voxel_size(phantom.voxel_size_nm)


def render_em(phantom: Phantom, seed: int = 0, params: EMRenderParams | None = None) -> np.ndarray:
    """Render a phantom as an EM-like image.

    Grey cytoplasm, dark membranes, darker mitochondria with darker cristae, vesicles with dark rims; sharp
    (at most a tiny blur), Gaussian grain noise and slight per-slice brightness/contrast variation.

    Args:
        phantom: any :class:`Phantom`.
        seed: seed of the rendering's randomness (noise, textures), independent of the phantom's.
        params: :class:`EMRenderParams` defaults when None.

    Returns:
        uint8 ``(Z, Y, X)`` image, same shape as the phantom.
    """
    vs = _check_phantom(phantom)
    p = params or EMRenderParams()
    rng = _rng(seed, _STREAM_EM)
    shape = phantom.shape
    n_cells = int(phantom.cells.max()) + 1
    grey = (p.cytoplasm + p.cell_jitter * rng.standard_normal(n_cells)).astype(np.float32)
    img = grey[phantom.cells]
    texture = _smooth_noise(shape, p.texture_scale_nm, vs, rng) * np.float32(p.texture_amplitude)
    img += texture
    mito = phantom.mito > 0
    img[mito] = np.float32(p.mito_matrix) + 0.5 * texture[mito]
    img[_inplane_edge(mito)] = p.mito_membrane
    img[phantom.cristae] = p.cristae
    img[phantom.vesicles] = p.vesicle_lumen
    img[_inplane_edge(phantom.vesicles)] = p.vesicle_rim
    img[phantom.membrane] = np.float32(p.membrane) + 0.5 * texture[phantom.membrane]
    sigma = [s / v for s, v in zip(p.blur_sigma_nm, vs, strict=True)]
    if any(s > 0 for s in sigma):
        img = ndi.gaussian_filter(img, sigma, mode="reflect", truncate=3.0)
    contrast = 1 + p.slice_contrast_std * rng.standard_normal(shape[0]).astype(np.float32)
    brightness = p.slice_brightness_std * rng.standard_normal(shape[0]).astype(np.float32)
    img = (img - np.float32(p.cytoplasm)) * contrast[:, None, None] + (p.cytoplasm + brightness)[
        :, None, None
    ]
    img += rng.standard_normal(shape, dtype=np.float32) * np.float32(p.noise_std)
    np.clip(img, 0, 255, out=img)
    return np.rint(img).astype(np.uint8)


def render_exm(phantom: Phantom, seed: int = 0, params: ExMRenderParams | None = None) -> np.ndarray:
    """Render a phantom as an ExM pan-protein fluorescence image.

    Protein-dense structures are bright (membranes, mitochondria, vesicle clusters), cytoplasm dim; the
    density is blurred by an anisotropic Gaussian PSF (nm) and turned into photons (Poisson shot noise),
    camera gain, offset and read noise.

    Args:
        phantom: any :class:`Phantom`.
        seed: seed of the rendering's randomness (noise, textures), independent of the phantom's.
        params: :class:`ExMRenderParams` defaults when None.

    Returns:
        uint16 ``(Z, Y, X)`` image in camera counts (about ``offset`` … ``offset + gain · photons``).
    """
    vs = _check_phantom(phantom)
    p = params or ExMRenderParams()
    rng = _rng(seed, _STREAM_EXM)
    shape = phantom.shape
    n_cells = int(phantom.cells.max()) + 1
    level = (p.cytoplasm + p.cell_jitter * rng.standard_normal(n_cells)).astype(np.float32)
    dens = level[phantom.cells]
    dens += _smooth_noise(shape, p.texture_scale_nm, vs, rng) * np.float32(p.texture_amplitude)
    dens[phantom.membrane] = p.membrane
    dens[phantom.mito > 0] = p.mito
    dens[phantom.cristae] = p.cristae
    dens[phantom.vesicles] = p.vesicle
    sigma = [s / v for s, v in zip(p.psf_sigma_nm, vs, strict=True)]
    if any(s > 0 for s in sigma):
        dens = ndi.gaussian_filter(dens, sigma, mode="reflect", truncate=3.0)
    dens *= (1 + p.slice_brightness_std * rng.standard_normal(shape[0])).astype(np.float32)[:, None, None]
    np.clip(dens, 0, None, out=dens)
    expected = dens * np.float32(p.photons) + np.float32(p.background_photons)
    counts = rng.poisson(expected).astype(np.float32)
    counts *= np.float32(p.gain)
    counts += np.float32(p.offset)
    counts += rng.standard_normal(shape, dtype=np.float32) * np.float32(p.read_noise)
    np.clip(counts, 0, np.iinfo(np.uint16).max, out=counts)
    return np.rint(counts).astype(np.uint16)


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
}


def _content(what: str, phantom: Phantom, seed: int) -> np.ndarray:
    if what == "exm":
        return render_exm(phantom, seed=seed)
    if what == "em":
        return render_em(phantom, seed=seed)
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
            f"{path} exists but is not a readable OME-Zarr group ({exc}); pass overwrite=True to replace it"
        ) from exc
    if not complete or not isinstance(found, dict):
        raise FileExistsError(
            f"{path} exists but is not a complete exem synthetic output; pass overwrite=True to replace it"
        )
    keys = ("seed", "kind", "shape", "voxel_size_nm", "content")
    differ = [k for k in keys if found.get(k) != expected[k]]
    if differ:
        have = ", ".join(f"{k}={found.get(k)}" for k in differ)
        want = ", ".join(f"{k}={expected[k]}" for k in differ)
        raise FileExistsError(
            f"{path} exists with {have}, not {want}; pass overwrite=True or use another out_dir"
        )
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
) -> dict[str, Path]:
    """Write a synthetic ExM/EM dataset as OME-Zarr (NGFF 0.4) groups under ``out_dir``.

    Outputs (name → ``out_dir/<name>.zarr``):

    - ``exm_train``: ExM rendering (uint16) of phantom ``seeds["lm"]``;
    - ``em_train``: EM rendering (uint8) of phantom ``seeds["em"]``: another phantom, so unpaired;
    - ``em_train_paired``: EM rendering of phantom ``seeds["lm"]`` (the paired truth of ``exm_train``, for
      validation metrics);
    - ``exm_test``, ``em_test``: both renderings of the held-out phantom ``seeds["test"]``;
    - ``labels_test``: its semantic labels (uint8, see :data:`SEMANTIC_CLASSES`); ``mito_test``: its
      mitochondria instance ids (uint32).

    Each group has ``levels`` in-plane 2x pyramid levels ``"0", "1", ...``, the voxel size in its multiscales
    metadata and an ``exem_synthetic`` attribute ``{"seed", "kind": "exm"|"em"|"labels", "shape", ...}``.
    Outputs that already exist with the same settings are reused (only missing ones are written) unless
    ``overwrite``; an existing output with other settings raises FileExistsError. Groups are written to a
    temporary name and renamed, so an interrupted run leaves no half-written output.

    Args:
        out_dir: folder to write into (created if needed).
        shape: ``(Z, Y, X)`` voxels of every volume.
        seeds: phantom seeds ``{"lm", "em", "test"}``; missing keys take :data:`DEFAULT_SEEDS`.
        voxel_size_nm: ``(z, y, x)`` voxel size in nm.
        overwrite: regenerate everything even if present.
        levels: number of pyramid levels.
        chunks: chunk shape ``(z, y, x)``, clipped to the volume.

    Returns:
        output name → path of its ``.zarr`` group.
    """
    shape = _check_shape(shape)
    vs = _check_voxel_size(voxel_size_nm)
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
        _write_atomic(paths[name], array, vs, chunks, levels, expected[name], overwrite or name in replace)
    return paths


def _write_atomic(
    path: Path,
    array: np.ndarray,
    vs: Sequence[float],
    chunks: Sequence[int],
    levels: int,
    meta: dict,
    overwrite: bool,
) -> None:
    """Write an OME-Zarr group under a temporary name, then rename it to ``path``.

    Label volumes get their coarser levels by in-plane subsampling (label ids must not be averaged).
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
    log.info("wrote %s", path)
