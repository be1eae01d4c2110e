"""Reliability maps: where virtual EM should not be trusted.

A generator that has learnt the data's structure gives (nearly) the same virtual EM for a patch and for a
rotated or mirrored copy of it; where it hallucinates, the copies disagree. :class:`TTAStd` runs a network on
the eight in-plane symmetries of a patch (the dihedral group D4: rotations by 0, 90, 180, 270 degrees in Y-X,
each with and without an X mirror), maps each output back, and returns the per-voxel standard deviation of the
eight. Z is never rotated into the plane: ExM and EM voxels are anisotropic.

:func:`reliability_map` writes this map for a whole volume as a translation of the wrapped generator: the same
blockwise engine, grid, blending, resumability and devices as the virtual EM, float16 in normalised intensity
units (``exem-translate … uncertainty=true`` writes it next to the virtual EM).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from exem.checks import check_input_shape
from exem.inference.translate import TranslateResult, translate_volume
from exem.trained import TrainedGenerator, as_trained

__all__ = ["D4", "UNCERTAINTY_NAME", "TTAStd", "d4_transforms", "default_uncertainty_path", "reliability_map"]

UNCERTAINTY_SUFFIX = "_uncertainty"
UNCERTAINTY_NAME = "virtual_em_std"

# (quarter turns in Y-X, mirror X): the 8 in-plane symmetries of a patch.
D4: tuple[tuple[int, bool], ...] = tuple((k, m) for k in range(4) for m in (False, True))
_YX = (-2, -1)


def _forward(x: Tensor, turns: int, mirror: bool) -> Tensor:
    y = torch.rot90(x, turns, dims=_YX) if turns else x
    return torch.flip(y, dims=(-1,)) if mirror else y


def _inverse(y: Tensor, turns: int, mirror: bool) -> Tensor:
    y = torch.flip(y, dims=(-1,)) if mirror else y
    return torch.rot90(y, -turns, dims=_YX) if turns else y


def d4_transforms(x: Tensor) -> Iterator[tuple[Tensor, tuple[int, bool]]]:
    """The 8 in-plane symmetric copies of ``(…, Y, X)`` with their (turns, mirror) keys, identity first."""
    for turns, mirror in D4:
        yield _forward(x, turns, mirror), (turns, mirror)


class TTAStd(nn.Module):
    """Per-voxel standard deviation of a network's outputs over the 8 in-plane symmetries of its input.

    ``(B, 1, Z, Y, X)`` in [0, 1] → ``(B, C, Z, Y, X)`` float32 (population standard deviation, same units as the
    network's output: normalised intensities for a generator). Y and X of the input must both suit the
    network (rotations swap them). The mean and spread are accumulated with Welford's update in float32.

    Attributes mirrored from ``net`` for the callers that read them: ``divisor``, ``widths``, ``voxel_size_nm``,
    ``check_input_shape``.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        for name in ("divisor", "widths"):
            if hasattr(net, name):
                setattr(self, name, getattr(net, name))

    def check_input_shape(self, patch: tuple[int, int, int]) -> None:
        """The network must take the patch and its 90°-rotated copy (Y and X swapped)."""
        for shape in (tuple(patch), (patch[0], patch[2], patch[1])):
            check_input_shape(self.net, shape)

    def forward(self, x: Tensor) -> Tensor:
        mean: Tensor | None = None
        m2: Tensor | None = None
        for n, (xt, (turns, mirror)) in enumerate(d4_transforms(x), start=1):
            y = _inverse(self.net(xt), turns, mirror).float()
            if mean is None or m2 is None:
                mean, m2 = y.clone(), torch.zeros_like(y)
                continue
            delta = y - mean
            mean += delta / n
            m2 += delta * (y - mean)
        assert m2 is not None
        return (m2 / len(D4)).clamp_min_(0.0).sqrt_()


def default_uncertainty_path(output: str | Path) -> Path:
    """``<dir>/<stem>_uncertainty.ome.zarr`` for an output ``<dir>/<stem>.ome.zarr`` (or ``<stem>.zarr``)."""
    out = Path(output)
    name = out.name
    for ext in (".ome.zarr", ".zarr"):
        if name.endswith(ext):
            return out.with_name(name[: -len(ext)] + UNCERTAINTY_SUFFIX + ext)
    return out.with_name(name + UNCERTAINTY_SUFFIX + ".ome.zarr")


def reliability_map(
    generator: TrainedGenerator | nn.Module,
    input: Any,  # noqa: A002 - mirrors translate_volume
    output: str | Path,
    **options: Any,
) -> TranslateResult:
    """Write the reliability map of ``generator`` over a whole volume: :class:`TTAStd` translated blockwise.

    Args:
        generator: as for :func:`~exem.inference.translate.translate_volume` (its training normalisation and voxel
            size apply).
        input: the ExM volume (path, :class:`~exem.data.volume.Volume` or array).
        output: the OME-Zarr written: per-voxel standard deviation of the virtual EM over the 8 in-plane
            symmetries, float16, normalised intensity units, multiscales name ``virtual_em_std``. Use
            :func:`default_uncertainty_path` to put it next to a translation.
        **options: the keyword arguments of ``translate_volume`` (patch, overlap, roi, trainer, overwrite, …) except
            ``dtype`` and ``name``; give the same as for the translation so that the two share one voxel grid.

    Returns:
        the :class:`~exem.inference.translate.TranslateResult` of the map.
    """
    for key in ("dtype", "name"):
        if key in options:
            raise ValueError(f"reliability_map writes float16 '{UNCERTAINTY_NAME}'; {key} cannot be set")
    trained = as_trained(generator)
    wrapped = trained.with_network(TTAStd(trained.network))
    return translate_volume(wrapped, input, output, dtype="float16", name=UNCERTAINTY_NAME, **options)
