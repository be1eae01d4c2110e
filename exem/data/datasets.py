"""The torch datasets of training and validation: random unpaired LM/EM patches, fixed held-out patches, augmentation.

Patches are float32 ``(1, Z, Y, X)`` tensors in [0, 1] (normalised as the volumes say); training sample ``i`` is
a global sample id whose draw depends only on ``(seed, i)`` (see :mod:`exem.data.datamodule`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torchio as tio
from torch.utils.data import Dataset
from torchio.transforms.augmentation import RandomTransform

from exem.checks import fmt_voxels
from exem.data.grid import AXIS_NAMES
from exem.data.sampling import Coord, Region
from exem.data.volume import Volume, VolumeError

# ----------------------------------------------------------------------------------------------------
# augmentation


class RandomRot90InPlane(RandomTransform, tio.SpatialTransform):
    """Rotate by k·90° in the (Y, X) plane: the last two spatial axes of (C, Z, Y, X) tensors.

    k ∈ {0, 1, 2, 3} when Y == X, else k ∈ {0, 2} (shape-preserving). Randomness from torch's CPU RNG, like
    all torchio random transforms; one k per call, shared by all images of a subject.
    """

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        images = self.get_images(subject)
        if not images:
            return subject
        *_, h, w = images[0].data.shape
        k = int(torch.randint(0, 4, (1,)).item()) if h == w else 2 * int(torch.randint(0, 2, (1,)).item())
        if k:
            for image in images:
                image.set_data(torch.rot90(image.data, k, dims=(-2, -1)).contiguous())
        return subject


def make_augmentation(patch_size: Sequence[int] = (2, 2, 2)) -> tio.Compose:
    """torchio: random flips on Z, Y, X (p = 0.5 each) and random in-plane 90° rotations of (C, Z, Y, X).

    Axes of size 1 in ``patch_size`` are not flipped (a no-op anyway; torchio 1.2 fails on flipping them).
    """
    axes = tuple(ax for ax in range(3) if int(patch_size[ax]) > 1)
    transforms: list[tio.Transform] = []
    if axes:
        transforms.append(tio.RandomFlip(axes=axes, flip_probability=0.5, copy=False))
    transforms.append(RandomRot90InPlane(copy=False))
    return tio.Compose(transforms)


def _seeded(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, seed: int) -> torch.Tensor:
    """Apply a torch-RNG-driven transform with the CPU RNG seeded from ``seed``; the RNG is restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(int(seed))
        return fn(x)


# ----------------------------------------------------------------------------------------------------
# datasets


def _slices(start: Sequence[int], patch: Sequence[int]) -> tuple[slice, slice, slice]:
    return tuple(slice(int(s), int(s) + int(p)) for s, p in zip(start, patch, strict=True))  # type: ignore[return-value]


def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)[None])


class UnpairedPatchDataset(Dataset):
    """Random unpaired LM and EM patches, balanced over volumes.

    Item ``i`` is a global sample id (any ``i ≥ 0``; ``len`` is the epoch length). It returns
    ``{"lm": float32 (1, Z, Y, X) in [0, 1], "em": float32 (1, Z, Y, X) in [0, 1]}``, drawn from
    ``np.random.default_rng([seed, i])``: a volume uniformly per domain, a start uniformly inside that
    volume's training region, and independent augmentations for LM and EM.

    Args:
        lm, em: the volumes of each domain.
        patch_size: (Z, Y, X) voxels.
        length: samples per epoch.
        lm_regions, em_regions: training region of each volume (default: the whole volume).
        seed: base seed.
        augment: random flips (all axes) and in-plane 90° rotations.
    """

    def __init__(
        self,
        lm: Sequence[Volume],
        em: Sequence[Volume],
        patch_size: Sequence[int],
        length: int,
        *,
        lm_regions: Sequence[Region] | None = None,
        em_regions: Sequence[Region] | None = None,
        seed: int = 0,
        augment: bool = True,
    ) -> None:
        if not lm or not em:
            raise VolumeError("UnpairedPatchDataset needs at least one LM and one EM volume")
        self.lm = list(lm)
        self.em = list(em)
        self.patch = tuple(int(p) for p in patch_size)
        self.length = int(length)
        self.lm_regions = (
            list(lm_regions) if lm_regions is not None else [Region((0, 0, 0), v.shape) for v in lm]
        )
        self.em_regions = (
            list(em_regions) if em_regions is not None else [Region((0, 0, 0), v.shape) for v in em]
        )
        for vols, regions in ((self.lm, self.lm_regions), (self.em, self.em_regions)):
            for v, r in zip(vols, regions, strict=True):
                for ax in range(3):
                    if self.patch[ax] > r.shape[ax]:
                        raise VolumeError(
                            f"{v.path}: patch {fmt_voxels(self.patch)} is larger than the training region"
                            f" {fmt_voxels(r.shape)} on axis {AXIS_NAMES[ax]}"
                        )
        self.seed = int(seed) % 2**63
        self.augment = bool(augment)
        self._transform = make_augmentation(self.patch) if self.augment else None

    def __len__(self) -> int:
        return self.length

    def _rng(self, i: int) -> np.random.Generator:
        if i < 0:
            raise IndexError(f"sample id must be ≥ 0, got {i}")
        return np.random.default_rng([self.seed, int(i)])

    def _pick(
        self, rng: np.random.Generator, regions: Sequence[Region], patch: Sequence[int] | None = None
    ) -> tuple[int, Coord]:
        v = int(rng.integers(len(regions)))
        r = regions[v]
        high = np.asarray(r.shape) - np.asarray(patch or self.patch) + 1
        start = tuple(int(o + s) for o, s in zip(r.offset, rng.integers(0, high), strict=True))
        return v, start  # type: ignore[return-value]

    def _draw(self, i: int) -> tuple[tuple[int, Coord], tuple[int, Coord], tuple[int, int]]:
        rng = self._rng(i)
        lm = self._pick(rng, self.lm_regions)
        em = self._pick(rng, self.em_regions)
        seeds = rng.integers(0, 2**62, size=2)
        return lm, em, (int(seeds[0]), int(seeds[1]))

    def sample_coords(self, i: int) -> dict[str, tuple[int, Coord]]:
        """``{"lm": (lm volume index, (z, y, x) start), "em": (em volume index, start)}`` of sample ``i``."""
        lm, em, _ = self._draw(i)
        return {"lm": lm, "em": em}

    def intensity_sample(self, patch: Sequence[int], n_patches: int, seed: int) -> dict[str, np.ndarray]:
        """Patches of each domain drawn as training draws them (a volume uniformly, a start uniformly in its
        training region) and normalised as training normalises them, without augmentation (flips and rotations
        do not change intensities).

        Args:
            patch: (Z, Y, X) voxels, at most the training patch.
            n_patches: patches per domain.
            seed: seed of the draw (independent of the training samples).

        Returns:
            ``{"lm": (N, Z, Y, X), "em": (N, Z, Y, X)}`` float32 in [0, 1].
        """
        patch = tuple(min(int(p), q) for p, q in zip(patch, self.patch, strict=True))
        out = {}
        for d, (name, vols, regions) in enumerate(
            (("lm", self.lm, self.lm_regions), ("em", self.em, self.em_regions))
        ):
            rng = np.random.default_rng([int(seed) % 2**63, d])
            picks = [self._pick(rng, regions, patch) for _ in range(int(n_patches))]
            out[name] = np.stack(
                [np.asarray(vols[v].read_normalized(_slices(start, patch)), np.float32) for v, start in picks]
            )
        return out

    def _patch(self, vol: Volume, start: Coord, seed: int) -> torch.Tensor:
        x = _tensor(vol.read_normalized(_slices(start, self.patch)))
        if self._transform is not None:
            x = _seeded(self._transform, x, seed).contiguous()
        return x

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        (v_lm, s_lm), (v_em, s_em), (seed_lm, seed_em) = self._draw(int(i))
        return {
            "lm": self._patch(self.lm[v_lm], s_lm, seed_lm),
            "em": self._patch(self.em[v_em], s_em, seed_em),
        }


class ValidationPatchDataset(Dataset):
    """Fixed held-out patches: item ``i`` → LM patch ``i % n_lm``, EM patch ``i % n_em`` (+ ``em_paired`` at LM).

    Returns ``{"lm": float32 (1, Z, Y, X) in [0, 1], "em": same, ["em_paired": same], "counted": float32 ()}``; no
    augmentation. Ids ``i ≥ len(self)`` are the padding of :class:`~exem.data.sampling.ValidationSampler` under DDP:
    item ``i mod len(self)`` with ``counted`` 0 (the validation metrics leave it out), else ``counted`` is 1.
    ``lm_coords``/``em_coords`` are lists of (volume index, (z, y, x) start). ``paired`` pairs with LM volume 0.
    """

    def __init__(
        self,
        lm: Sequence[Volume],
        em: Sequence[Volume],
        lm_coords: Sequence[tuple[int, Coord]],
        em_coords: Sequence[tuple[int, Coord]],
        patch_size: Sequence[int],
        paired: Volume | None = None,
    ) -> None:
        if not lm_coords or not em_coords:
            raise VolumeError("validation needs at least one LM and one EM patch")
        self.lm, self.em = list(lm), list(em)
        self.lm_coords, self.em_coords = list(lm_coords), list(em_coords)
        self.patch = tuple(int(p) for p in patch_size)
        self.paired = paired
        if paired is not None and any(v != 0 for v, _ in self.lm_coords):
            raise VolumeError("paired validation needs all LM patches from LM volume 0")

    def __len__(self) -> int:
        return max(len(self.lm_coords), len(self.em_coords))

    def coords(self, i: int) -> dict[str, tuple[int, Coord]]:
        """``{"lm": (lm volume index, start), "em": (em volume index, start)}`` of item ``i``."""
        return {"lm": self.lm_coords[i % len(self.lm_coords)], "em": self.em_coords[i % len(self.em_coords)]}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < 0:
            raise IndexError(f"validation item {i} out of range ({len(self)} items)")
        counted = i < len(self)
        i %= len(self)
        c = self.coords(i)
        (v_lm, s_lm), (v_em, s_em) = c["lm"], c["em"]
        out = {
            "lm": _tensor(self.lm[v_lm].read_normalized(_slices(s_lm, self.patch))),
            "em": _tensor(self.em[v_em].read_normalized(_slices(s_em, self.patch))),
        }
        if self.paired is not None:
            out["em_paired"] = _tensor(self.paired.read_normalized(_slices(s_lm, self.patch)))
        out["counted"] = torch.tensor(1.0 if counted else 0.0)
        return out
