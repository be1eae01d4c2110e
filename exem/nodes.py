"""Config nodes ``{_target_: dotted.path, **keyword arguments}`` (as in conf/model/exem.yaml) → objects.

Hydra instantiates such nodes itself when it builds the node above them. :class:`~exem.module.ExEMModule` gets its
nodes as plain mappings instead (``model._recursive_: false``) and calls them with :func:`call`: it builds two
networks from each network node and one optimizer per network group, and plain mappings keep its checkpoints
loadable with ``torch.load(weights_only=True)``. A node is a ``_target_`` and keyword arguments; Hydra's
``_partial_``, ``_recursive_`` and ``_convert_`` keys are accepted and not used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["HYDRA_KEYS", "call", "complete", "keyword_args", "locate", "plain", "target"]

HYDRA_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_"})


def plain(value: Any) -> Any:
    """OmegaConf containers → plain dicts/lists (other values unchanged)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def complete(node: Mapping[str, Any] | None, default: Mapping[str, Any]) -> dict[str, Any]:
    """The node to use: ``node`` as given when it names its own ``_target_``; otherwise ``default`` updated with
    ``node``'s keys (so ``{"widths": [8, 16]}`` changes one argument of the default class). None → ``default``."""
    given = dict(plain(node) or {})
    return given if "_target_" in given else {**default, **given}


def locate(path: str) -> Any:
    """The object a dotted path names (``"torch.optim.Adam"``); ImportError or AttributeError when none."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


def target(node: Mapping[str, Any], key: str) -> Callable[..., Any]:
    """The callable ``node["_target_"]`` names; a one-line ValueError naming ``key`` when there is none."""
    path = node.get("_target_")
    if not isinstance(path, str) or not path:
        raise ValueError(f"{key} needs a _target_ (a dotted class path), got {path!r}")
    try:
        obj = locate(path)
    except (ImportError, AttributeError):
        raise ValueError(f"{key}._target_: cannot import {path!r}") from None
    if not callable(obj):
        raise ValueError(f"{key}._target_: {path!r} is not callable")
    return obj


def keyword_args(node: Mapping[str, Any]) -> dict[str, Any]:
    """The node's keyword arguments (everything but Hydra's underscore keys)."""
    return {k: v for k, v in node.items() if k not in HYDRA_KEYS}


def call(node: Mapping[str, Any], key: str, *args: Any, **extra: Any) -> Any:
    """``target(*args, **node's keyword arguments, **extra)``; ``key`` (``"model.generator"``) names the node in
    errors."""
    return target(node, key)(*args, **keyword_args(node), **extra)
