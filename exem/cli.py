"""Command-line entry points (thin Hydra mains): ``exem-train``, ``exem-synth``.

User errors (bad paths, bad data, bad config) end with one line on stderr and exit code 1.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

log = logging.getLogger("exem")


def _conf_dir() -> str:
    """The Hydra config folder: ``conf/`` of a source checkout, or ``exem/conf`` inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"exem's Hydra configs were not found next to {here}")


def _wandb_offline() -> bool:
    """wandb runs offline unless an API key is configured or WANDB_MODE=online."""
    if os.environ.get("WANDB_MODE", "").lower() == "online":
        return False
    return not os.environ.get("WANDB_API_KEY")


OmegaConf.register_new_resolver("exem_wandb_offline", _wandb_offline, replace=True)
CONF_DIR = _conf_dir()
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, MissingMandatoryValue)


def _user_error(exc: BaseException) -> BaseException | None:
    """The user-facing error inside ``exc`` (Hydra's InstantiationException wraps the constructor's), if any."""
    seen: BaseException | None = exc
    visited: set[int] = set()
    while seen is not None and id(seen) not in visited:
        if isinstance(seen, USER_ERRORS):
            return seen
        visited.add(id(seen))
        seen = seen.__cause__ or seen.__context__
    return None


def _tidy_logging() -> None:
    """One copy of each log line (Hydra's handler, not Lightning's own) and no advertising tips."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for handler in list(lg.handlers):
            lg.removeHandler(handler)
        lg.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda r: "Tip:" not in r.getMessage()
    )
    # exem checkpoints after all three optimizer steps of a batch on purpose; Lightning warns about that.
    warnings.filterwarnings("ignore", message=".*no pre-optimization state was saved.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


def _one_line(err: BaseException) -> str:
    """The message of a user error on one line.

    Errors raised inside DataLoader workers come back with the worker's traceback in their message; only its
    last line (``VolumeError: ...``) is kept.
    """
    if isinstance(err, MissingMandatoryValue):
        return f"missing mandatory config value {err.full_key}"
    text = str(err)
    if "Original Traceback" in text:
        last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def one_line_errors(prog: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Turn user errors raised by a CLI body into ``<prog>: error: <message>`` on stderr and exit code 1."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - we re-raise what is not a user error
                err = _user_error(exc)
                if err is None:
                    raise
                print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
                log.debug("full traceback", exc_info=exc)
                sys.exit(1)

        return wrapper

    return deco


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
@one_line_errors("exem-train")
def train_main(cfg: DictConfig) -> float | None:
    """``exem-train``: train the ExM→EM CycleGAN; returns ``optimized_metric`` for Hydra sweepers."""
    from exem.train import train

    _tidy_logging()
    result = train(cfg)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
        print(f"exem-train: done: {result.batch_step} batches ({result.global_step} optimizer steps)")
        print(f"  run dir      {result.output_dir}")
        print(f"  checkpoint   {result.last_checkpoint}")
        print(f"  metrics CSV  {result.metrics_csv}")
        if result.panels:
            print(f"  image panel  {result.panels[-1]}  (real ExM | fake EM | recovered ExM; EM row below)")
        shown = {k: v for k, v in sorted(result.metrics.items()) if k.startswith("val/")}
        if shown:
            print("  validation   " + "  ".join(f"{k}={v:.4g}" for k, v in shown.items()))
    return result.metric


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="synth")
@one_line_errors("exem-synth")
def synth_main(cfg: DictConfig) -> None:
    """``exem-synth``: write synthetic ExM/EM phantoms and labels as OME-Zarr."""
    from exem.data.synthetic import write_synthetic_dataset

    args = OmegaConf.to_container(cfg, resolve=True)
    args.pop("hydra", None)
    paths = write_synthetic_dataset(**args)
    for name, path in paths.items():
        print(f"{name:14s} {path}")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
@one_line_errors("exem-export")
def export_main(cfg: DictConfig) -> None:
    """``exem-export``: write a generator as safetensors + JSON, TorchScript and ONNX, checked against PyTorch."""
    from exem.checkpoints import export_generator

    args = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    args.pop("hydra", None)
    files = export_generator(
        args["checkpoint"],
        args["output"],
        formats=args["formats"],
        direction=args["direction"],
        example_shape=args["example_shape"],
        overwrite=bool(args["overwrite"]),
    )
    for name, path in files.items():
        print(f"{name:12s} {path}")
    if files.torchscript_max_abs_diff is not None:
        print(f"torchscript check: max |ts - torch| = {files.torchscript_max_abs_diff:.3g}")
    if files.onnx_max_abs_diff is not None:
        diff = files.onnx_max_abs_diff
        print(f"onnx check: max |onnx - torch| = {diff:.3g} (onnxruntime CPU, tolerance 1e-4)")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="translate")
@one_line_errors("exem-translate")
def translate_main(cfg: DictConfig) -> None:
    """``exem-translate``: a whole ExM volume (or ROI) → virtual EM OME-Zarr, resumable, on one or many devices."""
    from hydra.utils import instantiate

    from exem.checkpoints import load_generator
    from exem.inference import translate_volume
    from exem.train import check_missing, default_precision

    _tidy_logging()
    check_missing(cfg)
    generator = load_generator(cfg.checkpoint)
    # Normalise the input as the generator's training data were, unless the command line says otherwise.
    trained = getattr(generator, "lm_normalization", None) or {}
    intensity_range = cfg.intensity_range
    percentiles = cfg.percentiles
    if intensity_range is None and percentiles is None:
        intensity_range, percentiles = trained.get("intensity_range"), trained.get("percentiles")
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_cfg.get("precision") is None:
        trainer_cfg["precision"] = default_precision(trainer_cfg.get("accelerator"))
    trainer_cfg.update(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer = instantiate(trainer_cfg, callbacks=[])

    def seq(value: Any) -> list | None:
        return None if value is None else list(value)

    result = translate_volume(
        generator,
        cfg.input,
        cfg.output,
        patch=list(cfg.patch),
        overlap=seq(cfg.overlap),
        sigma=float(cfg.sigma),
        batch_size=int(cfg.batch_size),
        dtype=str(cfg.dtype),
        roi=seq(cfg.roi),
        overwrite=bool(cfg.overwrite),
        input_level=int(cfg.input_level),
        block_shape=seq(cfg.block_shape),
        num_workers=cfg.num_workers,
        trainer=trainer,
        intensity_range=seq(intensity_range),
        percentiles=seq(percentiles),
    )
    if trainer.is_global_zero:
        z, y, x = result.shape
        print(
            f"exem-translate: {z}×{y}×{x} voxels in {result.seconds:.1f} s ({result.mvox_per_s:.2f} Mvox/s), "
            f"{result.blocks_done} blocks computed, {result.blocks_skipped} resumed → {result.output}"
        )
