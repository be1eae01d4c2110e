"""Apply an EM-trained segmentation network (TorchScript or ONNX) to a whole (virtual) EM volume.

The network (:mod:`exem.analysis.em_models`) runs through the same core as translation (plan once with
:func:`exem.inference.job.plan_job`, resumable outputs with :mod:`exem.inference.output`, the blockwise engine
:func:`exem.inference.engine.run_blockwise`: one global patch grid, Gaussian blending, done-markers, DDP through a
Lightning Trainer), then its probability map is post-processed into instance labels
(:mod:`exem.analysis.instances`).

Output (one local folder, OME-Zarr 0.5 on Zarr v3 by default, 0.4 on Zarr v2 with ``ngff_version="0.4"``)::

    <output>/                 zarr group; attribute "exem": the settings, "complete", "num_objects"; NGFF
                              "labels": ["labels"] (so OME-Zarr readers opening <output> find the labels)
    <output>/probabilities/   OME-Zarr image, levels "0" and "1" (Y, X halved by 2×2 mean), float16: channel 0
                              of the model's output (foreground or boundary probability), blended
    <output>/labels/          OME-Zarr label image ("image-label" metadata), levels "0" and "1" (nearest
                              neighbour), uint32 instance ids (0 = background), the input's voxel size

``napari <output>/labels`` (with napari-ome-zarr) opens the labels as a labels layer.

Models take ``(B, 1, Z, Y, X)`` float32 in the model's own normalisation: ``normalize=[lo, hi]`` maps that raw
input range to [0, 1] (``percentiles=[lo %, hi %]`` of a sample instead; default: the volume's dtype range), and
return ``(B, C, Z, Y, X)`` whose channel 0 is the probability. Options (:data:`~exem.analysis.em_models.OPTION_KEYS`)
come from, in order of precedence: the arguments / command line, the model's sidecar file, the defaults.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import zarr
from torch import nn

from exem.analysis.em_models import (
    DEFAULT_OPTIONS,
    KINDS,
    OPTION_KEYS,
    OnnxModule,
    Segmenter,
    as_segmenter,
    check_options,
    find_sidecar,
    load_segmenter,
    package_options,
    read_sidecar,
    resolve_options,
)
from exem.analysis.instances import CONNECTIVITY, check_watershed_size, label_components, seeded_watershed
from exem.bioimageio.processing import reproduce_or_fail
from exem.checks import one_of, triple
from exem.data.channels import VIRTUAL_EM_CHANNEL
from exem.data.errors import channel_option
from exem.data.ome import RECORD_ATTRIBUTE, create_group, is_group, ngff_version_of, write_image_label
from exem.data.volume import Volume
from exem.inference.engine import run_blockwise
from exem.inference.job import open_input, plan_job
from exem.inference.output import (
    GRID_KEYS,
    create_image,
    inspect_output,
    local_output,
    read_record,
    remove_output,
    update_record,
)
from exem.inference.plan import BlockPlan, align_block, default_overlap, resolve_region
from exem.quiet import summary_of

__all__ = [
    "DEFAULT_OPTIONS",
    "KINDS",
    "OPTION_KEYS",
    "OnnxModule",
    "SegmentResult",
    "Segmenter",
    "find_sidecar",
    "load_segmenter",
    "read_sidecar",
    "segment_volume",
]

log = logging.getLogger(__name__)

PROBABILITY_DTYPES = ("float16", "float32")
PROBABILITIES = "probabilities"
LABELS = "labels"
TASK = "segment"
# how exem-segment chooses the channel of a multi-channel input (its channel= is the model's output channel)
INPUT_CHANNEL_OPTION = "input_channel=<index or name>"
# Default patch (z, y, x) voxels, capped by the volume (for a 2D bioimage.io model: Z slices per patch).
DEFAULT_PATCH = (16, 256, 256)
DEFAULT_PATCH_2D = (8, 256, 256)
# Post-processing blocks (z, y, x) of the blockwise connected components; rounded up to whole output chunks.
DEFAULT_LABEL_BLOCK = (32, 512, 512)
# The boundary watershed runs in memory: at most this many voxels (~4 GiB of RAM) unless raised.
DEFAULT_MAX_WATERSHED_VOXELS = 2**27
# The record keys a resume must match: the grid's, the model's and the post-processing's.
RECORD_KEYS = (
    *GRID_KEYS,
    "model",
    "kind",
    "threshold",
    "seed_erosion",
    "min_size",
    "label_block",
    "connectivity",
)


@dataclass(frozen=True)
class SegmentResult:
    """What :func:`segment_volume` did.

    Attributes:
        output: the output group.
        probabilities: its probability image (OME-Zarr, levels "0", "1").
        labels: its label image (OME-Zarr, uint32).
        shape: (Z, Y, X) voxels (the ROI's, or the input's).
        seconds: wall time of the call.
        num_objects: instances in the labels (None on ranks other than 0).
        kind, threshold: the post-processing used.
        blocks_done, blocks_skipped: engine blocks computed by this call / found done (resume).
        already_complete: the output was complete with these settings; nothing was computed.
    """

    output: Path
    probabilities: Path
    labels: Path
    shape: tuple[int, int, int]
    seconds: float
    num_objects: int | None
    kind: str
    threshold: float
    blocks_done: int
    blocks_skipped: int
    already_complete: bool = False
    check: Mapping[str, Any] | None = None

    def summary(self, prog: str = "segment") -> str:
        """One line as ``exem-segment`` prints it (a second with ``check=True``'s result)."""
        z, y, x = self.shape
        what = "already complete, nothing computed" if self.already_complete else f"{self.seconds:.1f} s"
        line = (
            f"{prog}: {z}×{y}×{x} voxels ({what}), {self.num_objects} objects"
            f" ({self.kind}, threshold {self.threshold:g}) → {self.output}"
            f" (labels: {self.labels.name}/, probabilities: {self.probabilities.name}/)"
        )
        if self.check is not None:
            tol = self.check["tolerance"]
            line += (
                f"\n{prog}: the package's test output reproduced: max |Δ| {self.check['max_abs_error']:.3g},"
                f" {self.check['mismatched_ppm']:.3g} ppm beyond {tol['absolute']:g} + {tol['relative']:g}·|expected|"
                f" (allowed {tol['mismatched_ppm']:g} ppm)"
            )
        return line


def _prepare(
    out: Path,
    action: str,
    plan: BlockPlan,
    dtype: str,
    voxel_size_nm: tuple[float, float, float],
    attributes: dict,
) -> None:
    """Create the output group and its probability image (global rank 0, inside the Lightning run), in the
    record's NGFF version."""
    version = attributes["ngff_version"]
    if action == "overwrite":
        remove_output(out)
    if action in ("create", "overwrite"):
        out.mkdir(parents=True, exist_ok=True)
        create_group(out, version).attrs[RECORD_ATTRIBUTE] = attributes
    if not is_group(out / PROBABILITIES):  # also after a kill between the two creations
        create_image(
            out / PROBABILITIES,
            plan,
            dtype,
            voxel_size_nm,
            attributes,
            name=PROBABILITIES,
            ngff_version=version,
        )


def _create_labels(
    root: Path, plan: BlockPlan, voxel_size_nm: tuple[float, float, float]
) -> list[zarr.Array]:
    """(Re)create the NGFF label image ``<root>/labels`` (the root's format; listed in the root's ``labels``, its
    source ``../probabilities``; no colours: instance ids); returns its level arrays."""
    parent = zarr.open_group(str(root), mode="r+")
    group = create_image(
        root / LABELS,
        plan,
        "uint32",
        voxel_size_nm,
        {"task": "labels"},
        name=LABELS,
        replace=True,
        ngff_version=ngff_version_of(parent),
    )
    write_image_label(group, parent=parent, source_image=f"../{PROBABILITIES}")
    return [group[str(lvl)] for lvl in range(plan.levels)]  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------------------
# the API


def segment_volume(
    model: str | Path | nn.Module,
    input: str | Path | Volume | Any,  # noqa: A002 - the natural name, mirrors the config key
    output: str | Path,
    *,
    kind: str | None = None,
    threshold: float | None = None,
    normalize: Sequence[float] | None = None,
    percentiles: Sequence[float] | None = None,
    patch: Sequence[int] | None = None,
    overlap: Sequence[int] | None = None,
    sigma: float | None = None,
    batch_size: int | None = None,
    seed_erosion: int | None = None,
    min_size: int | None = None,
    channel: int | str | None = None,
    check: bool = False,
    input_channel: int | str | None = None,
    options: Mapping[str, Any] | None = None,
    dtype: str = "float16",
    overwrite: bool = False,
    roi: Sequence[int] | None = None,
    input_level: int = 0,
    block_shape: Sequence[int] | None = None,
    label_block: Sequence[int] = DEFAULT_LABEL_BLOCK,
    max_watershed_voxels: int = DEFAULT_MAX_WATERSHED_VOXELS,
    num_workers: int | None = None,
    chunks: Sequence[int] | None = None,
    trainer: L.Trainer | None = None,
    autocast_dtype: str | None = None,
    progress: bool = True,
    ngff_version: str = "0.5",
    shards: Sequence[int] | None = None,
) -> SegmentResult:
    """Segment a whole (virtual) EM volume (or an ROI) with an EM-trained network; write probabilities and labels.

    Args:
        model: a TorchScript (``.pt``/``.ts``) or ONNX (``.onnx``) file (its sidecar options apply), a bioimage.io
            model package (folder, ``rdf.yaml`` or ``.zip``: its preprocessing with statistics of the whole volume,
            valid patch sizes, halo), a :class:`Segmenter` from :func:`load_segmenter`, or any module
            ``(B, 1, Z, Y, X)`` → ``(B, C, Z, Y, X)``.
        input: a Zarr / OME-Zarr / TIFF path, a :class:`~exem.data.volume.Volume` or a numpy array.
        output: local folder written (layout in the module docstring). A complete output with the same settings is
            left as it is (nothing is computed); an incomplete one is resumed; other settings or a foreign folder
            need ``overwrite=True``.
        kind: ``foreground`` (threshold + connected components) or ``boundary`` (seeded watershed).
        threshold: foreground is ``p > threshold``; watershed seeds grow from ``boundary < threshold``.
        normalize: raw ``[lo, hi]`` mapped to the model's [0, 1]; or ``percentiles`` ``[lo %, hi %]`` of a sample.
            If either is given, the sidecar's normalisation is ignored; if none is set, the dtype range is used.
        patch, overlap, sigma, batch_size: the engine's patch grid (voxels), Gaussian window, patches per call.
        seed_erosion: erosions of the watershed seed mask (kind=boundary).
        min_size: objects (foreground) or seeds (boundary) with fewer voxels are dropped.
        channel: the model's output channel (index; or name, for a package; default 0). A package channel named
            like a boundary makes ``kind`` default to ``boundary``.
        input_channel: of a multi-channel input (index or name); default: its ``virtual_em`` channel (the output of
            ``exem-translate channel=…``), else one-line error listing the channels.
        check: run a package's test input through exem's path and compare with its test output (within the
            package's tolerance) before anything is written; the result is in :attr:`SegmentResult.check`.
        options: sidecar-level options (:data:`OPTION_KEYS`) for a module ``model``, or over a file's sidecar.
            ``None`` arguments take the sidecar's value, else :data:`DEFAULT_OPTIONS` (patch: (16, 256, 256)
            capped by the volume).
        dtype: probability storage, ``float16`` or ``float32``.
        overwrite: delete an existing output first.
        roi: (z0, z1, y0, y1, x0, x1) voxels of the input level; None → the whole volume.
        input_level: OME-Zarr level of the input.
        block_shape: engine block (voxels); None → default.
        label_block: (z, y, x) blocks of the connected-components pass (rounded up to whole chunks).
        max_watershed_voxels: the in-memory watershed refuses larger volumes.
        num_workers: reader processes; None → 0 on the CPU, 2 on a GPU.
        chunks: output chunks (z, y, x); None → ``(2·patch_z, 256, 256)`` capped by the shape.
        trainer: a Lightning Trainer (e.g. DDP); None → one device, chosen automatically.
        autocast_dtype: ``bfloat16``/``float16`` autocast for the network (GPU); None → the trainer's mixed
            precision (``bf16-mixed``: bfloat16; :func:`~exem.inference.engine.autocast_for`), else float32.
        progress: rich progress bars on stderr.
        ngff_version: ``"0.5"`` (OME-Zarr 0.5 on Zarr v3) or ``"0.4"`` (Zarr v2) for the whole output.
        shards: (z, y, x) voxels per shard file of the probabilities and labels (Zarr v3 sharding, whole chunks;
            engine blocks then follow whole shards); None: one file per chunk.

    Returns:
        a :class:`SegmentResult` (every rank; post-processing runs on global rank 0).

    Raises:
        FileNotFoundError: missing model. ValueError: unknown model type, bad options, model failure, watershed
        over the voxel limit. VolumeError: bad input. FileExistsError / PermissionError: output problems.
    """
    t0 = time.perf_counter()
    out = local_output(output)
    one_of(dtype, PROBABILITY_DTYPES, "dtype")
    segmenter, sidecar = as_segmenter(model)
    if options:
        sidecar = {**sidecar, **check_options(options, "options")}
    explicit = {
        "channel": channel,
        "kind": kind,
        "threshold": threshold,
        "normalize": normalize,
        "percentiles": percentiles,
        "patch": patch,
        "overlap": overlap,
        "sigma": sigma,
        "batch_size": batch_size,
        "seed_erosion": seed_erosion,
        "min_size": min_size,
    }
    chosen = channel if channel is not None else sidecar.get("channel", 0)
    sidecar = {**package_options(segmenter, chosen), **sidecar}
    opts = resolve_options(explicit, sidecar)
    segmenter = segmenter.with_channel(opts["channel"])
    package, overlap, statistics, checked = segmenter.package, opts["overlap"], None, None
    in_channel = (input_channel, VIRTUAL_EM_CHANNEL)  # a multi-channel translation: its virtual EM by default
    if package is None:
        if check:
            raise ValueError(
                f"check=true needs a bioimage.io package (with test tensors); {segmenter.source} is not one"
            )
        with channel_option(INPUT_CHANNEL_OPTION):
            volume = open_input(input, input_level, opts["normalize"], opts["percentiles"], *in_channel)
    else:
        if opts["normalize"] is not None or opts["percentiles"] is not None:
            raise ValueError(
                f"model {segmenter.source}: normalize/percentiles do not apply to a bioimage.io package"
                " (its preprocessing normalises, with statistics of the whole volume)"
            )
        checked = reproduce_or_fail(segmenter.net) if check else None
        with channel_option(INPUT_CHANNEL_OPTION):  # raw range set from the data next
            volume = open_input(input, input_level, (0.0, 1.0), None, *in_channel)
        raw_range, statistics = segmenter.net.fit_volume(volume)  # one sample: range and statistics
        volume = open_input(volume, intensity_range=raw_range)
    region = resolve_region(volume.shape, roi, (1, 1, 1))
    extent = (region[1] - region[0], region[3] - region[2], region[5] - region[4])
    if opts["patch"] is None and package is not None:
        patch3 = package.default_patch(extent, DEFAULT_PATCH_2D if package.is_2d else DEFAULT_PATCH)
    elif opts["patch"] is None:
        patch3 = tuple(min(p, s) for p, s in zip(DEFAULT_PATCH, extent, strict=True))
    else:
        patch3 = triple(opts["patch"], "patch")
        if package is not None:
            package.check_patch(patch3)
    if package is not None and overlap is None:
        overlap = package.default_overlap(patch3, default_overlap(patch3))
    job = plan_job(
        segmenter,
        volume,
        input,
        patch=patch3,
        overlap=overlap,
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
    shape = plan.shape
    assert plan.chunks is not None
    lblock = align_block(shape, plan.chunks, plan.levels, label_block, "label_block", shards=plan.shards)
    if opts["kind"] == "boundary":
        check_watershed_size(shape, int(max_watershed_voxels))  # before any compute
    record = job.record(
        sigma=float(opts["sigma"]),
        dtype=dtype,
        model={
            "format": segmenter.model_format,
            "fingerprint": segmenter.fingerprint,
            "channel": segmenter.channel,
            "statistics": statistics,
        },
        kind=opts["kind"],
        threshold=float(opts["threshold"]),
        seed_erosion=int(opts["seed_erosion"]),
        min_size=int(opts["min_size"]),
        label_block=list(lblock),
        connectivity=CONNECTIVITY,
    )
    action = inspect_output(
        out,
        record,
        keys=RECORD_KEYS,
        overwrite=bool(overwrite),
        what="segmentation",
        owned=lambda stored: stored.get("task") == TASK,
        complete_ok=True,
    )

    def result(num: int | None, done: int, skipped: int, complete: bool) -> SegmentResult:
        return SegmentResult(
            output=out,
            probabilities=out / PROBABILITIES,
            labels=out / LABELS,
            shape=shape,
            seconds=time.perf_counter() - t0,
            num_objects=num,
            kind=opts["kind"],
            threshold=float(opts["threshold"]),
            blocks_done=done,
            blocks_skipped=skipped,
            already_complete=complete,
            check=checked,
        )

    if action == "complete":
        return result((read_record(out) or {}).get("num_objects"), 0, len(plan.blocks), True)

    from exem import __version__

    attributes = {**record, "task": TASK, "model_source": segmenter.source, "complete": False}
    attributes["version"] = __version__
    prob_meta = read_record(out / PROBABILITIES) if action == "resume" else None
    if prob_meta is not None and prob_meta.get("complete"):
        log.info("%s: probabilities complete; post-processing only", out)
        done, skipped = 0, len(plan.blocks)
        rank = 0 if trainer is None else int(trainer.global_rank)
    else:
        run = run_blockwise(
            segmenter,
            job.volume,
            plan,
            out / PROBABILITIES,
            sigma=float(opts["sigma"]),
            batch_size=int(opts["batch_size"]),
            out_dtype=dtype,
            num_workers=num_workers,
            trainer=trainer,
            autocast_dtype=job.autocast_dtype,
            prepare=functools.partial(_prepare, out, action, plan, dtype, job.voxel_size_nm, attributes),
            progress=progress,
            halo=package.halo3 if package is not None else (0, 0, 0),
        )
        done, skipped, rank = run.blocks_done, run.blocks_skipped, run.global_rank
    if rank != 0:
        return result(None, done, skipped, False)

    levels = _create_labels(out, plan, job.voxel_size_nm)
    prob = zarr.open_group(str(out / PROBABILITIES), mode="r")["0"]
    if opts["kind"] == "foreground":
        num = label_components(
            prob,
            levels,
            threshold=float(opts["threshold"]),
            block_shape=lblock,
            min_size=int(opts["min_size"]),
            progress=progress,
        )
    else:
        num = seeded_watershed(
            prob,
            levels,
            threshold=float(opts["threshold"]),
            seed_erosion=int(opts["seed_erosion"]),
            min_size=int(opts["min_size"]),
            max_voxels=int(max_watershed_voxels),
        )
    update_record(out, complete=True, num_objects=int(num))
    res = result(num, done, skipped, False)
    log.info(
        "segmented %s (%s voxels, %s) in %.1f s: %d objects → %s",
        job.volume.path,
        "×".join(map(str, shape)),
        opts["kind"],
        res.seconds,
        num,
        out,
        extra=summary_of("exem-segment"),
    )
    return res
