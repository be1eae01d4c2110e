"""The synthetic neuropil label volume: :class:`Phantom`, its knobs :class:`PhantomParams` and :func:`make_phantom`.

What the phantom holds (cells, membranes, mitochondria with cristae, vesicle clusters, semantic classes) is
described in :mod:`exem.data.synthetic`; the nm-space geometry it is built with is in
:mod:`exem.data.phantom_geometry`. Everything is deterministic for a seed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from exem.data.phantom_geometry import (
    ball_pairs,
    ball_voxels,
    dilate,
    distance_to_mask,
    inside_volume,
    interfaces,
    nearest_per_voxel,
    perpendicular,
    random_walks,
)

log = logging.getLogger(__name__)

SEMANTIC_CLASSES: dict[int, str] = {0: "cytoplasm", 1: "membrane", 2: "mitochondrion", 3: "vesicle"}
"""Class index → name of :attr:`Phantom.semantic`."""

# Independent random streams per purpose (the ``stream`` of :func:`stream_rng`): the phantom of seed s and its
# renderings never share random numbers.
STREAM_PHANTOM, STREAM_EM, STREAM_EXM, STREAM_ANTIBODY, STREAM_ANTIBODY_RENDER = 0, 1, 2, 3, 4


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


def stream_rng(seed: int, stream: int) -> np.random.Generator:
    """The generator of ``stream`` (``STREAM_*``) for ``seed`` (a non-negative int; ValueError otherwise)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), stream]))


def check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """``shape`` as 3 positive ints ``(Z, Y, X)`` voxels; ValueError otherwise."""
    values = tuple(int(s) for s in shape)
    if len(values) != 3 or any(s < 1 for s in values):
        raise ValueError(f"shape must be 3 positive integers (z, y, x), got {list(shape)}")
    return values  # type: ignore[return-value]


def check_voxel_size(voxel_size_nm: Sequence[float]) -> tuple[float, float, float]:
    """``voxel_size_nm`` as 3 finite positive floats ``(z, y, x)`` nm; ValueError otherwise."""
    values = tuple(float(v) for v in voxel_size_nm)
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"voxel_size_nm must be 3 positive numbers (z, y, x), got {list(voxel_size_nm)}")
    return values  # type: ignore[return-value]


def _uniform(
    rng: np.random.Generator, bounds: Sequence[float], size: int | None = None
) -> np.ndarray | float:
    lo, hi = float(bounds[0]), float(bounds[1])
    return rng.uniform(lo, hi, size)


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
        fwd = random_walks(rng, start, d0, n_half, step, sigma)
        bwd = random_walks(rng, start, -d0, n_half, step, sigma)
        pts = np.concatenate([bwd[:, :0:-1], fwd], axis=1)
        tangent = np.gradient(pts, axis=1)
        tangent /= np.maximum(np.linalg.norm(tangent, axis=-1, keepdims=True), 1e-12)
        inside = inside_volume(pts, shape, vs)
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
    shape = check_shape(shape)
    vs_t = check_voxel_size(voxel_size_nm)
    vs = np.asarray(vs_t)
    p = params or PhantomParams()
    rng = stream_rng(seed, STREAM_PHANTOM)
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
        seeds.ravel()[ball_voxels(centers, r, vs, shape)] = curve_label[i]

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
        seeds.ravel()[ball_voxels(pts[i, j], r, vs, shape)] = curve_label[i]

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
    membrane = dilate(interfaces(cells, vs, p.membrane_enface_reach_nm), p.membrane_thickness_nm / 2, vs)
    near_membrane = dilate(membrane, p.mito_membrane_gap_nm, vs)
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
        free = distance_to_mask(membrane, c, vs, search_nm) - p.mito_membrane_gap_nm - float(vs.min()) / 2
        r = min(float(_uniform(rng, p.mito_radius_nm)), free)
        length = float(_uniform(rng, p.mito_length_nm))
        if r < p.mito_min_radius_nm:
            continue
        t = tangents[i, j]
        shift = perpendicular(rng, t) * rng.uniform(0, p.mito_max_offset_frac * max(free - r, 0.0))
        half_n = max(0, int(round((length / 2 - r) / step)))
        k = np.arange(max(j - half_n, 0), min(j + half_n, pts.shape[1] - 1) + 1)
        every = max(1, int(r / 3 / step))
        k = np.unique(np.append(k[::every], k[-1]))
        centers = pts[i, k] + shift
        arc = (k - j) * step
        lin, which, d2, diff = ball_pairs(centers, r, vs, shape)
        lin, d2, (which, diff) = nearest_per_voxel(lin, d2, which, diff)
        ok = (flat_cells[lin] == host) & ~near_membrane.ravel()[lin] & (flat_mito[lin] == 0)
        if ok.sum() < 0.5 * len(lin) or ok.sum() == 0:
            continue
        placed += 1
        flat_mito[lin[ok]] = placed
        # cristae: lamellae across the long axis (slightly tilted), inside the outer membrane
        tan = tangents[i, k][which]
        axial = arc[which] + np.einsum("pi,pi->p", diff, tan)
        tilt = rng.uniform(-p.cristae_tilt, p.cristae_tilt) * (diff @ perpendicular(rng, t))
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
        lin, _, _, _ = ball_pairs(cand[chosen], radii[chosen], vs, shape, z_slack_nm=float(vs[0]) / 2)
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
