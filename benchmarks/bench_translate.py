"""Translation speed: exem's ``translate_volume`` vs the published stitching, side by side.

    python benchmarks/bench_translate.py --size tiny          # CPU, well under a minute on 2 idle cores
    python benchmarks/bench_translate.py --size published     # GPU: 64×1024×1024 uint8, patch 16×256×256
    python benchmarks/bench_translate.py --size large         # GPU: exem-translate end to end, 128×2048×2048

``--size large`` (and ``tiny_cli``, its CPU-sized check) runs the ``exem-translate`` command in a subprocess on a
Zarr volume with a published-width generator (random weights: speed only) and reports the command's wall clock, the
translation's own time and Mvox/s (from its summary line), and the start-up before translation (the difference);
there is no baseline at that size.

Both start from the same uint8 Zarr volume and the same generator weights, and end with a uint8 volume on disk:

- **exem**: ``exem.inference.translate_volume`` (reads, on-device normalisation and Gaussian blending, uint8
  cast, OME-Zarr levels 0 and 1, done-markers), at its default overlap and at the baseline's 50 %; bf16
  autocast on a GPU;
- **baseline**: ``benchmarks/baseline_published.py``: the whole volume read into RAM as float32, 50 % overlap,
  batches of 8, fp32, CPU numpy accumulation, then the uint8 cast and one Zarr write.

Median of ``--repeats`` after a warm-up run of each; Mvox/s over the volume's voxels; peak memory (CUDA:
max_memory_allocated; host: peak RSS, both over what was in use before). The uint8 outputs of exem at 50 %
overlap and of the baseline are compared (max |difference|; on a GPU exem runs under bf16 autocast and the
baseline in fp32, so a few levels apart are expected). The last line printed is a JSON object.
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
    "large": {
        "shape": (128, 2048, 2048),
        "patch": (16, 256, 256),
        "widths": (32, 64, 128, 256, 512),
        "repeats": 1,
        "cli": True,
    },
    "tiny_cli": {"shape": (16, 128, 128), "patch": (8, 64, 64), "widths": (4, 8), "repeats": 1, "cli": True},
}
UINT8_MAX = 255


def half_overlap(patch: tuple[int, ...]) -> tuple[int, ...]:
    """The published 50 % overlap, in voxels per axis."""
    return tuple(p // 2 for p in patch)


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * UINT8_MAX), 0, UINT8_MAX).astype(np.uint8)


def cli_end_to_end(args: argparse.Namespace, size: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``exem-translate`` in a subprocess: wall clock, the translation's time (its summary line), start-up."""
    import re
    import subprocess

    shape, patch = size["shape"], size["patch"]
    tmp = Path(tempfile.mkdtemp(prefix="exem-bench-cli-"))
    try:
        src = tmp / "in.zarr"
        arr = zarr.create_array(str(src), shape=shape, chunks=(16, 256, 256), dtype="uint8")
        for z in range(0, shape[0], 16):  # slab by slab: the large volume is 0.5 GB
            arr[z : z + 16] = textured_volume((min(16, shape[0] - z), *shape[1:]), np.dtype(np.uint8), seed=z)
        torch.manual_seed(0)
        torch.save(AnisotropicUNet3D(widths=size["widths"]).state_dict(), tmp / "G_AB_1.pth")
        exe = Path(sys.executable).with_name("exem-translate")
        command = [
            str(exe), f"checkpoint={tmp / 'G_AB_1.pth'}", f"input={src}", f"output={tmp / 'out.ome.zarr'}",
            f"patch=[{','.join(map(str, patch))}]", "trainer=gpu" if device.type == "cuda" else "trainer=cpu",
            "overwrite=true", *args.cli_args,
        ]  # fmt: skip
        runs = []
        for _ in range(args.repeats or size["repeats"]):
            t0 = time.perf_counter()
            proc = subprocess.run(command, capture_output=True, text=True, check=False)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise SystemExit(f"exem-translate failed:\n{proc.stderr[-3000:]}")
            found = re.search(
                r"voxels in ([0-9.]+) s \(([0-9.]+) Mvox/s(?:, first batch ([0-9.]+) s after start)?\)",
                proc.stdout,
            )
            if found is None:
                raise SystemExit(f"no summary line in exem-translate's output:\n{proc.stdout[-2000:]}")
            first = None if found.group(3) is None else float(found.group(3))
            runs.append((wall, float(found.group(1)), float(found.group(2)), first))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall, seconds, mvox, first = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    print(
        f"  exem-translate: wall {wall:.2f} s, translation {seconds:.2f} s ({mvox:.2f} Mvox/s), "
        f"start-up and exit {wall - seconds:.2f} s, first batch {first} s after the command started;"
        f" extra arguments {args.cli_args}"
    )
    return {
        "cli_wall_s": round(wall, 3),
        "cli_translate_s": round(seconds, 3),
        "cli_mvox_s": mvox,
        "cli_startup_s": round(wall - seconds, 3),
        "cli_first_batch_s": first,  # the goal: ≤ 5 s (process start to the first network call)
        "cli_args": args.cli_args,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument(
        "--cli-args",
        nargs="*",
        default=[],
        help="more exem-translate arguments (cli sizes), e.g. compile=true",
    )
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
    if size.get("cli"):
        figures = cli_end_to_end(args, size, device)
        result = {"bench": "translate_cli", "device": device.type, "size": args.size, "shape": list(shape)}
        print(json.dumps({**result, **figures, "machine": machine(device), "torch": torch.__version__}))
        return

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
