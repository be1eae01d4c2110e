"""How many patches go into one network call: a fixed number on the CPU, what the device's memory holds on a GPU."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "AUTO_BATCH_MEMORY_FRACTION",
    "AVAILABLE_SHARE",
    "DEFAULT_BATCH_SIZE",
    "MAX_AUTO_BATCH",
    "batch_for_memory",
    "probe_batch_size",
]

log = logging.getLogger(__name__)

# Patches per network call when none is given: on the CPU; on a GPU, :func:`batch_for_memory` decides.
DEFAULT_BATCH_SIZE = 8
# The largest automatic batch, and the share of the device's memory the network's activations may take.
MAX_AUTO_BATCH = 64
AUTO_BATCH_MEMORY_FRACTION = 0.5
# ... and the most of what the process can still allocate that they may take (the rest: contexts, sums, output).
AVAILABLE_SHARE = 0.9


def batch_for_memory(
    per_patch_bytes: int,
    device_bytes: int,
    fraction: float = AUTO_BATCH_MEMORY_FRACTION,
    available_bytes: int | None = None,
) -> int:
    """The automatic batch size: the largest power of two ≤ :data:`MAX_AUTO_BATCH` whose activations
    (``per_patch_bytes`` each) fit in ``fraction`` of ``device_bytes``; halved while they would take more than
    :data:`AVAILABLE_SHARE` of ``available_bytes`` (what this process can still allocate, when other processes
    hold much of the device); at least 1."""
    room = int(fraction * device_bytes) // max(int(per_patch_bytes), 1)
    batch = 1
    while batch * 2 <= min(room, MAX_AUTO_BATCH):
        batch *= 2
    if available_bytes is not None:
        while batch > 1 and batch * per_patch_bytes > AVAILABLE_SHARE * available_bytes:
            batch //= 2
    return batch


def probe_batch_size(net: nn.Module, patch: Sequence[int], device: torch.device, autocast_dtype: Any) -> int:
    """Patches per call for ``net`` on ``device``: :data:`DEFAULT_BATCH_SIZE` on the CPU; on a CUDA device, one
    patch is run to measure its peak memory and :func:`batch_for_memory` sizes the batch against the device's
    *total* memory (the same on every rank of identical GPUs and in a resumed run, so outputs do not depend on
    the moment). When other processes hold so much of the device that what this one can still allocate would not
    hold that batch, it is halved until it does, with a warning. The patch runs twice and the second call is
    measured (the first pays one-off allocations); the device's peak-memory statistics are reset by the probe."""
    if device.type != "cuda":
        return DEFAULT_BATCH_SIZE
    x = torch.zeros((1, 1, *patch), device=device)
    enabled = autocast_dtype is not None
    per_patch = 0
    # twice: the first call also pays one-off allocations (cuDNN's autotuning tries algorithms in workspaces taken
    # from the same memory pool when `benchmark` is on, cuBLAS/cuDNN handles), which would shrink the batch and
    # vary from run to run; the second measures what a call needs
    for _ in range(2):
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad(), torch.autocast("cuda", dtype=autocast_dtype or torch.bfloat16, enabled=enabled):
            net.forward(x)  # eager even when compiled: the run compiles for its own batch shape only
        torch.cuda.synchronize(device)
        per_patch = torch.cuda.max_memory_allocated(device) - before
    free, total = torch.cuda.mem_get_info(device)
    reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    batch = batch_for_memory(per_patch, total)
    limited = batch_for_memory(per_patch, total, available_bytes=free + reserved - allocated)
    if limited < batch:
        log.warning(
            "batch size %d instead of %d: other processes hold %.1f GiB of %s (batch_size= sets it; outputs "
            "computed with another batch size can differ in the last bits)",
            limited,
            batch,
            (total - free - reserved) / 2**30,
            device,
        )
        batch = limited
    log.info(
        "batch size %d (one patch took %.2f GiB of %.0f GiB on %s)",
        batch,
        per_patch / 2**30,
        total / 2**30,
        device,
    )
    return batch
