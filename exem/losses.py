"""Losses of the ExEM CycleGAN (published defaults).

All volumes are ``(B, 1, Z, Y, X)`` float tensors with intensities normalised to [0, 1]; domain A is light
microscopy (ExM, "LM"), domain B electron microscopy ("EM"). Discriminator outputs are lists of score maps,
one per scale (see :class:`exem.models.MultiScaleDiscriminator3D`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "IntensityGroupContentLoss",
    "LossWeights",
    "content_decay",
    "cycle_loss",
    "discriminator_loss",
    "identity_loss",
    "lsgan_loss",
]


def _as_score_list(scores: Sequence[Tensor] | Tensor) -> list[Tensor]:
    # A bare tensor is one scale; iterating it would silently split the batch dimension.
    out = [scores] if isinstance(scores, Tensor) else list(scores)
    if not out:
        raise ValueError("expected at least one score map, got an empty sequence")
    return out


def lsgan_loss(scores: Sequence[Tensor], target: float) -> Tensor:
    """Least-squares GAN loss summed over scales: ``Σ_s mean((scores[s] − target)²)``.

    Args:
        scores: one score map per discriminator scale, any shapes (a bare tensor counts as one scale).
        target: the label the scores should reach (1 for real, 0 for fake).

    Returns:
        a scalar tensor.
    """
    return sum(torch.mean((s - target) ** 2) for s in _as_score_list(scores))  # type: ignore[return-value]


def discriminator_loss(real_scores: Sequence[Tensor], fake_scores: Sequence[Tensor]) -> Tensor:
    """Discriminator LSGAN loss ``½·(lsgan(real, 1) + lsgan(fake, 0))``; scores are lists over scales.

    Returns:
        a scalar tensor.
    """
    return 0.5 * (lsgan_loss(real_scores, 1.0) + lsgan_loss(fake_scores, 0.0))


def cycle_loss(recovered: Tensor, original: Tensor) -> Tensor:
    """Cycle-consistency loss: mean absolute difference of ``(B, 1, Z, Y, X)`` volumes (normalised units).

    Returns:
        a scalar tensor.
    """
    return torch.mean(torch.abs(recovered - original))


def identity_loss(same: Tensor, original: Tensor) -> Tensor:
    """Identity loss, e.g. ``G_AB(b) ≈ b``: mean absolute difference of ``(B, 1, Z, Y, X)`` volumes.

    Returns:
        a scalar tensor.
    """
    return torch.mean(torch.abs(same - original))


def content_decay(step: int | Tensor, decay_steps: float) -> float | Tensor:
    """Weight multiplier of the content loss: ``2 ** (−step / decay_steps)`` (halves every ``decay_steps``).

    Args:
        step: the training batch counter (a Python int or a tensor).
        decay_steps: half-life in steps, > 0.

    Returns:
        a float for an int ``step``, a tensor for a tensor ``step``.
    """
    if not decay_steps > 0 or not math.isfinite(decay_steps):
        raise ValueError(f"content_decay: decay_steps must be a finite number > 0, got {decay_steps!r}")
    return 2.0 ** (-step / decay_steps)


@dataclass(frozen=True)
class LossWeights:
    """Weights of the generator loss terms (``model.loss`` without its ``content`` settings), published defaults.

    ``G = lambda_gan·(adv_AB + adv_BA) + lambda_cycle·cycle + lambda_content·2^(−batch/content_decay_steps)·content
    (+ lambda_identity·identity)``.
    """

    lambda_gan: float = 1.0
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.0
    lambda_content: float = 50.0
    content_decay_steps: float = 1000.0

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"model.loss.{name} must be a number ≥ 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not self.content_decay_steps > 0:
            raise ValueError("loss.content_decay_steps must be > 0")

    @classmethod
    def from_config(cls, loss: Mapping[str, Any] | None) -> LossWeights:
        """The weights in a ``model.loss`` mapping (its ``content`` settings aside); missing ones take the
        published values, unknown keys are refused in one line."""
        weights = {k: v for k, v in dict(loss or {}).items() if k != "content"}
        unknown = sorted(set(weights) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"model.loss: unknown key(s) {', '.join(unknown)}")
        return cls(**weights)


def _sigmoid_step(x: Tensor, threshold: float, slope: float) -> Tensor:
    """Soft step ``sigmoid(slope · (x − threshold))``: ≈ 1 above the threshold, ≈ 0 below."""
    return torch.sigmoid(slope * (x - threshold))


def intensity_groups(x: Tensor, thresholds: Sequence[float], slope: float) -> list[Tensor]:
    """Soft intensity groups of a ``(B, 1, Z, Y, X)`` volume in normalised units, numbered dark (0) → bright.

    With ``s(x, t) = sigmoid(slope · (x − t))`` and increasing thresholds ``t_1 < … < t_n``, group ``k`` is
    ``s(x, t_k) − s(x, t_{k+1})`` (with ``s(x, t_0) = 1`` and ``s(x, t_{n+1}) = 0``): one threshold gives
    ``[dark, bright]``, two give ``[dark, mid, bright]``.

    Each group is a tensor shaped like ``x`` with values in [0, 1]; the groups of a voxel sum to 1.
    """
    if len(thresholds) < 1:
        raise ValueError("intensity_groups needs at least one threshold")
    above = [_sigmoid_step(x, t, slope) for t in thresholds]
    groups = [1.0 - above[0]]
    groups += [lo - hi for lo, hi in zip(above[:-1], above[1:], strict=True)]
    groups.append(above[-1])
    return groups


MAX_GROUPS = 5
"""Most intensity groups per domain (thresholds + 1) the content loss and its fit accept."""


def _validate_thresholds(name: str, thresholds: Sequence[float]) -> tuple[float, ...]:
    if isinstance(thresholds, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of increasing floats in [0, 1], got {thresholds!r}")
    ts = tuple(float(t) for t in thresholds)
    if not 1 <= len(ts) < MAX_GROUPS:
        raise ValueError(
            f"{name} must hold 1 to {MAX_GROUPS - 1} thresholds (2 to {MAX_GROUPS} intensity groups), got {len(ts)}"
        )
    if not all(0.0 <= t <= 1.0 for t in ts):
        raise ValueError(f"{name} must lie in [0, 1] (normalised intensities), got {ts}")
    if any(b <= a for a, b in zip(ts[:-1], ts[1:], strict=True)):
        raise ValueError(f"{name} must be strictly increasing, got {ts}")
    return ts


def _index(name: str, value: int, n: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        i = operator.index(value)
    except TypeError:
        raise ValueError(f"{name}: group indices must be ints, got {value!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"{name}: group index {i} out of range 0..{n - 1}")
    return i


class IntensityGroupContentLoss(nn.Module):
    """Intensity-group content loss of the published ExEM code.

    Soft groups of intensities (see :func:`intensity_groups`) of each real volume must be covered by the
    mapped groups of its translation: LM group ``i`` of ``real_a`` by the sum of the EM groups
    ``lm_to_em[i]`` of ``fake_b``; EM group ``j`` of ``real_b`` by the LM group ``em_to_lm[j]`` of
    ``fake_a``. With ``L1(x, y) = mean|x − y|``::

        L = 2 / (n_lm + n_em) · [Σ_i L1(a_i, (Σ_{k ∈ lm_to_em[i]} fb_k) · a_i)
                                + Σ_j L1(b_j, fa_{em_to_lm[j]} · b_j)]

    Groups are numbered from dark (0) to bright in both domains. At the defaults this is the published
    ``2/5·[L1(a1, fb1·a1) + L1(a2, (fb2+fb3)·a2) + L1(b1, fa1·b1) + L1(b2, fa2·b2) + L1(b3, fa2·b3)]``
    (the published code numbers LM ``[bright, dark]`` and EM ``[mid, dark, bright]``): bright LM ↔ mid-grey EM,
    dark LM ↔ dark or bright EM, i.e. ``lm_to_em = [[0, 2], [1]]``, ``em_to_lm = [0, 1, 0]``. Which groups suit
    a stain is better fitted from the data: :func:`exem.content_groups.fit_content_groups`.

    Args:
        lm_thresholds: 1 to 4 increasing thresholds in normalised LM intensity (groups: see
            :func:`intensity_groups`).
        em_thresholds: 1 to 4 increasing thresholds in normalised EM intensity.
        slope: steepness ``k`` of the soft steps, per unit of normalised intensity, > 0.
        lm_to_em: for each LM group, the non-empty list of EM group indices that must cover it.
        em_to_lm: for each EM group, the LM group index that must cover it.
    """

    def __init__(
        self,
        lm_thresholds: Sequence[float] = (110 / 255,),
        em_thresholds: Sequence[float] = (120 / 255, 160 / 255),
        slope: float = 100.0,
        lm_to_em: Sequence[Sequence[int]] = ((0, 2), (1,)),
        em_to_lm: Sequence[int] = (0, 1, 0),
    ) -> None:
        super().__init__()
        self.lm_thresholds = _validate_thresholds("lm_thresholds", lm_thresholds)
        self.em_thresholds = _validate_thresholds("em_thresholds", em_thresholds)
        slope = float(slope)
        if not slope > 0 or not math.isfinite(slope):
            raise ValueError(f"slope must be a finite number > 0, got {slope!r}")
        self.slope = slope
        n_lm, n_em = len(self.lm_thresholds) + 1, len(self.em_thresholds) + 1

        if isinstance(lm_to_em, (str, bytes)) or len(lm_to_em) != n_lm:
            raise ValueError(f"lm_to_em needs one entry per LM group ({n_lm}), got {lm_to_em!r}")
        mapping: list[tuple[int, ...]] = []
        for i, targets in enumerate(lm_to_em):
            if isinstance(targets, (str, bytes)) or not isinstance(targets, Sequence) or len(targets) == 0:
                raise ValueError(
                    f"lm_to_em[{i}] must be a non-empty list of EM group indices, got {targets!r}"
                )
            mapping.append(tuple(_index(f"lm_to_em[{i}]", k, n_em) for k in targets))
        self.lm_to_em: tuple[tuple[int, ...], ...] = tuple(mapping)

        if isinstance(em_to_lm, (str, bytes)) or len(em_to_lm) != n_em:
            raise ValueError(f"em_to_lm needs one entry per EM group ({n_em}), got {em_to_lm!r}")
        self.em_to_lm: tuple[int, ...] = tuple(
            _index(f"em_to_lm[{j}]", k, n_lm) for j, k in enumerate(em_to_lm)
        )

    def extra_repr(self) -> str:
        return (
            f"lm_thresholds={self.lm_thresholds}, em_thresholds={self.em_thresholds}, slope={self.slope}, "
            f"lm_to_em={self.lm_to_em}, em_to_lm={self.em_to_lm}"
        )

    def forward(self, real_lm: Tensor, fake_em: Tensor, real_em: Tensor, fake_lm: Tensor) -> Tensor:
        """Content loss of one batch.

        Args:
            real_lm: ``(B, 1, Z, Y, X)`` real LM volume, normalised to [0, 1].
            fake_em: ``G_AB(real_lm)``, same shape, EM units.
            real_em: ``(B, 1, Z, Y, X)`` real EM volume, normalised to [0, 1] (its shape may
                differ from real_lm's).
            fake_lm: ``G_BA(real_em)``, same shape as ``real_em``, LM units.

        Returns:
            a scalar tensor.
        """
        a = intensity_groups(real_lm, self.lm_thresholds, self.slope)
        fb = intensity_groups(fake_em, self.em_thresholds, self.slope)
        b = intensity_groups(real_em, self.em_thresholds, self.slope)
        fa = intensity_groups(fake_lm, self.lm_thresholds, self.slope)

        terms: list[Tensor] = []
        for i, targets in enumerate(self.lm_to_em):
            cover = sum(fb[k] for k in targets)
            terms.append(torch.mean(torch.abs(a[i] - cover * a[i])))
        for j, k in enumerate(self.em_to_lm):
            terms.append(torch.mean(torch.abs(b[j] - fa[k] * b[j])))
        return (2.0 / len(terms)) * torch.stack(terms).sum()
