"""Pyramid levels computed where the data are: the 2× in-plane mean of a block's rows on its device, or on the host.

:func:`downsample_rows` gives exactly what :func:`exem.data.ome.downsample_inplane` gives on the host (integers:
the 2×2 sum in a wider type, rounded half to even with shifts; floats: ``(a + b + c + d) · 0.25`` in float32, or
float64 for float16 and float64), so a level computed on a GPU equals one computed by the writer thread.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from exem.data.ome import downsample_inplane

__all__ = ["downsample_block", "downsample_rows"]

_WIDER = {1: torch.int16, 2: torch.int32, 4: torch.int64, 8: torch.int64}


def downsample_rows(rows: Tensor) -> Tensor:
    """2× mean in Y and X of ``(C, Z, Y, X)`` (odd edges replicated); ``(C, Z, ⌈Y/2⌉, ⌈X/2⌉)``, same dtype/device.

    Raises:
        ValueError: not a 4-D tensor.
    """
    if rows.dim() != 4:
        raise ValueError(f"downsample_rows expects (C, Z, Y, X), got shape {tuple(rows.shape)}")
    if rows.shape[2] % 2:
        rows = torch.cat([rows, rows[:, :, -1:]], dim=2)
    if rows.shape[3] % 2:
        rows = torch.cat([rows, rows[:, :, :, -1:]], dim=3)
    corners = (rows[:, :, 0::2, 0::2], rows[:, :, 0::2, 1::2], rows[:, :, 1::2, 0::2], rows[:, :, 1::2, 1::2])
    if not rows.dtype.is_floating_point:
        total = corners[0].to(_WIDER[rows.element_size()], copy=True)
        for c in corners[1:]:
            total += c.to(total.dtype)
        total += ((total >> 2) & 1) + 1  # round half to even of total / 4 (as downsample_inplane)
        return (total >> 2).to(rows.dtype)
    work = torch.float64 if rows.dtype in (torch.float16, torch.bfloat16, torch.float64) else torch.float32
    total = corners[0].to(work, copy=True)
    for c in corners[1:]:
        total += c.to(work)
    return total.mul_(0.25).to(rows.dtype)


def downsample_block(data: np.ndarray) -> np.ndarray:
    """2× in-plane mean of a ``(C, Z, Y, X)`` block on the host: :func:`downsample_inplane` of each channel, written
    straight into the result (it steps over Z itself, its temporaries in cache)."""
    c, z, y, x = data.shape
    out = np.empty((c, z, -(-y // 2), -(-x // 2)), dtype=data.dtype)
    for ci in range(c):
        downsample_inplane(data[ci], out=out[ci])
    return out
