"""Block input/output of the engine: reading block contexts ahead, writing blocks behind, done-markers.

- Reading: :class:`BlockDataset` (one item = one block's context in the raw dtype, or one Z part of it) in
  DataLoader workers;
  :class:`BlockDataModule` serves each rank its share of the blocks that are not done yet.
- Writing: :class:`BlockWriter` (a ``BasePredictionWriter``) writes each block, and its in-plane 2× pyramid
  levels, on a background thread and only then creates the block's done-markers
  ``<output>/.exem_done/<level>/<block-id>`` (:mod:`exem.inference.markers`). A rerun skips blocks whose markers
  all exist (:func:`done_blocks`). In a sharded output (Zarr v3) chunk rows are gathered into whole shard rows
  first: writing part of a shard rewrites the shard file, so each shard is written once, by one writer.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import zarr
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from exem.checks import fmt_voxels
from exem.data.volume import Volume
from exem.inference.markers import DONE_DIR, clear_failures, done_blocks, marker_path, touch_atomic
from exem.inference.plan import Block, BlockPlan
from exem.inference.pyramid import downsample_block
from exem.inference.ranks import together
from exem.progress import progress_bar

__all__ = [
    "DEFAULT_NUM_WORKERS",
    "DONE_DIR",
    "BlockDataModule",
    "BlockDataset",
    "BlockWriter",
    "check_output_levels",
    "done_blocks",
    "open_levels",
    "raw_tensor",
    "touch_atomic",
]

log = logging.getLogger(__name__)

DEFAULT_NUM_WORKERS = 2
# Items waiting to be written: whole blocks, or the chunk rows of a streamed block (each held on the host).
WRITE_QUEUE_SIZE = 4

# ----------------------------------------------------------------------------------------------------------
# reading


def raw_tensor(raw: np.ndarray) -> Tensor:
    """A raw block context as a CPU tensor in native byte order, without widening it.

    uint16/uint32 are reinterpreted (not converted) as int16/int32 (CUDA kernels lack the unsigned types);
    :meth:`BlockPredictor.normalize` undoes this with ``raw_dtype``. uint64 becomes float64.
    """
    a = np.asarray(raw)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype in (np.uint16, np.uint32):
        a = a.view(f"i{a.dtype.itemsize}")
    elif a.dtype == np.uint64:
        a = a.astype(np.float64)
    return torch.from_numpy(np.ascontiguousarray(a))


class BlockDataset(Dataset):
    """The raw context of a plan's blocks, whole or in Z parts.

    Args:
        volume: the input volume (picklable; path-backed volumes reopen in DataLoader workers).
        plan: the block plan.
        indices: block indices (into ``plan.blocks``) served by this dataset, in order.
        part_voxels: None: one item per block (its whole context); else each context in Z parts of about this
            many voxels (at least one Z slice), their borders on the input's Z chunks where it has them, so the
            engine starts a large block before all of it is read (:class:`~exem.inference.blockrun.BlockRun`).

    Items are ``(block index, z0, raw rows)``: rows ``[z0, z0 + dz)`` of the block's context (relative to its
    start), a ``(dz, cy, cx)`` CPU tensor of the raw bytes (uint16/uint32 viewed as int16/int32, see
    :meth:`BlockPredictor.normalize`), read with ``Volume.read`` (only those voxels are read); a block's parts come
    in order, one after the other.
    """

    def __init__(
        self, volume: Volume, plan: BlockPlan, indices: Sequence[int], part_voxels: int | None = None
    ) -> None:
        self.volume = volume
        self.plan = plan
        self.indices = [int(i) for i in indices]
        self.items = [
            (i, z0, z1) for i in self.indices for z0, z1 in self._parts(plan.blocks[i], part_voxels)
        ]

    def _parts(self, block: Block, part_voxels: int | None) -> list[tuple[int, int]]:
        """Z ranges of the block's context (relative to its start) served as separate items."""
        depth = block.context_stop[0] - block.context_start[0]
        if part_voxels is None:
            return [(0, depth)]
        plane = (block.context_stop[1] - block.context_start[1]) * (
            block.context_stop[2] - block.context_start[2]
        )
        step = max(1, int(part_voxels) // max(1, plane))
        chunks = getattr(self.volume.array, "chunks", None)  # zarr: (Z, Y, X) or (C, Z, Y, X); numpy: none
        cz = int(chunks[-3]) if isinstance(chunks, tuple) and len(chunks) >= 3 else 1
        first = self.plan.origin[0] + block.context_start[0]  # the context's first slice in the volume
        step = max(cz, step - step % cz)  # whole input chunks in Z per part
        edges = [0]
        cut = step - first % cz  # the first border on a chunk border
        while cut < depth:
            if cut > 0:
                edges.append(cut)
            cut += step
        edges.append(depth)
        return list(zip(edges[:-1], edges[1:], strict=True))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, int, Tensor]:
        index, z0, z1 = self.items[i]
        block = self.plan.blocks[index]
        start = (block.context_start[0] + z0, *block.context_start[1:])
        stop = (block.context_start[0] + z1, *block.context_stop[1:])
        sl = tuple(slice(o + a, o + b) for o, a, b in zip(self.plan.origin, start, stop, strict=True))
        return index, z0, raw_tensor(self.volume.read(sl))  # type: ignore[arg-type]


def _single(batch: list[Any]) -> Any:
    """Collate for one item per batch: the item itself (keeps ints and tensors as they are)."""
    return batch[0]


def open_levels(root: Path, levels: int) -> list[zarr.Array]:
    """The output's first ``levels`` arrays, opened for writing whole chunks.

    Chunks equal to the fill value are written like any other (``write_empty_chunks``): zarr's check for them
    scans every chunk before encoding it, which tripled the time of writing a dense output (0.12 s vs 0.04 s for
    32×1024×1024 uint8 on 2 cores); an empty chunk compressed (Blosc LZ4) takes 0.4 % of its size on disk
    (8.5 KB for 32×256×256 uint8).
    """
    group = zarr.open_group(str(root), mode="r+")
    return [group[str(lvl)].with_config({"write_empty_chunks": True}) for lvl in range(levels)]  # type: ignore[union-attr]


def check_output_levels(arrays: Sequence[zarr.Array], plan: BlockPlan, root: Path, out_dtype: str) -> None:
    """The output arrays must have the region's shape per level, ``out_dtype`` and chunks (shards, when sharded)
    aligned with the blocks: no two blocks may write into one chunk or shard file."""
    for lvl, arr in enumerate(arrays):
        per_channel = arr.ndim == 4 and arr.chunks[0] == 1  # channels written independently (the first by us)
        fits = per_channel and np.can_cast(np.dtype(out_dtype), np.dtype(arr.dtype), "safe")
        if np.dtype(arr.dtype) != np.dtype(out_dtype) and not fits:
            raise ValueError(f"{root}: level {lvl} has dtype {arr.dtype}, expected {out_dtype}")
        f = (1, 2**lvl, 2**lvl)
        want = tuple(-(-s // k) for s, k in zip(plan.shape, f, strict=True))
        got = tuple(arr.shape[-3:])
        if got != want or arr.ndim not in (3, 4):
            raise ValueError(
                f"{root}: level {lvl} has shape {tuple(arr.shape)}, expected (C,) {fmt_voxels(want)}"
            )
        shards = getattr(arr, "shards", None)
        what = "shards" if shards else "chunks"
        files = tuple((shards or arr.chunks)[-3:])
        for ax in range(3):
            step = files[ax] * f[ax]
            if plan.block_shape[ax] % step and plan.block_shape[ax] < plan.shape[ax]:
                raise ValueError(
                    f"{root}: level {lvl} {what} {fmt_voxels(files)} are not aligned with blocks of"
                    f" {fmt_voxels(plan.block_shape)}; blocks would share {what}"
                )
        if arr.ndim == 4 and arr.chunks[0] not in (arr.shape[0], 1):
            raise ValueError(f"{root}: level {lvl} must hold all channels in one chunk, or one per chunk")


class BlockDataModule(L.LightningDataModule):
    """Serves this rank's share of the blocks that are not done yet.

    ``setup`` runs inside ``Trainer.predict`` once the process group exists: global rank 0 clears old failure
    flags and runs ``prepare`` (e.g. create the output), all ranks wait, check the output, read the done-markers,
    and wait again, so the markers are read before any rank writes and all ranks agree on the remaining blocks.
    Both waits are :func:`~exem.inference.ranks.together` sections: a rank that fails in one stops all. Rank
    ``r`` of ``n`` takes every n-th remaining block starting at r, wrapped in a one-replica ``DistributedSampler``
    so that Lightning does not shard it again (its ``UnrepeatedDistributedSamplerWrapper`` asserts that every rank
    gets at least one item, which fails when fewer blocks than ranks remain). ``part_voxels``: serve each block's
    context in Z parts of about this many voxels (:class:`BlockDataset`); None: whole.
    """

    def __init__(
        self,
        volume: Volume,
        plan: BlockPlan,
        output: str | Path,
        *,
        levels: int,
        out_dtype: str,
        num_workers: int = DEFAULT_NUM_WORKERS,
        prepare: Callable[[], None] | None = None,
        part_voxels: int | None = None,
    ) -> None:
        super().__init__()
        self.part_voxels = part_voxels
        self.out_dtype = out_dtype
        self.volume = volume
        self.plan = plan
        self.output = Path(output)
        self.levels = int(levels)
        self.num_workers = int(num_workers)
        self.prepare = prepare
        self.allow_zero_length_dataloader_with_multiple_devices = True
        self.skipped: int | None = None
        self.todo: list[int] = []
        self.shard: list[int] = []

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        assert trainer is not None
        with together(trainer, "while creating the output", self.output):
            if trainer.global_rank == 0:
                clear_failures(self.output)
                if self.prepare is not None:
                    self.prepare()
        # every rank checks the output; rank 0 alone lists the done-markers, before any rank writes one, and tells
        # the others (on a shared file system another node's listing may lag)
        done: set[int] | None = None
        with together(trainer, "while reading the output's done-markers", self.output):
            check_output_levels(open_levels(self.output, self.levels), self.plan, self.output, self.out_dtype)
            if trainer.global_rank == 0:
                done = done_blocks(self.output, self.plan, self.levels)
        done = trainer.strategy.broadcast(done, src=0)
        assert done is not None
        todo = [b.index for b in self.plan.blocks if b.index not in done]
        self.skipped = len(self.plan.blocks) - len(todo)
        self.todo = todo
        self.shard = todo[trainer.global_rank :: trainer.world_size]
        if trainer.is_global_zero:
            log.info(
                "%d of %d blocks to compute (%d already done)", len(todo), len(self.plan.blocks), self.skipped
            )

    def predict_dataloader(self) -> DataLoader:
        dataset = BlockDataset(self.volume, self.plan, self.shard, self.part_voxels)
        trainer = self.trainer
        cuda = trainer is not None and trainer.strategy.root_device.type == "cuda"
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs.update(prefetch_factor=2, persistent_workers=False)
        return DataLoader(
            dataset,
            batch_size=1,
            sampler=DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=False),
            collate_fn=_single,
            num_workers=self.num_workers,
            pin_memory=cuda,
            **kwargs,
        )


# ----------------------------------------------------------------------------------------------------------
# writing


class BlockWriter(BasePredictionWriter):
    """Writes computed blocks (and their pyramid levels) on a background thread, then marks them done.

    A block arrives whole (``write_on_batch_end`` with its data) or chunk row by chunk row while it is computed
    (:meth:`put_slab`, then ``write_on_batch_end`` with None). Each piece is written to level 0 and to level l = the
    2× in-plane mean (:func:`~exem.data.ome.downsample_inplane`, rounded half to even for integers) of level l−1,
    by a helper thread while level 0 is written; once all of a block's data calls have returned, its markers
    ``<output>/.exem_done/<level>/<block-id>`` are created, atomically. A killed run thus leaves for every block
    either all of its data and markers, or possibly partial data and missing markers (a rerun computes it again).

    A bounded queue (``queue_size`` items) lets writes overlap compute. The first write error is re-raised in the
    main thread (at the next item, or at the end of ``predict``).

    Args:
        output: local folder of the output group (arrays ``"0"``, ``"1"``, …).
        plan: the block plan.
        levels: number of pyramid levels to write.
        progress: show a rich progress bar (blocks, Mvox/s) on stderr on global rank 0.
        workers: threads writing chunk rows at once (zarr's codecs release the GIL): 1 on the CPU, where compute
            needs the cores; more on a GPU host (:data:`~exem.inference.engine.GPU_WRITE_WORKERS`).

    In a sharded output the chunk rows of a block are held until they fill whole shards in Z (or reach the block's
    end) and written as one row: shards are written whole, once, each by one thread (at most a shard's depth of
    rows is held per block).
    """

    def __init__(
        self,
        output: str | Path,
        plan: BlockPlan,
        levels: int,
        *,
        queue_size: int = WRITE_QUEUE_SIZE,
        progress: bool = False,
        workers: int = 1,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self.plan = plan
        self.levels = int(levels)
        self.queue_size = int(queue_size)
        self.workers = max(1, int(workers))
        self.progress = bool(progress)
        self.written = 0
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._arrays: list[zarr.Array] = []
        self._shard_z = 0  # Z voxels of the output's shards; 0: not sharded
        # chunk rows held until they make a whole shard row: block index → [(z0, levels)]
        self._rows: dict[int, list[tuple[int, list[np.ndarray]]]] = {}
        self._levels_pool: ThreadPoolExecutor | None = None
        self._levels_lock = threading.Lock()  # writer threads may ask for the pool at once
        self._bar: Any = None
        self._task: Any = None
        self._t0 = 0.0
        self._voxels = 0

    # lifecycle -------------------------------------------------------------------------------------------
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._arrays = open_levels(self.output, self.levels)
        shards = getattr(self._arrays[0], "shards", None) if self._arrays else None
        self._shard_z = int(shards[-3]) if shards else 0
        self._rows = {}
        self._error = None
        self._queue = queue.Queue(maxsize=max(1, self.queue_size))
        self._thread = threading.Thread(target=self._run, name="exem-block-writer", daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        self._voxels = 0
        if self.progress and trainer.is_global_zero:
            self._start_bar(trainer)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(raise_error=True)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # Write what was computed before the failure (those blocks are valid), then let the exception propagate.
        self._finish(raise_error=False)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._finish(raise_error=False)

    # the queue -------------------------------------------------------------------------------------------
    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if prediction is None:
            return  # a part of a block's context: the block is not complete yet
        index, data = prediction
        # a block streamed slab by slab (put_slab) is complete now; else it comes whole
        self._put(("done", int(index)) if data is None else ("block", int(index), np.asarray(data)))

    def put_slab(self, index: int, z0: int, levels: Sequence[Any], ready: Any = None) -> None:
        """Queue rows ``[z0, z0 + dz)`` (relative to block ``index``'s start) of the block's output for writing.

        ``levels``: the rows of level 0 ``(C, dz, by, bx)`` and, when computed on the device, of the next levels
        (the writer downsamples the missing ones), on the host (numpy, or CPU tensors); ``ready``: what to wait for
        before reading them (a :class:`~exem.inference.blockrun.HostCopies`, after non-blocking device → host
        copies; its ``wait()`` is called in the writer thread), or None. ``z0`` and the slab's end lie on chunk
        borders in Z (or the block's end), so every chunk is written whole, once. The block's done-markers follow
        only once the predictor has returned the block (``write_on_batch_end``), after all its slabs.
        """
        self._put(("slab", int(index), int(z0), list(levels), ready))

    def _put(self, item: tuple) -> None:
        self._raise_if_failed()
        assert self._queue is not None, "BlockWriter: on_predict_start was not called"
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self._finish(raise_error=False)
            raise error

    def _run(self) -> None:
        """The writer thread: slabs go to ``workers`` threads (at most ``workers + 1`` in flight: bounded host memory;
        different chunk rows are different chunks), a block's markers wait for all of its slabs."""
        assert self._queue is not None
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="exem-write") if self.workers > 1 else None
        slots = threading.Semaphore(self.workers + 1)
        pending: dict[int, list[Future]] = {}

        def settled(future: Future) -> None:
            slots.release()
            if future.exception() is not None and self._error is None:
                self._error = future.exception()

        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                if self._error is not None:
                    continue  # keep draining so the producer never blocks on a dead consumer
                try:
                    kind, index, *rest = item
                    if kind == "slab" and self._shard_z:
                        whole = self._shard_row(index, *rest)
                        if whole is None:
                            continue
                        rest = list(whole)
                    if kind == "slab" and pool is not None:
                        slots.acquire()
                        future = pool.submit(self._write_slab_item, index, *rest)
                        future.add_done_callback(settled)
                        pending.setdefault(index, []).append(future)
                    elif kind == "slab":
                        self._write_slab_item(index, *rest)
                    elif kind == "done":
                        if self._rows.pop(index, None):
                            raise RuntimeError(f"block {self.plan.blocks[index].id}: last rows missing")
                        for future in pending.pop(index, []):
                            future.result()  # its data first; an error stops here, before the markers
                        self.finish_block(index)
                    else:
                        self.write_block(index, rest[0])
                except BaseException as e:  # noqa: BLE001 - handed to the main thread
                    if self._error is None:
                        self._error = e
        finally:
            if pool is not None:
                pool.shutdown(wait=True)

    def _shard_row(self, index: int, z0: int, levels: list, ready: Any) -> tuple[int, list, None] | None:
        """Hold a chunk row of block ``index``; once the held rows end on a shard border in Z (or at the block's end),
        return them as one row ``(z0, levels, None)``, else None."""
        if ready is not None:
            ready.wait()
        held = self._rows.setdefault(index, [])
        held.append((int(z0), [np.asarray(level) for level in levels]))
        block = self.plan.blocks[index]
        end = int(z0) + held[-1][1][0].shape[-3]
        if (block.start[0] + end) % self._shard_z and end < block.shape[0]:
            return None
        del self._rows[index]
        if len(held) == 1:
            return held[0][0], held[0][1], None
        merged = [np.concatenate([h[1][i] for h in held], axis=-3) for i in range(len(held[0][1]))]
        return held[0][0], merged, None

    def _write_slab_item(self, index: int, z0: int, levels: list, ready: Any) -> None:
        if ready is not None:
            ready.wait()
        arrays = [np.asarray(level) for level in levels]
        self.write_slab(index, z0, arrays[0], arrays[1:])

    def _finish(self, raise_error: bool) -> None:
        if self._thread is not None and self._queue is not None:
            self._queue.put(None)
            self._thread.join()
        self._thread = None
        if self._levels_pool is not None:
            self._levels_pool.shutdown(wait=True)
            self._levels_pool = None
        self._queue = None
        self._rows = {}
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if raise_error and self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._error is not None:
            log.error("writing a block failed: %s", self._error)
            self._error = None

    # one block -------------------------------------------------------------------------------------------
    def write_block(self, index: int, data: np.ndarray) -> None:
        """Write block ``index`` (``(C, bz, by, bx)`` data) to every level, then its markers."""
        self.write_slab(index, 0, data)
        self.finish_block(index)

    def write_slab(
        self, index: int, z0: int, data: np.ndarray, lower_levels: Sequence[np.ndarray] = ()
    ) -> None:
        """Write rows ``[z0, z0 + dz)`` of block ``index`` (``(C, dz, by, bx)`` or ``(dz, by, bx)`` data) to every
        level: level l is ``lower_levels[l − 1]`` when given (computed on the device), else the 2× in-plane mean of
        level l−1 (:func:`~exem.inference.pyramid.downsample_block`)."""
        block = self.plan.blocks[index]
        if data.ndim == 3:
            data = data[None]
        z0 = int(z0)
        if tuple(data.shape[2:]) != block.shape[1:] or not 0 <= z0 < z0 + data.shape[1] <= block.shape[0]:
            raise ValueError(
                f"block {block.id}: data of shape {data.shape} at z {z0} for a block of {fmt_voxels(block.shape)}"
            )
        # levels 1, 2, … (each downsampled from the one above it) are computed and written by a helper thread while
        # this one writes level 0 (numpy and zarr's codecs release the GIL)
        lower = (
            self._lower_levels_pool().submit(self._write_lower_levels, block, z0, data, lower_levels)
            if len(self._arrays) > 1
            else None
        )
        try:
            self._write_level(0, block, z0, data)
        except BaseException:
            if lower is not None:
                wait([lower])  # its own error, if any, would hide this one
            raise
        if lower is not None:
            lower.result()

    def _write_lower_levels(
        self, block: Block, z0: int, data: np.ndarray, lower_levels: Sequence[np.ndarray]
    ) -> None:
        level_data = data
        for lvl in range(1, len(self._arrays)):
            given = lower_levels[lvl - 1] if lvl - 1 < len(lower_levels) else None
            level_data = downsample_block(level_data) if given is None else given
            self._write_level(lvl, block, z0, level_data[None] if level_data.ndim == 3 else level_data)

    def _write_level(self, lvl: int, block: Block, z0: int, level_data: np.ndarray) -> None:
        """Write ``(C, dz, y, x)`` rows of level ``lvl`` of ``block`` at ``z0`` (relative to the block)."""
        arr = self._arrays[lvl]
        f = 2**lvl
        sl = (
            slice(block.start[0] + z0, block.start[0] + z0 + level_data.shape[1]),
            slice(block.start[1] // f, block.start[1] // f + level_data.shape[2]),
            slice(block.start[2] // f, block.start[2] // f + level_data.shape[3]),
        )
        if arr.ndim == 3:
            if level_data.shape[0] != 1:
                raise ValueError(
                    f"the network returned {level_data.shape[0]} channels but output level {lvl} is 3D"
                )
            arr[sl] = level_data[0]
        else:  # the network's channels are the image's first ones (a caller may write the others)
            arr[(slice(0, level_data.shape[0]), *sl)] = level_data

    def _lower_levels_pool(self) -> ThreadPoolExecutor:
        """The threads computing and writing the lower pyramid levels (one per writer thread)."""
        with self._levels_lock:
            if self._levels_pool is None:
                self._levels_pool = ThreadPoolExecutor(self.workers, thread_name_prefix="exem-levels")
            return self._levels_pool

    def finish_block(self, index: int) -> None:
        """Create block ``index``'s done-markers (every level; its data were written before) and count it."""
        block = self.plan.blocks[index]
        for lvl in range(self.levels):
            touch_atomic(marker_path(self.output, lvl, block))
        self.written += 1
        self._voxels += block.voxels
        if self._bar is not None:
            elapsed = max(time.perf_counter() - self._t0, 1e-9)
            self._bar.update(self._task, advance=1, rate=f"{self._voxels / elapsed / 1e6:.2f} Mvox/s")

    def _start_bar(self, trainer: L.Trainer) -> None:
        dm = trainer.datamodule
        total = len(dm.shard) if isinstance(dm, BlockDataModule) else None
        self._bar = progress_bar("blocks", "{task.fields[rate]}", remaining=True)
        who = f" (rank 0 of {trainer.world_size})" if trainer.world_size > 1 else ""
        self._task = self._bar.add_task(f"{self.output.name}{who}", total=total, rate="")
        self._bar.start()
