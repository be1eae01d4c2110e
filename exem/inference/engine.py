"""Blockwise, out-of-core, resumable application of a network to a whole volume (or a region of it).

Used by translation (``G_AB``), segmentation and test-time-augmentation reliability maps: the network is any
``torch.nn.Module`` mapping ``(B, 1, Z, Y, X)`` float32 in [0, 1] to ``(B, C, Z, Y, X)``. The engine takes a
:class:`~exem.inference.plan.BlockPlan` (made once by the caller, :mod:`exem.inference.plan`) and its block IO
(:mod:`exem.inference.blockio`).

How it works
------------
- The network is always called with ``batch_size`` patches (the last batch of a block repeats its last patch),
  so a patch's prediction does not depend on its batch neighbours: on x86 CPUs different block splits give
  bit-identical outputs.
- Compute: :class:`BlockPredictor` (a LightningModule) normalises on the device, cuts the patches, runs the
  network in batches, blends on the device streaming along Z (float32 sums for one patch depth of slices at a
  time, :class:`~exem.inference.blend.ZStreamBlender`) and casts each finished slab into the block's output;
  :class:`~exem.inference.blockrun.BlockRun` does this for one block as its context arrives (in Z parts on a
  GPU, so a one-block volume starts before all of it is read).
- Many devices / nodes: ``Trainer.predict`` under DDP. :class:`~exem.inference.blockio.BlockDataModule` prepares
  the output on global rank 0 once the process group exists, every rank then reads the markers (before any rank
  writes) and takes every ``world_size``-th remaining block. The per-block computation does not depend on the
  rank, so a DDP run on CPUs is bit-identical to a single-process run (on GPUs only with ``cudnn.benchmark`` off:
  in benchmark mode each process picks its own convolution algorithms).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import zarr
from torch import Tensor, nn

from exem.allocator import keep_freed_memory
from exem.checks import fmt_voxels, one_of
from exem.data.volume import Volume
from exem.inference.batching import DEFAULT_BATCH_SIZE
from exem.inference.blend import WindowCache
from exem.inference.blockio import DEFAULT_NUM_WORKERS, BlockDataModule, BlockWriter
from exem.inference.blockrun import BlockRun
from exem.inference.markers import done_blocks
from exem.inference.output import update_record
from exem.inference.plan import CPU_BLOCK_VOXELS, DEFAULT_BLOCK_VOXELS, Block, BlockPlan
from exem.inference.ranks import raise_if_peers_failed, together
from exem.perf import compile_or_eager
from exem.quiet import lightning_announcements_muted, lightning_noise_silenced

__all__ = [
    "OUT_DTYPES",
    "BlockPredictor",
    "BlockwiseResult",
    "autocast_for",
    "default_block_voxels",
    "default_num_workers",
    "default_trainer",
    "module_state_kept",
    "local_root",
    "on_cpu",
    "run_blockwise",
]

log = logging.getLogger(__name__)

OUT_DTYPES = ("uint8", "float16", "float32")
# Threads writing chunk rows on a GPU host (the engine ceiling there asks for ≥ 150 Mvox/s; one thread encodes
# ~140-200 Mvox/s of uint8 levels 0 + 1 on this project's CPU).
GPU_WRITE_WORKERS = 4
# On a GPU a block's context is read in Z parts of about this many voxels (64 MB of uint8; 16 slices of a
# 2048×2048 plane), so a one-block volume starts computing after its first part instead of after all of it (a
# 128×2048×2048 context is 512 MB). On the CPU contexts come whole: no reader processes run beside the compute there.
GPU_CONTEXT_PART_VOXELS = 2**26
# ----------------------------------------------------------------------------------------------------------
# compute


def _torch_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    table = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if str(name) not in table:
        raise ValueError(f"autocast_dtype must be bfloat16 or float16 (or None), got {name!r}")
    return table[str(name)]


class BlockPredictor(L.LightningModule):
    """Computes one block per ``predict_step``: normalise, cut patches, run the network, blend, cast.

    Args:
        net: ``(B, 1, Z, Y, X)`` float32 in [0, 1] → ``(B, C, Z, Y, X)``; registered as a submodule (Lightning
            moves it to the device and puts it in eval mode).
        plan: the block plan (its global grid gives the patches and their order).
        intensity_range: raw (lo, hi) mapped to [0, 1], exactly as :func:`exem.data.volume.normalize`.
        sigma, floor: Gaussian window (:func:`~exem.inference.blend.gaussian_window`).
        halo: (z, y, x) voxels of each patch's output given no weight away from the region's border
            (:class:`~exem.inference.blend.WindowCache`); (0, 0, 0): the plain window.
        batch_size: patches per network call; None: :func:`probe_batch_size` on the device at the first block.
        out_dtype: ``uint8`` (``clip(round(255·x), 0, 255)``), ``float16`` or ``float32`` (unclipped).
        autocast_dtype: run the network under ``torch.autocast`` with this dtype (``bfloat16``/``float16``);
            None: float32. Blending is always float32.
        raw_dtype: dtype of the volume; uint16/uint32 contexts arrive as int16/int32 views (:class:`BlockDataset`)
            and are read back as unsigned.
        compile: ``torch.compile`` the network in place (``nn.Module.compile``) when the run sets up; the
            network always gets full batches of one patch shape, so it compiles once. Worth it on a GPU for
            large volumes; the first batch pays the compilation (tens of seconds).

    ``predict_step(batch)`` takes ``(block index, raw context (cz, cy, cx))`` and returns
    ``(block index, (C, bz, by, bx) numpy array of out_dtype)``.
    """

    def __init__(
        self,
        net: nn.Module,
        plan: BlockPlan,
        intensity_range: Sequence[float],
        *,
        sigma: float = 0.5,
        batch_size: int | None = DEFAULT_BATCH_SIZE,
        out_dtype: str = "uint8",
        autocast_dtype: str | torch.dtype | None = None,
        floor: float = 1e-4,
        raw_dtype: np.dtype | str | None = None,
        compile: bool = False,  # noqa: A002 - the config key's name
        halo: Sequence[int] = (0, 0, 0),
    ) -> None:
        super().__init__()
        one_of(out_dtype, OUT_DTYPES, "dtype")
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        lo, hi = (float(v) for v in intensity_range)
        if not hi > lo:
            raise ValueError(f"intensity range needs hi > lo, got [{lo}, {hi}]")
        self.net = net
        self.plan = plan
        # float32 constants exactly as normalize() uses them: (x − f32(lo)) · f32(1 / (hi − lo)).
        self._lo = float(np.float32(lo))
        self._scale = float(np.float32(1.0 / (hi - lo)))
        self._unit: dict[torch.dtype, bool] = {}  # _maps_into_unit per raw dtype
        self.sigma = float(sigma)
        self.floor = float(floor)
        # None: chosen on the device at the first block (probe_batch_size), then fixed for the run
        self.batch_size: int | None = None if batch_size is None else int(batch_size)
        self.out_dtype = out_dtype
        self.autocast_dtype = _torch_dtype(autocast_dtype)
        dt = None if raw_dtype is None else np.dtype(raw_dtype)
        self._unsigned_mask = (
            (1 << (8 * dt.itemsize)) - 1 if dt is not None and dt.kind == "u" and dt.itemsize in (2, 4) else 0
        )
        self.windows = WindowCache(plan.grid, self.sigma, self.floor, halo)  # validates sigma, floor, halo
        self.halo = self.windows.halo
        self.allow_zero_length_dataloader_with_multiple_devices = True
        self.compile_net = bool(compile)
        # where finished chunk rows go while a block is computed (BlockWriter.put_slab); None: whole blocks
        self.sink: Callable[[int, int, Any, Any], None] | None = None
        # pyramid levels of those rows computed on the device (exact, pyramid.downsample_rows): None = on a GPU,
        # where it spares the writer thread; on the CPU the writer thread does it, next to the compute
        self.device_levels: bool | None = None
        self._run: BlockRun | None = None  # the block whose context parts are arriving (predict_step)
        # under DDP (output, global rank, world size): before each block, stop if another rank failed
        self.peers: tuple[Path, int, int] | None = None
        # seconds from this process's start to its first network call (exem.clock.process_age_s; set by BlockRun)
        self.first_batch_age_s: float | None = None

    def configure_model(self) -> None:
        """Lightning hook (once per run, on every rank): compile the network when asked (idempotent)."""
        if self.compile_net and not getattr(self.net, "_compiled_call_impl", None):
            compile_or_eager(self.net)

    def setup(self, stage: str) -> None:
        """Lightning hook, before its last set-up barrier. Under DDP the network moves to this rank's device in a
        meeting point (:func:`~exem.inference.ranks.together`): a rank failing there (out of device memory) stops
        the others instead of leaving them in Lightning's next barrier. Lightning's own move is then a no-op."""
        if self.peers is not None:
            with together(self.trainer, "while moving the network to its device", self.peers[0]):
                self.net.to(self.trainer.strategy.root_device)

    def levels_on_device(self, device: torch.device) -> bool:
        """Whether the pyramid levels of shipped rows are computed on ``device`` (:attr:`device_levels`)."""
        return device.type == "cuda" if self.device_levels is None else bool(self.device_levels)

    def forward(self, x: Tensor) -> Tensor:
        """The network: ``(B, 1, Z, Y, X)`` in [0, 1] → ``(B, C, Z, Y, X)``."""
        return self.net(x)

    def window(self, device: torch.device, start: Sequence[int] | None = None) -> Tensor:
        """The ``(pz, py, px)`` float32 blending window on ``device`` of the patch at ``start`` (cached)."""
        return self.windows.get(device, start)

    def normalize(self, raw: Tensor, out: Tensor | None = None) -> Tensor:
        """Raw voxels → float32 in [0, 1], bit-identical to :func:`exem.data.volume.normalize`.

        ``(x − f32(lo)) · f32(1 / (hi − lo))`` in float32, clipped to [0, 1]; int16/int32 views of
        uint16/uint32 data (``raw_dtype``) are read back as unsigned first. ``out``: a float32 tensor of
        ``raw``'s shape to write into (no fresh memory); else a new one.
        """
        if self._unsigned_mask and raw.dtype in (torch.int16, torch.int32):
            raw = raw.to(torch.int64).bitwise_and_(self._unsigned_mask)
        if out is None:
            out = torch.empty(raw.shape, dtype=torch.float32, device=raw.device)
        # steps that cannot change a value are skipped (x − 0 = x, x · 1 = x, and no clip when every value the
        # dtype can hold already maps into [0, 1]); the conversion is a copy into ``out`` and the steps run in place:
        # fusing the conversion into the first step (``torch.mul(raw, s, out=out)``) makes the CPU cast ``raw`` into a
        # temporary first, 25 % slower here (same bits)
        out.copy_(raw)
        if self._lo != 0.0:
            out.sub_(self._lo)
        if self._scale != 1.0:
            out.mul_(self._scale)
        return out if self._maps_into_unit(raw.dtype) else out.clamp_(0.0, 1.0)

    def _maps_into_unit(self, dtype: torch.dtype) -> bool:
        """Whether every value of integer ``dtype`` (as :meth:`normalize` reads it) maps into [0, 1] unclipped
        (computed once per dtype: :meth:`normalize` asks for every patch)."""
        if dtype not in self._unit:
            self._unit[dtype] = self._compute_maps_into_unit(dtype)
        return self._unit[dtype]

    def _compute_maps_into_unit(self, dtype: torch.dtype) -> bool:
        if dtype.is_floating_point or dtype == torch.bool:
            return False  # any value, NaN included
        if dtype == torch.int64 and self._unsigned_mask:
            ends = torch.tensor([0, self._unsigned_mask], dtype=torch.int64)
        else:
            info = torch.iinfo(dtype)
            ends = torch.tensor([info.min, info.max], dtype=dtype)
        ends = ends.to(torch.float32).sub_(self._lo).mul_(self._scale)  # monotone: the ends bound every value
        return bool(ends[0] >= 0.0) and bool(ends[1] <= 1.0)

    @torch.no_grad()
    def predict_block(
        self, block: Block, raw: Tensor, sink: Callable[[int, int, Any, Any], None] | None = None
    ) -> Tensor:
        """The blended, cast prediction of one block from its whole raw context ``(cz, cy, cx)`` (any device):
        ``(C, bz, by, bx)`` of ``out_dtype`` on the device. :class:`~exem.inference.blockrun.BlockRun` does the work
        (and takes the context in Z parts); ``sink`` as there.

        Raises:
            ValueError: non-finite values in the blended output (the block is not written).
        """
        run = BlockRun(self, block, sink)
        run.feed(0, raw)
        return run.finish()

    def cast(self, out: Tensor, within_unit: bool = False) -> Tensor:
        """Prepare blended float32 values for ``out_dtype`` on their device, in place: uint8
        ``clip(round(255·x), 0, 255)`` (still float: copying it into a uint8 tensor is exact); else as is.
        ``within_unit``: the values are known to lie in [0, 1], so the clip has nothing to do and is skipped."""
        if self.out_dtype == "uint8":
            out = out.mul_(255.0).round_()
            return out if within_unit else out.clamp_(0.0, 255.0)
        return out

    def predict_step(
        self, batch: tuple[int, int, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> tuple[int, Any] | None:
        """One Z part ``(block index, z0, raw rows)`` of a block's context (:class:`BlockDataset`): its batches run
        now, and the part that completes the context finishes the block. Returns None before that; then ``(block
        index, (C, bz, by, bx) numpy array)``, or with a :attr:`sink` (the rows went there chunk row by chunk row
        while the block was computed) ``(block index, None)``."""
        index, z0, raw = batch
        block = self.plan.blocks[int(index)]
        if int(z0) == 0:
            if self.peers is not None:
                raise_if_peers_failed(*self.peers)
            self._run = BlockRun(self, block, self.sink)
        run = self._run
        if run is None or run.block.index != block.index:
            raise RuntimeError(f"block {block.id}: context part at z {z0} without its first part")
        run.feed(int(z0), raw)
        if run.received < run.depth:
            return None
        self._run = None
        result = run.finish()
        return int(index), None if self.sink is not None else result.cpu().numpy()


# ----------------------------------------------------------------------------------------------------------
# running


@dataclass(frozen=True)
class BlockwiseResult:
    """What :func:`run_blockwise` did.

    Attributes:
        plan: the block plan.
        blocks_total: blocks in the plan.
        blocks_skipped: blocks already done before this run (resume).
        blocks_done: blocks computed by this run (all ranks).
        voxels_done: output voxels of those blocks.
        seconds: wall time of the run.
        global_rank, world_size: of this process.
        first_batch_age_s: seconds from this process's start to its first network call (None: it computed no block,
            or the platform does not tell the process's start).
    """

    plan: BlockPlan
    blocks_total: int
    blocks_skipped: int
    blocks_done: int
    voxels_done: int
    seconds: float
    global_rank: int
    world_size: int
    first_batch_age_s: float | None = None


def default_trainer(**overrides: Any) -> L.Trainer:
    """A Trainer for inference: auto accelerator, one device, no logger, no checkpoints, no Lightning bar.

    Built quietly: Lightning's "GPU available …" lines and tips are not logged (a notebook that translates several
    volumes would otherwise repeat them for every call); warnings still are.
    """
    kwargs: dict[str, Any] = {
        "accelerator": "auto",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    kwargs.update(overrides)
    with lightning_announcements_muted():
        return L.Trainer(**kwargs)


@contextlib.contextmanager
def module_state_kept(net: nn.Module) -> Iterator[None]:
    """Give the caller's ``net`` back as it came: each parameter and buffer on its device and in its dtype, each
    submodule in its train/eval mode, compiled or not (``compile=true`` compiles it for the run only).

    Lightning puts the module it predicts with in eval mode and, when the run ends, moves it to the CPU; ``net``
    is a submodule of that module and is the caller's own (e.g. a generator still being trained on a GPU).
    Tensors are moved back through ``.data``, so parameter objects (and optimizers holding them) stay valid.
    """
    params = [(p, p.device, p.dtype) for p in net.parameters()]
    buffers = [
        (m, name, b.device, b.dtype) for m in net.modules() for name, b in m.named_buffers(recurse=False)
    ]
    modes = [(m, m.training) for m in net.modules()]
    # nn.Module.compile's hook, which exem.perf.compile_or_eager sets for compile=true
    compiled = getattr(net, "_compiled_call_impl", None)
    try:
        yield
    finally:
        net._compiled_call_impl = compiled
        for p, device, dtype in params:  # .to()/.cpu() change parameters in place (p.data)
            if p.device != device or p.dtype != dtype:
                p.data = p.data.to(device=device, dtype=dtype)
        for m, name, device, dtype in buffers:  # ... and replace buffers by new tensors
            b = getattr(m, name)
            if isinstance(b, Tensor) and (b.device != device or b.dtype != dtype):
                setattr(m, name, b.to(device=device, dtype=dtype))
        for m, training in modes:
            m.training = training


def on_cpu(trainer: L.Trainer | None) -> bool:
    """Whether inference runs on the CPU: the trainer's device, or (no trainer) whether CUDA is absent."""
    if trainer is not None:
        return trainer.strategy.root_device.type == "cpu"
    return not torch.cuda.is_available()


# Lightning precisions an inference run can take, and the autocast dtype each means for the network.
_PRECISION_AUTOCAST: dict[str, str | None] = {
    "32-true": None,
    "bf16-mixed": "bfloat16",
    "16-mixed": "float16",
}


def autocast_for(trainer: L.Trainer | None, autocast_dtype: str | torch.dtype | None = None) -> str | None:
    """The autocast dtype a run's network uses: ``autocast_dtype`` when given, else the trainer's mixed precision
    (``bf16-mixed`` → ``"bfloat16"``, ``16-mixed`` → ``"float16"``, ``32-true`` or no trainer → None: float32).

    The engine runs the network inside its own ``torch.autocast`` (enabled or not), which overrides the one
    Lightning's precision plugin wraps around ``predict_step``; so the trainer's precision must be read here.

    Raises:
        ValueError: a precision that converts the network's weights (``bf16-true``, ``16-true``, ``64-true``, …):
            the engine feeds float32 batches.
    """
    if autocast_dtype is not None:
        dtype = _torch_dtype(autocast_dtype)
        return "bfloat16" if dtype == torch.bfloat16 else "float16"
    if trainer is None:
        return None
    precision = str(trainer.precision)
    if precision not in _PRECISION_AUTOCAST:
        raise ValueError(
            f"trainer.precision={precision} cannot run inference (it converts the network's weights); use "
            f"{', '.join(_PRECISION_AUTOCAST)}"
        )
    return _PRECISION_AUTOCAST[precision]


def default_num_workers(trainer: L.Trainer | None) -> int:
    """Reader processes when none are configured: ``DEFAULT_NUM_WORKERS`` for an accelerator, which must be fed
    while it computes; 0 on the CPU, where compute is the bottleneck and readers would only compete with torch for
    the same cores (measured on 2 cores: 3.9 s with 0 workers vs 4.0-4.4 s with 1-2, model alone 3.8 s)."""
    return 0 if on_cpu(trainer) else DEFAULT_NUM_WORKERS


def default_block_voxels(trainer: L.Trainer | None, region_voxels: int | None = None) -> int:
    """Voxel budget of the default block shape: :data:`~exem.inference.plan.DEFAULT_BLOCK_VOXELS` on an
    accelerator, :data:`~exem.inference.plan.CPU_BLOCK_VOXELS` on the CPU (block buffers live in RAM); with
    several ranks, at most a ``2 × world_size``-th of the ``region_voxels`` to translate, so that every rank gets
    blocks (a 128×2048×2048 volume is one GPU block: on 8 GPUs, 7 would wait)."""
    budget = CPU_BLOCK_VOXELS if on_cpu(trainer) else DEFAULT_BLOCK_VOXELS
    world = int(trainer.world_size) if trainer is not None else 1
    if world > 1 and region_voxels is not None:
        budget = max(1, min(budget, int(region_voxels) // (2 * world)))
    return budget


def local_root(output: str | Path | zarr.Group) -> Path:
    """The local folder of an output (a path, or a ``zarr.Group`` on a local store).

    Raises:
        ValueError: a remote URL or a non-local store (done-markers are files).
    """
    if isinstance(output, zarr.Group):
        root = getattr(output.store, "root", None)
        if root is None:
            raise ValueError(
                "run_blockwise needs an output group on the local file system (for done-markers)"
            )
        return Path(root) / output.path if output.path else Path(root)
    text = str(output)
    if "://" in text:
        raise ValueError(f"output {text}: only local paths are supported (done-markers are files)")
    return Path(text).expanduser().absolute()


def run_blockwise(
    net: nn.Module,
    volume: Volume,
    plan: BlockPlan,
    output: str | Path | zarr.Group,
    *,
    sigma: float = 0.5,
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    out_dtype: str = "float32",
    num_workers: int | None = None,
    trainer: L.Trainer | None = None,
    autocast_dtype: str | torch.dtype | None = None,
    prepare: Callable[[], None] | None = None,
    progress: bool = False,
    floor: float = 1e-4,
    compile: bool = False,  # noqa: A002 - the config key's name
    write_workers: int | None = None,
    halo: Sequence[int] = (0, 0, 0),
    context_part_voxels: int | None = None,
) -> BlockwiseResult:
    """Apply ``net`` to the plan's region of ``volume``, block by block, and write an image pyramid.

    Args:
        net: ``(B, 1, Z, Y, X)`` float32 in [0, 1] → ``(B, C, Z, Y, X)``. Given back on its device, in its dtype
            and train/eval mode (:func:`module_state_kept`).
        volume: the input (its ``intensity_range`` normalises the raw voxels).
        plan: the blocks (:func:`~exem.inference.plan.plan_blocks` / :func:`~exem.inference.plan.plan_volume`
            with the output's chunks and ``levels``): planned once, by the caller.
        output: local folder (or a ``zarr.Group`` on a local store) of a group whose arrays ``"0"``, ``"1"``, …
            are the ``plan.levels`` levels: level l is ``(Z, ⌈Y/2^l⌉, ⌈X/2^l⌉)`` of the region (or ``(C, …)``),
            of ``out_dtype``, chunks aligned with the plan's blocks. With ``prepare``, the group is created by
            ``prepare()`` (run on global rank 0 only, inside the Lightning run); otherwise it must exist.
        sigma, floor: the Gaussian blending window.
        batch_size: patches per network call (None: :func:`probe_batch_size`).
        out_dtype: ``uint8`` | ``float16`` | ``float32`` (must match the arrays).
        num_workers: DataLoader reader processes (0: read in the main process); None → :func:`default_num_workers`.
        trainer: a Lightning Trainer (e.g. ``strategy="ddp"``); None → :func:`default_trainer`.
        autocast_dtype: ``bfloat16``/``float16`` to run the network under autocast; None → the trainer's
            (:func:`autocast_for`: bf16 under ``bf16-mixed``, float32 under ``32-true`` or without a trainer).
        progress: rich progress bar on stderr (global rank 0).
        compile: ``torch.compile`` the network (see :class:`BlockPredictor`).
        write_workers: threads writing chunk rows; None → 1 on the CPU, :data:`GPU_WRITE_WORKERS` on a GPU.
        halo: (z, y, x) voxels at each side of a patch's output that the network gets wrong (weight 0 away from
            the region's border; the plan's overlap must be ≥ 2 × halo).
        context_part_voxels: read each block's context in Z parts of about this many voxels, and start computing
            after the first (:class:`~exem.inference.blockrun.BlockRun`); 0: whole contexts; None → whole on the
            CPU, :data:`GPU_CONTEXT_PART_VOXELS` on a GPU. The output does not depend on it.

    Returns:
        a :class:`BlockwiseResult`. Every rank returns after all blocks are written and rank 0 has set the
        group attribute ``exem.complete = true``.

    Raises:
        ValueError: bad dtype or output; non-finite network output in a block.
        RuntimeError: blocks still missing after the run.
    """
    root = local_root(output)
    one_of(out_dtype, OUT_DTYPES, "dtype")
    autocast_dtype = autocast_for(trainer, autocast_dtype)
    if on_cpu(trainer):
        keep_freed_memory()  # large tensors reuse the heap instead of fresh pages (exem/allocator.py)
    levels = int(plan.levels)
    log.info(
        "%s: %d block(s) of ≤ %s voxels, %d patches of %s (%.1f%% extra work at block borders)",
        root,
        len(plan.blocks),
        fmt_voxels(plan.block_shape),
        len(plan.grid),
        fmt_voxels(plan.grid.patch),
        100 * plan.duplicate_fraction,
    )
    predictor = BlockPredictor(
        net,
        plan,
        volume.intensity_range,
        sigma=sigma,
        batch_size=batch_size,
        out_dtype=out_dtype,
        autocast_dtype=autocast_dtype,
        floor=floor,
        raw_dtype=volume.dtype,
        compile=compile,
        halo=halo,
    )
    workers = default_num_workers(trainer) if num_workers is None else int(num_workers)
    if context_part_voxels is None:
        context_part_voxels = None if on_cpu(trainer) else GPU_CONTEXT_PART_VOXELS
    datamodule = BlockDataModule(
        volume,
        plan,
        root,
        levels=levels,
        out_dtype=out_dtype,
        num_workers=workers,
        prepare=prepare,
        part_voxels=context_part_voxels or None,
    )
    workers = (1 if on_cpu(trainer) else GPU_WRITE_WORKERS) if write_workers is None else int(write_workers)
    writer = BlockWriter(root, plan, levels, progress=progress, workers=workers)
    predictor.sink = writer.put_slab  # chunk rows are written while the rest of their block is computed
    trainer = trainer if trainer is not None else default_trainer()
    if trainer.world_size > 1:
        predictor.peers = (root, int(trainer.global_rank), int(trainer.world_size))
    t0 = time.perf_counter()
    trainer.callbacks.append(writer)
    # every rank leaves each `together` section at once: when one fails, the others stop too (exem/inference/ranks.py)
    with together(trainer, "while computing its blocks", root):
        try:
            with lightning_noise_silenced(), module_state_kept(net):
                # Lightning's warnings about what is ours: every block already done, num_workers, a block's parts
                for said in ("across ranks is zero", "does not have many workers", "predict returned None"):
                    warnings.filterwarnings("ignore", message=f".*{said}.*")
                trainer.predict(predictor, datamodule=datamodule, return_predictions=False)
        finally:
            trainer.callbacks.remove(writer)

    # rank 0 alone lists the markers and decides: on a shared file system another node's listing may lag
    with together(trainer, "while marking the output complete", root):
        if trainer.is_global_zero:
            done = done_blocks(root, plan, levels)
            missing = [b.id for b in plan.blocks if b.index not in done]
            if missing:
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                raise RuntimeError(
                    f"{root}: {len(missing)} block(s) were not written ({', '.join(missing[:3])}{more});"
                    " rerun to resume"
                )
            update_record(root, complete=True, blocks=len(plan.blocks), block_shape=list(plan.block_shape))
    skipped = datamodule.skipped if datamodule.skipped is not None else 0
    return BlockwiseResult(
        plan=plan,
        blocks_total=len(plan.blocks),
        blocks_skipped=skipped,
        blocks_done=len(plan.blocks) - skipped,
        voxels_done=sum(plan.blocks[i].voxels for i in datamodule.todo),
        seconds=time.perf_counter() - t0,
        global_rank=int(trainer.global_rank),
        world_size=int(trainer.world_size),
        first_batch_age_s=predictor.first_batch_age_s,
    )
