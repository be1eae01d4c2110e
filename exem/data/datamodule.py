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
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from exem.checks import fmt_voxels
from exem.content_groups import check_stain
from exem.data.datasets import (
    RandomRot90InPlane,
    UnpairedPatchDataset,
    ValidationPatchDataset,
    make_augmentation,
)
from exem.data.grid import PatchGrid
from exem.data.sampling import (
    VAL_AXIS_PREFERENCE,
    Coord,
    EpochSampler,
    Region,
    Split,
    ValidationSampler,
    split_volume,
)
from exem.data.volume import Volume, VolumeError, open_volumes

log = logging.getLogger(__name__)

__all__ = [
    "VAL_AXIS_PREFERENCE",
    "Coord",
    "EpochSampler",
    "ExEMDataModule",
    "RandomRot90InPlane",
    "Region",
    "Split",
    "UnpairedPatchDataset",
    "ValidationPatchDataset",
    "ValidationSampler",
    "make_augmentation",
    "split_volume",
]


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
        "channel": cfg.get("channel"),
    }
    return path, kwargs


class ExEMDataModule(L.LightningDataModule):
    """LM (ExM) and EM volumes → unpaired training patches and a fixed validation set.

    Batches are ``{"lm": float32 (B, 1, Z, Y, X) in [0, 1], "em": same}``; validation batches add
    ``"em_paired"`` (the ``em_paired`` volume at the LM patch's coordinates) when ``em_paired`` is set.

    Args:
        lm, em: mappings with ``path`` (a store, OME-Zarr, TIFF, a folder of ``*.zarr`` or a list of those),
            ``level``, ``voxel_size`` ([z, y, x] nm), ``intensity_range`` ([lo, hi]),
            ``percentiles`` ([lo, hi]), ``channel`` (of a multi-channel volume: index or name, e.g. the
            pan-protein channel of an ExM sample with antibody channels); ``lm`` also ``stain``
            (``pan_protein`` | ``direct`` | None), the prior of the content-group fit (:mod:`exem.content_groups`).
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
        self.lm_stain: str | None = check_stain(lm.get("stain") if hasattr(lm, "get") else None)
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
        lm_coords = _spread(self._grid_coords(lm_for_val), self.val_patches)
        em_coords = _spread(self._grid_coords(self.em_splits), self.val_patches)
        self.val_dataset = ValidationPatchDataset(
            self.lm_volumes,
            self.em_volumes,
            lm_coords,
            em_coords,
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
        """Random unpaired patches: ``{"lm": (B, 1, Z, Y, X), "em": (B, 1, Z, Y, X)}``, float32 in [0, 1]."""
        self._require_setup()
        assert self.train_dataset is not None
        sampler = EpochSampler(
            len(self.train_dataset),
            self._current_epoch,
            **self._shard(),
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
        """Fixed held-out patches: ``{"lm", "em"[, "em_paired"]}``, each (B, 1, Z, Y, X) float32 in [0, 1], and
        ``"counted"`` (B,): 0 for the padding that evens out the ranks under DDP (:class:`ValidationSampler`)."""
        self._require_setup()
        assert self.val_dataset is not None
        sampler = ValidationSampler(
            len(self.val_dataset),
            **self._shard(),
        )
        return DataLoader(
            self.val_dataset, sampler=sampler, generator=self._loader_generator(), **self._loader_kwargs()
        )

    def _shard(self) -> dict[str, int]:
        """``{"rank", "world_size"}`` of this process under the attached trainer (0 and 1 without one)."""
        trainer = self.trainer
        return {
            "rank": int(getattr(trainer, "global_rank", 0)),
            "world_size": int(getattr(trainer, "world_size", 1)),
        }

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
        now = {
            "samples_per_epoch": self.samples_per_epoch,
            "batch_size": self.batch_size,
            "world_size": self._shard()["world_size"],
        }
        changed = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
        if changed:
            log.warning(
                "resuming with other sampling settings (%s): patches are drawn from the start of the epoch",
                ", ".join(f"{k} {old} → {new}" for k, (old, new) in changed.items()),
            )
            return
        self._resume_position = (int(state["epoch"]), int(state["batches"]))
