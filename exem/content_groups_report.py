"""The picture and the files of a content-group fit: ``content_groups.png`` and ``content_groups.json``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from exem.content_groups_record import OTSU_BINS, ContentGroups, group_name

# One hue per LM group (dark → bright); EM groups take the hue of the LM group they map onto.
_HUES = ((60, 120, 255), (255, 140, 0), (40, 200, 90), (220, 60, 200), (240, 220, 40))
_TILE = 320
_HIST_H = 150
_PAD = 8
_TEXT = 14


def _em_colours(fit: ContentGroups) -> list[tuple[int, int, int]]:
    """EM group colours: the hue of its LM group, lighter for the 2nd, 3rd… EM group sharing it."""
    seen: dict[int, int] = {}
    out = []
    for i in fit.em_to_lm:
        k = seen.get(i, 0)
        seen[i] = k + 1
        base = np.asarray(_HUES[i % len(_HUES)], dtype=np.float32)
        out.append(tuple(int(v) for v in base + (255 - base) * min(0.6, 0.35 * k)))
    return out


def _histogram(
    sample: np.ndarray, thresholds: Sequence[float], colours: Sequence[tuple[int, ...]]
) -> Image.Image:
    counts, _ = np.histogram(np.asarray(sample, np.float32).ravel(), bins=OTSU_BINS, range=(0.0, 1.0))
    heights = np.log1p(counts.astype(np.float64))
    heights = heights / max(1e-9, heights.max())
    img = Image.new("RGB", (_TILE, _HIST_H), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    bin_w = _TILE / OTSU_BINS
    centres = (np.arange(OTSU_BINS) + 0.5) / OTSU_BINS
    groups = np.searchsorted(np.asarray(thresholds), centres, side="right")
    for b in range(OTSU_BINS):
        h = int(round(heights[b] * (_HIST_H - _TEXT - 4)))
        if h:
            x0 = int(b * bin_w)
            draw.rectangle(
                [x0, _HIST_H - h, max(x0, int((b + 1) * bin_w) - 1), _HIST_H - 1], fill=colours[groups[b]]
            )
    for t in thresholds:
        x = int(round(t * _TILE))
        draw.line([x, _TEXT, x, _HIST_H], fill=(0, 0, 0), width=1)
        draw.text((min(x + 2, _TILE - 40), 1), f"{t:.3f}", fill=(0, 0, 0))
    return img


def _overlay(
    slice_: np.ndarray, thresholds: Sequence[float], colours: Sequence[tuple[int, ...]]
) -> Image.Image:
    s = np.clip(np.asarray(slice_, dtype=np.float32), 0.0, 1.0)
    grey = np.repeat((s * 255.0)[..., None], 3, axis=2)
    tint = np.asarray(colours, dtype=np.float32)[np.searchsorted(np.asarray(thresholds), s, side="right")]
    rgb = np.concatenate([grey, 0.55 * grey + 0.45 * tint], axis=1)  # the slice | its groups
    img = Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8))
    scale = (2 * _TILE) / img.width
    return img.resize((2 * _TILE, max(1, int(round(img.height * scale)))), Image.Resampling.NEAREST)


def content_groups_panel(
    fit: ContentGroups,
    lm_sample: np.ndarray,
    em_sample: np.ndarray,
    lm_slice: np.ndarray,
    em_slice: np.ndarray,
) -> np.ndarray:
    """The picture of a fit as an ``(H, W, 3)`` uint8 array.

    Left: ExM; right: EM. Top: each domain's histogram (log counts) coloured by group, thresholds drawn. Below:
    a middle slice of each domain and the same slice coloured by group. Colours say what becomes what: an EM group
    has the colour of the ExM group it is mapped onto.

    Args:
        fit: the fitted groups.
        lm_sample, em_sample: the normalised samples the fit used.
        lm_slice, em_slice: ``(Y, X)`` normalised slices of each domain.
    """
    lm_col = [_HUES[i % len(_HUES)] for i in range(len(fit.lm_fractions))]
    em_col = _em_colours(fit)
    tiles = [
        (
            "ExM (data.lm)",
            _histogram(lm_sample, fit.lm_thresholds, lm_col),
            _overlay(lm_slice, fit.lm_thresholds, lm_col),
        ),
        (
            "EM (data.em)",
            _histogram(em_sample, fit.em_thresholds, em_col),
            _overlay(em_slice, fit.em_thresholds, em_col),
        ),
    ]
    legend = []
    n_lm, n_em = len(fit.lm_fractions), len(fit.em_fractions)
    for i, targets in enumerate(fit.lm_to_em):
        ems = ", ".join(f"{group_name(j, n_em)} ({100 * fit.em_fractions[j]:.0f} %)" for j in targets)
        legend.append(
            (lm_col[i], f"ExM {group_name(i, n_lm)} ({100 * fit.lm_fractions[i]:.0f} %) -> EM {ems}")
        )
    col_w = 2 * _TILE
    body_h = max(t[2].height for t in tiles)
    height = _PAD + _TEXT + _HIST_H + _PAD + body_h + _PAD + (len(legend) + 1) * (_TEXT + 2) + _PAD
    canvas = Image.new("RGB", (2 * col_w + 3 * _PAD, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, (title, hist, over) in enumerate(tiles):
        x0 = _PAD + c * (col_w + _PAD)
        draw.text((x0, _PAD), f"{title}: histogram (log) | slice | groups", fill=(0, 0, 0))
        canvas.paste(hist, (x0 + (col_w - _TILE) // 2, _PAD + _TEXT))
        canvas.paste(over, (x0, _PAD + _TEXT + _HIST_H + _PAD))
    y = _PAD + _TEXT + _HIST_H + _PAD + body_h + _PAD
    for colour, text in legend:
        draw.rectangle([_PAD, y + 2, _PAD + 10, y + 12], fill=colour)
        draw.text((_PAD + 16, y), text, fill=(0, 0, 0))
        y += _TEXT + 2
    draw.text(
        (_PAD, y),
        f"score {fit.score:.3f} ({fit.polarity}; 1 = the mapped fractions are equal)",
        fill=(0, 0, 0),
    )
    return np.asarray(canvas)


def write_content_groups(
    out_dir: str | Path,
    fit: ContentGroups,
    lm_sample: np.ndarray,
    em_sample: np.ndarray,
    lm_slice: np.ndarray,
    em_slice: np.ndarray,
) -> tuple[Path, Path]:
    """Write ``content_groups.json`` (the fit, as stored in checkpoints, plus notes) and ``content_groups.png``
    into ``out_dir``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {**fit.as_config(), "notes": list(fit.notes)}
    json_path = out / "content_groups.json"
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    png_path = out / "content_groups.png"
    Image.fromarray(content_groups_panel(fit, lm_sample, em_sample, lm_slice, em_slice)).save(png_path)
    return json_path, png_path
