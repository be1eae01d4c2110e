"""Compare a virtual EM volume with the ground-truth EM of the same sample: PSNR, SSIM and a picture.

python -m exem.analysis.compare --exm exm.zarr --virtual-em vem.zarr --em em.zarr --out compare.png
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from exem.analysis.metrics import image_quality
from exem.data.channels import VIRTUAL_EM_CHANNEL
from exem.data.volume import open_volume
from exem.errors import one_line_errors
from exem.panels import grid_panel, middle_slice, save_panel

TITLES = (("ExM input", "virtual EM", "ground-truth EM"),)


def _normalized(
    path: str | Path, percentiles: Sequence[float] | None = None, prefer_channel: str | None = None
) -> np.ndarray:
    """A whole (small) volume normalised to [0, 1] float32 ``(Z, Y, X)``; only for evaluation-sized data."""
    vol = open_volume(path, percentiles=percentiles, prefer_channel=prefer_channel)
    return vol.read_normalized(tuple(slice(0, s) for s in vol.shape))


def compare_translation(
    exm: str | Path,
    virtual_em: str | Path,
    em: str | Path,
    out_png: str | Path,
    *,
    exm_percentiles: Sequence[float] | None = (0.5, 99.8),
) -> dict[str, float]:
    """PSNR (dB) and SSIM of ``virtual_em`` against ``em`` (same shape, both normalised to [0, 1] by dtype range),
    and a PNG of the middle Z slices: ExM input | virtual EM | ground-truth EM. Returns ``{"psnr", "ssim"}``."""
    a = _normalized(exm, exm_percentiles)
    v = _normalized(virtual_em, prefer_channel=VIRTUAL_EM_CHANNEL)  # a multi-channel translation's virtual EM
    g = _normalized(em)
    if v.shape != g.shape:
        raise ValueError(f"virtual EM {v.shape} and ground-truth EM {g.shape} differ in shape")
    q = image_quality(torch.from_numpy(v)[None, None], torch.from_numpy(g)[None, None])
    save_panel(grid_panel([[middle_slice(a), middle_slice(v), middle_slice(g)]], TITLES), out_png)
    return {k: float(t) for k, t in q.items()}


@one_line_errors("exem.analysis.compare")
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Virtual EM vs ground-truth EM: PSNR, SSIM and a PNG panel.")
    ap.add_argument("--exm", required=True, help="the ExM input (shown in the panel)")
    ap.add_argument("--virtual-em", required=True, help="exem-translate output (OME-Zarr, level 0 is used)")
    ap.add_argument("--em", required=True, help="ground-truth EM of the same sample")
    ap.add_argument("--out", required=True, help="PNG written")
    args = ap.parse_args(argv)
    q = compare_translation(args.exm, args.virtual_em, args.em, args.out)
    print(
        f"virtual EM vs ground-truth EM: PSNR {q['psnr']:.2f} dB, SSIM {q['ssim']:.3f}  (panel: {args.out})"
    )


if __name__ == "__main__":
    main()
