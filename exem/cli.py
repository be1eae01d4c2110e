"""Command-line entry points: compose the Hydra config, instantiate what it names (``_target_``), call it, print
a summary. User errors (bad paths, bad data, bad config) end with one line on stderr and exit code 1
(:mod:`exem.errors`); config helpers live in :mod:`exem.config`.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from exem.config import CONF_DIR, check_missing, inference_trainer, rename_cli_key
from exem.errors import config_errors_one_line, one_line_errors
from exem.quiet import LIGHTNING_ANNOUNCER, drop_summaries_of, silence_lightning_noise
from exem.startup import preload

__all__ = ["CONF_DIR"]


def _not_a_tip(record: logging.LogRecord) -> bool:
    return "Tip:" not in record.getMessage()


def _tidy_logging(prog: str) -> None:
    """One copy of each log line (Hydra's handler, not Lightning's own), no advertising tips, no HTTP request log,
    and no library summary line that ``prog`` prints itself."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for handler in list(lg.handlers):
            lg.removeHandler(handler)
        lg.propagate = True
    logging.getLogger(LIGHTNING_ANNOUNCER).addFilter(_not_a_tip)  # (once however often: the same function)
    silence_lightning_noise()
    drop_summaries_of(prog)
    # one INFO line per HTTP request (bioimageio.core's package test checks every URL of a description: 18 lines
    # for one cite URL); failures still show as warnings
    logging.getLogger("httpx").setLevel(logging.WARNING)


def command(
    prog: str, config_name: str, imports: Sequence[str], hints: Mapping[str, str] | None = None
) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """A Hydra main for ``conf/<config_name>.yaml`` whose errors (config or run) are one line from ``prog``;
    ``imports``: the modules the command runs (imported first, :func:`~exem.startup.preload`: a faster start and
    exit); ``hints``: messages for mandatory values that are missing (:func:`~exem.config.check_missing`)."""

    def deco(body: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @one_line_errors(prog)
        @functools.wraps(body)
        def run(cfg: DictConfig) -> Any:
            preload(imports)  # before _tidy_logging: Lightning installs its log handlers when imported
            _tidy_logging(prog)
            check_missing(cfg, hints)
            return body(cfg)

        main = config_errors_one_line(prog, config_name)(
            hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)(run)
        )
        main.preloads = tuple(imports)  # type: ignore[attr-defined]  # (tests check that they import)
        return main

    return deco


def _call(node: DictConfig, *args: Any, **kwargs: Any) -> Any:
    """Instantiate a ``_target_`` / ``_partial_`` node and call it."""
    return hydra.utils.instantiate(node)(*args, **kwargs)


def _plain(cfg: DictConfig) -> dict[str, Any]:
    args = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    args.pop("hydra", None)
    return args


def _print_files(files: Mapping[str, Any]) -> None:
    """One ``name  path`` line per file, the paths in one column."""
    width = max((len(str(name)) for name in files), default=0) + 1
    for name, path in files.items():
        print(f"{name:{width}s} {path}")


def _rank_zero() -> bool:
    """Whether this is global rank 0: Lightning's rank (set by the strategy; from RANK, SLURM_PROCID, … before)."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


@command("exem-train", "train", ["exem.train"])
def train_main(cfg: DictConfig) -> float | None:
    """``exem-train``: train the ExM→EM CycleGAN; returns ``optimized_metric`` for Hydra sweepers."""
    from exem.train import train

    result = train(cfg)
    if _rank_zero():
        print(result.summary())
    return result.metric


@command("exem-calibrate", "calibrate", ["exem.train"])
def calibrate_main(cfg: DictConfig) -> None:
    """``exem-calibrate``: fit the content-loss groups to the data (as ``exem-train`` would) without training."""
    from exem.train import calibrate

    result, (json_path, png_path) = calibrate(cfg)
    print(result.fit.report(json_path, png_path))


@command("exem-synth", "synth", ["exem.data.synthetic"])
def synth_main(cfg: DictConfig) -> None:
    """``exem-synth``: write synthetic ExM/EM phantoms and labels as OME-Zarr."""
    from exem.data.synthetic import write_synthetic_dataset

    _print_files(write_synthetic_dataset(**_plain(cfg)))


@command("exem-export", "export", ["exem.export"])
def export_main(cfg: DictConfig) -> None:
    """``exem-export``: write a generator as safetensors + JSON, TorchScript and ONNX, checked against PyTorch."""
    files = _call(cfg.export)
    _print_files(files)
    if files.summary():
        print(files.summary())


@command("exem-translate", "translate", ["exem.checkpoints", "exem.inference.uncertainty"])
def translate_main(cfg: DictConfig) -> None:
    """``exem-translate``: a whole ExM volume (or ROI) → virtual EM OME-Zarr, resumable, on one or many devices."""
    from exem.inference.uncertainty import default_uncertainty_path, reliability_map

    trainer = inference_trainer(cfg.trainer)
    generator = hydra.utils.instantiate(cfg.generator)
    translate = hydra.utils.instantiate(cfg.translate)
    result = translate(generator, cfg.input, cfg.output, trainer=trainer, complete_ok=bool(cfg.uncertainty))
    if trainer.is_global_zero:
        print(result.summary("exem-translate", first_batch=True))
    if cfg.uncertainty:
        where = cfg.uncertainty_output or default_uncertainty_path(result.output)
        options = {k: v for k, v in translate.keywords.items() if k != "dtype"}
        unc = reliability_map(generator, cfg.input, where, trainer=trainer, **options)
        if trainer.is_global_zero:
            print(f"  reliability map (std over 8 in-plane flips/rotations) → {unc.output}")


# Hydra reads `model=...` as a choice of the config group conf/model/ (the generator's), so exem-segment's
# `model=PATH` reaches its config as `model_file=PATH` (segment_main renames the argument).
SEGMENT_MODEL_KEY = "model_file"
MISSING_MODEL = "missing mandatory config value model (set it: model=PATH of a .pt/.ts/.onnx file)"


@command("exem-segment", "segment", ["exem.analysis.segment"], hints={SEGMENT_MODEL_KEY: MISSING_MODEL})
def _segment(cfg: DictConfig) -> None:
    trainer = inference_trainer(cfg.trainer)
    result = _call(cfg.segment, input=cfg.input, output=cfg.output, trainer=trainer)
    if trainer.is_global_zero:
        print(result.summary("exem-segment"))


def segment_main() -> None:
    """``exem-segment``: an EM-trained TorchScript/ONNX segmenter on a whole volume → probabilities + labels."""
    sys.argv = rename_cli_key(sys.argv, "model", SEGMENT_MODEL_KEY)
    _segment()


@command("exem-evaluate", "evaluate", ["exem.analysis.evaluate"])
def evaluate_main(cfg: DictConfig) -> None:
    """``exem-evaluate``: an EM segmenter on virtual EM vs raw ExM (vs real EM) against labels; CSV + PNG."""
    trainer = inference_trainer(cfg.trainer)
    result = _call(cfg.evaluate, trainer=trainer)
    if trainer.is_global_zero:
        print(f"exem-evaluate: segmenter {cfg.segmenter} against {cfg.labels} ({result.seconds:.1f} s)")
        print(result.summary())


@command("exem-train-segmenter", "segmenter", ["exem.analysis.segmenter"])
def train_segmenter_main(cfg: DictConfig) -> None:
    """``exem-train-segmenter``: train the built-in EM segmenter on EM phantoms; write TorchScript + sidecars."""
    import torch

    from exem.analysis.segmenter import train_segmenter

    args = _plain(cfg)
    threads = args.pop("threads", None)
    if threads is not None:
        torch.set_num_threads(int(threads))
    print(train_segmenter(args.pop("out_dir"), **args).summary())


@command("exem-measure", "measure", ["exem.analysis.measure"])
def measure_main(cfg: DictConfig) -> None:
    """``exem-measure``: one row per labelled object (size, centroid, box, intensities) → CSV, Parquet, PNG."""
    print(_call(cfg.measure).summary())
