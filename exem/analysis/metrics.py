"""Image-quality metrics on normalised volumes.

All inputs are float tensors ``(B, 1, Z, Y, X)`` with intensities in [0, 1] (``data_range`` = 1).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def psnr(pred: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB over the whole batch, ``pred``/``target`` of equal shape."""
    return peak_signal_noise_ratio(pred.float(), target.float(), data_range=data_range)


def ssim(pred: Tensor, target: Tensor, data_range: float = 1.0, kernel_size: int = 7) -> Tensor:
    """Structural similarity of ``(B, 1, Z, Y, X)`` volumes, averaged over in-plane (Y, X) slices.

    ExM and EM volumes are strongly anisotropic (Z is coarse, and a 2D patch has Z = 1), so SSIM is computed
    slice-wise in-plane with a Gaussian window of ``kernel_size`` pixels rather than with a 3D window.
    """
    if pred.shape != target.shape:
        raise ValueError(f"ssim: shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    b, c, z, y, x = pred.shape
    k = min(kernel_size, y, x)
    k = k if k % 2 == 1 else k - 1
    p = pred.float().permute(0, 2, 1, 3, 4).reshape(b * z, c, y, x)
    t = target.float().permute(0, 2, 1, 3, 4).reshape(b * z, c, y, x)
    return structural_similarity_index_measure(p, t, data_range=data_range, kernel_size=k)


@torch.no_grad()
def image_quality(pred: Tensor, target: Tensor) -> dict[str, Tensor]:
    """``{"psnr": dB, "ssim": [-1, 1]}`` of ``pred`` against ``target`` (both ``(B, 1, Z, Y, X)`` in [0, 1])."""
    return {"psnr": psnr(pred, target), "ssim": ssim(pred, target)}
