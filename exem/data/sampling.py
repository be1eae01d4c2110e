"""Which patches training and validation draw from: the split of a volume and the epoch sampler of sample ids.

:func:`split_volume` holds out the end of a volume's roomiest axis for validation (:class:`Split` of two
:class:`Region` boxes); :class:`EpochSampler` hands out the global training sample ids of an epoch, sharded over
DDP ranks, and can resume part-way through an epoch (see :mod:`exem.data.datamodule`); :class:`ValidationSampler`
shards the held-out patches so that each counts once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from torch.utils.data import DistributedSampler

from exem.checks import fmt_voxels
from exem.data.grid import AXIS_NAMES
from exem.data.volume import VolumeError

Coord = tuple[int, int, int]
# Axis preference when choosing the validation axis: on ties Y wins, then X, then Z.
VAL_AXIS_PREFERENCE = (1, 2, 0)


def _shard(sampler: DistributedSampler, n: int, rank: int, world_size: int, *, drop_last: bool) -> None:
    """Set ``sampler``'s ``DistributedSampler`` attributes for ``n`` ids over ``world_size`` ranks, unshuffled:
    ``n // W`` ids per rank when ``drop_last``, else ``⌈n / W⌉`` (the caller pads). ``DistributedSampler.__init__``
    is not called: it wants a dataset and asks torch.distributed for the world."""
    name = type(sampler).__name__
    if n < 1:
        raise ValueError(f"{name} needs n ≥ 1, got {n}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"{name}: rank {rank} is not in a world of {world_size} process(es)")
    sampler.n = int(n)  # type: ignore[attr-defined]
    sampler.rank = sampler.global_rank = int(rank)  # type: ignore[attr-defined]
    sampler.num_replicas = sampler.world_size = int(world_size)  # type: ignore[attr-defined]
    sampler.num_samples = n // world_size if drop_last else -(-n // world_size)
    sampler.total_size = sampler.num_samples * world_size
    sampler.shuffle, sampler.drop_last, sampler.seed = False, drop_last, 0


class EpochSampler(DistributedSampler):
    """Yields this process's global sample ids of epoch ``e``: ``e·n, …, (e+1)·n − 1`` on a single process.

    ``e`` is the value of the last :meth:`set_epoch` call (Lightning calls it at every epoch start), else
    ``epoch_fn()``, else 0. Under DDP (``world_size`` W > 1) rank r takes ``e·n + r, e·n + r + W, …``: ``n // W``
    ids each, the same number on every rank and no id on two ranks (the ``n mod W`` ids left over are not
    drawn). It shards by itself, so it is a ``DistributedSampler`` and Lightning does not wrap it again.

    Exact resumes: :meth:`resume_at` makes the next iteration start ``batches`` batches into an epoch (the first
    ``batches · batch_size`` ids of this rank are skipped, never read). While an iteration runs,
    :attr:`position` is ``(epoch, batches handed to training)``; :class:`~exem.data.ExEMDataModule` counts the
    batches and stores the position in checkpoints. Lives in the main process only.
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
        _shard(self, n, rank, world_size, drop_last=True)
        if n < world_size:
            raise ValueError(
                f"data.samples_per_epoch ({n}) must be at least the number of processes ({world_size})"
            )
        if batch_size < 1:
            raise ValueError(f"EpochSampler needs batch_size ≥ 1, got {batch_size}")
        self.epoch_fn = epoch_fn
        self.batch_size = int(batch_size)
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


class ValidationSampler(DistributedSampler):
    """The validation ids of this process: every held-out patch once over all ranks, the same count on each.

    Rank r of W takes ids ``r, r + W, …`` below ``⌈n / W⌉ · W``. Ids ``≥ n`` are padding, so that every rank runs
    the same number of batches (DDP needs that); the dataset serves them as item ``id mod n`` marked not counted
    (:class:`~exem.data.datasets.ValidationPatchDataset`), and the metrics leave them out. torch's own
    ``DistributedSampler``, which Lightning would put in its place, pads with repeated patches instead: they
    counted twice in the validation metrics (and in the metric that selects checkpoints). On a single process the
    ids are ``0 … n − 1``. Being a ``DistributedSampler``, Lightning does not wrap it again.
    """

    def __init__(self, n: int, *, rank: int = 0, world_size: int = 1) -> None:
        _shard(self, n, rank, world_size, drop_last=False)
        self.epoch = 0  # DistributedSampler's set_epoch and len serve as they are; the epoch changes no id

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.world_size))


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
