"""Fitting the content-loss groups: Otsu thresholds, group fractions, the monotone mapping and the fit itself.

The method (smoothing, saturated voxels, multi-level Otsu, fraction-matched monotone mappings, the stain prior and
the skewness tie-break) is described in :mod:`exem.content_groups`.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from exem.content_groups_record import (
    OTSU_BINS,
    CalibrationError,
    ContentFitSettings,
    ContentGroups,
    check_stain,
)

log = logging.getLogger(__name__)

SATURATED_WARNING = 0.05
"""A domain with more than this fraction of voxels at exactly 0 or 1 gets a warning."""

SKEW_CLEAR = 0.2
"""Histogram skewness beyond ±this counts as a clear tail (the tie-break without a stain prior)."""


# -------------------------------------------------------------------------------------------------------
# thresholds and fractions
# -------------------------------------------------------------------------------------------------------


def _unsaturated(sample: np.ndarray, domain: str) -> tuple[np.ndarray, float]:
    x = np.asarray(sample, dtype=np.float32).ravel()
    if x.size == 0:
        raise CalibrationError(f"{domain}: the intensity sample is empty; check the volume and its region")
    if np.isnan(x).any():
        raise CalibrationError(
            f"{domain}: the sampled intensities contain NaN; fix the volume (no NaN allowed)"
        )
    keep = (x > 0.0) & (x < 1.0)
    saturated = 1.0 - float(keep.mean())
    return x[keep], saturated


def smooth_inplane(sample: np.ndarray, sigma: float) -> np.ndarray:
    """``sample`` as float32, Gaussian-smoothed over its last two axes (Y, X) with ``sigma`` voxels (NaN kept).

    A flat (1D) sample or ``sigma`` 0 is returned unsmoothed."""
    x = np.asarray(sample, dtype=np.float32)
    if sigma <= 0 or x.ndim < 2 or x.size == 0:
        return x
    from scipy import ndimage as ndi

    return ndi.gaussian_filter(x, (0,) * (x.ndim - 2) + (float(sigma),) * 2, mode="reflect", truncate=3.0)


def check_levels(sample: np.ndarray, groups: int, domain: str) -> np.ndarray:
    """The unsaturated voxels of ``sample`` (flat float32), after checking they can form ``groups`` groups.

    Raises:
        CalibrationError: empty, NaN, constant, or fewer distinct levels (of 256 over [0, 1]) than groups.
    """
    x, _ = _unsaturated(sample, domain)
    distinct = np.unique(np.round(x * (OTSU_BINS - 1)).astype(np.int32)) if x.size else np.empty(0)
    if distinct.size <= 1:
        raise CalibrationError(
            f"{domain}: the intensities are constant (or all at the ends of the range); "
            f"content groups need contrast (check the volume and data.*.intensity_range / percentiles)"
        )
    if distinct.size < groups:
        raise CalibrationError(
            f"{domain}: only {distinct.size} distinct intensity levels, fewer than the {groups} groups asked for"
        )
    return x


def otsu_thresholds(sample: np.ndarray, groups: int, domain: str = "volume") -> tuple[float, ...]:
    """Multi-level Otsu thresholds of a normalised intensity sample: ``groups − 1`` increasing floats in (0, 1).

    Args:
        sample: intensities normalised to [0, 1], any shape (voxels at exactly 0 or 1 are ignored).
        groups: number of groups, 2 to 5.
        domain: name used in error messages.

    Raises:
        CalibrationError: empty, NaN, constant, or fewer distinct values than groups.
    """
    return _otsu(check_levels(sample, groups, domain), groups, domain)


def _otsu(x: np.ndarray, groups: int, domain: str) -> tuple[float, ...]:
    """:func:`otsu_thresholds` of a flat, checked, unsaturated sample."""
    from skimage.filters import threshold_multiotsu

    counts, edges = np.histogram(x, bins=OTSU_BINS, range=(0.0, 1.0))
    centres = 0.5 * (edges[:-1] + edges[1:])
    try:
        ts = threshold_multiotsu(hist=(counts, centres), classes=groups)
    except ValueError as exc:  # e.g. too few occupied bins for the classes
        raise CalibrationError(
            f"{domain}: cannot split the intensities into {groups} groups ({exc})"
        ) from None
    ts = _plateau_centres(counts, centres, [int(np.searchsorted(centres, t)) for t in ts])
    if any(b <= a for a, b in zip(ts[:-1], ts[1:], strict=True)):
        raise CalibrationError(f"{domain}: the intensities do not separate into {groups} groups")
    return tuple(ts)


def _between_class_variance(counts: np.ndarray, centres: np.ndarray, cuts: Sequence[int]) -> float:
    """Otsu's criterion Σ_k ω_k μ_k² for the classes ``[0, cuts[0]], (cuts[0], cuts[1]], …`` of a histogram."""
    total = 0.0
    for lo, hi in zip((0, *(c + 1 for c in cuts)), (*(c + 1 for c in cuts), len(counts)), strict=True):
        w = float(counts[lo:hi].sum())
        if w > 0:
            total += float((counts[lo:hi] * centres[lo:hi]).sum()) ** 2 / w
    return total


def _plateau_centres(counts: np.ndarray, centres: np.ndarray, cuts: list[int]) -> tuple[float, ...]:
    """Thresholds at the centre of the flat stretch of Otsu's criterion around each cut.

    Across an empty valley between two modes every threshold separates the same voxels, so the criterion is flat
    and :func:`~skimage.filters.threshold_multiotsu` returns the valley's first bin; the valley's middle is the
    threshold a person would draw (and the minimum-error one for equal modes). Each cut moves, the others held, to
    the middle of the run of bins that keep the criterion within 1e-9 (relative) of its value.
    """
    cuts = list(cuts)
    for k in range(len(cuts)):
        lo = cuts[k - 1] + 1 if k > 0 else 0
        hi = cuts[k + 1] - 1 if k + 1 < len(cuts) else len(counts) - 2
        best = _between_class_variance(counts, centres, cuts)
        same = []
        for c in range(lo, hi + 1):
            trial = [*cuts[:k], c, *cuts[k + 1 :]]
            same.append(
                abs(_between_class_variance(counts, centres, trial) - best) <= 1e-9 * max(best, 1e-30)
            )
        run_lo = run_hi = cuts[k] - lo
        while run_lo > 0 and same[run_lo - 1]:
            run_lo -= 1
        while run_hi + 1 < len(same) and same[run_hi + 1]:
            run_hi += 1
        cuts[k] = lo + (run_lo + run_hi) // 2
    # a cut at bin c puts the threshold between bins c and c + 1 (what threshold_multiotsu reports is centres[c])
    return tuple(float(centres[c]) for c in cuts)


def group_fractions(sample: np.ndarray, thresholds: Sequence[float]) -> tuple[float, ...]:
    """Volume fraction of each hard group ``[dark, …, bright]`` of a normalised sample (sums to 1)."""
    x = np.asarray(sample, dtype=np.float32).ravel()
    idx = np.searchsorted(np.asarray(thresholds, dtype=np.float32), x, side="right")
    counts = np.bincount(idx, minlength=len(thresholds) + 1).astype(np.float64)
    return tuple(float(c) for c in counts / max(1.0, counts.sum()))


# -------------------------------------------------------------------------------------------------------
# the mapping
# -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    em_to_lm: tuple[int, ...]
    score: float
    polarity: str


def _candidates(lm_fr: Sequence[float], em_fr: Sequence[float]) -> list[_Candidate]:
    """Every monotone mapping EM group → LM group that gives each LM group at least one EM group, scored."""
    n_lm, n_em = len(lm_fr), len(em_fr)
    out = []
    for f in itertools.product(range(n_lm), repeat=n_em):
        steps = np.diff(f)
        if len(set(f)) != n_lm or not (np.all(steps >= 0) or np.all(steps <= 0)):
            continue
        mapped = np.zeros(n_lm)
        for j, i in enumerate(f):
            mapped[i] += em_fr[j]
        score = 1.0 - 0.5 * float(np.abs(np.asarray(lm_fr) - mapped).sum())
        # monotone and onto ≥ 2 LM groups, so never constant: the ends tell the direction
        out.append(_Candidate(tuple(f), score, "direct" if f[-1] > f[0] else "pan_protein"))
    # best first; among equal scores pan-protein first (the stain exem is made for)
    return sorted(out, key=lambda c: (-round(c.score, 9), c.polarity != "pan_protein", c.em_to_lm))


def _skew(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64).ravel()
    sd = float(x.std()) if x.size else 0.0
    return float(np.mean(((x - x.mean()) / sd) ** 3)) if sd > 0 else 0.0


def _skew_polarity(skew_lm: float, skew_em: float) -> str | None:
    """``pan_protein`` for clearly opposite tails, ``direct`` for clearly equal ones, else None."""
    if min(abs(skew_lm), abs(skew_em)) <= SKEW_CLEAR:
        return None
    return "direct" if (skew_lm > 0) == (skew_em > 0) else "pan_protein"


def _choose(
    cands: Sequence[_Candidate],
    stain: str | None,
    tolerance: float,
    notes: list[str],
    skews: tuple[float, float] = (0.0, 0.0),
) -> _Candidate:
    best = cands[0]
    ties = [c for c in cands if c.score >= best.score - tolerance]
    if stain is not None:
        agree = [c for c in ties if c.polarity == stain]
        if agree:
            return agree[0]
        notes.append(
            f"the data disagree with data.lm.stain={stain}: the best {stain} mapping scores"
            f" {max((c.score for c in cands if c.polarity == stain), default=float('nan')):.3f} against"
            f" {best.score:.3f} for the {best.polarity} one chosen; check the stain setting and the"
            " content_groups.png picture"
        )
        return best
    polarities = {c.polarity for c in ties}
    if len(polarities) > 1:
        tails = _skew_polarity(*skews)
        if tails is not None:
            chosen = next(c for c in ties if c.polarity == tails)
            log.info(
                "content groups: mapped fractions nearly tie; the histograms' tails (skew ExM %.2f, EM %.2f) decide"
                " %s",
                skews[0],
                skews[1],
                tails,
            )
            return chosen
        other = next(c for c in ties if c.polarity != best.polarity)
        notes.append(
            f"the data barely decide between a {best.polarity} mapping (score {best.score:.3f}, chosen) and a"
            f" {other.polarity} one ({other.score:.3f}); set data.lm.stain (pan_protein | direct) to decide"
        )
    return best


def fit_content_groups(
    lm: np.ndarray,
    em: np.ndarray,
    *,
    lm_groups: int = 2,
    em_groups: int = 3,
    stain: str | None = None,
    tie_tolerance: float = 0.1,
    smooth_sigma: float = 0.7,
) -> ContentGroups:
    """Fit content-loss groups to samples of both domains (normalised to [0, 1] as in training).

    Args:
        lm: ExM intensities in [0, 1]: patches ``(N, Z, Y, X)``, one ``(Z, Y, X)`` volume or ``(Y, X)`` slice, or
            a flat sample (not smoothed).
        em: EM intensities in [0, 1], likewise.
        lm_groups, em_groups: number of groups per domain (2 to 5).
        stain: None, ``"pan_protein"`` or ``"direct"``: breaks ties between mappings of opposite polarity.
        tie_tolerance: mappings within this score of the best are ties.
        smooth_sigma: in-plane Gaussian sigma (voxels) applied to the last two axes first; 0 = off.

    Returns:
        the fit; ``notes`` holds the warnings (also logged).

    Raises:
        CalibrationError: a sample is empty, contains NaN, is constant or has too few distinct values.
    """
    return _fit(lm, em, lm_groups, em_groups, stain, tie_tolerance, smooth_sigma)[0]


def _fit(
    lm: np.ndarray,
    em: np.ndarray,
    lm_groups: int,
    em_groups: int,
    stain: str | None,
    tie_tolerance: float,
    smooth_sigma: float,
) -> tuple[ContentGroups, np.ndarray, np.ndarray]:
    """:func:`fit_content_groups`, also returning the smoothed ``lm`` and ``em`` samples it fitted."""
    check_stain(stain)
    notes: list[str] = []
    fits, smoothed = [], []
    for domain, sample, groups in (("ExM (data.lm)", lm, lm_groups), ("EM (data.em)", em, em_groups)):
        check_levels(sample, groups, domain)  # on the data as they are: smoothing makes new levels at edges
        sample = smooth_inplane(sample, smooth_sigma)
        smoothed.append(sample)
        x, saturated = _unsaturated(sample, domain)
        ts = _otsu(x, groups, domain)
        if saturated > SATURATED_WARNING:
            notes.append(
                f"{domain}: {100 * saturated:.1f} % of the sampled voxels are at exactly 0 or 1 (padding,"
                " saturation or clipping by the normalisation); they were left out of the fit"
            )
        fits.append((ts, group_fractions(x, ts), int(np.asarray(sample).size), saturated, _skew(x)))
    (lm_t, lm_fr, lm_n, lm_sat, lm_skew), (em_t, em_fr, em_n, em_sat, em_skew) = fits
    chosen = _choose(_candidates(lm_fr, em_fr), stain, float(tie_tolerance), notes, (lm_skew, em_skew))
    lm_to_em = tuple(tuple(j for j, i in enumerate(chosen.em_to_lm) if i == g) for g in range(lm_groups))
    for n in notes:
        log.warning("content groups: %s", n)
    fit = ContentGroups(
        lm_thresholds=lm_t,
        em_thresholds=em_t,
        lm_to_em=lm_to_em,
        em_to_lm=chosen.em_to_lm,
        lm_fractions=lm_fr,
        em_fractions=em_fr,
        score=chosen.score,
        stain=stain,
        polarity=chosen.polarity,
        voxels=(lm_n, em_n),
        saturated=(lm_sat, em_sat),
        skew=(lm_skew, em_skew),
        notes=tuple(notes),
    )
    return fit, smoothed[0], smoothed[1]


# -------------------------------------------------------------------------------------------------------
# the fit on a datamodule's training data
# -------------------------------------------------------------------------------------------------------


def sample_patch_shape(patch: Sequence[int], settings: ContentFitSettings) -> tuple[int, int, int]:
    """The patch drawn for the sample: the training patch, its Y/X shrunk so ``sample_patches`` of them hold about
    ``sample_voxels`` voxels (never below 16 × 16 nor above the training patch)."""
    pz, py, px = (int(p) for p in patch)
    side = int(math.sqrt(settings.sample_voxels / settings.sample_patches / max(1, pz)))
    return pz, max(min(py, 16), min(py, side)), max(min(px, 16), min(px, side))


@dataclass(frozen=True)
class CalibrationResult:
    """A fit with the samples it came from.

    Attributes:
        fit: the content groups.
        lm, em: the sampled patches ``(N, Z, Y, X)`` float32 in [0, 1], smoothed as the fit saw them.
        lm_slice, em_slice: ``(Y, X)`` middle slices of each domain's first volume, normalised and smoothed.
    """

    fit: ContentGroups
    lm: np.ndarray
    em: np.ndarray
    lm_slice: np.ndarray
    em_slice: np.ndarray

    def pictures(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The arguments :func:`write_content_groups` takes after the fit."""
        return self.lm, self.em, self.lm_slice, self.em_slice


def fit_from_datamodule(datamodule: Any, settings: ContentFitSettings | None = None) -> CalibrationResult:
    """Fit the content groups to an :class:`~exem.data.ExEMDataModule`'s training data.

    Patches are drawn from each domain's training region exactly as training draws and normalises them
    (:meth:`~exem.data.ExEMDataModule.intensity_sample`, seeded by ``settings.seed``); the stain prior is
    ``data.lm.stain``.
    """
    settings = settings or ContentFitSettings()
    datamodule.setup("fit")
    patch = sample_patch_shape(datamodule.patch_size, settings)
    sample = datamodule.intensity_sample(patch, settings.sample_patches, settings.seed)
    s = settings.smooth_sigma
    fit, lm, em = _fit(
        sample["lm"],
        sample["em"],
        settings.lm_groups,
        settings.em_groups,
        datamodule.lm_stain,
        settings.tie_tolerance,
        s,
    )
    return CalibrationResult(
        fit=fit,
        lm=lm,
        em=em,
        lm_slice=smooth_inplane(sample["lm_slice"], s),
        em_slice=smooth_inplane(sample["em_slice"], s),
    )
