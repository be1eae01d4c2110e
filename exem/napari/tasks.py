"""What the napari widgets run in a worker thread: exem's public functions with block-by-block progress.

No Qt here: each task takes a :class:`~exem.napari.layers.LayerInput` captured in the main thread and a
``report`` callable that receives :class:`Progress` values (the widgets pass a Qt signal's ``emit``, which
delivers them to the main thread). Progress comes from a Lightning callback on the inference trainer
(:class:`BlockProgress`), so it counts the engine's blocks.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np

from exem.analysis.segment import SegmentResult, read_sidecar, segment_volume
from exem.checkpoints import load_generator
from exem.data.volume import Volume, open_volume
from exem.inference.engine import default_trainer
from exem.inference.translate import TranslateResult, translate_volume
from exem.inference.uncertainty import default_uncertainty_path, reliability_map
from exem.napari.groups import ContentGroupPreview, preview_content_groups
from exem.napari.layers import LayerInput
from exem.trained import trained_normalization

__all__ = [
    "BlockProgress",
    "Progress",
    "TranslateOutputs",
    "default_output",
    "run_content_groups",
    "run_segment",
    "run_translate",
]

log = logging.getLogger(__name__)

Report = Callable[["Progress"], None]
# exem's outputs get these suffixes after the input's name (the translation's as exem-translate names it).
TRANSLATE_SUFFIX = "_virtual_em.ome.zarr"
SEGMENT_SUFFIX = "_segmentation.zarr"


@dataclass(frozen=True)
class Progress:
    """A step of a running task: ``done`` of ``total`` units (blocks) of ``stage``; ``total`` 0 = unknown."""

    stage: str
    done: int = 0
    total: int = 0

    @property
    def text(self) -> str:
        """``"virtual EM: 3/8 blocks"`` (or the stage alone when the total is unknown)."""
        return f"{self.stage}: {self.done}/{self.total} blocks" if self.total else self.stage


class BlockProgress(L.Callback):
    """Reports every block the inference engine finishes (one predict batch is one block), and ``after`` (the
    next stage, e.g. post-processing) when the engine is done."""

    def __init__(self, report: Report, stage: str, after: str | None = None) -> None:
        super().__init__()
        self.report = report
        self.stage = stage
        self.after = after
        self.done = 0
        self.total = 0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.total = int(sum(trainer.num_predict_batches))
        self.report(Progress(self.stage, 0, self.total))

    def on_predict_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self.done += 1
        self.report(Progress(self.stage, self.done, self.total))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.after:
            self.report(Progress(self.after))


def _trainer(report: Report, stage: str, after: str | None = None) -> L.Trainer:
    """The engine's default inference trainer with a :class:`BlockProgress` callback."""
    return default_trainer(callbacks=[BlockProgress(report, stage, after)])


def default_output(layer: LayerInput, suffix: str) -> Path:
    """A fresh output path for ``layer``: next to the file it came from, else in a new temporary folder;
    ``<name><suffix>``, or ``<name>-2<suffix>``, … when that exists."""
    folder = layer.path.parent if layer.path is not None else Path(tempfile.mkdtemp(prefix="exem-napari-"))
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in layer.name) or "layer"
    out, n = folder / f"{stem}{suffix}", 1
    while out.exists():
        n += 1
        out = folder / f"{stem}-{n}{suffix}"
    return out


@dataclass(frozen=True)
class TranslateOutputs:
    """The results of :func:`run_translate`: the virtual EM, and the reliability map when one was asked for."""

    virtual_em: TranslateResult
    reliability: TranslateResult | None = None

    @property
    def paths(self) -> list[Path]:
        """The outputs written, virtual EM first."""
        return [r.output for r in (self.virtual_em, self.reliability) if r is not None]


def run_translate(
    layer: LayerInput,
    checkpoint: str | Path,
    output: str | Path,
    *,
    report: Report,
    reliability: bool = False,
    patch: Sequence[int] | None = None,
    overlap: Sequence[int] | None = None,
    overwrite: bool = False,
    batch_size: int | None = None,
) -> TranslateOutputs:
    """Load the generator, translate the layer to virtual EM (and its reliability map) with
    :func:`exem.translate_volume` / :func:`exem.reliability_map`.

    Args:
        layer: the ExM layer (Z, Y, X); a file-backed one is read from its file, an in-memory one at its voxel size
            (nm) with the generator's training normalisation.
        checkpoint: anything :func:`exem.load_generator` accepts (``.ckpt``, ``.pth``, an export folder or its
            ``generator.safetensors``).
        output: the OME-Zarr written (uint8, the input's voxel size); the reliability map goes next to it
            (:func:`~exem.inference.uncertainty.default_uncertainty_path`).
        report: receives :class:`Progress` (blocks of each output).
        reliability: also write the reliability map (8 generator passes per patch).
        patch, overlap: (z, y, x) voxels; None → the generator's training patch and 25 % overlap.
        overwrite: replace existing outputs (else a complete output with the same settings is kept).
        batch_size: patches per network call (None: exem's default).
    """
    report(Progress("loading the generator"))
    generator = load_generator(checkpoint)
    source = layer.open(*trained_normalization(generator))
    options: dict[str, Any] = {
        "patch": patch,
        "overlap": overlap,
        "batch_size": batch_size,
        "num_workers": 0,  # no reader processes forked from a GUI
        "progress": False,
        "overwrite": overwrite,
        "complete_ok": True,
    }
    result = translate_volume(generator, source, output, trainer=_trainer(report, "virtual EM"), **options)
    log.info("%s", result.summary("napari translate"))
    uncertainty = None
    if reliability:
        uncertainty = reliability_map(
            generator,
            source,
            default_uncertainty_path(result.output),
            trainer=_trainer(report, "reliability map"),
            **options,
        )
    return TranslateOutputs(result, uncertainty)


def run_segment(
    layer: LayerInput,
    model: str | Path,
    output: str | Path,
    *,
    report: Report,
    overwrite: bool = False,
) -> SegmentResult:
    """Segment the layer with an EM model: :func:`exem.segment_volume` (probabilities, then labels).

    Args:
        layer: the (virtual) EM layer (Z, Y, X); a file-backed one is read from its file, an in-memory one at its
            voxel size (nm) with the model's input normalisation.
        model: passed to :func:`exem.segment_volume` as it is (TorchScript ``.pt``, ONNX ``.onnx``, a bioimage.io
            package folder or ``.zip``, …): exem loads it and applies its options (sidecar or package).
        output: the folder written (``probabilities/``, ``labels/``).
        report: receives :class:`Progress`.
        overwrite: replace an existing output with other settings.
    """
    normalize = None
    if (
        layer.path is None
    ):  # an in-memory layer is opened here: with the model's normalisation, if it sets one
        options = read_sidecar(model)  # a bioimage.io package has none: it normalises the data itself
        norm, percentiles = options.get("normalize"), options.get("percentiles")
        volume = layer.open(norm, percentiles)
        if norm is not None or percentiles is not None:
            normalize = list(volume.intensity_range)  # the range the percentiles gave, for exem's record
        source: str | Volume = volume
    else:
        source = layer.open()
    result = segment_volume(
        model,
        source,
        output,
        normalize=normalize,
        num_workers=0,
        progress=False,
        overwrite=overwrite,
        trainer=_trainer(report, "probabilities", after="labels"),
    )
    log.info("%s", result.summary("napari segment"))
    return result


def run_content_groups(
    layer: LayerInput,
    *,
    report: Report,
    checkpoint: str | Path | None = None,
    groups: int | None = None,
    percentiles: Sequence[float] | None = None,
    published: bool = False,
) -> ContentGroupPreview:
    """The content-loss intensity groups of an ExM layer, voxel by voxel (:mod:`exem.napari.groups`).

    Thresholds: a checkpoint's (the groups it was trained with, with its normalisation), the published ExEM
    defaults (``published``), or fitted to the layer as training fits them (``groups`` groups, multi-level Otsu).

    Args:
        layer: the ExM layer (Z, Y, X).
        report: receives :class:`Progress`.
        checkpoint: take the thresholds and the normalisation from this generator.
        groups: number of ExM groups of a fit (2 to 5; None: training's default).
        percentiles: (lo %, hi %) normalisation of the layer when no checkpoint gives one (None: the dtype range).
        published: use the published thresholds instead of a fit.
    """
    content: dict[str, Any] | None = None
    intensity_range, pct = None, percentiles
    if checkpoint is not None:
        report(Progress("loading the generator"))
        generator = load_generator(checkpoint)
        content = dict(generator.content_groups or {})
        if "lm_thresholds" not in content:
            raise ValueError(f"exem: {checkpoint} records no content groups (lm_thresholds)")
        intensity_range, pct = trained_normalization(generator)
    report(Progress("content groups"))
    source = layer.open(intensity_range, pct)
    volume = (
        source
        if isinstance(source, Volume)
        else open_volume(source, intensity_range=intensity_range, percentiles=pct)
    )
    full = (slice(None),) * 3
    x = np.asarray(volume.read_normalized(full), dtype=np.float32)
    return preview_content_groups(x, content=content, groups=groups, published=published)
