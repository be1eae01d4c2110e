"""Tiny fixed "EM segmenters" for the segmentation tests, saved as TorchScript and as ONNX."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from exem.export import onnx_export

# EM grey band of the synthetic mitochondria (matrix ~118/255 between membranes ~55 and cytoplasm ~162).
BAND = (0.36, 0.56)
GAIN = 25.0
ONNX_OPSET = 18


class BandSegmenter(nn.Module):
    """Foreground probability = in-plane 3×3 mean of the input inside a grey band (soft edges); 2 channels.

    ``(B, 1, Z, Y, X)`` in [0, 1] → ``(B, 2, Z, Y, X)``: channel 0 the probability, channel 1 its complement.
    """

    def __init__(self, band: tuple[float, float] = BAND, gain: float = GAIN) -> None:
        super().__init__()
        self.smooth = nn.Conv3d(1, 1, (1, 3, 3), padding=(0, 1, 1), bias=False)
        with torch.no_grad():
            self.smooth.weight.fill_(1.0 / 9.0)
        self.lo, self.hi = band
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.smooth(x)
        p = torch.sigmoid(self.gain * (s - self.lo)) * torch.sigmoid(self.gain * (self.hi - s))
        return torch.cat([p, 1.0 - p], dim=1)


class Identity2(nn.Module):
    """Returns its input as channel 0 (e.g. a boundary map that is the image itself) and 1 − input as channel 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, 1.0 - x], dim=1)


def save_segmenters(folder: Path, model: nn.Module | None = None, name: str = "seg") -> tuple[Path, Path]:
    """Save ``model`` (default :class:`BandSegmenter`) as ``<name>.pt`` (traced TorchScript) and ``<name>.onnx``."""
    model = (model or BandSegmenter()).eval()
    folder.mkdir(parents=True, exist_ok=True)
    example = torch.rand(2, 1, 4, 16, 16)
    ts, onnx = folder / f"{name}.pt", folder / f"{name}.onnx"
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(model, example), str(ts))
    onnx_export(model, example, onnx, ONNX_OPSET, "torchscript")  # the exporter that works offline here
    return ts, onnx
