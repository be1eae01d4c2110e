"""One block's computation, fed its raw context in Z parts: each batch of patches runs once its context is there.

A large block (on a GPU, one block may be a whole 128×2048×2048 volume) need not wait for all of its context to be
read: :class:`~exem.inference.blockio.BlockDataset` can serve the context in Z parts, and :class:`BlockRun` runs
every batch whose patches lie in the rows received so far. Batches are the same patches in the same order as with
the whole context at once, so the output is bit-identical whatever the parts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from exem.clock import process_age_s
from exem.data.grid import AXIS_NAMES
from exem.inference.batching import probe_batch_size
from exem.inference.blend import WindowSums, ZStreamBlender
from exem.inference.plan import Block
from exem.inference.pyramid import downsample_rows

if TYPE_CHECKING:
    from exem.inference.engine import BlockPredictor

__all__ = ["BlockRun", "HostCopies", "to_host"]


class HostCopies:
    """The end of non-blocking device→host copies, for another thread to wait for (:meth:`wait`).

    The event is a blocking-sync one: a waiting writer thread sleeps instead of spinning a core. :meth:`wait` makes
    the event's device current in the calling thread first: a thread's first CUDA call otherwise runs on device 0,
    which would give every DDP rank's writer threads a CUDA context (memory) on GPU 0.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.event = torch.cuda.Event(blocking=True)
        self.event.record(torch.cuda.current_stream(device))

    def wait(self) -> None:
        """Block until the copies are done."""
        with torch.cuda.device(self.device):
            self.event.synchronize()


def to_host(tensors: list[Tensor]) -> tuple[list[Tensor], HostCopies | None]:
    """``tensors`` on the host: themselves on the CPU; on a GPU non-blocking copies into pinned memory and a
    :class:`HostCopies` that marks their end (the writer thread waits for it, the device goes on computing)."""
    if tensors[0].device.type != "cuda":
        return tensors, None
    hosts = []
    for t in tensors:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        hosts.append(host.copy_(t, non_blocking=True))
    return hosts, HostCopies(tensors[0].device)


def non_finite_error(predictor: BlockPredictor, block: Block) -> ValueError:
    """The one-line error for NaN/Inf in a block's blended output, naming the block's input region."""
    o = predictor.plan.origin
    where = ", ".join(
        f"{n} {o[ax] + block.start[ax]}:{o[ax] + block.stop[ax]}" for ax, n in enumerate(AXIS_NAMES)
    )
    return ValueError(
        f"non-finite values (NaN/Inf) in the output of block {block.id} (input {where});"
        " is the input finite? The block is not marked done"
    )


class BlockRun:
    """The blended, cast prediction of one block, computed as its raw context arrives.

    Patches run through the network in batches of ``batch_size``, in the global grid's order. Each patch is
    normalised straight from the raw context into one reused batch buffer; the Gaussian blend is streamed along Z
    (:class:`~exem.inference.blend.ZStreamBlender`, its buffer of one patch depth reused) and divided by the
    block's :class:`~exem.inference.blend.WindowSums` (no weight summed per patch), and each finished slab is
    checked and cast straight into the output. Apart from the output and the context, memory is allocated once
    per block (fresh large tensors cost page faults on the CPU).

    Args:
        predictor: the :class:`~exem.inference.engine.BlockPredictor` (network, normalisation, windows, cast).
        block: a block of its plan.
        sink: called with ``(block index, z0, levels, ready)`` for each chunk row of the output (Z rows
            ``[z0, z0 + chunk_z)`` relative to the block, the last one shorter) as soon as it is final: ``levels``
            holds the rows ``(C, dz, by, bx)`` and, with ``predictor.levels_on_device``, their pyramid levels, on the
            host (views on the CPU; pinned copies on a GPU, with ``ready`` the :class:`HostCopies` to wait for before
            reading them; else None).

    Feed the context's Z parts in order with :meth:`feed`, then call :meth:`finish`.
    """

    def __init__(
        self,
        predictor: BlockPredictor,
        block: Block,
        sink: Callable[[int, int, Any, Any], None] | None = None,
    ) -> None:
        self.p = predictor
        self.block = block
        self.sink = sink
        self.device = predictor.device
        self.depth = block.context_stop[0] - block.context_start[0]  # context Z slices
        self.received = 0  # context Z slices received so far
        self.context: Tensor | None = None
        self.result: Tensor | None = None
        plan = predictor.plan
        self.chunk_z = plan.chunks[0] if plan.chunks is not None else block.shape[0]
        self.shipped = 0  # output rows handed to the sink
        sums = WindowSums(predictor.windows, block.start, block.shape, block.patch_starts, self.device)
        self.blender = ZStreamBlender(
            block.start, block.shape, predictor.window(self.device), consume=self._emit, window_sums=sums
        )
        self.starts = list(block.patches())
        self.next = 0  # index into starts of the first patch not run yet
        if predictor.batch_size is None:
            predictor.batch_size = probe_batch_size(
                predictor.net, block.patch, self.device, predictor.autocast_dtype
            )
        self.batch = torch.empty(
            (predictor.batch_size, *block.patch), dtype=torch.float32, device=self.device
        )

    @torch.no_grad()
    def feed(self, z0: int, raw: Tensor) -> None:
        """Context rows ``[z0, z0 + dz)`` (relative to the context's start) of ``raw`` ``(dz, cy, cx)``, in order;
        runs every batch whose patches now have their context."""
        if int(z0) != self.received or self.received + raw.shape[0] > self.depth:
            raise ValueError(
                f"block {self.block.id}: context rows {z0}:{int(z0) + raw.shape[0]} after {self.received} of"
                f" {self.depth}"
            )
        raw = raw.to(self.device, non_blocking=True)
        if z0 == 0 and raw.shape[0] == self.depth:
            self.context = raw  # the whole context at once: no copy
        else:
            if self.context is None:
                self.context = torch.empty((self.depth, *raw.shape[1:]), dtype=raw.dtype, device=self.device)
            self.context[z0 : z0 + raw.shape[0]].copy_(raw)
        self.received += raw.shape[0]
        self._run()

    @torch.no_grad()
    def finish(self) -> Tensor:
        """The block's ``(C, bz, by, bx)`` output of ``out_dtype`` on the device (after the whole context was fed).

        Raises:
            ValueError: non-finite values in the blended output (the block is not written).
        """
        if self.received != self.depth:
            raise RuntimeError(
                f"block {self.block.id}: {self.received} of {self.depth} context rows received"
            )
        self._run()
        self.blender.finish()
        assert self.result is not None
        return self.result

    def _run(self) -> None:
        p, block, batch = self.p, self.block, self.batch
        assert self.context is not None
        c0 = block.context_start
        pz, py, px = block.patch
        size = batch.shape[0]
        autocast = torch.autocast(
            device_type=self.device.type,
            dtype=p.autocast_dtype or torch.bfloat16,
            enabled=p.autocast_dtype is not None,
        )
        while self.next < len(self.starts):
            chunk = self.starts[self.next : self.next + size]
            if chunk[-1][0] - c0[0] + pz > self.received:  # Z outermost: the last patch reaches deepest
                return
            for j, (sz, sy, sx) in enumerate(chunk):  # each patch normalised straight from the raw context
                z, y, x = sz - c0[0], sy - c0[1], sx - c0[2]
                p.normalize(self.context[z : z + pz, y : y + py, x : x + px], out=batch[j])
            # Always call the network with the same batch size (repeat the last patch): a patch's output then does
            # not depend on which other patches share its batch, i.e. on the block split.
            batch[len(chunk) :] = batch[len(chunk) - 1]
            if p.first_batch_age_s is None:  # the run's start-up ends here (exem-translate's summary)
                p.first_batch_age_s = process_age_s()
            with autocast:
                out = p.net(batch.unsqueeze(1))
            for j, start in enumerate(chunk):
                self.blender.add(out[j], start, p.window(self.device, start) if any(p.halo) else None)
            self.next += len(chunk)

    def _emit(self, z0: int, values: Tensor) -> None:
        """A finished slab ``(C, dz, by, bx)`` of blended float32 values: checked, cast into the output, and the
        chunk rows it completes handed to the sink."""
        p, block = self.p, self.block
        low, high = torch.aminmax(values)  # NaN propagates to both; ±Inf shows in one of them
        # both facts in one device→host read (one sync per slab on a GPU)
        finite, within_unit = torch.stack(
            [torch.isfinite(low) & torch.isfinite(high), (low >= 0.0) & (high <= 1.0)]
        ).tolist()
        if not finite:
            raise non_finite_error(p, block)
        if self.result is None:
            dtype = getattr(torch, p.out_dtype)
            self.result = torch.empty((values.shape[0], *block.shape), dtype=dtype, device=self.device)
        done = z0 + values.shape[1]
        self.result[:, z0:done].copy_(p.cast(values, within_unit=within_unit))
        while self.sink is not None and (
            self.shipped + self.chunk_z <= done or done == block.shape[0] > self.shipped
        ):
            end = min(self.shipped + self.chunk_z, block.shape[0])
            levels = [self.result[:, self.shipped : end]]
            if p.levels_on_device(self.device):
                while len(levels) < p.plan.levels:
                    levels.append(downsample_rows(levels[-1]))
            self.sink(block.index, self.shipped, *to_host(levels))
            self.shipped = end
