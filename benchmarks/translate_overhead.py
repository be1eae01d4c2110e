"""End-to-end translation time vs the generator's forward passes alone over the same patches.

    python benchmarks/translate_overhead.py --size tiny            # CPU, a few seconds per repeat
    python benchmarks/translate_overhead.py --size small --repeats 5

Both are measured in the same process, alternating, after a warm-up; the median of ``--repeats`` is reported.
"exem" is ``exem.translate_volume`` from a Zarr input to an OME-Zarr output: reads, normalisation, blending,
casting, writes and the pyramid level, everything. "model only" runs the same generator on the same global-grid
patches already in memory as float32, with nothing else. The last line printed is a JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from exem.data.grid import PatchGrid
from exem.data.synthetic import make_phantom, render_exm
from exem.inference import translate_volume
from exem.models import AnisotropicUNet3D

SIZES = {
    # volume (z, y, x), patch, overlap, generator widths, batch size
    "tiny": ((32, 256, 256), (8, 64, 64), (2, 16, 16), (8, 16, 32, 64), 8),
    "small": ((64, 512, 512), (16, 128, 128), (4, 32, 32), (8, 16, 32, 64), 8),
}


def model_only(net: torch.nn.Module, volume: np.ndarray, grid: PatchGrid, batch_size: int) -> float:
    """Seconds for the generator alone over every patch of ``grid`` (input already normalised, in memory)."""
    x = torch.from_numpy(volume.astype(np.float32) / 65535.0)
    starts = list(grid)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(starts), batch_size):
            batch = torch.stack([x[grid.slices(s)] for s in starts[i : i + batch_size]])[:, None]
            net(batch)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape, patch, overlap, widths, batch_size = SIZES[args.size]

    tmp = Path(tempfile.mkdtemp(prefix="exem-bench-"))
    try:
        phantom = make_phantom(shape, seed=0)
        volume = render_exm(phantom, seed=0)
        src = zarr.create_array(str(tmp / "in.zarr"), shape=shape, dtype=volume.dtype, chunks=(16, 128, 128))
        src[...] = volume
        torch.manual_seed(0)
        net = AnisotropicUNet3D(widths=widths).eval()
        grid = PatchGrid(shape, patch, overlap)

        def exem_once() -> float:
            t0 = time.perf_counter()
            translate_volume(
                net, tmp / "in.zarr", tmp / "out.zarr", patch=patch, overlap=overlap, batch_size=batch_size,
                dtype="uint8", overwrite=True,
            )  # fmt: skip
            return time.perf_counter() - t0

        exem_once()  # warm-up (allocations, first zarr writes)
        model_only(net, volume, grid, batch_size)
        exem_t, model_t = [], []
        for _ in range(args.repeats):
            exem_t.append(exem_once())
            model_t.append(model_only(net, volume, grid, batch_size))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    exem_s, model_s = statistics.median(exem_t), statistics.median(model_t)
    voxels = int(np.prod(shape))
    print(f"volume {shape} uint16, patch {patch}, overlap {overlap}, widths {widths}, {len(grid)} patches")
    print(f"exem translate_volume: {exem_s:.3f} s ({voxels / exem_s / 1e6:.2f} Mvox/s)   runs: {exem_t}")
    print(f"generator only:        {model_s:.3f} s ({voxels / model_s / 1e6:.2f} Mvox/s)   runs: {model_t}")
    print(f"ratio exem / generator-only: {exem_s / model_s:.3f}")
    print(
        json.dumps(
            {
                "bench": "translate_overhead",
                "device": "cpu",
                "size": args.size,
                "shape": list(shape),
                "patches": len(grid),
                "exem_s": round(exem_s, 4),
                "model_only_s": round(model_s, 4),
                "ratio": round(exem_s / model_s, 4),
                "torch": torch.__version__,
                "cpu": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
