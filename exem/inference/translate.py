"""Whole-volume translation ExM → virtual EM with a trained generator (``G_AB``), out of core and resumable.

``translate_volume`` opens the input, validates everything it can before any compute, creates (or resumes)
an OME-Zarr output (NGFF 0.4, levels ``"0"`` and ``"1"``, the input's voxel size) and runs the blockwise engine
(:func:`exem.inference.engine.run_blockwise`) on one device or many (pass a DDP ``lightning.Trainer``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
import zarr
from torch import nn

from exem.checkpoints import trained_normalization
from exem.checks import check_input_shape, triple
from exem.data.ome import create_ome_zarr
from exem.data.resample import RescaledNetwork, resample_volume, same_voxel_size, scale_roi
from exem.data.volume import Volume, open_volume
from exem.inference.engine import (
    DEFAULT_BLOCK_VOXELS,
    DEFAULT_NUM_WORKERS,
    OUT_DTYPES,
    BlockPlan,
    done_blocks,
    plan_blocks,
    resolve_region,
    run_blockwise,
)
from exem.inference.uncertainty import TTAStd

__all__ = [
    "DEFAULT_CHUNK_YX",
    "LEVELS",
    "TranslateResult",
    "default_chunks",
    "default_overlap",
    "plan_output",
    "translate_volume",
    "weights_fingerprint",
]

log = logging.getLogger(__name__)

# Pyramid levels written: "0" (full resolution) and "1" (Y and X halved, 2×2 mean).
LEVELS = 2
# In-plane output chunk size (voxels); Z chunks are two patches deep.
DEFAULT_CHUNK_YX = 256
# Default overlap of neighbouring patches, as a fraction of the patch (rounded to an even number of voxels).
DEFAULT_OVERLAP_FRACTION = 0.25
OUTPUT_NAME = "virtual_em"
OUTPUT_SCALES = ("input", "model")
# Settings recorded in the output's "exem" attribute; a resume must match all of them.
_SETTINGS = (
    "input",
    "input_level",
    "roi",
    "shape",
    "patch",
    "overlap",
    "sigma",
    "dtype",
    "autocast_dtype",
    "intensity_range",
    "generator",
    "block_shape",
    "chunks",
    "levels",
    "scale",
)


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
        uncertainty: the reliability map written with ``uncertainty=True`` (else None).
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
    uncertainty: Path | None = None


def default_overlap(patch: Sequence[int]) -> tuple[int, int, int]:
    """25 % of the patch per axis, rounded to an even number of voxels (0 for an axis of size 1)."""
    out = []
    for p in triple(patch, "patch"):
        o = 2 * round(p * DEFAULT_OVERLAP_FRACTION / 2)
        out.append(min(o, p - 1) if p > 1 else 0)
    return tuple(out)  # type: ignore[return-value]


def default_chunks(shape: Sequence[int], patch: Sequence[int]) -> tuple[int, int, int]:
    """Output chunks ``(2·patch_z, 256, 256)`` capped by the output shape."""
    pz = triple(patch, "patch")[0]
    want = (2 * pz, DEFAULT_CHUNK_YX, DEFAULT_CHUNK_YX)
    return tuple(min(int(c), int(s)) for c, s in zip(want, shape, strict=True))  # type: ignore[return-value]


def weights_fingerprint(module: nn.Module) -> str:
    """SHA-1 of the module's state (dtype, shape and bytes of every state-dict tensor, in order; no names)."""
    h = hashlib.sha1()
    for t in module.state_dict().values():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _check_patch(generator: nn.Module, patch: tuple[int, int, int]) -> None:
    if min(patch) < 1:
        raise ValueError(f"patch must be positive, got {list(patch)}")
    check_input_shape(generator, patch)


def _open_input(
    source: Any,
    level: int,
    intensity_range: Sequence[float] | None,
    percentiles: Sequence[float] | None,
) -> Volume:
    if isinstance(source, Volume):
        if percentiles is not None:
            raise ValueError(
                "percentiles apply when opening the input; give a path, or open the volume with them"
            )
        if intensity_range is not None:
            lo, hi = (float(v) for v in intensity_range)
            if not hi > lo:
                raise ValueError(f"intensity range [{lo:g}, {hi:g}] must have hi > lo")
            return replace(source, intensity_range=(lo, hi))
        return source
    return open_volume(source, level=level, intensity_range=intensity_range, percentiles=percentiles)


def _input_id(volume: Volume, source: Any) -> str:
    if isinstance(source, (str, Path)) and "://" not in str(source):
        return str(Path(source).expanduser().resolve())
    return volume.path


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _describe_differences(stored: dict, settings: dict) -> str:
    diffs = []
    for key in _SETTINGS:
        old, new = stored.get(key), settings.get(key)
        if old != new:
            if key == "generator" and isinstance(old, dict) and isinstance(new, dict):
                keys = [k for k in new if old.get(k) != new.get(k)]
                diffs.append("generator " + ", ".join(f"{k} {old.get(k)} (now {new.get(k)})" for k in keys))
            else:
                diffs.append(f"{key} {old} (now {new})")
    return "; ".join(diffs)


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _inspect_output(
    out: Path, settings: dict, overwrite: bool, plan: BlockPlan, allow_complete: bool = False
) -> str:
    """Decide what to do with the output (read-only): ``create`` | ``overwrite`` | ``resume``, or raise.

    With ``allow_complete``, a complete output written with the same settings gives ``complete`` (nothing to do).
    """
    exists = out.exists() and not (out.is_dir() and not any(out.iterdir()))
    if not exists:
        anchor = _nearest_existing(out.parent)
        if not os.access(anchor, os.W_OK | os.X_OK):
            raise PermissionError(f"output {out}: cannot create it, {anchor} is not writable")
        return "create"
    if overwrite:
        for p in (out.parent, out):
            if not os.access(p, os.W_OK | os.X_OK):
                raise PermissionError(f"output {out}: cannot replace it, {p} is not writable")
        return "overwrite"
    stored = None
    try:
        attrs = dict(zarr.open_group(str(out), mode="r").attrs)
        stored = attrs.get("exem") if isinstance(attrs.get("exem"), dict) else None
    except Exception:  # noqa: BLE001 - anything unreadable is "not an exem output"
        stored = None
    if stored is None or "patch" not in stored:
        raise FileExistsError(
            f"output {out} exists and is not an exem translation; use overwrite=true or another output"
        )
    diff = _describe_differences(stored, settings)
    if stored.get("complete"):
        if allow_complete and not diff:
            log.info("%s is complete with the same settings; not recomputed", out)
            return "complete"
        raise FileExistsError(f"output {out} exists (complete); use overwrite=true")
    if diff:
        raise FileExistsError(
            f"output {out} exists (incomplete) with other settings: {diff}; use overwrite=true to start over"
        )
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"output {out}: cannot resume, it is not writable")
    n = len(done_blocks(out, plan, LEVELS))
    log.info("resuming %s: %d of %d blocks already done", out, n, len(plan.blocks))
    return "resume"


def _prepare_output(
    path: str,
    action: str,
    shape: tuple[int, int, int],
    dtype: str,
    voxel_size_nm: tuple[float, float, float],
    chunks: tuple[int, int, int],
    origin: tuple[int, int, int],
    attributes: dict,
    name: str = OUTPUT_NAME,
) -> None:
    """Create the OME-Zarr output (runs once, on global rank 0, inside the Lightning run); ``name`` is the
    multiscales name."""
    out = Path(path)
    if action == "resume":
        return
    if action == "overwrite" and out.exists():
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        else:
            out.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    group = create_ome_zarr(
        out,
        shape,
        dtype,
        voxel_size_nm,
        chunks=chunks,
        factors=[(1, 2**lvl, 2**lvl) for lvl in range(LEVELS)],
        name=name,
        attributes={"exem": attributes},
    )
    if any(origin):
        # NGFF: place the ROI where it lies in the input (scale, then translation, in physical units).
        multiscales = _jsonable(group.attrs["multiscales"])
        offset = [float(o) * float(v) for o, v in zip(origin, voxel_size_nm, strict=True)]
        for ds in multiscales[0]["datasets"]:
            ds["coordinateTransformations"].append({"type": "translation", "translation": offset})
        group.attrs["multiscales"] = multiscales


def _on_cpu(trainer: L.Trainer | None) -> bool:
    """Whether inference runs on the CPU: the trainer's device, or (no trainer) whether CUDA is absent."""
    if trainer is not None:
        return trainer.strategy.root_device.type == "cpu"
    return not torch.cuda.is_available()


def default_num_workers(trainer: L.Trainer | None) -> int:
    """Reader processes when none are configured: ``DEFAULT_NUM_WORKERS`` for an accelerator, which must be fed
    while it computes; 0 on the CPU, where compute is the bottleneck and readers would only compete with torch for
    the same cores (measured on 2 cores: 3.9 s with 0 workers vs 4.0-4.4 s with 1-2, model alone 3.8 s)."""
    return 0 if _on_cpu(trainer) else DEFAULT_NUM_WORKERS


# Default block budget on the CPU, where the block buffers live in RAM: with 2^26 voxels a translation peaked at
# 1.17 GiB RSS on a 2-core machine (benchmarks/RESULTS.md), 2^27 at 1.58 GiB; the target is < 2 GiB.
CPU_BLOCK_VOXELS = 2**26


def default_block_voxels(trainer: L.Trainer | None) -> int:
    """Voxel budget of the default block shape: the engine's default on an accelerator, less on the CPU."""
    return CPU_BLOCK_VOXELS if _on_cpu(trainer) else DEFAULT_BLOCK_VOXELS


def plan_output(
    volume: Volume,
    patch: tuple[int, int, int],
    overlap: tuple[int, int, int],
    roi: Sequence[int] | None,
    chunks: Sequence[int] | None,
    block_shape: Sequence[int] | None,
    trainer: L.Trainer | None,
) -> tuple[BlockPlan, tuple[int, int, int], tuple[float, float, float]]:
    """The block plan, output chunks and output voxel size of a whole-volume inference run.

    Shared by translation and segmentation: output chunks default to :func:`default_chunks` (else ``chunks``
    capped by the output shape), blocks to :func:`default_block_voxels` for the trainer's device, and the
    voxel size to the input's (1 nm with a warning when unknown).

    Raises:
        ValueError: bad ROI / patch / overlap / chunks / block shape (one line).
    """
    region = resolve_region(volume.shape, roi, patch)
    shape = (region[1] - region[0], region[3] - region[2], region[5] - region[4])
    if chunks is None:
        chunks3 = default_chunks(shape, patch)
    else:
        chunks3 = tuple(min(int(c), s) for c, s in zip(triple(chunks, "chunks"), shape, strict=True))
        if min(chunks3) < 1:
            raise ValueError(f"chunks must be positive, got {list(chunks)}")
    plan = plan_blocks(
        volume.shape,
        patch,
        overlap,
        roi=roi,
        block_shape=block_shape,
        chunks=chunks3,
        levels=LEVELS,
        block_voxels=default_block_voxels(trainer),
    )
    if volume.voxel_size_nm is None:
        log.warning("%s: voxel size unknown; the output says 1 nm per voxel", volume.path)
        voxel = (1.0, 1.0, 1.0)
    else:
        voxel = tuple(float(v) for v in volume.voxel_size_nm)
    return plan, chunks3, voxel  # type: ignore[return-value]


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
    if output_scale not in OUTPUT_SCALES:
        raise ValueError(f"output_scale must be one of {', '.join(OUTPUT_SCALES)}, got {output_scale!r}")
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


def translate_volume(
    generator: nn.Module,
    input: str | Path | Volume | Any,  # noqa: A002 - the natural name, mirrors the config key
    output: str | Path,
    *,
    patch: Sequence[int] = (16, 256, 256),
    overlap: Sequence[int] | None = None,
    sigma: float = 0.5,
    batch_size: int = 8,
    dtype: str = "uint8",
    roi: Sequence[int] | None = None,
    overwrite: bool = False,
    input_level: int = 0,
    block_shape: Sequence[int] | None = None,
    num_workers: int | None = None,
    trainer: L.Trainer | None = None,
    intensity_range: Sequence[float] | None = None,
    percentiles: Sequence[float] | None = None,
    chunks: Sequence[int] | None = None,
    autocast_dtype: str | None = None,
    progress: bool = True,
    resample: bool = True,
    output_scale: str = "input",
    model_voxel_size_nm: Sequence[float] | None = None,
    uncertainty: bool = False,
    uncertainty_output: str | Path | None = None,
    name: str = OUTPUT_NAME,
    compile: bool = False,  # noqa: A002 - the config key's name
) -> TranslateResult:
    """Translate a whole ExM volume (or an ROI) to virtual EM and write it as an OME-Zarr pyramid.

    Args:
        generator: ``(B, 1, Z, Y, X)`` float32 in [0, 1] → ``(B, 1, Z, Y, X)`` (e.g. an
            :class:`~exem.models.unet.AnisotropicUNet3D`); its weights' fingerprint is recorded in the output.
        input: a Zarr / OME-Zarr / TIFF path (opened with ``open_volume(level=input_level, …)``), or a
            :class:`~exem.data.volume.Volume` (or anything ``open_volume`` accepts, e.g. a numpy array).
        output: local folder of the OME-Zarr written (NGFF 0.4, levels ``"0"`` and ``"1"``, voxel size of the
            input; 1 nm with a warning when unknown). An existing complete output needs ``overwrite=True``; an
            incomplete one written with the same settings and weights is resumed.
        patch: (z, y, x) voxels per network call, as the generator sees them (at the model's voxel size when
            resampling); Y and X multiples of the generator's ``divisor``.
        overlap: (z, y, x) overlap of neighbouring patches, in the same voxels as ``patch``; None → 25 % of the
            patch (even, 0 for size 1).
        sigma: Gaussian blending window width on [−1, 1]³ (published 0.5).
        batch_size: patches per network call.
        dtype: ``uint8`` (``clip(round(255·x), 0, 255)``), ``float16`` or ``float32`` (unclipped).
        roi: (z0, z1, y0, y1, x0, x1) voxels of the input level; None → the whole volume.
        overwrite: delete an existing output first.
        input_level: OME-Zarr level of the input.
        block_shape: (z, y, x) voxels per output block (rounded up to chunks); None → engine default.
        num_workers: reader processes; None → :func:`default_num_workers`.
        trainer: a Lightning Trainer (e.g. DDP over several devices); None → one device, chosen automatically.
        intensity_range, percentiles: input normalisation (see ``open_volume``); must match training. Both
            None → the generator's training normalisation when it has one (``lm_normalization`` from its
            checkpoint, :func:`~exem.checkpoints.trained_normalization`), else the dtype range.
        chunks: output chunk shape (z, y, x); None → ``(2·patch_z, 256, 256)`` capped by the shape.
        autocast_dtype: ``bfloat16``/``float16`` to run the generator under autocast (GPU); None → float32.
        progress: show a progress bar (blocks, Mvox/s) on stderr.
        resample: when the generator was trained at another voxel size than the input's (``voxel_size_nm`` of
            :func:`~exem.checkpoints.load_generator`, or ``model_voxel_size_nm``), resample on the fly;
            False: translate the voxels as they are (with a warning).
        output_scale: ``input`` (default; the output has the input's voxel grid: each patch is resampled to the
            model's voxel size and back) or ``model`` (the input is read resampled to the model's voxel size and
            the output has that voxel size).
        model_voxel_size_nm: (z, y, x) nm the generator was trained at; None → ``generator.voxel_size_nm``.
        uncertainty: also write a reliability map: the per-voxel standard deviation of the virtual EM over the 8
            in-plane symmetries of each patch (:class:`~exem.inference.uncertainty.TTAStd`), float16 in
            normalised intensity units, same grid and blending, resumable like the virtual EM.
        uncertainty_output: where to write it; None → ``<output stem>_uncertainty.ome.zarr`` next to ``output``.
        name: the multiscales name written in the output's metadata.
        compile: ``torch.compile`` the generator for the run (GPU, large volumes: the first batch pays tens of
            seconds of compilation; results equal to float rounding).

    The generator is moved to the trainer's device (and put in eval mode) by Lightning and stays there.

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
    if "://" in str(output):
        raise ValueError(f"output {output}: only local paths are supported (done-markers are files)")
    if dtype not in OUT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(OUT_DTYPES)}, got {dtype!r}")
    if not float(sigma) > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if not isinstance(input, Volume):  # an opened Volume already carries its normalisation
        intensity_range, percentiles = trained_normalization(generator, intensity_range, percentiles)
    volume = _open_input(input, input_level, intensity_range, percentiles)
    roi_arg = roi  # in input voxels (the scale step may rewrite roi)
    model_nm = (
        model_voxel_size_nm if model_voxel_size_nm is not None else getattr(generator, "voxel_size_nm", None)
    )
    net, volume, roi, resampled = _apply_scale(
        generator, volume, roi, model_nm, bool(resample), str(output_scale)
    )
    patch3 = triple(patch, "patch")
    _check_patch(generator, patch3)
    if overlap is not None:
        overlap3 = triple(overlap, "overlap")
    if isinstance(net, RescaledNetwork):  # patch and overlap are the model's voxels; the grid is the input's
        model_patch = patch3
        patch3 = net.input_patch(model_patch)
        _check_patch(net, patch3)
        if overlap is not None:
            overlap3 = tuple(round(o * p / m) for o, p, m in zip(overlap3, patch3, model_patch, strict=True))  # type: ignore[assignment]
    if overlap is None:
        overlap3 = default_overlap(patch3)
    plan, chunks3, voxel = plan_output(volume, patch3, overlap3, roi, chunks, block_shape, trainer)
    shape = plan.shape

    from exem import __version__

    settings = _jsonable(
        {
            "input": _input_id(volume, input),
            "input_level": volume.level,
            "roi": list(plan.region),
            "shape": list(shape),
            "patch": list(patch3),
            "overlap": list(overlap3),
            "sigma": float(sigma),
            "dtype": dtype,
            "autocast_dtype": None if autocast_dtype is None else str(autocast_dtype),
            "intensity_range": list(volume.intensity_range),
            "generator": {
                "widths": list(getattr(generator, "widths", []) or []) or None,
                "fingerprint": weights_fingerprint(generator),
            },
            "block_shape": list(plan.block_shape),
            "chunks": list(chunks3),
            "levels": LEVELS,
            "scale": None
            if resampled is None
            else {"output": resampled, "model_voxel_size_nm": [float(v) for v in model_nm]},  # type: ignore[union-attr]
        }
    )
    out = Path(output).expanduser().absolute()
    action = _inspect_output(out, settings, bool(overwrite), plan, allow_complete=bool(uncertainty))
    attributes = {
        **settings,
        "generator_class": type(generator).__name__,
        "complete": False,
        "version": __version__,
    }
    if action == "complete":
        blocks_done, blocks_skipped, voxels, rank = (
            0,
            len(plan.blocks),
            0,
            trainer.global_rank if trainer else 0,
        )
    else:
        prepare = functools.partial(
            _prepare_output,
            str(out),
            action,
            shape,
            dtype,
            voxel,
            chunks3,
            plan.origin,
            attributes,
            name=name,
        )
        result = run_blockwise(
            net,
            volume,
            out,
            patch=patch3,
            overlap=overlap3,
            sigma=sigma,
            batch_size=batch_size,
            out_dtype=dtype,
            roi=plan.region,
            block_shape=plan.block_shape,
            num_workers=default_num_workers(trainer) if num_workers is None else int(num_workers),
            trainer=trainer,
            autocast_dtype=autocast_dtype,
            chunks=chunks3,
            levels=LEVELS,
            prepare=prepare,
            progress=progress,
            compile=compile,
        )
        blocks_done, blocks_skipped = result.blocks_done, result.blocks_skipped
        voxels, rank = result.voxels_done, result.global_rank
    seconds = time.perf_counter() - t0
    rate = voxels / seconds / 1e6 if seconds > 0 else 0.0
    if rank == 0 and action != "complete":
        log.info(
            "translated %s (%s voxels) in %.1f s, %.2f Mvox/s → %s",
            volume.path,
            "×".join(map(str, shape)),
            seconds,
            rate,
            out,
        )
    return TranslateResult(
        output=out,
        shape=shape,  # type: ignore[arg-type]
        seconds=seconds,
        voxels=int(voxels),
        mvox_per_s=rate,
        blocks_done=blocks_done,
        voxel_size_nm=None if volume.voxel_size_nm is None else voxel,  # type: ignore[arg-type]
        resampled=resampled,
        blocks_skipped=blocks_skipped,
        uncertainty=None
        if not uncertainty
        else _reliability_map(
            generator,
            input,
            out if uncertainty_output is None else Path(uncertainty_output).expanduser().absolute(),
            dict(
                patch=patch,
                overlap=overlap,
                sigma=sigma,
                batch_size=batch_size,
                roi=roi_arg,
                overwrite=overwrite,
                input_level=input_level,
                block_shape=block_shape,
                num_workers=num_workers,
                trainer=trainer,
                intensity_range=intensity_range,
                percentiles=percentiles,
                chunks=chunks,
                autocast_dtype=autocast_dtype,
                progress=progress,
                compile=compile,
                resample=resample,
                output_scale=output_scale,
                model_voxel_size_nm=model_voxel_size_nm,
            ),
            default=uncertainty_output is None,
        ),
    )


UNCERTAINTY_SUFFIX = "_uncertainty"
UNCERTAINTY_NAME = "virtual_em_std"


def default_uncertainty_path(output: str | Path) -> Path:
    """``<dir>/<stem>_uncertainty.ome.zarr`` for an output ``<dir>/<stem>.ome.zarr`` (or ``<stem>.zarr``)."""
    out = Path(output)
    name = out.name
    for ext in (".ome.zarr", ".zarr"):
        if name.endswith(ext):
            return out.with_name(name[: -len(ext)] + UNCERTAINTY_SUFFIX + ext)
    return out.with_name(name + UNCERTAINTY_SUFFIX + ".ome.zarr")


def _reliability_map(generator: nn.Module, source: Any, out: Path, kwargs: dict, default: bool) -> Path:
    """Write the TTA standard deviation of ``generator`` over the input (same grid) as float16; its path."""
    target = default_uncertainty_path(out) if default else out
    translate_volume(TTAStd(generator), source, target, dtype="float16", name=UNCERTAINTY_NAME, **kwargs)
    return target
