"""Out-of-core translation: a Zarr volume larger than the RSS budget, translated with bounded memory.

    python benchmarks/translate_out_of_core.py make --path /tmp/big.zarr       # 68×8192×8192 uint8 = 4.25 GiB
    /usr/bin/time -v python benchmarks/translate_out_of_core.py run --path /tmp/big.zarr --out /tmp/big_vem.zarr

``make`` writes a compressible uint8 volume chunk by chunk (never whole in RAM). ``run`` translates it with a tiny
generator (a per-voxel affine map: the engine's reads, blending, casts and writes are what is measured, not the
network) and prints, last, a JSON line with the time and this process's peak RSS (from ``resource``).

Why not a 1×1×1 ``Conv3d``: on the CPU, oneDNN runs a 1-channel convolution in a 16-channel blocked layout, so
one call on a batch of 8 patches of 16×256×256 transiently takes ~1 GiB, which is the network's memory, not the
engine's (it was most of the 2.32 GiB peak first measured here).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch
import zarr

from exem.inference import translate_volume

SHAPE = (68, 8192, 8192)
CHUNKS = (16, 512, 512)


def make(path: str) -> None:
    arr = zarr.create_array(path, shape=SHAPE, chunks=CHUNKS, dtype=np.uint8, overwrite=True)
    yy, xx = np.mgrid[0 : CHUNKS[1], 0 : CHUNKS[2]]
    for z0 in range(0, SHAPE[0], CHUNKS[0]):
        for y0 in range(0, SHAPE[1], CHUNKS[1]):
            for x0 in range(0, SHAPE[2], CHUNKS[2]):
                nz = min(CHUNKS[0], SHAPE[0] - z0)
                plane = (((xx + x0) // 32 + (yy + y0) // 32) % 2 * 120 + 60).astype(np.uint8)
                arr[z0 : z0 + nz, y0 : y0 + CHUNKS[1], x0 : x0 + CHUNKS[2]] = plane[None].repeat(nz, 0)


class TinyGenerator(torch.nn.Module):
    """A per-voxel affine map ``a·x + b`` standing in for a generator: (B, 1, Z, Y, X) → (B, 1, Z, Y, X)."""

    divisor = 1

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(-0.8))
        self.shift = torch.nn.Parameter(torch.tensor(0.9))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def run(path: str, out: str) -> None:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    result = translate_volume(
        TinyGenerator().eval(), path, out, patch=(16, 256, 256), batch_size=8, overwrite=True
    )
    seconds = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    in_gib = np.prod(SHAPE) / 2**30
    print(
        json.dumps(
            {
                "bench": "translate_out_of_core",
                "device": "cpu",
                "shape": list(SHAPE),
                "input_gib": round(float(in_gib), 3),
                "seconds": round(seconds, 1),
                "mvox_per_s": round(result.mvox_per_s, 2),
                "peak_rss_gib": round(peak_gib, 3),
            }
        )
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["make", "run"])
    ap.add_argument("--path", default="/tmp/exem_big.zarr")
    ap.add_argument("--out", default="/tmp/exem_big_vem.zarr")
    args = ap.parse_args()
    make(args.path) if args.what == "make" else run(args.path, args.out)
