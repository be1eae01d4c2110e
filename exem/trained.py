"""A trained generator and what is known about how it was trained: one typed record, not attributes on a module.

:func:`exem.checkpoints.load_generator` returns a :class:`TrainedGenerator`; translation, reliability maps,
evaluation and export read the training facts from it (the LM normalisation, voxel size and patch), and a plain
``nn.Module`` is accepted everywhere too (:func:`as_trained`: nothing known about its training).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

__all__ = [
    "DIRECTIONS",
    "NETWORK_OF_DIRECTION",
    "TrainedGenerator",
    "as_trained",
    "check_direction",
    "trained_normalization",
]

# The two generators of the CycleGAN: ExM (LM) → EM and EM → ExM; "AB" / "BA" (the networks' names in the
# checkpoint, G_AB / G_BA) are accepted for them.
DIRECTIONS: tuple[str, ...] = ("lm_to_em", "em_to_lm")
NETWORK_OF_DIRECTION = {"lm_to_em": "AB", "em_to_lm": "BA"}
_ALIASES = {"AB": "lm_to_em", "BA": "em_to_lm", "ab": "lm_to_em", "ba": "em_to_lm"}


def check_direction(direction: str) -> str:
    """``lm_to_em`` or ``em_to_lm`` (``AB`` / ``BA`` accepted as their network names).

    Raises:
        ValueError: anything else (one line).
    """
    text = str(direction)
    text = _ALIASES.get(text, text)
    if text not in DIRECTIONS:
        raise ValueError(f"direction must be lm_to_em (AB) or em_to_lm (BA), got {direction!r}")
    return text


@dataclass(frozen=True, eq=False)
class TrainedGenerator:
    """A generator network with the facts of its training.

    Attributes:
        network: the module ``(B, 1, Z, Y, X)`` float32 in [0, 1] → ``(B, 1, Z, Y, X)``, in eval mode.
        direction: ``lm_to_em`` (ExM → virtual EM, ``G_AB``) or ``em_to_lm`` (``G_BA``).
        voxel_size_nm: (z, y, x) nm of the LM training data; None when unknown (e.g. published ``.pth`` files).
        lm_normalization: how the LM input was normalised in training (``{"intensity_range": [lo, hi] | None,
            "percentiles": [lo %, hi %] | None}``); None when unknown.
        training_patch: (z, y, x) voxels of the training patches (the default inference patch); None when unknown.
        content_groups: the content-loss groups it was trained with (``model.loss.content``), when known.
        source: the path it was loaded from (or a description).
        checkpoint_kind: ``lightning`` | ``exported`` | ``state_dict`` | ``module``.
    """

    network: nn.Module
    direction: str = "lm_to_em"
    voxel_size_nm: tuple[float, float, float] | None = None
    lm_normalization: Mapping[str, Any] | None = None
    training_patch: tuple[int, int, int] | None = None
    content_groups: Mapping[str, Any] | None = None
    source: str = "in-memory module"
    checkpoint_kind: str = "module"

    @property
    def widths(self) -> tuple[int, ...] | None:
        """The U-Net's channel widths (None for other networks)."""
        widths = getattr(self.network, "widths", None)
        return None if widths is None else tuple(int(w) for w in widths)

    def with_network(self, network: nn.Module) -> TrainedGenerator:
        """The same record around another network (e.g. a test-time-augmentation wrapper)."""
        return replace(self, network=network)

    def to(self, device: Any) -> TrainedGenerator:
        """Move the network (in place) to ``device``; returns ``self``."""
        self.network.to(device)
        return self


def as_trained(generator: TrainedGenerator | nn.Module) -> TrainedGenerator:
    """``generator`` as a :class:`TrainedGenerator`; a plain module gets a record with nothing known.

    Raises:
        ValueError: neither a record nor a torch module.
    """
    if isinstance(generator, TrainedGenerator):
        return generator
    if isinstance(generator, nn.Module):
        return TrainedGenerator(network=generator, source=type(generator).__name__)
    raise ValueError(f"expected a trained generator or a torch module, got {type(generator).__name__}")


def trained_normalization(
    generator: TrainedGenerator | nn.Module,
    intensity_range: Sequence[float] | None = None,
    percentiles: Sequence[float] | None = None,
) -> tuple[Sequence[float] | None, Sequence[float] | None]:
    """The ``(intensity_range, percentiles)`` to open ExM input for ``generator`` with.

    What the caller gives wins; when both are None, the normalisation the generator's training data had
    (:attr:`TrainedGenerator.lm_normalization`), else ``(None, None)``: the input's dtype range.
    """
    if intensity_range is not None or percentiles is not None:
        return intensity_range, percentiles
    trained = as_trained(generator).lm_normalization or {}
    return trained.get("intensity_range"), trained.get("percentiles")
