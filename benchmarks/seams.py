"""Seam visibility against the translation overlap: which default overlap leaves no visible seam?

    python benchmarks/seams.py                       # CPU, ~1 min: random + demo generators if present
    python benchmarks/seams.py --checkpoint run/checkpoints/last.ckpt --png outputs/bench/seams.png
    python benchmarks/seams.py --checkpoint <published-width last.ckpt> --shape 32 1024 1024 --patch 16 256 256 \
        --larger 512                                 # GPU: the published generator at its training patch and 2×

A synthetic ExM phantom is translated with the engine (``translate_volume``, float32 output) at several overlaps
(fractions of the patch per axis), and :func:`exem.inference.seams.seam_visibility` compares the mean intensity step
across patch-border planes with the mean step between all other neighbouring planes (≈ 1: no seam).

Generators: a freshly initialised one (worst case: GroupNorm statistics differ from patch to patch and nothing has
learnt to make neighbouring patches agree) and, when it exists, a trained checkpoint (``--checkpoint``, default the
``make demo`` one). ``--png`` writes a picture: the same slice at overlap 0 and at the default overlap.

The last line printed is a JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine, pick_device  # noqa: E402
from exem.checkpoints import load_generator  # noqa: E402
from exem.data.grid import PatchGrid  # noqa: E402
from exem.data.synthetic import make_phantom, render_exm  # noqa: E402
from exem.data.volume import normalize  # noqa: E402
from exem.inference.plan import DEFAULT_OVERLAP_FRACTION  # noqa: E402
from exem.inference.seams import seam_visibility  # noqa: E402
from exem.inference.translate import translate_volume  # noqa: E402
from exem.models import AnisotropicUNet3D  # noqa: E402

DEMO_CKPT = Path("outputs/demo/latest/checkpoints/last.ckpt")
FRACTIONS = (0.0, 0.125, DEFAULT_OVERLAP_FRACTION, 0.5)
# A border step this much above the mean step elsewhere is taken as a visible seam.
VISIBLE = 1.10


def overlap_for(patch: tuple[int, int, int], fraction: float) -> tuple[int, int, int]:
    """``fraction`` of the patch per axis, rounded to even voxels (as the engine's default)."""
    return tuple(2 * round(p * fraction / 2) for p in patch)  # type: ignore[return-value]


def translate(generator: torch.nn.Module, volume: np.ndarray, patch, overlap, folder: Path) -> np.ndarray:
    import zarr

    out = folder / f"o{'_'.join(map(str, overlap))}.ome.zarr"
    translate_volume(
        generator, volume, out, patch=patch, overlap=overlap, dtype="float32", progress=False, overwrite=True
    )
    return zarr.open_group(str(out), mode="r")["0"][:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[32, 192, 192])
    ap.add_argument("--patch", type=int, nargs=3, default=[8, 64, 64])
    ap.add_argument("--widths", type=int, nargs="+", default=[4, 8, 16, 32], help="of the random generator")
    ap.add_argument(
        "--checkpoint", type=Path, default=DEMO_CKPT, help="a trained generator (skipped if absent)"
    )
    ap.add_argument("--png", type=Path, default=None, help="picture: overlap 0 vs the default overlap")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--larger",
        type=int,
        nargs="*",
        default=[],
        help="in-plane patch sizes larger than --patch to try with the trained generator (e.g. 128 192): seams at "
        "the default overlap and PSNR against the phantom's EM rendering, next to --patch",
    )
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")

    shape, patch = tuple(args.shape), tuple(args.patch)
    phantom = make_phantom(shape, seed=args.seed)
    exm = render_exm(phantom, seed=args.seed).astype(np.float32)
    volume = normalize(exm, *np.percentile(exm, [0.5, 99.8]))  # [0, 1], the demo's training percentiles

    torch.manual_seed(args.seed)
    generators = {"random_init": AnisotropicUNet3D(widths=args.widths).eval()}
    if args.checkpoint.is_file():
        generators["trained"] = load_generator(args.checkpoint).network.eval()
    else:
        print(f"no checkpoint at {args.checkpoint}: only the freshly initialised generator")

    device = pick_device("auto")  # what translate_volume picks without a trainer
    result: dict[str, object] = {
        "bench": "seams",
        "device": device.type,
        "size": "x".join(map(str, shape)),
        "shape": list(shape),
        "patch": list(patch),
    }
    slices: dict[str, np.ndarray] = {}
    default = overlap_for(patch, DEFAULT_OVERLAP_FRACTION)
    with tempfile.TemporaryDirectory() as d:
        for name, gen in generators.items():
            for fraction in FRACTIONS:
                overlap = overlap_for(patch, fraction)
                out = translate(gen, volume, patch, overlap, Path(d))
                report = seam_visibility(out, PatchGrid(shape, patch, overlap))
                verdict = "visible" if report.ratio > VISIBLE else "not visible"
                print(f"{name:>12} overlap {fraction:5.3f} {overlap}: {report} → {verdict}")
                result[f"seam_ratio_{name}_overlap{fraction:g}"] = round(report.ratio, 3)
                if overlap in (default, (0, 0, 0)):
                    mid = np.clip(np.rint(255 * out[shape[0] // 2]), 0, 255).astype(np.uint8)
                    slices[f"{name}, overlap {'x'.join(map(str, overlap))}"] = mid
    if args.larger and "trained" in generators:
        from exem.analysis.metrics import image_quality
        from exem.data.synthetic import render_em

        em = render_em(phantom, seed=args.seed).astype(np.float32)
        em = torch.from_numpy(normalize(em, *np.percentile(em, [0.5, 99.8])))[None, None]
        with tempfile.TemporaryDirectory() as d:
            reference = None
            for side in (patch[1], *args.larger):
                big = (patch[0], side, side)
                overlap = overlap_for(big, DEFAULT_OVERLAP_FRACTION)
                out = translate(generators["trained"], volume, big, overlap, Path(d))
                report = seam_visibility(out, PatchGrid(shape, big, overlap))
                quality = image_quality(torch.from_numpy(np.clip(out, 0, 1))[None, None], em)
                reference = out if reference is None else reference
                change = float(np.abs(out - reference).mean())
                print(
                    f"     trained patch {'×'.join(map(str, big))}: seam ratio {report.ratio:.3f}, PSNR vs EM "
                    f"{float(quality['psnr']):.2f} dB, SSIM {float(quality['ssim']):.3f}, mean |Δ| vs "
                    f"{'×'.join(map(str, patch))} {change:.4f}"
                )
                key = f"patch{side}"
                result[f"seam_ratio_trained_{key}"] = round(report.ratio, 3)
                result[f"psnr_trained_{key}"] = round(float(quality["psnr"]), 3)
                result[f"mean_abs_change_{key}"] = round(change, 5)
    if args.png is not None:
        from exem.panels import grid_panel, save_panel

        names = list(slices)
        save_panel(grid_panel([[slices[n] for n in names]], [names]), args.png)
        print(f"picture → {args.png}")
    result["default_fraction"] = DEFAULT_OVERLAP_FRACTION
    result["machine"] = machine(device)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
