"""Does virtual EM help an EM-trained segmenter? Translate ExM, segment virtual EM, raw ExM and real EM, score.

:func:`evaluate` (``exem-evaluate``):

1. translates the ExM volume with the generator (``exem.inference.translate_volume``) into ``out/virtual_em.ome.zarr``;
2. segments with the same EM-trained model (:func:`exem.analysis.segment.segment_volume`, same options):
   (a) the virtual EM (``out/segment_virtual_em.zarr``), (b) the raw ExM (``out/segment_exm.zarr``), normalised
   to [0, 1] exactly as the generator's input was (the intensity range / percentiles it was trained with, as
   ``exem-translate`` does), (c) the real EM when given (``out/segment_em.zarr``);
3. scores each labelling against the ground truth: Dice and IoU of the foreground masks (labels > 0),
   variation of information (split, merge) and adapted Rand error of the instances, and the translation's
   PSNR / SSIM (virtual EM vs real EM, both normalised to [0, 1]) when the EM is given;
4. writes ``out/evaluation.csv`` (one row per input: em, virtual_em, exm) and ``out/evaluation.png`` (one row per
   input: image | predicted mask | ground-truth mask on the middle Z slice).

Ground truth: ``labels`` holds instance ids (uint32, 0 = background), e.g. the synthetic ``mito_test.zarr``;
with ``labels_class=K`` it is a semantic volume (e.g. the synthetic ``labels_test.zarr``: 0 cytoplasm,
1 membrane, 2 mitochondrion, 3 vesicle) whose class K is the binary truth, and the connected components
(faces connectivity) of that class are the true instances.

The scoring reads whole volumes into memory: evaluate on crops (``roi``) of a size that fits.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import zarr
from scipy import ndimage as ndi
from torch import nn

from exem.analysis.instances import CONNECTIVITY
from exem.analysis.metrics import adapted_rand_error, dice, image_quality, iou, variation_of_information
from exem.analysis.segment import load_segmenter, segment_volume
from exem.checks import fmt_voxels
from exem.data.channels import VIRTUAL_EM_CHANNEL
from exem.data.errors import channel_option
from exem.data.volume import Volume, open_volume
from exem.inference.plan import resolve_region
from exem.inference.translate import translate_volume
from exem.panels import PREDICTION_COLOR, TRUTH_COLOR, grid_panel, middle_slice, overlay_mask, save_panel
from exem.quiet import summary_of

__all__ = ["COLUMNS", "INPUTS", "EvaluationResult", "evaluate", "format_table"]

log = logging.getLogger(__name__)

INPUTS = ("em", "virtual_em", "exm")
"""Row order of the table: the segmenter on real EM, on virtual EM, on raw ExM."""
COLUMNS = ("input", "dice", "iou", "voi_split", "voi_merge", "adapted_rand_error", "psnr", "ssim")
TITLES = {"em": "EM", "virtual_em": "virtual EM", "exm": "ExM (normalised)"}
VIRTUAL_EM = "virtual_em.ome.zarr"
CSV_NAME = "evaluation.csv"
PNG_NAME = "evaluation.png"


@dataclass(frozen=True)
class EvaluationResult:
    """What :func:`evaluate` measured and wrote.

    Attributes:
        rows: one dict per input (``COLUMNS`` keys; ``input`` is ``em`` | ``virtual_em`` | ``exm``; psnr/ssim are
            NaN except for virtual EM with a real EM given).
        csv: the CSV table.
        png: the figure.
        virtual_em: the translation written.
        segmentations: input name → segmentation output folder.
        seconds: wall time.
    """

    rows: list[dict[str, Any]]
    csv: Path
    png: Path
    virtual_em: Path
    segmentations: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        """The score table, the Dice-relative-to-EM line (with an ``em`` row) and where the files are."""
        lines = [format_table(self.rows)]
        ratio = dice_ratio_line(self.rows)
        if ratio:
            lines.append(ratio)
        lines.append(f"  table  {self.csv}\n  figure {self.png}")
        return "\n".join(lines)


def _read_all(volume: Volume, roi: Sequence[int] | None, normalized: bool) -> np.ndarray:
    """The whole volume (or its ROI) as an array: raw, or float32 in [0, 1] by its intensity range."""
    r = (
        (0, volume.shape[0], 0, volume.shape[1], 0, volume.shape[2])
        if roi is None
        else tuple(int(v) for v in roi)
    )
    sl = (slice(r[0], r[1]), slice(r[2], r[3]), slice(r[4], r[5]))
    return volume.read_normalized(sl) if normalized else volume.read(sl)


def _ground_truth(
    vol: Volume, roi: Sequence[int] | None, labels_class: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """(instance ids, binary mask) of the ground truth."""
    if vol.dtype.kind not in "ui":
        raise ValueError(f"labels {vol.path}: expected integer ids or classes, got dtype {vol.dtype}")
    truth = _read_all(vol, roi, normalized=False)
    if labels_class is None:
        return truth.astype(np.uint32, copy=False), truth > 0
    mask = truth == int(labels_class)
    if not mask.any():
        present = ", ".join(str(int(v)) for v in np.unique(truth)[:10])
        raise ValueError(
            f"labels {vol.path}: class {labels_class} does not occur (classes present: {present})"
        )
    instances, _ = ndi.label(mask, structure=ndi.generate_binary_structure(3, CONNECTIVITY))
    return instances.astype(np.uint32), mask


def _scores(pred: np.ndarray, truth: np.ndarray, truth_mask: np.ndarray) -> dict[str, float]:
    split, merge = variation_of_information(pred, truth)
    return {
        "dice": dice(pred > 0, truth_mask),
        "iou": iou(pred > 0, truth_mask),
        "voi_split": split,
        "voi_merge": merge,
        "adapted_rand_error": adapted_rand_error(pred, truth) if truth.any() else math.nan,
    }


def _write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    k: (
                        ""
                        if isinstance(v, float) and math.isnan(v)
                        else f"{v:.6g}"
                        if isinstance(v, float)
                        else v
                    )
                    for k, v in row.items()
                }
            )
    return path


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a fixed-width text table (NaN shown as ``-``)."""
    head = f"{'input':<11}" + "".join(
        f"{c:>20}" if c == "adapted_rand_error" else f"{c:>10}" for c in COLUMNS[1:]
    )
    lines = [head]
    for row in rows:
        cells = []
        for c in COLUMNS[1:]:
            v = float(row[c])
            text = "-" if math.isnan(v) else f"{v:.4f}" if c != "psnr" else f"{v:.2f}"
            cells.append(f"{text:>20}" if c == "adapted_rand_error" else f"{text:>10}")
        lines.append(f"{row['input']:<11}" + "".join(cells))
    return "\n".join(lines)


def dice_ratio_line(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """``"Dice relative to EM: virtual EM 0.61×, raw ExM 0.00×"`` when the rows hold an ``em`` row with Dice > 0,
    else None: how much of what the segmenter reaches on real EM the virtual EM keeps."""
    dice = {str(r["input"]): float(r["dice"]) for r in rows}
    ref = dice.get("em")
    if ref is None or not ref > 0:
        return None
    parts = [f"{label} {dice[name] / ref:.2f}×" for name, label in (("virtual_em", "virtual EM"), ("exm", "raw ExM"))
             if name in dice]  # fmt: skip
    return f"Dice relative to EM ({ref:.4f}): " + ", ".join(parts)


def _figure(
    images: Mapping[str, np.ndarray], preds: Mapping[str, np.ndarray], truth_mask: np.ndarray, path: Path
) -> Path:
    """Rows: ExM, virtual EM, EM (when given); columns: image | predicted mask | ground-truth mask (middle Z)."""
    z = truth_mask.shape[0] // 2
    rows, titles = [], []
    for name in ("exm", "virtual_em", "em"):
        if name not in images:
            continue
        grey = middle_slice(images[name])
        rows.append(
            [
                grey,
                overlay_mask(grey, preds[name][z] > 0, PREDICTION_COLOR),
                overlay_mask(grey, truth_mask[z], TRUTH_COLOR),
            ]
        )
        titles.append((TITLES[name], f"segmented on {TITLES[name]}", "ground truth"))
    return save_panel(grid_panel(rows, titles), path)


def evaluate(
    exm: str | Path,
    checkpoint: str | Path | nn.Module | Any,
    segmenter: str | Path | nn.Module,
    labels: str | Path | np.ndarray,
    *,
    em: str | Path | None = None,
    out: str | Path = "evaluation",
    labels_class: int | None = None,
    roi: Sequence[int] | None = None,
    exm_intensity_range: Sequence[float] | None = None,
    exm_percentiles: Sequence[float] | None = None,
    exm_channel: int | str | None = None,
    translate_options: Mapping[str, Any] | None = None,
    segment_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    trainer: L.Trainer | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Segment virtual EM, raw ExM and (optionally) real EM with one EM-trained model; score against labels.

    Args:
        exm: the ExM volume (Zarr / OME-Zarr / TIFF).
        checkpoint: the generator: an ``exem-train`` checkpoint, an export, an ExEM ``.pth``
            (:func:`exem.checkpoints.load_generator`), a :class:`~exem.trained.TrainedGenerator`, or a module
            ``(B, 1, Z, Y, X)`` → same.
        segmenter: TorchScript / ONNX file (with its sidecar) or module (see :func:`segment_volume`).
        labels: ground truth of the same sample and grid as ``exm`` (instance ids, or classes with ``labels_class``).
        em: the real EM of the same sample and grid (optional): adds the ``em`` row and translation PSNR/SSIM.
        out: folder for the translation, the three segmentations, the CSV and the PNG.
        labels_class: take ``labels == labels_class`` as the binary truth (its connected components as instances).
        roi: (z0, z1, y0, y1, x0, x1) voxels, applied to every volume; None → whole volumes.
        exm_intensity_range, exm_percentiles: ExM normalisation; None → what the generator was trained with
            (its checkpoint's ``lm_normalization``), else the dtype range.
        exm_channel: the pan-protein channel of a multi-channel ExM volume (index or name; the OME-Zarr ``c``
            axis, a CZYX TIFF, a 4D Zarr); None for a single-channel one. Only that channel is translated and
            segmented (the ``exm`` row); the labels are on its grid.
        translate_options: more keyword arguments of :func:`translate_volume` (e.g. ``patch``, ``batch_size``).
        segment_options: more keyword arguments of :func:`segment_volume` (e.g. ``threshold``, ``patch``).
        overwrite: replace earlier outputs in ``out``.
        trainer: a Lightning Trainer used for every network pass; None → one device, chosen automatically.
        progress: rich progress bars on stderr.

    Returns:
        an :class:`EvaluationResult` with the rows in :data:`INPUTS` order (``em`` only with ``em``); on ranks
        other than 0 of a multi-process trainer, without rows (rank 0 scores and writes the table and figure).

    Raises:
        ValueError / FileNotFoundError / FileExistsError: one-line user errors (bad volumes, shapes that differ,
        a class that does not occur, outputs that exist without ``overwrite``).
    """
    from exem.checkpoints import load_generator
    from exem.trained import TrainedGenerator, trained_normalization

    t0 = time.perf_counter()
    folder = Path(out).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    # the intensity range is irrelevant for labels; giving one skips the dtype-range check of open_volume
    labels_volume = open_volume(labels, intensity_range=(0.0, 1.0))
    resolve_region(labels_volume.shape, roi, (1, 1, 1))  # a valid ROI, or a one-line error
    truth, truth_mask = _ground_truth(labels_volume, roi, labels_class)
    generator = (
        checkpoint if isinstance(checkpoint, (nn.Module, TrainedGenerator)) else load_generator(checkpoint)
    )
    exm_intensity_range, exm_percentiles = trained_normalization(
        generator, exm_intensity_range, exm_percentiles
    )
    with channel_option("exm_channel=<index or name>"):
        exm_volume = open_volume(
            exm, intensity_range=exm_intensity_range, percentiles=exm_percentiles, channel=exm_channel
        )
    em_volume = open_volume(em) if em is not None else None
    for name, vol in (("exm", exm_volume), ("em", em_volume)):
        if vol is not None and vol.shape != labels_volume.shape:
            raise ValueError(
                f"{name} {vol.path} has shape {fmt_voxels(vol.shape)} but the labels {labels_volume.path} have"
                f" {fmt_voxels(labels_volume.shape)}; give volumes of the same sample on the same voxel grid"
            )

    translation = translate_volume(
        generator,
        exm_volume,
        folder / VIRTUAL_EM,
        roi=roi,
        overwrite=overwrite,
        trainer=trainer,
        progress=progress,
        **{"other_channels": False, **dict(translate_options or {})},  # the antibodies are not scored
    )
    seg_net, sidecar = load_segmenter(segmenter) if isinstance(segmenter, (str, Path)) else (segmenter, {})
    inputs: dict[str, tuple[Any, Sequence[int] | None, list[float] | None]] = {
        "virtual_em": (translation.output, None, None),  # the translation is already the ROI
        "exm": (exm_volume, roi, list(exm_volume.intensity_range)),  # as the generator saw it
    }
    if em_volume is not None:
        inputs["em"] = (em_volume, roi, None)
    seg_kw = dict(segment_options or {})
    segmentations: dict[str, Path] = {}
    preds: dict[str, np.ndarray] = {}
    for name, (source, region, normalize) in inputs.items():
        kw = dict(seg_kw)
        if normalize is not None:
            kw.update(normalize=normalize, percentiles=None)
        res = segment_volume(
            seg_net,
            source,
            folder / f"segment_{name}.zarr",
            options=sidecar,
            roi=region,
            overwrite=overwrite,
            trainer=trainer,
            progress=progress,
            **kw,
        )
        segmentations[name] = res.output
        if res.num_objects is None:  # not global rank 0: the labels are rank 0's job
            continue
        preds[name] = np.asarray(zarr.open_group(str(res.labels), mode="r")["0"][...])
        if preds[name].shape != truth.shape:
            raise ValueError(
                f"segmentation of {name} has shape {preds[name].shape}, the labels {truth.shape}"
            )

    if trainer is not None and trainer.global_rank != 0:  # rank 0 writes the labels, scores and figures
        return EvaluationResult(
            rows=[], csv=folder / CSV_NAME, png=folder / PNG_NAME, virtual_em=translation.output
        )
    images = {
        "exm": _read_all(exm_volume, roi, normalized=True),
        "virtual_em": _read_all(
            open_volume(translation.output, prefer_channel=VIRTUAL_EM_CHANNEL), None, normalized=True
        ),
    }
    if em_volume is not None:
        images["em"] = _read_all(em_volume, roi, normalized=True)
    rows = []
    for name in INPUTS:
        if name not in preds:
            continue
        row: dict[str, Any] = {"input": name, **_scores(preds[name], truth, truth_mask)}
        row["psnr"] = row["ssim"] = math.nan
        if name == "virtual_em" and "em" in images:
            q = image_quality(
                torch.from_numpy(images["virtual_em"])[None, None], torch.from_numpy(images["em"])[None, None]
            )
            row["psnr"], row["ssim"] = float(q["psnr"]), float(q["ssim"])
        rows.append(row)
    csv_path = _write_csv(rows, folder / CSV_NAME)
    png_path = _figure(images, preds, truth_mask, folder / PNG_NAME)
    seconds = time.perf_counter() - t0
    log.info("evaluation in %.1f s → %s, %s", seconds, csv_path, png_path, extra=summary_of("exem-evaluate"))
    return EvaluationResult(
        rows=rows,
        csv=csv_path,
        png=png_path,
        virtual_em=translation.output,
        segmentations=segmentations,
        seconds=seconds,
    )
