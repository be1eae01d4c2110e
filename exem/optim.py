"""Optimizers and learning-rate schedulers of :class:`~exem.module.ExEMModule`, built from config nodes.

``model.optimizer`` is a partial of an optimizer class: it is called with the parameters of each network group
(G_AB + G_BA, D_A, D_B). ``model.scheduler`` is None or a partial of a scheduler class, called with each
optimizer and stepped once per batch. Both are :mod:`exem.nodes` nodes (``_target_`` + keyword arguments).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from exem.nodes import call, complete, plain, target

__all__ = [
    "FUSED_DEVICES",
    "KERNEL_FLAGS",
    "PUBLISHED_OPTIMIZER",
    "kernel_flags",
    "make_optimizers",
    "make_schedulers",
    "optimizer_node",
    "scheduler_node",
]

# The published optimizer: Adam, lr 3e-4 (not multiplied by the batch size), betas (0.5, 0.999).
PUBLISHED_OPTIMIZER: dict[str, Any] = {
    "_target_": "torch.optim.Adam",
    "_partial_": True,
    "lr": 3.0e-4,
    "betas": [0.5, 0.999],
    "weight_decay": 0.0,
}
KERNEL_FLAGS = ("foreach", "fused")
# Devices with fused Adam/AdamW kernels, used when the optimizer node's foreach and fused are both null (auto).
FUSED_DEVICES = ("cpu", "cuda")


def optimizer_node(node: Mapping[str, Any] | None) -> dict[str, Any]:
    """``model.optimizer`` as used: a node with its own ``_target_`` as given, otherwise the published Adam
    updated with the given keys (``{"lr": 1e-3}``). The target is imported here, so a typo fails at once."""
    node = complete(node, PUBLISHED_OPTIMIZER)
    target(node, "model.optimizer")
    return node


def scheduler_node(node: Mapping[str, Any] | None, lr: float | None = None) -> dict[str, Any] | None:
    """``model.scheduler`` as used: None (no schedule) or a node with a ``_target_``.

    The form of checkpoints written before the config mirrored the constructors, ``{name: cosine_warm_restarts,
    T_0, T_mult, eta_min_fraction}``, becomes the same ``CosineAnnealingWarmRestarts`` with ``eta_min`` =
    ``eta_min_fraction`` × ``lr``.
    """
    node = plain(node)
    if not node:
        return None
    node = dict(node)
    if "_target_" not in node and node.get("name") == "cosine_warm_restarts":
        node = {
            "_target_": "torch.optim.lr_scheduler.CosineAnnealingWarmRestarts",
            "_partial_": True,
            "T_0": int(node["T_0"]),
            "T_mult": int(node.get("T_mult", 1)),
            "eta_min": float(node.get("eta_min_fraction", 0.0)) * float(lr or 0.0),
        }
    target(node, "model.scheduler")
    return node


def kernel_flags(node: Mapping[str, Any], device: torch.device, grad_clip: float | None) -> dict[str, bool]:
    """``foreach``/``fused`` for the optimizers: as the node sets them, or (both null) fused kernels on the CPU and
    CUDA (several times faster than the per-tensor loop, same update rule), foreach elsewhere. Fused kernels
    cannot be combined with Lightning's gradient clipping under mixed precision, so ``grad_clip`` gets foreach.
    Optimizers without these arguments get neither."""
    chosen = {k: bool(node[k]) for k in KERNEL_FLAGS if node.get(k) is not None}
    if chosen:
        return chosen
    accepted = inspect.signature(target(node, "model.optimizer")).parameters
    if "fused" in accepted and device.type in FUSED_DEVICES and not grad_clip:
        return {"fused": True}
    return {"foreach": True} if "foreach" in accepted else {}


def make_optimizers(
    node: Mapping[str, Any],
    groups: Sequence[Iterable[nn.Parameter]],
    device: torch.device,
    grad_clip: float | None = None,
) -> list[torch.optim.Optimizer]:
    """One optimizer per parameter group, from the ``model.optimizer`` node (see :func:`kernel_flags`)."""
    flags = kernel_flags(node, device, grad_clip)
    rest = {k: v for k, v in node.items() if k not in KERNEL_FLAGS}
    return [call(rest, "model.optimizer", list(params), **flags) for params in groups]


def make_schedulers(
    node: Mapping[str, Any] | None, optimizers: Sequence[torch.optim.Optimizer], names: Sequence[str]
) -> list[dict[str, Any]]:
    """Lightning scheduler entries (stepped every batch, logged as ``lr-<name>``), one per optimizer; none when
    ``node`` is None."""
    if not node:
        return []
    return [
        {"scheduler": call(node, "model.scheduler", opt), "interval": "step", "name": f"lr-{name}"}
        for opt, name in zip(optimizers, names, strict=True)
    ]
