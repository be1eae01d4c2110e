"""Translation speed: exem's ``translate_volume`` vs the published stitching, side by side.

    python benchmarks/bench_translate.py --size tiny          # CPU, well under a minute on 2 idle cores
    python benchmarks/bench_translate.py --size published     # GPU: 64×1024×1024 uint8, patch 16×256×256

Both start from the same uint8 Zarr volume and the same generator weights, and end with a uint8 volume on disk:

- **exem**: ``exem.inference.translate_volume`` (reads, on-device normalisation and Gaussian blending, uint8
  cast, OME-Zarr levels 0 and 1, done-markers), at its default overlap and at the baseline's 50 %; bf16
  autocast on a GPU;
- **baseline**: ``benchmarks/baseline_published.py``: the whole volume read into RAM as float32, 50 % overlap,
  batches of 8, fp32, CPU numpy accumulation, then the uint8 cast and one Zarr write.

Median of ``--repeats`` after a warm-up run of each; Mvox/s over the volume's voxels; peak memory (CUDA:
max_memory_allocated; host: peak RSS, both over what was in use before). The uint8 outputs of exem at 50 %
overlap and of the baseline are compared (max |difference|). The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    GIB,
    PeakMemory,
    machine,
    median,
    pick_device,
    textured_volume,
    write_zarr,
)
from benchmarks.baseline_published import STITCH_BATCH, published_stitch  # noqa: E402
from exem.inference import translate_volume  # noqa: E402
from exem.models import AnisotropicUNet3D  # noqa: E402

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"shape": (32, 256, 256), "patch": (8, 64, 64), "widths": (4, 8, 16, 32), "repeats": 3},
    "published": {
        "shape": (64, 1024, 1024),
        "patch": (16, 256, 256),
        "widths": (32, 64, 128, 256, 512),
        "repeats": 2,
    },
}
UINT8_MAX = 255


def half_overlap(patch: tuple[int, ...]) -> tuple[int, ...]:
    """The published 50 % overlap, in voxels per axis."""
    return tuple(p // 2 for p in patch)


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * UINT8_MAX), 0, UINT8_MAX).astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    size = SIZES[args.size]
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    repeats = args.repeats or size["repeats"]
    shape, patch = size["shape"], size["patch"]
    voxels = int(np.prod(shape))
    autocast = "bfloat16" if device.type == "cuda" else None
    print(f"{machine(device)}; volume {shape} uint8, patch {patch}, widths {size['widths']}")

    tmp = Path(tempfile.mkdtemp(prefix="exem-bench-"))
    try:
        src = write_zarr(tmp / "in.zarr", textured_volume(shape, np.dtype(np.uint8)))
        torch.manual_seed(0)
        net = AnisotropicUNet3D(widths=size["widths"]).eval().to(device)

        def exem(overlap: tuple[int, ...] | None, out: str) -> Callable[[], None]:
            def run() -> None:
                translate_volume(
                    net, src, tmp / out, patch=patch, overlap=overlap, batch_size=STITCH_BATCH, dtype="uint8",
                    overwrite=True, autocast_dtype=autocast, progress=False,
                )  # fmt: skip

            return run

        def baseline() -> None:
            volume = zarr.open_array(str(src), mode="r")[...]
            out = to_uint8(published_stitch(net, volume, patch, device=device))
            write_zarr(tmp / "baseline.zarr", out)

        contestants = {
            "exem": exem(None, "exem.ome.zarr"),
            "exem_50": exem(half_overlap(patch), "exem50.ome.zarr"),
            "baseline": baseline,
        }
        times: dict[str, list[float]] = {k: [] for k in contestants}
        peaks: dict[str, tuple[int, int]] = {}
        for name, run in contestants.items():  # warm-up, with the peak memory of a whole run
            with PeakMemory(device) as mem:
                run()
            peaks[name] = (mem.peak, mem.rss_peak)
        for _ in range(repeats):  # alternating, against the noise of a shared machine
            for name, run in contestants.items():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                run()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append(time.perf_counter() - t0)
        ours = zarr.open_group(str(tmp / "exem50.ome.zarr"), mode="r")["0"][...]
        theirs = zarr.open_array(str(tmp / "baseline.zarr"), mode="r")[...]
        max_diff = int(np.abs(ours.astype(np.int16) - theirs.astype(np.int16)).max())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    sec = {k: median(v) for k, v in times.items()}
    result: dict[str, Any] = {
        "bench": "translate",
        "device": device.type,
        "size": args.size,
        "shape": list(shape),
        "patch": list(patch),
        "widths": list(size["widths"]),
        "machine": machine(device),
    }
    for name in contestants:
        result[f"{name}_s"] = round(sec[name], 4)
        result[f"{name}_mvox_s"] = round(voxels / sec[name] / 1e6, 3)
        result[f"{name}_peak_gib"] = round(peaks[name][0] / GIB, 3)
        if device.type == "cuda":
            result[f"{name}_host_peak_gib"] = round(peaks[name][1] / GIB, 3)
        print(
            f"  {name:>8}: {sec[name]:8.3f} s  {voxels / sec[name] / 1e6:8.3f} Mvox/s  "
            f"peak {peaks[name][0] / GIB:.3f} GiB   runs {[round(t, 3) for t in times[name]]}"
        )
    result["speedup"] = round(sec["baseline"] / sec["exem"], 3)
    result["speedup_same_overlap"] = round(sec["baseline"] / sec["exem_50"], 3)
    result["max_abs_diff_uint8"] = max_diff
    print(
        f"  speedup baseline/exem: {result['speedup']} (default overlap), {result['speedup_same_overlap']} "
        f"(both 50 %); exem vs baseline uint8 outputs differ by at most {max_diff}"
    )
    result["torch"] = torch.__version__
    print(json.dumps(result))


if __name__ == "__main__":
    main()
