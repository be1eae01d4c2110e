"""Compose exem's Hydra configs from Python (notebooks, scripts), as the ``exem-*`` commands would."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

__all__ = ["compose_config"]


def compose_config(
    overrides: Sequence[str] = (),
    *,
    output_dir: str | Path,
    config_name: str = "train",
) -> DictConfig:
    """The composed config ``config_name`` (``train``, ``translate``, …) with command-line style ``overrides``.

    Hydra's run-time values (``${hydra:runtime.output_dir}`` and friends, used for the run folder) are set as a
    command would set them, with ``output_dir`` as the run folder, so the result can go straight to
    :func:`exem.train.train`.

    Example::

        cfg = compose_config(["experiment=demo", "trainer.max_steps=30"], output_dir="runs/try")
        result = exem.train(cfg)
    """
    from exem.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(Path(output_dir).absolute())
        cfg.hydra.runtime.cwd = str(Path.cwd())
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg
