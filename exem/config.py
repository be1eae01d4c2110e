"""Config helpers shared by the commands and Python users: where the configs are, exem's resolvers, defaults
that depend on the machine (precision), the inference Trainer, and composing a config from Python.

The command-line tools (:mod:`exem.cli`) only compose, instantiate and call; what they need from the config
lives here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

__all__ = [
    "CONF_DIR",
    "TRAINING_LOOP_KEYS",
    "ConfigError",
    "check_missing",
    "compose_config",
    "conf_dir",
    "config_groups",
    "default_precision",
    "inference_trainer",
    "rename_cli_key",
    "wandb_offline",
]


class ConfigError(ValueError):
    """A problem with the composed configuration, reported to the user in one line."""


def conf_dir() -> str:
    """The Hydra config folder: ``conf/`` of a source checkout, or ``exem/conf`` inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"exem's Hydra configs were not found next to {here}")


def wandb_offline() -> bool:
    """wandb runs offline unless an API key is configured or WANDB_MODE=online (resolver ``exem_wandb_offline``)."""
    if os.environ.get("WANDB_MODE", "").lower() == "online":
        return False
    return not os.environ.get("WANDB_API_KEY")


OmegaConf.register_new_resolver("exem_wandb_offline", wandb_offline, replace=True)
CONF_DIR = conf_dir()


def config_groups(config_name: str) -> list[str]:
    """The config groups in the defaults list of ``conf/<config_name>.yaml`` (e.g. ``trainer``, ``experiment``);
    Hydra's own (``hydra/…``) and ``override`` entries left out."""
    node = OmegaConf.load(Path(CONF_DIR) / f"{config_name}.yaml")
    groups = []
    for entry in node.get("defaults", []):
        for key in entry.keys() if isinstance(entry, Mapping) else ():
            name = str(key).removeprefix("optional ")
            if "/" not in name and not name.startswith("override "):
                groups.append(name)
    return groups


def check_missing(cfg: DictConfig, hints: Mapping[str, str] | None = None) -> None:
    """Raise :class:`ConfigError` naming every mandatory (``???``) value that was not set.

    ``hints`` maps a key to the whole message for it (e.g. a key the command line spells differently).
    """
    missing = sorted(
        k for k in _missing_keys(OmegaConf.to_container(cfg, resolve=False)) if not k.startswith("hydra.")
    )
    for key, message in (hints or {}).items():
        if key in missing:
            raise ConfigError(message)
    if missing:
        example = " ".join(f"{k}=..." for k in missing)
        raise ConfigError(f"missing mandatory config value(s): {', '.join(missing)} (set them: {example})")


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose value is the literal ``???`` (interpolations to them are not listed, nor resolved)."""
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _missing_keys(v, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in _missing_keys(v, f"{prefix}{i}.")]
    return [prefix[:-1]] if node == "???" else []


def default_precision(accelerator: str | None) -> str:
    """bf16-mixed on a CUDA GPU that supports it (unless the CPU is requested), else 32-true."""
    import torch

    if accelerator not in ("cpu",) and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


# Keys of ``conf/trainer`` that only steer the training loop. An inference Trainer is built without them: they
# change nothing in ``Trainer.predict``, and Lightning would announce e.g. "validation will run at the end of the
# training epoch" in exem-translate's output.
TRAINING_LOOP_KEYS: frozenset[str] = frozenset(
    {
        "max_steps",
        "min_steps",
        "max_epochs",
        "min_epochs",
        "max_time",
        "val_check_interval",
        "check_val_every_n_epoch",
        "num_sanity_val_steps",
        "log_every_n_steps",
        "accumulate_grad_batches",
        "gradient_clip_val",
        "gradient_clip_algorithm",
        "limit_train_batches",
        "limit_val_batches",
        "limit_test_batches",
        "overfit_batches",
        "reload_dataloaders_every_n_epochs",
    }
)


def inference_trainer(trainer: Mapping[str, Any] | DictConfig) -> Any:
    """A Lightning Trainer for inference from a ``conf/trainer`` node: its accelerator, devices, strategy,
    precision (``null`` → :func:`default_precision`) and other settings, without the training loop's
    (:data:`TRAINING_LOOP_KEYS`), logger, checkpoints, Lightning bars or callbacks."""
    from hydra.utils import instantiate

    cfg = OmegaConf.to_container(trainer, resolve=True) if isinstance(trainer, DictConfig) else dict(trainer)
    cfg = {k: v for k, v in cfg.items() if k not in TRAINING_LOOP_KEYS}
    if cfg.get("precision") is None:
        cfg["precision"] = default_precision(cfg.get("accelerator"))
    cfg.update(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    return instantiate(cfg, callbacks=[])


def rename_cli_key(argv: Sequence[str], key: str, new: str) -> list[str]:
    """``key=V`` (also ``+key=V``, ``++key=V``) → ``new=V`` in a Hydra command line (e.g. exem-segment's
    ``model=PATH``, which Hydra would read as a choice of the config group ``conf/model``)."""
    out = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        out.append(f"{new}={value}" if sep and name.lstrip("+") == key else arg)
    return out


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
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(Path(output_dir).absolute())
        cfg.hydra.runtime.cwd = str(Path.cwd())
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg
