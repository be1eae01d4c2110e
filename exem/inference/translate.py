"""Whole-volume translation ExM → virtual EM with a trained generator (``G_AB``), out of core and resumable.

``translate_volume`` opens the input (with the generator's training normalisation), reconciles the model's and
the input's voxel sizes, plans once (:func:`exem.inference.job.plan_job`), decides what to do with the output
(:func:`exem.inference.output.inspect_output`), creates it (OME-Zarr 0.5 on Zarr v3 by default, or 0.4 on Zarr
v2; levels ``"0"`` and ``"1"``, the input's voxel size) and runs the blockwise engine
(:func:`exem.inference.engine.run_blockwise`) on one device or many (pass a DDP ``lightning.Trainer``).
Reliability maps (:func:`exem.inference.uncertainty.reliability_map`) are translations of a wrapped generator.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from exem.checks import one_of, triple
from exem.data.channels import VIRTUAL_EM_CHANNEL
from exem.data.ome import DEFAULT_NGFF_VERSION
from exem.data.resample import RescaledNetwork, resample_volume, same_voxel_size, scale_roi
from exem.data.volume import Volume
from exem.inference.companions import (
    channel_entries,
    companion_channels,
    copy_companions,
    storage_dtype,
)
from exem.inference.engine import OUT_DTYPES, on_cpu, run_blockwise
from exem.inference.job import check_patch, open_input, plan_job
from exem.inference.output import (
    GRID_KEYS,
    create_image,
    inspect_output,
    local_output,
)
from exem.inference.plan import default_overlap
from exem.quiet import summary_of
from exem.trained import TrainedGenerator, as_trained, trained_normalization

__all__ = [
    "OUTPUT_NAME",
    "TranslateResult",
    "translate_volume",
    "weights_fingerprint",
]

log = logging.getLogger(__name__)

OUTPUT_NAME = "virtual_em"
# compile="auto" compiles the generator for volumes of at least this many output voxels on a CUDA device: there the
# compilation (tens of seconds) is paid back (issue 13, H200: 67.8 → 101 Mvox/s for the published generator).
COMPILE_AUTO_VOXELS = 2**30
# The patch (z, y, x) voxels when neither the call nor the generator's checkpoint gives one (published ExEM).
DEFAULT_PATCH = (16, 256, 256)
OUTPUT_SCALES = ("input", "model")
# The record keys a resume must match: the grid's and the generator's (and the resampling).
RECORD_KEYS = (*GRID_KEYS, "generator", "scale", "channels")


@dataclass(frozen=True)
class TranslateResult:
    """What :func:`translate_volume` did.

    Attributes:
        output: the OME-Zarr group written.
        shape: output shape (Z, Y, X) in voxels (the ROI's, or the input's).
        seconds: wall time of the call.
        voxels: output voxels computed by this call (all of them unless resumed).
        mvox_per_s: ``voxels / seconds / 1e6``.
        blocks_done: blocks computed by this call (all ranks).
        blocks_skipped: blocks already done by an earlier, interrupted call.
        voxel_size_nm: (z, y, x) nm of the output (None: unknown, written as 1 nm).
        resampled: ``None``, or the scale the output was written at after resampling: ``"input"`` (patches
            resampled to the model's voxel size and back) or ``"model"`` (the input read at the model's size).
        already_complete: the output was complete with these settings (``complete_ok``); nothing was computed.
        first_batch_s: seconds from the process's start (the command's, for ``exem-translate``) to the first
            network call; None when nothing was computed or the platform does not tell (see ``exem.clock``).
    """

    output: Path
    shape: tuple[int, int, int]
    seconds: float
    voxels: int
    mvox_per_s: float
    blocks_done: int
    blocks_skipped: int
    voxel_size_nm: tuple[float, float, float] | None = None
    resampled: str | None = None
    already_complete: bool = False
    first_batch_s: float | None = None

    def summary(self, prog: str = "translate", first_batch: bool = False) -> str:
        """One line (two when resampled) as ``exem-translate`` prints them. ``first_batch``: add when the first batch
        ran after the process's start (for a command, whose process is the run; not for a napari or notebook
        session, which started long before)."""
        z, y, x = self.shape
        first = ""
        if first_batch and self.first_batch_s is not None:
            first = f", first batch {self.first_batch_s:.1f} s after start"
        line = (
            f"{prog}: {z}×{y}×{x} voxels in {self.seconds:.1f} s ({self.mvox_per_s:.2f} Mvox/s{first}), "
            f"{self.blocks_done} block{'' if self.blocks_done == 1 else 's'} computed, {self.blocks_skipped}"
            f" resumed → {self.output}"
        )
        if self.resampled:
            nm = "×".join(f"{v:g}" for v in self.voxel_size_nm or ())
            line += f"\n  resampled on the fly to the model's voxel size; output at the {self.resampled}'s: {nm} nm"
        return line


def weights_fingerprint(module: nn.Module) -> str:
    """SHA-1 of the module's state (dtype, shape and bytes of every state-dict tensor, in order; no names)."""
    h = hashlib.sha1()
    for t in module.state_dict().values():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _fmt_nm(values: Sequence[float]) -> str:
    return "×".join(f"{float(v):g}" for v in values) + " nm"


def _apply_scale(
    generator: nn.Module,
    volume: Volume,
    roi: Sequence[int] | None,
    model_nm: Sequence[float] | None,
    resample: bool,
    output_scale: str,
) -> tuple[nn.Module, Volume, Sequence[int] | None, str | None]:
    """Reconcile the model's and the input's voxel sizes: ``(network, volume, roi, resampled)`` to run with.

    Nothing changes when the sizes agree (within 1 %), when one is unknown, or when ``resample`` is off (then a
    warning says so). Otherwise ``output_scale="input"`` wraps the generator in a :class:`RescaledNetwork`,
    and ``"model"`` reads the input through :func:`resample_volume` (the ROI, in input voxels, is scaled).
    """
    one_of(output_scale, OUTPUT_SCALES, "output_scale")
    input_nm = volume.voxel_size_nm
    if model_nm is None or input_nm is None or same_voxel_size(model_nm, input_nm):
        if model_nm is not None and input_nm is None:
            log.warning(
                "%s: voxel size unknown; the generator was trained at %s, no resampling",
                volume.path,
                _fmt_nm(model_nm),
            )
        return generator, volume, roi, None
    if not resample:
        log.warning(
            "%s has voxels of %s but the generator was trained at %s; translating without resampling"
            " (resample=false)",
            volume.path,
            _fmt_nm(input_nm),
            _fmt_nm(model_nm),
        )
        return generator, volume, roi, None
    log.info(
        "resampling on the fly: input %s, generator trained at %s; output at the %s's scale",
        _fmt_nm(input_nm),
        _fmt_nm(model_nm),
        output_scale,
    )
    if output_scale == "input":
        return RescaledNetwork(generator, input_nm, model_nm), volume, roi, "input"
    view = resample_volume(volume, model_nm)
    if roi is not None:
        scaled = scale_roi(roi, input_nm, model_nm)
        roi = [min(max(v, 0), view.shape[i // 2]) for i, v in enumerate(scaled)]
    return generator, view, roi, "model"


def compile_wanted(compile: bool | str, voxels: int, trainer: L.Trainer | None) -> bool:  # noqa: A002
    """Whether to ``torch.compile`` the network: ``True`` / ``False`` as given; ``"auto"``: on a CUDA device for
    at least :data:`COMPILE_AUTO_VOXELS` output voxels.

    Raises:
        ValueError: anything else (one line).
    """
    if isinstance(compile, bool):
        return compile
    one_of(str(compile), ("auto",), "compile (true, false or auto)")
    return not on_cpu(trainer) and voxels >= COMPILE_AUTO_VOXELS


def translate_volume(
    generator: TrainedGenerator | nn.Module,
    input: str | Path | Volume | Any,  # noqa: A002 - the natural name, mirrors the config key
    output: str | Path,
    *,
    patch: Sequence[int] | None = None,
    overlap: Sequence[int] | None = None,
    sigma: float = 0.5,
    batch_size: int | None = None,
    dtype: str = "uint8",
    roi: Sequence[int] | None = None,
    overwrite: bool = False,
    input_level: int = 0,
    block_shape: Sequence[int] | None = None,
    num_workers: int | None = None,
    trainer: L.Trainer | None = None,
    intensity_range: Sequence[float] | None = None,
    percentiles: Sequence[float] | None = None,
    channel: int | str | None = None,
    other_channels: bool = True,
    chunks: Sequence[int] | None = None,
    autocast_dtype: str | None = None,
    progress: bool = True,
    resample: bool = True,
    output_scale: str = "input",
    model_voxel_size_nm: Sequence[float] | None = None,
    name: str = OUTPUT_NAME,
    complete_ok: bool = False,
    compile: bool | str = "auto",  # noqa: A002 - the config key's name
    ngff_version: str = DEFAULT_NGFF_VERSION,
    shards: Sequence[int] | None = None,
) -> TranslateResult:
    """Translate a whole ExM volume (or an ROI) to virtual EM and write it as an OME-Zarr pyramid.

    Args:
        generator: a :class:`~exem.trained.TrainedGenerator` (:func:`~exem.checkpoints.load_generator`: its
            training normalisation, voxel size and patch are the defaults here), or any module ``(B, 1, Z, Y, X)``
            float32 in [0, 1] → ``(B, 1, Z, Y, X)``; the weights' fingerprint is recorded in the output.
        input: a Zarr / OME-Zarr / TIFF path (opened with ``open_volume(level=input_level, …)``), or a
            :class:`~exem.data.volume.Volume` (or anything ``open_volume`` accepts, e.g. a numpy array).
        output: local folder of the OME-Zarr written (``ngff_version``, levels ``"0"`` and ``"1"``, voxel size of the
            input; 1 nm with a warning when unknown). An existing complete output needs ``overwrite=True``; an
            incomplete one written with the same settings and weights is resumed.
        patch: (z, y, x) voxels per network call, as the generator sees them (at the model's voxel size when
            resampling); Y and X multiples of the generator's ``divisor``. None → the generator's training patch
            when its checkpoint records one, else :data:`DEFAULT_PATCH`.
        overlap: (z, y, x) overlap of neighbouring patches, in the same voxels as ``patch``; None → 25 % of the
            patch (even, 0 for size 1).
        sigma: Gaussian blending window width on [−1, 1]³ (published 0.5).
        batch_size: patches per network call; None: 8 on the CPU, on a GPU as many (a power of two ≤ 64) as half
            of the device's memory holds (:func:`~exem.inference.engine.probe_batch_size`).
        dtype: ``uint8`` (``clip(round(255·x), 0, 255)``), ``float16`` or ``float32`` (unclipped).
        roi: (z0, z1, y0, y1, x0, x1) voxels of the input level; None → the whole volume.
        overwrite: delete an existing output first.
        input_level: OME-Zarr level of the input.
        block_shape: (z, y, x) voxels per output block (rounded up to chunks); None → engine default.
        num_workers: reader processes; None → :func:`default_num_workers`.
        trainer: a Lightning Trainer (e.g. DDP over several devices); None → one device, chosen automatically.
        intensity_range, percentiles: input normalisation (see ``open_volume``); must match training. Both
            None → the generator's training normalisation when it has one
            (:func:`~exem.trained.trained_normalization`), else the dtype range.
        channel: the pan-protein channel of a multi-channel input (index or name); None for a single channel.
        other_channels: with ``channel``, write the input's other channels (antibodies) beside the virtual EM: the
            output is then one ``(C, Z, Y, X)`` OME-Zarr, channel 0 ``virtual_em`` (:mod:`exem.inference.companions`).
        chunks: output chunk shape (z, y, x); None → ``(2·patch_z, 256, 256)`` capped by the shape.
        autocast_dtype: ``bfloat16``/``float16`` to run the generator under autocast (GPU); None → the trainer's
            mixed precision (``bf16-mixed``: bfloat16; :func:`~exem.inference.engine.autocast_for`), else float32.
        progress: show a progress bar (blocks, Mvox/s) on stderr.
        resample: when the generator was trained at another voxel size than the input's (``voxel_size_nm`` of
            :func:`~exem.checkpoints.load_generator`, or ``model_voxel_size_nm``), resample on the fly;
            False: translate the voxels as they are (with a warning).
        output_scale: ``input`` (default; the output has the input's voxel grid: each patch is resampled to the
            model's voxel size and back) or ``model`` (the input is read resampled to the model's voxel size and
            the output has that voxel size).
        model_voxel_size_nm: (z, y, x) nm the generator was trained at; None → the record's ``voxel_size_nm``.
        name: the multiscales name written in the output's metadata.
        complete_ok: a complete output written with the same settings is left as it is (``already_complete``)
            instead of refused.
        compile: ``torch.compile`` the generator for the run (the first batch pays tens of seconds of compilation;
            results equal to float rounding): True, False, or ``"auto"`` (:func:`compile_wanted`: on a GPU for
            volumes of ≥ 2^30 voxels).
        ngff_version: ``"0.5"`` (OME-Zarr 0.5 on Zarr v3, the default) or ``"0.4"`` (Zarr v2).
        shards: (z, y, x) voxels per shard file (Zarr v3 sharding: fewer files; whole chunks; the blocks then follow
            whole shards, so no two writers share one); None: one file per chunk.

    The caller's network comes back on its device, in its dtype and train/eval mode.

    Returns:
        a :class:`TranslateResult` (on every rank).

    Raises:
        VolumeError: unreadable or invalid input (not 3D, non-numeric, NaN in a sample, …).
        ValueError: bad patch / overlap / ROI / dtype; non-finite output in a block (that block is not marked
            done).
        FileExistsError: the output exists (complete, foreign, or incomplete with other settings).
        PermissionError: the output location is not writable.
    """
    t0 = time.perf_counter()
    out = local_output(output)
    one_of(dtype, OUT_DTYPES, "dtype")
    if not float(sigma) > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    trained = as_trained(generator)
    generator = trained.network
    if not isinstance(input, Volume):  # an opened Volume already carries its normalisation
        intensity_range, percentiles = trained_normalization(trained, intensity_range, percentiles)
    volume = open_input(input, input_level, intensity_range, percentiles, channel)
    source, companions = volume, companion_channels(volume) if other_channels else []
    model_nm = model_voxel_size_nm if model_voxel_size_nm is not None else trained.voxel_size_nm
    net, volume, roi, resampled = _apply_scale(
        generator, volume, roi, model_nm, bool(resample), str(output_scale)
    )
    if patch is None:
        patch = trained.training_patch or DEFAULT_PATCH
    patch3 = check_patch(generator, patch)
    overlap3 = None if overlap is None else triple(overlap, "overlap")
    if isinstance(net, RescaledNetwork):  # patch and overlap are the model's voxels; the grid is the input's
        model_patch = patch3
        patch3 = net.input_patch(model_patch)
        if overlap3 is not None:
            overlap3 = tuple(round(o * p / m) for o, p, m in zip(overlap3, patch3, model_patch, strict=True))  # type: ignore[assignment]
    job = plan_job(
        net,
        volume,
        input,
        patch=patch3,
        overlap=default_overlap(patch3) if overlap3 is None else overlap3,
        roi=roi,
        chunks=chunks,
        block_shape=block_shape,
        trainer=trainer,
        ngff_version=ngff_version,
        shards=shards,
        output=None if overwrite else out,  # an unfinished output resumes with its own block shape
        autocast_dtype=autocast_dtype,
    )
    plan = job.plan
    scale = None if resampled is None else {"output": resampled, "model_voxel_size_nm": list(model_nm or [])}
    record = job.record(
        sigma=float(sigma),
        dtype=dtype,
        generator={
            "widths": list(trained.widths or []) or None,
            "fingerprint": weights_fingerprint(generator),
        },
        scale=scale,
        channels=[VIRTUAL_EM_CHANNEL, *(str(source.channel_names[c]) for c in companions)]
        if companions
        else None,  # type: ignore[index]
    )
    action = inspect_output(
        out,
        record,
        keys=RECORD_KEYS,
        overwrite=bool(overwrite),
        what="translation",
        owned=lambda stored: "patch" in stored,
        complete_ok=bool(complete_ok),
    )
    rank = trainer.global_rank if trainer is not None else 0
    blocks_done, blocks_skipped, voxels = 0, len(plan.blocks), 0
    first_batch: float | None = None
    if action != "complete":
        from exem import __version__

        attributes = {
            **record,
            "generator_class": type(generator).__name__,
            "complete": False,
            "version": __version__,
        }
        prepare = (
            None
            if action == "resume"
            else functools.partial(
                create_image,
                out,
                plan,
                storage_dtype(dtype, job.volume.dtype)
                if companions
                else dtype,  # holds the other channels too
                job.voxel_size_nm,
                attributes,
                name=name,
                replace=action == "overwrite",
                ngff_version=job.ngff_version,
                channels=channel_entries(source, companions, dtype) if companions else None,
            )
        )

        result = run_blockwise(
            net,
            job.volume,
            plan,
            out,
            sigma=sigma,
            batch_size=batch_size,
            out_dtype=dtype,
            num_workers=num_workers,
            trainer=trainer,
            autocast_dtype=job.autocast_dtype,
            prepare=prepare,
            progress=progress,
            compile=compile_wanted(compile, plan.voxels, trainer),
        )
        blocks_done, blocks_skipped = result.blocks_done, result.blocks_skipped
        voxels, rank, first_batch = result.voxels_done, result.global_rank, result.first_batch_age_s
    if companions:
        resample_to = model_nm if resampled == "model" else None
        copy_companions(trainer, source, companions, plan, out, resample_to, progress=progress)
    seconds = time.perf_counter() - t0
    rate = voxels / seconds / 1e6 if seconds > 0 else 0.0
    if rank == 0 and action != "complete":
        log.info(
            "translated %s (%s voxels) in %.1f s, %.2f Mvox/s → %s",
            job.volume.path,
            "×".join(map(str, plan.shape)),
            seconds,
            rate,
            out,
            extra=summary_of("exem-translate"),
        )
    return TranslateResult(
        output=out,
        shape=plan.shape,
        seconds=seconds,
        voxels=int(voxels),
        mvox_per_s=rate,
        blocks_done=blocks_done,
        blocks_skipped=blocks_skipped,
        voxel_size_nm=None if job.volume.voxel_size_nm is None else job.voxel_size_nm,
        resampled=resampled,
        already_complete=action == "complete",
        first_batch_s=first_batch,
    )
