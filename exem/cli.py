"""Command-line entry points (thin Hydra mains): ``exem-train``, ``exem-calibrate``, ``exem-synth``, ….

User errors (bad paths, bad data, bad config) end with one line on stderr and exit code 1.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from exem.quiet import LIGHTNING_ANNOUNCER, silence_lightning_noise

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
# OS errors that are about the user's environment, not a bug: full disk or quota, read-only or forbidden location.
_ENV_ERRNOS = ("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EACCES", "EPERM", "ENOTDIR", "EISDIR")
USER_OS_ERRNOS = frozenset(getattr(errno, name) for name in _ENV_ERRNOS if hasattr(errno, name))
# Exceptions named here are user errors too (matched by name: importing Lightning here would slow every CLI).
USER_ERROR_NAMES = frozenset({"MisconfigurationException"})  # Lightning: e.g. Trainer(devices=0)


def _is_user_error(err: BaseException) -> bool:
    if isinstance(err, USER_ERRORS) or type(err).__name__ in USER_ERROR_NAMES:
        return True
    return isinstance(err, OSError) and err.errno in USER_OS_ERRNOS


def _user_error(exc: BaseException) -> BaseException | None:
    """The user-facing error inside ``exc`` (Hydra's InstantiationException wraps the constructor's), if any."""
    seen: BaseException | None = exc
    visited: set[int] = set()
    while seen is not None and id(seen) not in visited:
        if _is_user_error(seen):
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
    logging.getLogger(LIGHTNING_ANNOUNCER).addFilter(lambda r: "Tip:" not in r.getMessage())
    silence_lightning_noise()


def _one_line(err: BaseException) -> str:
    """The message of a user error on one line.

    Errors raised inside DataLoader workers come back with the worker's traceback in their message; only its
    last line (``VolumeError: ...``) is kept.
    """
    if isinstance(err, MissingMandatoryValue):
        return f"missing mandatory config value {err.full_key}"
    if isinstance(err, OSError) and err.errno is not None and err.strerror:
        where = f": {err.filename}" if err.filename else ""
        return f"{err.strerror}{where}"
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


def _config_error_line(exc: BaseException) -> str:
    """A Hydra / OmegaConf error (unknown key, bad override, missing config group option) on one line."""
    text = str(exc).split("Config search path:")[0]  # (Hydra lists its search path after a missing option)
    text = " ".join(text.split())
    override = getattr(exc, "override", None)
    if isinstance(override, str) and override not in text:
        text = f"bad override {override!r}: {text}"
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        first = str(cause).strip().splitlines()[0].strip()
        if first and first not in text:
            text = f"{text} ({first})"
    return text or type(exc).__name__


def config_errors_one_line(prog: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Around a ``hydra.main``: configuration errors (unknown key, bad override, …) become one line and exit 1.

    Hydra prints these itself over several lines; here it re-raises them (``HYDRA_FULL_ERROR=1`` while the
    command runs) and they are printed as ``<prog>: error: <message>``. With ``HYDRA_FULL_ERROR=1`` set by the
    user, Hydra's full report is kept.
    """

    def deco(main: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(main)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from hydra.errors import HydraException
            from omegaconf.errors import OmegaConfBaseException

            user_full = os.environ.get("HYDRA_FULL_ERROR") == "1"
            previous = os.environ.get("HYDRA_FULL_ERROR")
            os.environ["HYDRA_FULL_ERROR"] = "1"
            try:
                return main(*args, **kwargs)
            except (HydraException, OmegaConfBaseException) as exc:
                if user_full:
                    raise
                print(f"{prog}: error: {_config_error_line(exc)}", file=sys.stderr)
                sys.exit(1)
            finally:
                if previous is None:
                    os.environ.pop("HYDRA_FULL_ERROR", None)
                else:
                    os.environ["HYDRA_FULL_ERROR"] = previous

        return wrapper

    return deco


@config_errors_one_line("exem-train")
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


@config_errors_one_line("exem-calibrate")
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="calibrate")
@one_line_errors("exem-calibrate")
def calibrate_main(cfg: DictConfig) -> None:
    """``exem-calibrate``: fit the content-loss groups to the data (as ``exem-train`` would) without training."""
    from exem.train import calibrate

    _tidy_logging()
    result, (json_path, png_path) = calibrate(cfg)
    fit = result.fit
    print(f"exem-calibrate: content groups of {fit.voxels[0]:,} ExM and {fit.voxels[1]:,} EM voxels")
    print(fit.table())
    print(f"chosen: {fit.describe()}")
    for note in fit.notes:
        print(f"warning: {note}")
    print(f"picture: {png_path}   record: {json_path}")
    print("to fix these groups in an experiment config:")
    print(fit.yaml_block())
    print(fit.summary_json())


@config_errors_one_line("exem-synth")
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


@config_errors_one_line("exem-export")
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


@config_errors_one_line("exem-translate")
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="translate")
@one_line_errors("exem-translate")
def translate_main(cfg: DictConfig) -> None:
    """``exem-translate``: a whole ExM volume (or ROI) → virtual EM OME-Zarr, resumable, on one or many devices."""
    from exem.checkpoints import load_generator
    from exem.inference import translate_volume
    from exem.train import check_missing

    _tidy_logging()
    check_missing(cfg)
    generator = load_generator(cfg.checkpoint, widths=None if cfg.widths is None else list(cfg.widths))
    trainer = _inference_trainer(cfg)
    seq = _seq
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
        intensity_range=seq(cfg.intensity_range),  # None: as the generator's training data (translate_volume)
        percentiles=seq(cfg.percentiles),
        resample=bool(cfg.resample),
        output_scale=str(cfg.output_scale),
        uncertainty=bool(cfg.uncertainty),
        uncertainty_output=cfg.uncertainty_output,
        compile=bool(cfg.compile),
    )
    if trainer.is_global_zero:
        z, y, x = result.shape
        print(
            f"exem-translate: {z}×{y}×{x} voxels in {result.seconds:.1f} s ({result.mvox_per_s:.2f} Mvox/s), "
            f"{result.blocks_done} blocks computed, {result.blocks_skipped} resumed → {result.output}"
        )
        if result.resampled:
            nm = "×".join(f"{v:g}" for v in result.voxel_size_nm or ())
            print(
                f"  resampled on the fly to the model's voxel size; output at the {result.resampled}'s: {nm} nm"
            )
        if result.uncertainty is not None:
            print(f"  reliability map (std over 8 in-plane flips/rotations) → {result.uncertainty}")


def _inference_trainer(cfg: DictConfig) -> Any:
    """A Lightning Trainer for inference from ``cfg.trainer`` (no logger, checkpoints or Lightning bars)."""
    from hydra.utils import instantiate

    from exem.train import default_precision

    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_cfg.get("precision") is None:
        trainer_cfg["precision"] = default_precision(trainer_cfg.get("accelerator"))
    trainer_cfg.update(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    return instantiate(trainer_cfg, callbacks=[])


def _seq(value: Any) -> list | None:
    return None if value is None else list(value)


def _segment_kwargs(cfg: Any) -> dict[str, Any]:
    """Keyword arguments of ``segment_volume`` from a config node (None = sidecar or default)."""

    def opt(key: str, cast: Callable[[Any], Any]) -> Any:
        value = cfg.get(key)
        return None if value is None else cast(value)

    return {
        "kind": opt("kind", str),
        "threshold": opt("threshold", float),
        "normalize": _seq(cfg.get("normalize")),
        "percentiles": _seq(cfg.get("percentiles")),
        "patch": _seq(cfg.get("patch")),
        "overlap": _seq(cfg.get("overlap")),
        "sigma": opt("sigma", float),
        "batch_size": opt("batch_size", int),
        "seed_erosion": opt("seed_erosion", int),
        "min_size": opt("min_size", int),
    }


# Hydra reads `model=...` as a choice of the config group conf/model/ (the generator's), so exem-segment's
# `model=PATH` reaches its config as `model_file=PATH` (segment_main renames the argument).
SEGMENT_MODEL_KEY = "model_file"


def _rename_cli_key(argv: list[str], key: str, new: str) -> list[str]:
    """``key=V`` (also ``+key=V``, ``++key=V``) → ``new=V`` in a Hydra command line."""
    out = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        out.append(f"{new}={value}" if sep and name.lstrip("+") == key else arg)
    return out


@config_errors_one_line("exem-segment")
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="segment")
@one_line_errors("exem-segment")
def _segment(cfg: DictConfig) -> None:
    from exem.analysis.segment import segment_volume
    from exem.train import check_missing

    _tidy_logging()
    if OmegaConf.is_missing(cfg, SEGMENT_MODEL_KEY):
        raise ValueError("missing mandatory config value model (set it: model=PATH of a .pt/.ts/.onnx file)")
    check_missing(cfg)
    trainer = _inference_trainer(cfg)
    result = segment_volume(
        cfg[SEGMENT_MODEL_KEY],
        cfg.input,
        cfg.output,
        **_segment_kwargs(cfg),
        dtype=str(cfg.dtype),
        overwrite=bool(cfg.overwrite),
        roi=_seq(cfg.roi),
        input_level=int(cfg.input_level),
        block_shape=_seq(cfg.block_shape),
        label_block=list(cfg.label_block),
        max_watershed_voxels=int(cfg.max_watershed_voxels),
        num_workers=cfg.num_workers,
        trainer=trainer,
    )
    if trainer.is_global_zero:
        z, y, x = result.shape
        what = "already complete, nothing computed" if result.already_complete else f"{result.seconds:.1f} s"
        print(
            f"exem-segment: {z}×{y}×{x} voxels ({what}), {result.num_objects} objects"
            f" ({result.kind}, threshold {result.threshold:g}) → {result.output}"
            f" (labels: {result.labels.name}/, probabilities: {result.probabilities.name}/)"
        )


def segment_main() -> None:
    """``exem-segment``: an EM-trained TorchScript/ONNX segmenter on a whole volume → probabilities + labels."""
    sys.argv = _rename_cli_key(sys.argv, "model", SEGMENT_MODEL_KEY)
    _segment()


@config_errors_one_line("exem-evaluate")
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
@one_line_errors("exem-evaluate")
def evaluate_main(cfg: DictConfig) -> None:
    """``exem-evaluate``: an EM segmenter on virtual EM vs raw ExM (vs real EM) against labels; CSV + PNG."""
    from exem.analysis.evaluate import dice_ratio_line, evaluate, format_table
    from exem.train import check_missing

    _tidy_logging()
    check_missing(cfg)
    trainer = _inference_trainer(cfg)
    tr = cfg.translate
    result = evaluate(
        cfg.exm,
        cfg.checkpoint,
        cfg.segmenter,
        cfg.labels,
        em=cfg.em,
        out=cfg.out,
        labels_class=None if cfg.labels_class is None else int(cfg.labels_class),
        roi=_seq(cfg.roi),
        exm_intensity_range=_seq(cfg.exm_intensity_range),
        exm_percentiles=_seq(cfg.exm_percentiles),
        translate_options={
            "patch": list(tr.patch),
            "overlap": _seq(tr.overlap),
            "batch_size": int(tr.batch_size),
        },
        segment_options={k: v for k, v in _segment_kwargs(cfg.segment).items() if v is not None},
        overwrite=bool(cfg.overwrite),
        trainer=trainer,
    )
    if trainer.is_global_zero:
        print(f"exem-evaluate: segmenter {cfg.segmenter} against {cfg.labels} ({result.seconds:.1f} s)")
        print(format_table(result.rows))
        ratio = dice_ratio_line(result.rows)
        if ratio:
            print(ratio)
        print(f"  table  {result.csv}\n  figure {result.png}")


@config_errors_one_line("exem-train-segmenter")
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="segmenter")
@one_line_errors("exem-train-segmenter")
def train_segmenter_main(cfg: DictConfig) -> None:
    """``exem-train-segmenter``: train the built-in EM segmenter on EM phantoms; write TorchScript + sidecars."""
    import torch

    from exem.analysis.segmenter import train_segmenter

    args = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    args.pop("hydra", None)
    threads = args.pop("threads", None)
    if threads is not None:
        torch.set_num_threads(int(threads))
    files = train_segmenter(args.pop("out_dir"), **args)
    for name, path in files.items():
        print(f"{name:9s} {path}  (+ {path.with_suffix('.yaml').name})")
    print(f"trained {files.steps} steps in {files.seconds:.0f} s ({files.parameters} parameters)")
    for split, scores in (("train", files.train_dice), ("val", files.val_dice)):
        print(f"  {split:5s} Dice  " + "  ".join(f"{k}={v:.3f}" for k, v in scores.items()))
