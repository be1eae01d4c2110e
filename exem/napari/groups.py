"""The content-loss intensity groups of an ExM volume, voxel by voxel: which structures fall into which group.

Training's content loss (:class:`exem.losses.IntensityGroupContentLoss`) splits normalised ExM intensities into soft
groups (:func:`exem.losses.intensity_groups`, numbered dark → bright). :func:`preview_content_groups` computes
those groups for a whole volume and labels each voxel with its strongest group, so that one can see, before
training, which structures each group holds. The thresholds are a checkpoint's, the published ExEM ones, or fitted
to the volume as training fits them (:func:`exem.content_groups.otsu_thresholds` on in-plane smoothed slices).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from exem.content_groups import ContentFitSettings, group_name, otsu_thresholds, smooth_inplane
from exem.losses import IntensityGroupContentLoss, intensity_groups

__all__ = [
    "GROUP_COLOURS",
    "ContentGroupPreview",
    "fit_lm_thresholds",
    "group_labels",
    "preview_content_groups",
]

# Voxels per slab of the soft-group computation (the groups of a slab are held in float32 at once).
SLAB_VOXELS = 1 << 22
# One colour per ExM group, dark → bright: the hues of exem-calibrate's content_groups.png.
GROUP_COLOURS = ((60, 120, 255), (255, 140, 0), (40, 200, 90), (220, 60, 200), (240, 220, 40))


@dataclass(frozen=True)
class ContentGroupPreview:
    """The content groups of a volume.

    Attributes:
        labels: (Z, Y, X) uint8, 1 + the index of each voxel's strongest group (1 = darkest); 0 is not used.
        thresholds: increasing thresholds in normalised [0, 1] intensity.
        slope: steepness of the soft steps (per unit of normalised intensity).
        fractions: fraction of the volume's voxels in each group, dark → bright.
        source: where the thresholds came from: ``fit`` | ``checkpoint`` | ``published``.
    """

    labels: np.ndarray
    thresholds: tuple[float, ...]
    slope: float
    fractions: tuple[float, ...]
    source: str

    @property
    def names(self) -> list[str]:
        """``dark``, ``mid``…, ``bright``: one name per group."""
        n = len(self.fractions)
        return [group_name(i, n) for i in range(n)]

    def describe(self) -> str:
        """One line: ``ExM content groups (fit): dark 61 % | 0.412 | bright 39 %``."""
        parts = [f"{name} {100 * f:.0f} %" for name, f in zip(self.names, self.fractions, strict=True)]
        line = parts[0]
        for t, part in zip(self.thresholds, parts[1:], strict=True):
            line += f" | {t:.3f} | {part}"
        return f"ExM content groups ({self.source}): {line}"

    def colours(self) -> dict[int | None, tuple[float, float, float, float]]:
        """RGBA in [0, 1] per label (1 = darkest group), the colours of ``content_groups.png``; 0 transparent."""
        out: dict[int | None, tuple[float, float, float, float]] = {None: (0.0, 0.0, 0.0, 0.0)}
        out[0] = (0.0, 0.0, 0.0, 0.0)
        for i in range(len(self.fractions)):
            r, g, b = GROUP_COLOURS[i % len(GROUP_COLOURS)]
            out[i + 1] = (r / 255, g / 255, b / 255, 1.0)
        return out

    def features(self) -> dict[str, list[Any]]:
        """A napari labels ``features`` table: label index, group name, fraction of the volume."""
        n = len(self.fractions)
        return {"index": list(range(1, n + 1)), "group": self.names, "fraction": list(self.fractions)}


def fit_lm_thresholds(
    x: np.ndarray, groups: int | None = None, settings: ContentFitSettings | None = None
) -> tuple[float, ...]:
    """Multi-level Otsu thresholds of a normalised ExM volume, as training's fit finds them for the LM domain.

    Args:
        x: (Z, Y, X) float32 in [0, 1].
        groups: number of groups (2 to 5); None → ``settings.lm_groups``.
        settings: the fit's settings (in-plane smoothing ``smooth_sigma``, ``sample_voxels``); None → defaults.
            Evenly spaced Z slices holding about ``sample_voxels`` voxels are used.

    Raises:
        CalibrationError: constant data, or fewer distinct levels than groups (one line).
    """
    settings = settings or ContentFitSettings()
    n = settings.lm_groups if groups is None else int(groups)
    z, y, xx = x.shape
    slices = max(1, min(z, settings.sample_voxels // max(1, y * xx)))
    index = np.unique(np.linspace(0, z - 1, slices).round().astype(np.int64))
    sample = smooth_inplane(x[index], settings.smooth_sigma)
    return otsu_thresholds(sample, n, "ExM layer")


def group_labels(x: np.ndarray, thresholds: Sequence[float], slope: float) -> np.ndarray:
    """(Z, Y, X) uint8: 1 + the argmax over :func:`exem.losses.intensity_groups` of each voxel (1 = darkest).

    Args:
        x: (Z, Y, X) normalised intensities in [0, 1].
        thresholds: increasing thresholds in [0, 1].
        slope: steepness of the soft steps.
    """
    z, y, xx = x.shape
    out = np.empty(x.shape, dtype=np.uint8)
    step = max(1, SLAB_VOXELS // max(1, y * xx))
    for z0 in range(0, z, step):
        slab = torch.from_numpy(np.ascontiguousarray(x[z0 : z0 + step], dtype=np.float32))[None, None]
        strongest = torch.stack(intensity_groups(slab, thresholds, slope)).argmax(dim=0)[0, 0]
        out[z0 : z0 + step] = (strongest + 1).to(torch.uint8).numpy()
    return out


def preview_content_groups(
    x: np.ndarray,
    *,
    content: Mapping[str, Any] | None = None,
    groups: int | None = None,
    published: bool = False,
) -> ContentGroupPreview:
    """The content groups of a normalised ExM volume.

    Args:
        x: (Z, Y, X) float32 in [0, 1], normalised as training normalises the ExM.
        content: a checkpoint's ``model.loss.content`` (its ``lm_thresholds`` and ``slope``), or None.
        groups: groups of a fit (2 to 5); None → training's default.
        published: the published ExEM thresholds (with no ``content``).

    Returns:
        the labels with the thresholds, slope and fractions used.
    """
    defaults = IntensityGroupContentLoss()
    slope = float(defaults.slope)
    if content is not None:
        thresholds = tuple(float(t) for t in content["lm_thresholds"])
        slope = float(content.get("slope", slope))
        source = "checkpoint"
    elif published:
        thresholds, source = tuple(defaults.lm_thresholds), "published"
    else:
        thresholds, source = fit_lm_thresholds(x, groups), "fit"
    IntensityGroupContentLoss(  # validates the thresholds and the slope (one-line ValueError)
        lm_thresholds=thresholds, slope=slope, lm_to_em=[[0]] * (len(thresholds) + 1), em_to_lm=[0] * 3
    )
    labels = group_labels(x, thresholds, slope)
    counts = np.bincount(labels.ravel(), minlength=len(thresholds) + 2)[1:]
    fractions = tuple(float(c) / max(1, labels.size) for c in counts)
    return ContentGroupPreview(labels, thresholds, slope, fractions, source)
