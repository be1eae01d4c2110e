"""Content-loss intensity groups fitted from the data: which ExM intensities must become which EM intensities.

The content loss (:class:`exem.losses.IntensityGroupContentLoss`) splits each domain into intensity groups and
asks the translation to map groups onto each other. Which groups suit a stain cannot be guessed: pan-protein ExM
is bright where EM is dark (membranes, mitochondria), a direct stain is not. :func:`fit_content_groups` fits them
from samples of both domains, normalised to [0, 1] exactly as training sees them:

1. thresholds per domain with multi-level Otsu (:func:`skimage.filters.threshold_multiotsu`); groups are
   numbered from dark (0) to bright;
2. the volume fraction of each group;
3. the mapping: every EM group goes to one LM group, every LM group receives at least one EM group, and the
   intensity order is kept (``direct``) or reversed (``pan_protein``): a stain's brightness is monotone in the
   density of what it stains, in ExM as in EM. Of these mappings the one whose mapped fractions are closest
   wins (``score`` = 1 − total-variation distance between the LM fractions and the mapped EM fractions,
   1 = identical). E.g. pan-protein ExM: the bright ~25 % of ExM ↔ the dark ~25 % of EM. (The published
   mapping, bright ExM ↔ mid-grey EM, is not monotone; it stays available with ``auto: false``.)

Mappings whose scores lie within ``tie_tolerance`` of the best are ties. Blur widens bright ExM structures, so the
bright ExM fraction can sit between a pan-protein and a direct candidate. An optional stain prior (``pan_protein``:
bright LM ↔ dark EM, ``direct``: bright ↔ bright) breaks such ties, and a warning says when the data disagree with
the prior (the data win). Without a prior the skewness of the two histograms breaks them: the sparse structures of
a domain make a long tail on their side (pan-protein ExM: a bright tail; EM: a dark tail), so opposite skews mean
``pan_protein`` and equal ones ``direct``, when both are clear (``|skew| > 0.2``); otherwise a warning asks for the
prior.

Before the fit each sampled patch is smoothed in-plane (Gaussian, ``smooth_sigma`` voxels): voxel noise (EM grain,
ExM shot noise) otherwise widens the dominant mode (cytoplasm) until Otsu splits it in two instead of separating
structures. Voxels at exactly 0 or 1 (clipped by the normalisation, padding, saturation) are left out of the fit and
reported, so a black frame around an aligned EM stack does not become a group of its own.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from exem.losses import MAX_GROUPS

log = logging.getLogger(__name__)

__all__ = [
    "STAINS",
    "CalibrationError",
    "ContentFitSettings",
    "ContentGroups",
    "content_groups_panel",
    "fit_content_groups",
    "group_fractions",
    "otsu_thresholds",
    "write_content_groups",
]

STAINS = ("pan_protein", "direct")
"""Stain priors: ``pan_protein`` (NHS-ester: dense protein bright in ExM, dark in EM) and ``direct``."""

SATURATED_WARNING = 0.05
"""A domain with more than this fraction of voxels at exactly 0 or 1 gets a warning."""

OTSU_BINS = 256
"""Histogram bins of the Otsu fit over [0, 1] (threshold resolution 1/256)."""

# Loss keyword arguments that a fit sets, and the record it adds next to them in ``model.loss.content``.
FIT_KEYS = ("lm_thresholds", "em_thresholds", "lm_to_em", "em_to_lm")
RECORD_KEYS = ("lm_fractions", "em_fractions", "score", "stain", "polarity", "voxels", "saturated", "skew")

SKEW_CLEAR = 0.2
"""Histogram skewness beyond ±this counts as a clear tail (the tie-break without a stain prior)."""


class CalibrationError(ValueError):
    """Data that content groups cannot be fitted to (constant, too few distinct values, NaN); one line."""


@dataclass(frozen=True)
class ContentFitSettings:
    """How the content groups are fitted (``model.loss.content`` keys next to the loss's own).

    Attributes:
        auto: fit the groups from the data before the first step (False: use the configured thresholds and
            mapping as given).
        lm_groups: intensity groups of the LM (ExM) domain, 2 to 5.
        em_groups: intensity groups of the EM domain, 2 to 5.
        sample_voxels: voxels sampled per domain (about; whole training-normalised patches).
        sample_patches: patches drawn per domain; their Y/X size shrinks so the total stays near
            ``sample_voxels``.
        seed: seed of the patch draw.
        tie_tolerance: mappings whose score is within this of the best are ties (the stain prior decides).
        smooth_sigma: in-plane Gaussian sigma (voxels) applied to each sampled patch before the fit; 0 = off.
    """

    auto: bool = True
    lm_groups: int = 2
    em_groups: int = 3
    sample_voxels: int = 4_000_000
    sample_patches: int = 64
    seed: int = 0
    tie_tolerance: float = 0.1
    smooth_sigma: float = 0.7

    def __post_init__(self) -> None:
        for name in ("lm_groups", "em_groups"):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= MAX_GROUPS:
                raise ValueError(
                    f"model.loss.content.{name} must be an int from 2 to {MAX_GROUPS}, got {n!r}"
                )
        for name in ("sample_voxels", "sample_patches"):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"model.loss.content.{name} must be an int ≥ 1, got {n!r}")
        if not 0.0 <= float(self.tie_tolerance) < 1.0:
            raise ValueError(
                f"model.loss.content.tie_tolerance must be in [0, 1), got {self.tie_tolerance!r}"
            )
        if not 0.0 <= float(self.smooth_sigma) < 100.0:
            raise ValueError(
                f"model.loss.content.smooth_sigma must be in [0, 100) voxels, got {self.smooth_sigma!r}"
            )

    @classmethod
    def split(cls, content: Mapping[str, Any] | None) -> tuple[ContentFitSettings, dict[str, Any]]:
        """``model.loss.content`` → (fit settings, the rest: loss keyword arguments and any stored fit)."""
        content = dict(content or {})
        names = {f for f in cls.__dataclass_fields__}
        settings = cls(**{k: content.pop(k) for k in list(content) if k in names})
        return settings, content


@dataclass(frozen=True)
class ContentGroups:
    """A fit of the content-loss groups. Groups are numbered from dark (0) to bright in both domains.

    Attributes:
        lm_thresholds, em_thresholds: increasing thresholds in normalised [0, 1] intensity.
        lm_to_em: for each LM group, the EM groups mapped onto it.
        em_to_lm: for each EM group, the LM group it maps onto.
        lm_fractions, em_fractions: volume fraction of each group in the sample (unsaturated voxels).
        score: 1 − total-variation distance between ``lm_fractions`` and the mapped EM fractions (1 = equal).
        stain: the stain prior used (None = none).
        polarity: ``pan_protein`` (bright LM ↔ dark EM) or ``direct`` (bright ↔ bright); ``""`` if unknown.
        voxels: ``[lm, em]`` voxels sampled.
        saturated: ``[lm, em]`` fraction of the sample at exactly 0 or 1 (left out of the fit).
        skew: ``[lm, em]`` skewness of the (smoothed, unsaturated) samples.
        notes: warnings raised while fitting (not stored in checkpoints).
    """

    lm_thresholds: tuple[float, ...]
    em_thresholds: tuple[float, ...]
    lm_to_em: tuple[tuple[int, ...], ...]
    em_to_lm: tuple[int, ...]
    lm_fractions: tuple[float, ...]
    em_fractions: tuple[float, ...]
    score: float
    stain: str | None = None
    polarity: str = ""
    voxels: tuple[int, int] = (0, 0)
    saturated: tuple[float, float] = (0.0, 0.0)
    skew: tuple[float, float] = (0.0, 0.0)
    notes: tuple[str, ...] = field(default=(), compare=False)

    def as_config(self) -> dict[str, Any]:
        """Plain values for ``model.loss.content`` / JSON (lists; no notes). Floats are kept exactly, so a resumed
        run trains with the very thresholds of the uninterrupted one."""
        d = asdict(self)
        d.pop("notes")
        return _plain(d)

    @classmethod
    def from_config(cls, content: Mapping[str, Any]) -> ContentGroups | None:
        """The fit stored in a ``model.loss.content`` mapping (a checkpoint's hyper-parameters), or None."""
        if not all(k in content for k in (*FIT_KEYS, "lm_fractions", "em_fractions", "score")):
            return None
        return cls(
            lm_thresholds=tuple(float(t) for t in content["lm_thresholds"]),
            em_thresholds=tuple(float(t) for t in content["em_thresholds"]),
            lm_to_em=tuple(tuple(int(k) for k in g) for g in content["lm_to_em"]),
            em_to_lm=tuple(int(k) for k in content["em_to_lm"]),
            lm_fractions=tuple(float(f) for f in content["lm_fractions"]),
            em_fractions=tuple(float(f) for f in content["em_fractions"]),
            score=float(content["score"]),
            stain=content.get("stain"),
            polarity=str(content.get("polarity", "")),
            voxels=tuple(int(v) for v in content.get("voxels", (0, 0))),  # type: ignore[arg-type]
            saturated=tuple(float(v) for v in content.get("saturated", (0.0, 0.0))),  # type: ignore[arg-type]
            skew=tuple(float(v) for v in content.get("skew", (0.0, 0.0))),  # type: ignore[arg-type]
        )

    def summary_json(self) -> str:
        """The one JSON line of ``exem-calibrate``: thresholds, mapping and fractions."""
        keys = ("lm_thresholds", "em_thresholds", "lm_to_em", "em_to_lm", "lm_fractions", "em_fractions")
        cfg = self.as_config()
        return json.dumps({k: cfg[k] for k in keys})

    def describe(self) -> str:
        """One line: which ExM groups become which EM groups, with fractions and the score."""
        n_lm, n_em = len(self.lm_fractions), len(self.em_fractions)
        parts = []
        for i, targets in enumerate(self.lm_to_em):
            ems = " + ".join(f"{group_name(j, n_em)} {100 * self.em_fractions[j]:.0f} %" for j in targets)
            parts.append(f"ExM {group_name(i, n_lm)} {100 * self.lm_fractions[i]:.0f} % ↔ EM {ems}")
        return f"{'; '.join(parts)} (score {self.score:.3f}, {self.polarity})"

    def table(self) -> str:
        """A text table: domain, group, intensity range, fraction, mapped onto."""
        rows = [("domain", "group", "intensities", "fraction", "maps onto")]
        for dom, ths, fr, n_other, mapping in (
            ("ExM", self.lm_thresholds, self.lm_fractions, len(self.em_fractions), self.lm_to_em),
            ("EM", self.em_thresholds, self.em_fractions, len(self.lm_fractions), self.em_to_lm),
        ):
            edges = (0.0, *ths, 1.0)
            other = "EM" if dom == "ExM" else "ExM"
            for g in range(len(fr)):
                targets = mapping[g] if isinstance(mapping[g], tuple) else (mapping[g],)
                onto = ", ".join(f"{other} {t} ({group_name(t, n_other)})" for t in targets)
                rows.append(
                    (
                        dom,
                        f"{g} ({group_name(g, len(fr))})",
                        f"{edges[g]:.3f}–{edges[g + 1]:.3f}",
                        f"{100 * fr[g]:.1f} %",
                        onto,
                    )
                )
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows)

    def yaml_block(self) -> str:
        """The ``model.loss.content`` block to paste into an experiment config (``auto: false``)."""
        cfg = self.as_config()

        def flow(v: Any) -> str:
            return json.dumps(_round(v)).replace('"', "")

        return "\n".join(
            [
                "model:",
                "  loss:",
                "    content:",
                "      auto: false",
                f"      lm_thresholds: {flow(cfg['lm_thresholds'])}",
                f"      em_thresholds: {flow(cfg['em_thresholds'])}",
                f"      lm_to_em: {flow(cfg['lm_to_em'])}",
                f"      em_to_lm: {flow(cfg['em_to_lm'])}",
            ]
        )


def _round(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, list):
        return [_round(v, digits) for v in value]
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def group_name(index: int, n: int) -> str:
    """``dark`` / ``mid`` / ``bright`` (or ``dark``, ``mid-1``, ``mid-2``, …) of group ``index`` of ``n``."""
    if index == 0:
        return "dark"
    if index == n - 1:
        return "bright"
    return "mid" if n == 3 else f"mid-{index}"


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
    if stain is not None and stain not in STAINS:
        raise CalibrationError(f"data.lm.stain must be one of {', '.join(STAINS)} or null, got {stain!r}")
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
# the picture and the files
# -------------------------------------------------------------------------------------------------------

# One hue per LM group (dark → bright); EM groups take the hue of the LM group they map onto.
_HUES = ((60, 120, 255), (255, 140, 0), (40, 200, 90), (220, 60, 200), (240, 220, 40))
_TILE = 320
_HIST_H = 150
_PAD = 8
_TEXT = 14


def _em_colours(fit: ContentGroups) -> list[tuple[int, int, int]]:
    """EM group colours: the hue of its LM group, lighter for the 2nd, 3rd… EM group sharing it."""
    seen: dict[int, int] = {}
    out = []
    for i in fit.em_to_lm:
        k = seen.get(i, 0)
        seen[i] = k + 1
        base = np.asarray(_HUES[i % len(_HUES)], dtype=np.float32)
        out.append(tuple(int(v) for v in base + (255 - base) * min(0.6, 0.35 * k)))
    return out


def _histogram(
    sample: np.ndarray, thresholds: Sequence[float], colours: Sequence[tuple[int, ...]]
) -> Image.Image:
    counts, _ = np.histogram(np.asarray(sample, np.float32).ravel(), bins=OTSU_BINS, range=(0.0, 1.0))
    heights = np.log1p(counts.astype(np.float64))
    heights = heights / max(1e-9, heights.max())
    img = Image.new("RGB", (_TILE, _HIST_H), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    bin_w = _TILE / OTSU_BINS
    centres = (np.arange(OTSU_BINS) + 0.5) / OTSU_BINS
    groups = np.searchsorted(np.asarray(thresholds), centres, side="right")
    for b in range(OTSU_BINS):
        h = int(round(heights[b] * (_HIST_H - _TEXT - 4)))
        if h:
            x0 = int(b * bin_w)
            draw.rectangle(
                [x0, _HIST_H - h, max(x0, int((b + 1) * bin_w) - 1), _HIST_H - 1], fill=colours[groups[b]]
            )
    for t in thresholds:
        x = int(round(t * _TILE))
        draw.line([x, _TEXT, x, _HIST_H], fill=(0, 0, 0), width=1)
        draw.text((min(x + 2, _TILE - 40), 1), f"{t:.3f}", fill=(0, 0, 0))
    return img


def _overlay(
    slice_: np.ndarray, thresholds: Sequence[float], colours: Sequence[tuple[int, ...]]
) -> Image.Image:
    s = np.clip(np.asarray(slice_, dtype=np.float32), 0.0, 1.0)
    grey = np.repeat((s * 255.0)[..., None], 3, axis=2)
    tint = np.asarray(colours, dtype=np.float32)[np.searchsorted(np.asarray(thresholds), s, side="right")]
    rgb = np.concatenate([grey, 0.55 * grey + 0.45 * tint], axis=1)  # the slice | its groups
    img = Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8))
    scale = (2 * _TILE) / img.width
    return img.resize((2 * _TILE, max(1, int(round(img.height * scale)))), Image.Resampling.NEAREST)


def content_groups_panel(
    fit: ContentGroups,
    lm_sample: np.ndarray,
    em_sample: np.ndarray,
    lm_slice: np.ndarray,
    em_slice: np.ndarray,
) -> np.ndarray:
    """The picture of a fit as an ``(H, W, 3)`` uint8 array.

    Left: ExM; right: EM. Top: each domain's histogram (log counts) coloured by group, thresholds drawn. Below:
    a middle slice of each domain and the same slice coloured by group. Colours say what becomes what: an EM group
    has the colour of the ExM group it is mapped onto.

    Args:
        fit: the fitted groups.
        lm_sample, em_sample: the normalised samples the fit used.
        lm_slice, em_slice: ``(Y, X)`` normalised slices of each domain.
    """
    lm_col = [_HUES[i % len(_HUES)] for i in range(len(fit.lm_fractions))]
    em_col = _em_colours(fit)
    tiles = [
        (
            "ExM (data.lm)",
            _histogram(lm_sample, fit.lm_thresholds, lm_col),
            _overlay(lm_slice, fit.lm_thresholds, lm_col),
        ),
        (
            "EM (data.em)",
            _histogram(em_sample, fit.em_thresholds, em_col),
            _overlay(em_slice, fit.em_thresholds, em_col),
        ),
    ]
    legend = []
    n_lm, n_em = len(fit.lm_fractions), len(fit.em_fractions)
    for i, targets in enumerate(fit.lm_to_em):
        ems = ", ".join(f"{group_name(j, n_em)} ({100 * fit.em_fractions[j]:.0f} %)" for j in targets)
        legend.append(
            (lm_col[i], f"ExM {group_name(i, n_lm)} ({100 * fit.lm_fractions[i]:.0f} %) -> EM {ems}")
        )
    col_w = 2 * _TILE
    body_h = max(t[2].height for t in tiles)
    height = _PAD + _TEXT + _HIST_H + _PAD + body_h + _PAD + (len(legend) + 1) * (_TEXT + 2) + _PAD
    canvas = Image.new("RGB", (2 * col_w + 3 * _PAD, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, (title, hist, over) in enumerate(tiles):
        x0 = _PAD + c * (col_w + _PAD)
        draw.text((x0, _PAD), f"{title}: histogram (log) | slice | groups", fill=(0, 0, 0))
        canvas.paste(hist, (x0 + (col_w - _TILE) // 2, _PAD + _TEXT))
        canvas.paste(over, (x0, _PAD + _TEXT + _HIST_H + _PAD))
    y = _PAD + _TEXT + _HIST_H + _PAD + body_h + _PAD
    for colour, text in legend:
        draw.rectangle([_PAD, y + 2, _PAD + 10, y + 12], fill=colour)
        draw.text((_PAD + 16, y), text, fill=(0, 0, 0))
        y += _TEXT + 2
    draw.text(
        (_PAD, y),
        f"score {fit.score:.3f} ({fit.polarity}; 1 = the mapped fractions are equal)",
        fill=(0, 0, 0),
    )
    return np.asarray(canvas)


def write_content_groups(
    out_dir: str | Path,
    fit: ContentGroups,
    lm_sample: np.ndarray,
    em_sample: np.ndarray,
    lm_slice: np.ndarray,
    em_slice: np.ndarray,
) -> tuple[Path, Path]:
    """Write ``content_groups.json`` (the fit, as stored in checkpoints, plus notes) and ``content_groups.png``
    into ``out_dir``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {**fit.as_config(), "notes": list(fit.notes)}
    json_path = out / "content_groups.json"
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    png_path = out / "content_groups.png"
    Image.fromarray(content_groups_panel(fit, lm_sample, em_sample, lm_slice, em_slice)).save(png_path)
    return json_path, png_path


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
