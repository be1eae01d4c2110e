"""Unpaired random LM/EM patches for training, a fixed held-out grid for validation, as a LightningDataModule.

Randomness: training sample ``i`` is a *global* sample id; everything about it (which volumes, where, which
augmentation) comes from ``np.random.default_rng([seed, i])``, so a sample does not depend on workers, ranks
or batch order. :class:`EpochSampler` hands out ids ``e·n … (e+1)·n − 1`` in epoch ``e`` and, under DDP, shards
them across ranks itself (rank r of W takes every W-th id from r). Checkpoints record where the sampler was
(epoch, batches done), so a resumed run draws exactly what the uninterrupted run would have drawn. The
DataLoaders get their own ``torch.Generator``, so creating them never advances the global torch RNG (which the
model's replay buffers draw from).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
import torchio as tio
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchio.transforms.augmentation import RandomTransform

from exem.checks import fmt_voxels
from exem.content_groups import STAINS
from exem.data.grid import AXIS_NAMES, PatchGrid
from exem.data.volume import Volume, VolumeError, open_volumes

log = logging.getLogger(__name__)

Coord = tuple[int, int, int]
# Axis preference when choosing the validation axis: on ties Y wins, then X, then Z.
VAL_AXIS_PREFERENCE = (1, 2, 0)


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
# samplers and datasets


class EpochSampler(DistributedSampler):
    """Yields this process's global sample ids of epoch ``e``: ``e·n, …, (e+1)·n − 1`` on a single process.

    ``e`` is the value of the last :meth:`set_epoch` call (Lightning calls it at every epoch start), else
    ``epoch_fn()``, else 0. Under DDP (``world_size`` W > 1) rank r takes ``e·n + r, e·n + r + W, …``: ``n // W``
    ids each, the same number on every rank and no id on two ranks (the ``n mod W`` ids left over are not
    drawn). It shards by itself, so it is a ``DistributedSampler`` and Lightning does not wrap it again.

    Exact resumes: :meth:`resume_at` makes the next iteration start ``batches`` batches into an epoch (the first
    ``batches · batch_size`` ids of this rank are skipped, never read). While an iteration runs,
    :attr:`position` is ``(epoch, batches handed to training)``; :class:`ExEMDataModule` counts the batches and
    stores the position in checkpoints. Lives in the main process only.
    """

    def __init__(
        self,
        n: int,
        epoch_fn: Callable[[], int] | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1,
    ) -> None:
        # DistributedSampler.__init__ is not called: it wants a dataset and asks torch.distributed for the world.
        if n < 1:
            raise ValueError(f"EpochSampler needs n ≥ 1, got {n}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"EpochSampler: rank {rank} is not in a world of {world_size} process(es)")
        if n < world_size:
            raise ValueError(
                f"data.samples_per_epoch ({n}) must be at least the number of processes ({world_size})"
            )
        if batch_size < 1:
            raise ValueError(f"EpochSampler needs batch_size ≥ 1, got {batch_size}")
        self.n = int(n)
        self.epoch_fn = epoch_fn
        self.rank = self.global_rank = int(rank)
        self.num_replicas = self.world_size = int(world_size)
        self.batch_size = int(batch_size)
        self.num_samples = self.n // self.world_size
        self.total_size = self.num_samples * self.world_size
        self.shuffle = False
        self.drop_last = True
        self.seed = 0
        self._epoch: int | None = None
        self._resume: tuple[int, int] | None = None
        self.current_epoch: int | None = None  # epoch of the running iteration
        self.batches_done = 0  # batches of the running iteration handed to training (the DataModule counts)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    @property
    def epoch(self) -> int:
        if self._epoch is not None:
            return self._epoch
        return int(self.epoch_fn()) if self.epoch_fn is not None else 0

    @property
    def batches_per_epoch(self) -> int:
        """Batches per epoch on this rank (the last one may be smaller)."""
        return -(-self.num_samples // self.batch_size)

    @property
    def position(self) -> tuple[int, int] | None:
        """``(epoch, batches done)`` of the running iteration, or None before the first one."""
        return None if self.current_epoch is None else (self.current_epoch, self.batches_done)

    def resume_at(self, epoch: int, batches: int) -> None:
        """Start the next iteration ``batches`` batches into ``epoch`` (a whole epoch or more rolls over)."""
        epoch, batches = int(epoch), int(batches)
        if epoch < 0 or batches < 0:
            raise ValueError(f"EpochSampler.resume_at needs epoch, batches ≥ 0, got {epoch}, {batches}")
        extra, batches = divmod(batches, self.batches_per_epoch)
        self._resume = (epoch + extra, batches)

    def ids(self, epoch: int) -> range:
        """This rank's sample ids of ``epoch``, in order."""
        start = int(epoch) * self.n + self.rank
        return range(start, start + self.total_size, self.world_size)

    def __iter__(self) -> Iterator[int]:
        if self._resume is not None:
            epoch, skip = self._resume
            self._resume = None
        else:
            epoch, skip = self.epoch, 0
        self.current_epoch, self.batches_done = epoch, skip
        return iter(self.ids(epoch)[skip * self.batch_size :])

    def __len__(self) -> int:
        return self.num_samples


@dataclass(frozen=True)
class Region:
    """A box inside a volume: ``offset`` and ``shape``, both (z, y, x) voxels."""

    offset: Coord
    shape: Coord


@dataclass(frozen=True)
class Split:
    """Training and validation regions of one volume (split along ``axis``)."""

    axis: int
    train: Region
    val: Region


def split_volume(shape: Sequence[int], patch: Sequence[int], val_fraction: float, name: str) -> Split:
    """Hold out the last ``val_fraction`` of the axis with the most room (largest shape/patch; ties → Y).

    The held-out part is at least one patch long and leaves at least one patch for training.

    Raises:
        VolumeError: the patch does not fit, or there is no room for both a training and a validation patch.
    """
    shape = tuple(int(s) for s in shape)
    patch = tuple(int(p) for p in patch)
    for ax in range(3):
        if patch[ax] > shape[ax]:
            raise VolumeError(
                f"{name}: patch {fmt_voxels(patch)} is larger than the volume {fmt_voxels(shape)}"
                f" on axis {AXIS_NAMES[ax]}"
            )
    axis = VAL_AXIS_PREFERENCE[0]
    for ax in VAL_AXIS_PREFERENCE[1:]:
        if shape[ax] / patch[ax] > shape[axis] / patch[axis]:
            axis = ax
    s, p = shape[axis], patch[axis]
    if s < 2 * p:
        raise VolumeError(
            f"{name}: volume {fmt_voxels(shape)} has no room for a training and a validation patch {fmt_voxels(patch)}"
            f" (needs {2 * p} voxels along axis {AXIS_NAMES[axis]}, has {s});"
            " use a smaller patch or more data"
        )
    val_len = min(max(p, int(round(val_fraction * s))), s - p)
    train_len = s - val_len
    train_shape = list(shape)
    train_shape[axis] = train_len
    val_shape = list(shape)
    val_shape[axis] = val_len
    val_offset = [0, 0, 0]
    val_offset[axis] = train_len
    return Split(
        axis=axis,
        train=Region((0, 0, 0), tuple(train_shape)),  # type: ignore[arg-type]
        val=Region(tuple(val_offset), tuple(val_shape)),  # type: ignore[arg-type]
    )


def _slices(start: Sequence[int], patch: Sequence[int]) -> tuple[slice, slice, slice]:
    return tuple(slice(int(s), int(s) + int(p)) for s, p in zip(start, patch, strict=True))  # type: ignore[return-value]


def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)[None])


class UnpairedPatchDataset(Dataset):
    """Random unpaired LM (A) and EM (B) patches, balanced over volumes.

    Item ``i`` is a global sample id (any ``i ≥ 0``; ``len`` is the epoch length). It returns
    ``{"A": float32 (1, Z, Y, X) in [0, 1], "B": float32 (1, Z, Y, X) in [0, 1]}``, drawn from
    ``np.random.default_rng([seed, i])``: a volume uniformly per domain, a start uniformly inside that
    volume's training region, and independent augmentations for A and B.

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
        a = self._pick(rng, self.lm_regions)
        b = self._pick(rng, self.em_regions)
        seeds = rng.integers(0, 2**62, size=2)
        return a, b, (int(seeds[0]), int(seeds[1]))

    def sample_coords(self, i: int) -> dict[str, tuple[int, Coord]]:
        """``{"A": (lm volume index, (z, y, x) start), "B": (em volume index, start)}`` of sample ``i``."""
        a, b, _ = self._draw(i)
        return {"A": a, "B": b}

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
        (va, sa), (vb, sb), (seed_a, seed_b) = self._draw(int(i))
        return {"A": self._patch(self.lm[va], sa, seed_a), "B": self._patch(self.em[vb], sb, seed_b)}


class ValidationPatchDataset(Dataset):
    """Fixed held-out patches: item ``i`` → A patch ``i % nA``, B patch ``i % nB`` (+ ``B_paired`` at A).

    Returns ``{"A": float32 (1, Z, Y, X) in [0, 1], "B": same, ["B_paired": same]}``; no augmentation.
    ``a_coords``/``b_coords`` are lists of (volume index, (z, y, x) start). ``paired`` pairs with LM volume 0.
    """

    def __init__(
        self,
        lm: Sequence[Volume],
        em: Sequence[Volume],
        a_coords: Sequence[tuple[int, Coord]],
        b_coords: Sequence[tuple[int, Coord]],
        patch_size: Sequence[int],
        paired: Volume | None = None,
    ) -> None:
        if not a_coords or not b_coords:
            raise VolumeError("validation needs at least one LM and one EM patch")
        self.lm, self.em = list(lm), list(em)
        self.a_coords, self.b_coords = list(a_coords), list(b_coords)
        self.patch = tuple(int(p) for p in patch_size)
        self.paired = paired
        if paired is not None and any(v != 0 for v, _ in self.a_coords):
            raise VolumeError("paired validation needs all A patches from LM volume 0")

    def __len__(self) -> int:
        return max(len(self.a_coords), len(self.b_coords))

    def coords(self, i: int) -> dict[str, tuple[int, Coord]]:
        """``{"A": (lm volume index, start), "B": (em volume index, start)}`` of item ``i``."""
        return {"A": self.a_coords[i % len(self.a_coords)], "B": self.b_coords[i % len(self.b_coords)]}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"validation item {i} out of range ({len(self)} items)")
        c = self.coords(i)
        (va, sa), (vb, sb) = c["A"], c["B"]
        out = {
            "A": _tensor(self.lm[va].read_normalized(_slices(sa, self.patch))),
            "B": _tensor(self.em[vb].read_normalized(_slices(sb, self.patch))),
        }
        if self.paired is not None:
            out["B_paired"] = _tensor(self.paired.read_normalized(_slices(sa, self.patch)))
        return out


def _spread(items: list, k: int) -> list:
    """At most ``k`` items, evenly spread over the list (first and last included)."""
    if len(items) <= k:
        return items
    idx = np.round(np.linspace(0, len(items) - 1, k)).astype(int)
    return [items[i] for i in idx]


# ----------------------------------------------------------------------------------------------------
# datamodule


def _volume_config(cfg: Mapping[str, Any] | None, name: str) -> tuple[Any, dict[str, Any]]:
    """(path or list of paths, open_volume keyword arguments) of one domain's config mapping."""
    if cfg is None or not hasattr(cfg, "get"):
        raise VolumeError(f"data.{name}: expected a mapping with a 'path', got {cfg!r}")
    path = cfg.get("path")
    if path is None or path == "" or path == []:
        raise VolumeError(f"data.{name}.path is not set")
    path = str(path) if isinstance(path, str) or not isinstance(path, Sequence) else [str(p) for p in path]

    def opt(key: str) -> list[float] | None:
        v = cfg.get(key)
        return None if v is None else [float(x) for x in v]

    level = cfg.get("level")
    kwargs = {
        "level": None if level is None else int(level),
        "voxel_size": opt("voxel_size"),
        "intensity_range": opt("intensity_range"),
        "percentiles": opt("percentiles"),
    }
    return path, kwargs


class ExEMDataModule(L.LightningDataModule):
    """LM (domain A, ExM) and EM (domain B) volumes → unpaired training patches and a fixed validation set.

    Batches are ``{"A": float32 (B, 1, Z, Y, X) in [0, 1], "B": same}``; validation batches add
    ``"B_paired"`` (the ``em_paired`` volume at the A patch's coordinates) when ``em_paired`` is set.

    Args:
        lm, em: mappings with ``path`` (a store, OME-Zarr, TIFF, a folder of ``*.zarr`` or a list of those),
            ``level``, ``voxel_size`` ([z, y, x] nm), ``intensity_range`` ([lo, hi]),
            ``percentiles`` ([lo, hi]); ``lm`` also ``stain`` (``pan_protein`` | ``direct`` | None), the prior
            of the content-group fit (:mod:`exem.content_groups`).
        patch_size: (Z, Y, X) voxels; Z = 1 for 2D training.
        batch_size, num_workers: DataLoader settings.
        samples_per_epoch: training samples per epoch (over all ranks).
        val_fraction: part of each volume held out for validation, along its axis with the most room.
        val_patches: at most this many validation patches per domain.
        seed: base seed of all sampling and augmentation.
        augment: random flips on all axes and in-plane 90° rotations during training.
        em_paired: optional EM of the same sample as LM volume 0 (same shape), for paired validation metrics.
        pin_memory: page-locked batches for faster, asynchronous host→GPU copies; None = on when the trainer runs
            on a CUDA device.
        persistent_workers, prefetch_factor: DataLoader settings (only with workers).
    """

    def __init__(
        self,
        lm: Mapping[str, Any],
        em: Mapping[str, Any],
        patch_size: Sequence[int] = (16, 256, 256),
        batch_size: int = 1,
        num_workers: int = 0,
        samples_per_epoch: int = 1000,
        val_fraction: float = 0.1,
        val_patches: int = 8,
        seed: int = 0,
        augment: bool = True,
        em_paired: Mapping[str, Any] | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
    ) -> None:
        super().__init__()
        patch = tuple(int(p) for p in patch_size)
        if len(patch) != 3 or min(patch) < 1:
            raise ValueError(f"data.patch_size must be 3 positive values (z, y, x), got {list(patch_size)}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be ≥ 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be ≥ 0, got {num_workers}")
        if samples_per_epoch < 1:
            raise ValueError(f"data.samples_per_epoch must be ≥ 1, got {samples_per_epoch}")
        if not 0.0 < float(val_fraction) < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if val_patches < 1:
            raise ValueError(f"data.val_patches must be ≥ 1, got {val_patches}")
        if prefetch_factor is not None and prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor must be ≥ 1 or null, got {prefetch_factor}")
        stain = lm.get("stain") if hasattr(lm, "get") else None
        if stain is not None and stain not in STAINS:
            raise ValueError(f"data.lm.stain must be one of {', '.join(STAINS)} or null, got {stain!r}")
        self.lm_stain: str | None = stain
        self.lm_cfg = lm
        self.em_cfg = em
        self.em_paired_cfg = em_paired
        self.patch_size: Coord = patch  # type: ignore[assignment]
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.samples_per_epoch = int(samples_per_epoch)
        self.val_fraction = float(val_fraction)
        self.val_patches = int(val_patches)
        self.seed = int(seed)
        self.augment = bool(augment)
        self.pin_memory = None if pin_memory is None else bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.prefetch_factor = None if prefetch_factor is None else int(prefetch_factor)

        self.lm_volumes: list[Volume] = []
        self.em_volumes: list[Volume] = []
        self.em_paired_volume: Volume | None = None
        self.lm_splits: list[Split] = []
        self.em_splits: list[Split] = []
        self.train_dataset: UnpairedPatchDataset | None = None
        self.val_dataset: ValidationPatchDataset | None = None
        self._train_sampler: EpochSampler | None = None
        self._resume_position: tuple[int, int] | None = None  # (epoch, batches) from a checkpoint

    # -- setup

    def setup(self, stage: str | None = None) -> None:
        """Open the volumes (metadata and a bounded sample), split them, build the datasets. Idempotent."""
        if self.train_dataset is not None:
            return
        lm_path, lm_kw = _volume_config(self.lm_cfg, "lm")
        em_path, em_kw = _volume_config(self.em_cfg, "em")
        self.lm_volumes = open_volumes(lm_path, **lm_kw)
        self.em_volumes = open_volumes(em_path, **em_kw)
        self.lm_splits = [
            split_volume(v.shape, self.patch_size, self.val_fraction, v.path) for v in self.lm_volumes
        ]
        self.em_splits = [
            split_volume(v.shape, self.patch_size, self.val_fraction, v.path) for v in self.em_volumes
        ]

        if self.em_paired_cfg is not None:
            p_path, p_kw = _volume_config(self.em_paired_cfg, "em_paired")
            paired = open_volumes(p_path, **p_kw)
            if len(paired) != 1:
                raise VolumeError(f"data.em_paired.path must be one volume, got {len(paired)} ({p_path})")
            self.em_paired_volume = paired[0]
            ref = self.lm_volumes[0]
            if self.em_paired_volume.shape != ref.shape:
                raise VolumeError(
                    f"{self.em_paired_volume.path}: paired EM shape {fmt_voxels(self.em_paired_volume.shape)}"
                    f" differs from the LM volume {ref.path} ({fmt_voxels(ref.shape)}); they must be voxel-aligned"
                )
        self._log_voxel_sizes()

        self.train_dataset = UnpairedPatchDataset(
            self.lm_volumes,
            self.em_volumes,
            self.patch_size,
            self.samples_per_epoch,
            lm_regions=[s.train for s in self.lm_splits],
            em_regions=[s.train for s in self.em_splits],
            seed=self.seed,
            augment=self.augment,
        )
        lm_for_val = self.lm_splits[:1] if self.em_paired_volume is not None else self.lm_splits
        a_coords = _spread(self._grid_coords(lm_for_val), self.val_patches)
        b_coords = _spread(self._grid_coords(self.em_splits), self.val_patches)
        self.val_dataset = ValidationPatchDataset(
            self.lm_volumes,
            self.em_volumes,
            a_coords,
            b_coords,
            self.patch_size,
            paired=self.em_paired_volume,
        )
        log.info(
            "data: %d LM / %d EM volume(s), patch %s, %d training samples per epoch, %d validation items",
            len(self.lm_volumes),
            len(self.em_volumes),
            fmt_voxels(self.patch_size),
            self.samples_per_epoch,
            len(self.val_dataset),
        )

    def intensity_sample(self, patch: Sequence[int], n_patches: int, seed: int) -> dict[str, np.ndarray]:
        """Training-normalised patches of both domains for the content-group fit, and a picture slice of each.

        Returns:
            ``{"lm", "em"}``: ``(N, Z, Y, X)`` float32 in [0, 1] (:meth:`UnpairedPatchDataset.intensity_sample`);
            ``{"lm_slice", "em_slice"}``: ``(Y, X)`` float32 in [0, 1], the middle Z slice of each domain's first
            volume (its central 256 × 256 voxels at most).
        """
        self._require_setup()
        assert self.train_dataset is not None
        out = self.train_dataset.intensity_sample(patch, n_patches, seed)
        for name, vol in (("lm", self.lm_volumes[0]), ("em", self.em_volumes[0])):
            z, y, x = vol.shape
            h, w = min(y, 256), min(x, 256)
            y0, x0 = (y - h) // 2, (x - w) // 2
            sl = vol.read_normalized((slice(z // 2, z // 2 + 1), slice(y0, y0 + h), slice(x0, x0 + w)))
            out[f"{name}_slice"] = np.asarray(sl, np.float32)[0]
        return out

    def _grid_coords(self, splits: Sequence[Split]) -> list[tuple[int, Coord]]:
        coords = []
        for v, split in enumerate(splits):
            grid = PatchGrid(split.val.shape, self.patch_size, 0)
            off = split.val.offset
            coords.extend((v, (s[0] + off[0], s[1] + off[1], s[2] + off[2])) for s in grid)
        return coords

    def _log_voxel_sizes(self) -> None:
        lm = {v.voxel_size_nm for v in self.lm_volumes}
        em = {v.voxel_size_nm for v in self.em_volumes}
        log.info("voxel sizes (nm, z y x): LM %s, EM %s", sorted(lm, key=str), sorted(em, key=str))
        if None not in lm and None not in em and lm != em:
            log.warning(
                "LM and EM voxel sizes differ (%s vs %s); patches are taken in voxels, not resampled",
                sorted(lm),
                sorted(em),
            )

    # -- dataloaders

    def _current_epoch(self) -> int:
        trainer = self.trainer
        return int(trainer.current_epoch) if trainer is not None else 0

    def _pin_memory(self) -> bool:
        """``pin_memory`` as configured; None → whether the trainer runs this process on a CUDA device."""
        if self.pin_memory is not None:
            return self.pin_memory
        strategy = getattr(self.trainer, "strategy", None)
        return strategy is not None and strategy.root_device.type == "cuda"

    def _loader_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "pin_memory": self._pin_memory(),
        }
        if self.num_workers > 0:
            kw["persistent_workers"] = self.persistent_workers
            if self.prefetch_factor is not None:
                kw["prefetch_factor"] = self.prefetch_factor
        return kw

    def _require_setup(self) -> None:
        if self.train_dataset is None or self.val_dataset is None:
            self.setup()

    def train_dataloader(self) -> DataLoader:
        """Random unpaired patches: ``{"A": (B, 1, Z, Y, X), "B": (B, 1, Z, Y, X)}``, float32 in [0, 1]."""
        self._require_setup()
        assert self.train_dataset is not None
        trainer = self.trainer
        sampler = EpochSampler(
            len(self.train_dataset),
            self._current_epoch,
            rank=int(getattr(trainer, "global_rank", 0)),
            world_size=int(getattr(trainer, "world_size", 1)),
            batch_size=self.batch_size,
        )
        if self._resume_position is not None:
            sampler.resume_at(*self._resume_position)
            self._resume_position = None
        self._train_sampler = sampler
        return DataLoader(
            self.train_dataset,
            sampler=sampler,
            drop_last=False,
            generator=self._loader_generator(),
            **self._loader_kwargs(),
        )

    def val_dataloader(self) -> DataLoader:
        """Fixed held-out patches: ``{"A", "B"[, "B_paired"]}``, each (B, 1, Z, Y, X) float32 in [0, 1]."""
        self._require_setup()
        assert self.val_dataset is not None
        return DataLoader(
            self.val_dataset, shuffle=False, generator=self._loader_generator(), **self._loader_kwargs()
        )

    def _loader_generator(self) -> torch.Generator:
        """A private generator for the DataLoader's worker base seed (not the global torch RNG)."""
        return torch.Generator().manual_seed(self.seed % 2**63)

    # -- exact resumes

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the training batches handed to the model (the sampler's position saved in checkpoints)."""
        trainer = self.trainer
        if self._train_sampler is not None and trainer is not None and getattr(trainer, "training", False):
            self._train_sampler.batches_done += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Where the training sampler is: ``{"epoch", "batches", "samples_per_epoch", "batch_size", "world_size"}``.

        Saved in Lightning checkpoints (called on every rank; the ranks are in step, rank 0's copy is written).
        """
        sampler = self._train_sampler
        position = sampler.position if sampler is not None else None
        if position is None:
            position = self._resume_position
        if position is None:
            return {}
        return {
            "epoch": int(position[0]),
            "batches": int(position[1]),
            "samples_per_epoch": self.samples_per_epoch,
            "batch_size": self.batch_size,
            "world_size": int(sampler.world_size) if sampler is not None else 1,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue sampling where a checkpoint left off (next training DataLoader starts there)."""
        if not state:
            return
        trainer = self.trainer
        now = {
            "samples_per_epoch": self.samples_per_epoch,
            "batch_size": self.batch_size,
            "world_size": int(getattr(trainer, "world_size", 1)),
        }
        changed = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
        if changed:
            log.warning(
                "resuming with other sampling settings (%s): patches are drawn from the start of the epoch",
                ", ".join(f"{k} {old} → {new}" for k, (old, new) in changed.items()),
            )
            return
        self._resume_position = (int(state["epoch"]), int(state["batches"]))
