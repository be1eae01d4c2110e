"""EM-like and ExM-like renderings of a :class:`~exem.data.phantom.Phantom` and their knobs.

:func:`render_em` gives an EM-like ``uint8`` image, :func:`render_exm` an ExM-like (pan-protein fluorescence)
``uint16`` one; grey levels, densities, PSF and camera live in :class:`EMRenderParams` and
:class:`ExMRenderParams` (lengths in nm). Deterministic for a seed; the randomness is independent of the
phantom's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from exem.data.phantom import (
    STREAM_ANTIBODY,
    STREAM_ANTIBODY_RENDER,
    STREAM_EM,
    STREAM_EXM,
    Phantom,
    check_voxel_size,
    stream_rng,
)


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
    return check_voxel_size(phantom.voxel_size_nm)


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
    rng = stream_rng(seed, STREAM_EM)
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
    rng = stream_rng(seed, STREAM_EXM)
    shape = phantom.shape
    n_cells = int(phantom.cells.max()) + 1
    level = (p.cytoplasm + p.cell_jitter * rng.standard_normal(n_cells)).astype(np.float32)
    dens = level[phantom.cells]
    dens += _smooth_noise(shape, p.texture_scale_nm, vs, rng) * np.float32(p.texture_amplitude)
    dens[phantom.membrane] = p.membrane
    dens[phantom.mito > 0] = p.mito
    dens[phantom.cristae] = p.cristae
    dens[phantom.vesicles] = p.vesicle
    return _fluorescence(dens, p, vs, rng)


def _fluorescence(
    dens: np.ndarray, p: ExMRenderParams, vs: Sequence[float], rng: np.random.Generator
) -> np.ndarray:
    """A density ``(Z, Y, X)`` as a fluorescence camera image: PSF blur, per-slice brightness, Poisson photons,
    gain, offset and read noise; uint16 counts."""
    shape = dens.shape
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


@dataclass(frozen=True)
class AntibodyRenderParams:
    """Knobs of :func:`render_antibody`: an antibody channel that marks a subset of the mitochondria."""

    positive_fraction: float = 0.4
    """Share of the mitochondria that carry the marker (chosen at random, reproducibly for a seed)."""
    positive: float = 1.0
    """Marker density inside a positive mitochondrion."""
    level_jitter: float = 0.25
    """Relative standard deviation of the marker density between positive mitochondria."""
    nonspecific: float = 0.04
    """Unspecific background density everywhere (sticky antibody)."""
    camera: ExMRenderParams = ExMRenderParams(photons=60.0, background_photons=10.0)
    """PSF and camera (dimmer than the pan-protein stain: antibody channels are sparse and noisier)."""


def antibody_positive_ids(phantom: Phantom, seed: int = 0, fraction: float = 0.4) -> np.ndarray:
    """The sorted mitochondrion ids (of ``phantom.mito``) that carry the marker: ``fraction`` of them, at random."""
    ids = np.unique(phantom.mito)
    ids = ids[ids > 0]
    rng = stream_rng(seed, STREAM_ANTIBODY)
    count = min(ids.size, max(1, int(round(float(fraction) * ids.size)))) if fraction > 0 else 0
    return np.sort(rng.choice(ids, size=count, replace=False)) if count else ids[:0]


def render_antibody(
    phantom: Phantom, seed: int = 0, params: AntibodyRenderParams | None = None
) -> np.ndarray:
    """Render an antibody channel of the phantom: a marker filling the mitochondria of
    :func:`antibody_positive_ids`, blurred and noisy like ExM (:class:`AntibodyRenderParams`).

    Returns:
        uint16 ``(Z, Y, X)`` camera counts on the phantom's voxel grid (the pan-protein channel's).
    """
    vs = _check_phantom(phantom)
    p = params or AntibodyRenderParams()
    positive = antibody_positive_ids(phantom, seed, p.positive_fraction)
    rng = stream_rng(seed, STREAM_ANTIBODY_RENDER)
    level = np.zeros(int(phantom.mito.max()) + 1, np.float32)
    level[positive] = p.positive * (1 + p.level_jitter * rng.standard_normal(positive.size)).clip(0.3, None)
    dens = level[phantom.mito] + np.float32(p.nonspecific)
    return _fluorescence(dens, p.camera, vs, rng)
