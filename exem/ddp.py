"""Gradient all-reduce under DDP for a batch of several optimizer steps: only the networks being trained.

A CycleGAN batch makes three optimizer steps (G, then D_A, then D_B), each with its own backward, and Lightning
wraps the whole module in one ``DistributedDataParallel``. With ``find_unused_parameters`` DDP then all-reduces
every gradient bucket at each of the three backwards, those of the networks the step does not train included
(their slots hold zeros or the already-averaged gradients of an earlier step): at the published sizes 3 × 352 MB
per batch where 352 MB carry the gradients.

:func:`allreduce_trainable` is a DDP communication hook that all-reduces a bucket only when one of its parameters
requires a gradient, and hands every other bucket back untouched. :class:`~exem.module.ExEMModule` freezes the
networks a step does not train (``requires_grad`` off), so the hook sends each network's gradients once per
batch. The result is the same: DDP copies a bucket back only into the gradients of parameters some rank used in
that backward, and a frozen parameter is used by none. Every rank runs the same steps, so every rank skips the
same buckets and the collectives stay matched.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations as objects (dist.GradBucket).
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

__all__ = ["GradientTraffic", "allreduce_trainable", "kept_per_rank", "register_trainable_allreduce"]

log = logging.getLogger(__name__)


@dataclass
class GradientTraffic:
    """The hook's state: the process group (None: the default one) and the bytes of gradient buckets it sent to
    the all-reduce and handed back unsent, counted over the run."""

    process_group: Any = None
    sent_bytes: int = 0
    skipped_bytes: int = 0


def allreduce_trainable(state: GradientTraffic, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook: average ``bucket`` over the ranks (torch's ``allreduce_hook``) when one of its
    parameters requires a gradient; otherwise return it as it is, without communicating."""
    buffer = bucket.buffer()
    size = buffer.numel() * buffer.element_size()
    if any(p.requires_grad for p in bucket.parameters()):
        state.sent_bytes += size
        return allreduce_hook(state.process_group, bucket)
    state.skipped_bytes += size
    done: torch.futures.Future[Tensor] = torch.futures.Future()
    done.set_result(buffer)
    return done


def register_trainable_allreduce(model: Any) -> GradientTraffic | None:
    """Register :func:`allreduce_trainable` on ``model`` when it is a ``DistributedDataParallel`` wrapper; returns
    the hook's state, or None (not DDP, or a communication hook is already registered: that one is kept)."""
    if not isinstance(model, DistributedDataParallel):
        return None
    if getattr(model, "_comm_hooks", None):  # e.g. DDPStrategy(ddp_comm_hook=...) on a GPU: the user's choice
        log.info(
            "DDP: a communication hook is already registered; every gradient bucket is all-reduced by it"
        )
        return None
    state = GradientTraffic()
    model.register_comm_hook(state, allreduce_trainable)
    return state


def kept_per_rank(module: torch.nn.Module, submodules: list[str]) -> None:
    """Make DDP leave the buffers of ``module``'s ``submodules`` (names, e.g. ``["pool_A"]``) alone: it broadcasts
    rank 0's parameters and buffers when it wraps a module, which would give every rank rank 0's replay pools (a
    resume loads each rank's own first, :func:`exem.replay.load_rank_pools`). Call before DDP wraps ``module``."""
    names = [f"{sub}.{name}" for sub in submodules for name, _ in module.get_submodule(sub).named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
