"""The content-group fit as data: its settings, its record and that record's text forms (table, YAML, JSON).

How the groups are fitted is described in :mod:`exem.content_groups` and done in
:mod:`exem.content_groups_fit`; the picture and the files are written by :mod:`exem.content_groups_report`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from exem.losses import MAX_GROUPS

STAINS = ("pan_protein", "direct")
"""Stain priors: ``pan_protein`` (NHS-ester: dense protein bright in ExM, dark in EM) and ``direct``."""

OTSU_BINS = 256
"""Histogram bins of the Otsu fit over [0, 1] (threshold resolution 1/256)."""

# Loss keyword arguments that a fit sets, and the record it adds next to them in ``model.loss.content``.
FIT_KEYS = ("lm_thresholds", "em_thresholds", "lm_to_em", "em_to_lm")
RECORD_KEYS = ("lm_fractions", "em_fractions", "score", "stain", "polarity", "voxels", "saturated", "skew")


class CalibrationError(ValueError):
    """Data that content groups cannot be fitted to (constant, too few distinct values, NaN); one line."""


def check_stain(stain: str | None) -> str | None:
    """``data.lm.stain``: one of :data:`STAINS`, or None (no prior on the ExM stain's polarity).

    Raises:
        CalibrationError: anything else (one line).
    """
    if stain is not None and stain not in STAINS:
        raise CalibrationError(f"data.lm.stain must be one of {', '.join(STAINS)} or null, got {stain!r}")
    return stain


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

    def report(self, json_path: Path | str, png_path: Path | str) -> str:
        """What ``exem-calibrate`` prints: sample sizes, the table, the choice, warnings, files, the YAML block to
        fix these groups, and the JSON line (last)."""
        lines = [f"exem-calibrate: content groups of {self.voxels[0]:,} ExM and {self.voxels[1]:,} EM voxels"]
        lines += [self.table(), f"chosen: {self.describe()}"]
        lines += [f"warning: {note}" for note in self.notes]
        lines += [
            f"picture: {png_path}   record: {json_path}",
            "to fix these groups in an experiment config:",
        ]
        lines += [self.yaml_block(), self.summary_json()]
        return "\n".join(lines)

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
