"""Image panels: middle slices of volumes side by side, as uint8 RGB arrays and PNG files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROW_TITLES_TRANSLATION = (
    ("real ExM", "fake EM", "recovered ExM"),
    ("real EM", "fake ExM", "recovered EM"),
)
LABEL_HEIGHT = 14
GAP = 4
MIN_TILE = 192  # small patches are enlarged (nearest neighbour) to at least this many pixels across
MASK_ALPHA = 0.45  # opacity of a mask drawn over an image by overlay_mask
PREDICTION_COLOR = (255, 48, 48)
TRUTH_COLOR = (40, 200, 255)


def middle_slice(volume: torch.Tensor | np.ndarray) -> np.ndarray:
    """The middle Z slice of the first sample of a ``(B, 1, Z, Y, X)`` tensor or a ``(Z, Y, X)`` array, as
    ``(Y, X)`` uint8 (intensities in [0, 1] clipped and scaled to 0..255)."""
    if isinstance(volume, torch.Tensor):
        volume = volume.detach().float().cpu().numpy()
    v = np.asarray(volume, dtype=np.float32)
    while v.ndim > 3:
        v = v[0]
    sl = v[v.shape[0] // 2]
    return np.clip(np.round(sl * 255.0), 0, 255).astype(np.uint8)


def grid_panel(
    rows: Sequence[Sequence[np.ndarray]], titles: Sequence[Sequence[str]] | None = None
) -> np.ndarray:
    """Tile ``(Y, X)`` grey or ``(Y, X, 3)`` RGB uint8 images (all the same size) into an RGB ``(H, W, 3)`` uint8
    panel with titles."""
    zoom = max(1, MIN_TILE // max(rows[0][0].shape[:2]))
    rows = [[img.repeat(zoom, axis=0).repeat(zoom, axis=1) for img in row] for row in rows]
    h, w = rows[0][0].shape[:2]
    ncols = max(len(r) for r in rows)
    label = LABEL_HEIGHT if titles else 0
    canvas = Image.new("RGB", (ncols * (w + GAP) + GAP, len(rows) * (h + label + GAP) + GAP), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            x0, y0 = GAP + j * (w + GAP), GAP + i * (h + label + GAP)
            if titles:
                draw.text((x0, y0), titles[i][j], fill=(0, 0, 0))
            canvas.paste(Image.fromarray(img).convert("RGB"), (x0, y0 + label))
    return np.asarray(canvas)


def translation_panel(
    row_a: Sequence[torch.Tensor | np.ndarray], row_b: Sequence[torch.Tensor | np.ndarray]
) -> np.ndarray:
    """Panel of ``[real A, fake B, recovered A]`` over ``[real B, fake A, recovered B]`` (middle Z slices)."""
    rows = [[middle_slice(v) for v in row_a], [middle_slice(v) for v in row_b]]
    return grid_panel(rows, ROW_TITLES_TRANSLATION)


def overlay_mask(
    image: np.ndarray,
    mask: np.ndarray,
    color: Sequence[int] = PREDICTION_COLOR,
    alpha: float = MASK_ALPHA,
) -> np.ndarray:
    """A ``(Y, X)`` uint8 grey image with the boolean ``(Y, X)`` mask blended in ``color``: ``(Y, X, 3)`` uint8."""
    if image.shape != mask.shape:
        raise ValueError(f"overlay_mask: image {image.shape} and mask {mask.shape} differ in shape")
    rgb = np.repeat(image[..., None], 3, axis=2).astype(np.float32)
    m = np.asarray(mask, dtype=bool)
    rgb[m] = (1.0 - alpha) * rgb[m] + alpha * np.asarray(color, dtype=np.float32)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def save_panel(panel: np.ndarray, path: str | Path) -> Path:
    """Write an ``(H, W, 3)`` uint8 panel as PNG, creating the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(panel).save(path)
    return path
