"""``train(cfg)``: compose data, model, logger, callbacks and Trainer from a Hydra config and fit."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

from exem.allocator import keep_freed_memory
from exem.config import ConfigError, check_missing, default_precision
from exem.quiet import lightning_noise_silenced

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished training run produced."""

    metric: float | None
    metrics: dict[str, float]
    output_dir: Path
    last_checkpoint: Path | None
    metrics_csv: Path | None
    panels: list[Path] = field(default_factory=list)
    global_step: int = 0
    batch_step: int = 0

    def summary(self) -> str:
        """What ``exem-train`` prints at the end: batches, where the outputs are, the validation metrics."""
        lines = [
            f"exem-train: done: {_count(self.batch_step, 'batch', 'batches')} ({self.global_step} optimizer steps)",
            f"  run dir      {self.output_dir}",
            f"  checkpoint   {self.last_checkpoint or 'none written'}",
            f"  metrics CSV  {self.metrics_csv or 'none written (no metrics were logged)'}",
        ]
        if self.panels:
            lines.append(
                f"  image panel  {self.panels[-1]}  (real ExM | fake EM | recovered ExM; EM row below)"
            )
        shown = {k: v for k, v in sorted(self.metrics.items()) if k.startswith("val/")}
        if shown:
            lines.append("  validation   " + "  ".join(f"{k}={v:.4g}" for k, v in shown.items()))
        return "\n".join(lines)


def _count(n: float, one: str, many: str) -> str:
    return f"{n:g} {one if n == 1 else many}"


def _instantiate_group(group: Mapping[str, Any] | None) -> list[Any]:
    if not group:
        return []
    return [instantiate(c) for c in group.values() if c is not None and "_target_" in c]


def _to_float(v: Any) -> float:
    return float(v.item()) if isinstance(v, torch.Tensor) else float(v)


def prepare_synthetic(cfg: DictConfig) -> None:
    """Write the synthetic phantoms a config asks for (``cfg.synthetic``; nothing when it is null)."""
    if cfg.get("synthetic"):
        from exem.data.synthetic import write_synthetic_dataset

        syn = OmegaConf.to_container(cfg.synthetic, resolve=True)
        write_synthetic_dataset(**syn)


def calibrate(cfg: DictConfig) -> tuple[Any, tuple[Path, Path]]:
    """Fit the content-loss groups to the data of a training config without training (``exem-calibrate``).

    Uses ``cfg.data`` (as ``exem-train``) and the fit settings in ``cfg.model.loss.content``; writes
    ``content_groups.json`` and ``content_groups.png`` into ``cfg.out_dir``.

    Returns:
        (:class:`exem.content_groups.CalibrationResult`, (json path, png path)).
    """
    from exem.content_groups import ContentFitSettings, fit_from_datamodule, write_content_groups

    check_missing(cfg)
    prepare_synthetic(cfg)
    content = OmegaConf.to_container(cfg.model.loss.content, resolve=True) if cfg.get("model") else {}
    settings, _ = ContentFitSettings.split(content)  # type: ignore[arg-type]
    datamodule = instantiate(cfg.data, _convert_="all")
    result = fit_from_datamodule(datamodule, settings)
    paths = write_content_groups(cfg.out_dir, result.fit, *result.pictures())
    return result, paths


def train(cfg: DictConfig) -> TrainResult:
    """Fit an :class:`~exem.module.ExEMModule` as configured; returns metrics and where the outputs are.

    Raises ConfigError / ValueError (including ``exem.data.VolumeError``) with one-line messages for user errors.
    """
    check_missing(cfg)
    L.seed_everything(cfg.seed, workers=True)
    prepare_synthetic(cfg)

    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    model.check_patch(list(cfg.data.patch_size))
    if cfg.get("ckpt_path"):
        if not Path(cfg.ckpt_path).is_file():
            raise ConfigError(f"ckpt_path {cfg.ckpt_path} does not exist")
        from exem.checkpoints import check_resume_checkpoint

        check_resume_checkpoint(cfg.ckpt_path, model)  # one line for a truncated / foreign / mismatched file

    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_cfg.get("precision") is None:
        trainer_cfg["precision"] = default_precision(trainer_cfg.get("accelerator"))
    loggers = _instantiate_group(cfg.get("logger"))
    callbacks = _instantiate_group(cfg.get("callbacks"))
    if "enable_progress_bar" not in trainer_cfg and not any(isinstance(c, ProgressBar) for c in callbacks):
        trainer_cfg["enable_progress_bar"] = False  # callbacks.progress_bar=null: no bar, not Lightning's own
    trainer: L.Trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)
    if trainer.strategy.root_device.type == "cpu":
        keep_freed_memory()  # activations reuse the heap instead of fresh pages (exem/allocator.py): ~8 % per step

    with lightning_noise_silenced():
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    metrics = {k: _to_float(v) for k, v in trainer.callback_metrics.items()}
    metric_name = cfg.get("optimized_metric")
    metric = metrics.get(metric_name) if metric_name else None
    if metric_name and metric is None:
        if any(k.startswith("val/") for k in metrics):
            log.warning("optimized_metric %s was not logged (metrics: %s)", metric_name, sorted(metrics))
        else:
            log.warning(
                "optimized_metric %s was not logged: no validation ran in this run's %s (an epoch is %s;"
                " trainer.val_check_interval, trainer.check_val_every_n_epoch)",
                metric_name,
                _count(model.batch_step, "batch", "batches"),
                _count(trainer.num_training_batches, "batch", "batches"),
            )
    out = Path(cfg.paths.output_dir)
    last = out / "checkpoints" / "last.ckpt"
    csv = next(iter(sorted(out.glob("csv/**/metrics.csv"))), None)
    image_dir = Path(cfg.model.image_dir) if cfg.model.get("image_dir") else None
    panels = sorted(image_dir.glob("*.png"), key=os.path.getmtime) if image_dir and image_dir.is_dir() else []
    return TrainResult(
        metric=metric,
        metrics=metrics,
        output_dir=out,
        last_checkpoint=last if last.is_file() else None,
        metrics_csv=csv,
        panels=panels,
        global_step=trainer.global_step,
        batch_step=model.batch_step,
    )
