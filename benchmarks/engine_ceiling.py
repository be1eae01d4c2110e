"""The engine's ceiling: whole-volume translation with an identity network (no model cost), and where the time goes.

    python benchmarks/engine_ceiling.py                       # CPU: 32×1024×1024 uint8, patch 16×256×256
    python benchmarks/engine_ceiling.py --device cuda --shape 128 2048 2048 --repeats 3

End to end: ``translate_volume`` from a Zarr input (uint8, chunks 16×256×256) to an OME-Zarr output (uint8, levels 0
and 1), default overlap (25 %), timed from the call to its return (median of ``--repeats`` after a warm-up); the
figure is output voxels per second. Then each stage alone over the same blocks, in the order the engine runs them:
read (the blocks' contexts from the Zarr input), host→device, blend (normalise, cut patches, identity "network",
Gaussian blend streamed along Z), cast (to uint8), device→host, write level 0, write level 1 (2× in-plane mean and
its write). The stage sum exceeds the end-to-end time when stages overlap (reads ahead, writes behind).

The last line is a JSON object; ``benchmarks/ratios.py`` prints its ``speedup_vs_d716e53`` (this figure over the one
commit d716e53 gave on the same machine, recorded in benchmarks/RESULTS.md: ``--baseline``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine, pick_device, release_memory, sync  # noqa: E402
from exem.inference import translate_volume  # noqa: E402

# d716e53 on the 2-core development machine, CPU, default shape: median of 4 runs side by side with this commit's
# (23.6, 30.1, 29.1, 28.4 Mvox/s; benchmarks/RESULTS.md, "engine ceiling").
BASELINE_D716E53_CPU = 28.8


class Identity(torch.nn.Module):
    """The negligible network: returns its input (so only the engine costs)."""

    divisor = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def write_input(path: Path, shape: tuple[int, int, int]) -> None:
    arr = zarr.create_array(str(path), shape=shape, chunks=(16, 256, 256), dtype="uint8")
    rng = np.random.default_rng(0)
    for z in range(0, shape[0], 16):
        arr[z : z + 16] = rng.integers(0, 256, (min(16, shape[0] - z), *shape[1:]), dtype=np.uint8)


def end_to_end(src: Path, out: Path, args: argparse.Namespace, device: torch.device) -> float:
    """Seconds of one translate_volume call (the output removed first)."""
    from exem.inference.engine import default_trainer

    shutil.rmtree(out, ignore_errors=True)
    release_memory(device)
    trainer = default_trainer(  # exem's inference Trainer (quiet: no Lightning tips per run)
        accelerator="gpu" if device.type == "cuda" else "cpu",
        precision="bf16-mixed" if device.type == "cuda" else "32-true",
    )
    t0 = time.perf_counter()
    translate_volume(
        Identity(),
        src,
        out,
        patch=tuple(args.patch),
        batch_size=args.batch_size,
        trainer=trainer,
        progress=False,
        num_workers=args.num_workers,
    )
    sync(device)
    return time.perf_counter() - t0


def stages(src: Path, tmp: Path, args: argparse.Namespace, device: torch.device) -> dict[str, float] | None:
    """Seconds per stage over every block of the plan the engine would use (None before the engine split)."""
    try:
        from exem.data.ome import create_ome_zarr, downsample_inplane
        from exem.data.volume import open_volume
        from exem.inference.blockio import BlockDataset, open_levels
        from exem.inference.engine import BlockPredictor, default_block_voxels
        from exem.inference.plan import plan_volume
    except ImportError:
        return None
    volume = open_volume(src)
    plan = plan_volume(volume.shape, tuple(args.patch), block_voxels=default_block_voxels(None))
    predictor = BlockPredictor(
        Identity(), plan, volume.intensity_range, batch_size=args.batch_size, out_dtype="float32"
    ).to(device)
    dataset = BlockDataset(volume, plan, range(len(plan.blocks)))
    assert plan.chunks is not None
    create_ome_zarr(
        tmp / "stages.ome.zarr",
        plan.shape,
        "uint8",
        (1, 1, 1),
        chunks=plan.chunks,
        factors=[(1, 1, 1), (1, 2, 2)],
        overwrite=True,
    )
    levels = open_levels(tmp / "stages.ome.zarr", 2)  # as the engine's writer opens them
    t = dict.fromkeys(
        ("read", "host_to_device", "blend", "cast", "device_to_host", "write_level0", "write_level1"), 0.0
    )

    def timed(key: str, fn, *a):  # noqa: ANN001, ANN202
        sync(device)
        t0 = time.perf_counter()
        value = fn(*a)
        sync(device)
        t[key] += time.perf_counter() - t0
        return value

    with torch.inference_mode():
        for i in range(len(dataset)):
            index, _, raw = timed("read", dataset.__getitem__, i)
            block = plan.blocks[index]
            raw = timed("host_to_device", lambda r: r.to(device), raw)
            values = timed("blend", predictor.predict_block, block, raw)
            cast = timed("cast", lambda v: v.mul_(255.0).round_().clamp_(0.0, 255.0).to(torch.uint8), values)
            host = timed("device_to_host", lambda c: c.cpu().numpy()[0], cast)
            timed("write_level0", levels[0].__setitem__, block.slices(), host)
            f = 2
            sl = (
                block.slices()[0],
                slice(block.start[1] // f, -(-block.stop[1] // f)),
                slice(block.start[2] // f, -(-block.stop[2] // f)),
            )
            timed("write_level1", lambda h, s=sl: levels[1].__setitem__(s, downsample_inplane(h)), host)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--shape", type=int, nargs=3, default=[32, 1024, 1024], help="volume Z Y X (voxels)")
    ap.add_argument("--patch", type=int, nargs=3, default=[16, 256, 256])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-workers", type=int, default=None, help="reader processes (default: the engine's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", type=float, default=None, help="Mvox/s of d716e53 on this machine")
    args = ap.parse_args()
    device = pick_device(args.device)
    shape = tuple(args.shape)
    voxels = int(np.prod(shape))
    tmp = Path(tempfile.mkdtemp(prefix="exem-ceiling-"))
    try:
        src = tmp / "in.zarr"
        write_input(src, shape)  # type: ignore[arg-type]
        end_to_end(src, tmp / "warm.ome.zarr", args, device)  # warm-up: imports, allocator, threads
        runs = [end_to_end(src, tmp / "out.ome.zarr", args, device) for _ in range(args.repeats)]
        seconds = statistics.median(runs)
        per_stage = stages(src, tmp, args, device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mvox = voxels / seconds / 1e6
    baseline = (
        args.baseline
        if args.baseline is not None
        else (BASELINE_D716E53_CPU if device.type == "cpu" else None)
    )
    print(f"engine ceiling on {machine(device)}: {'×'.join(map(str, shape))} uint8, identity network")
    print(f"  end to end: {seconds:.3f} s (median of {args.repeats}: {', '.join(f'{r:.3f}' for r in runs)})")
    print(
        f"  {mvox:.1f} Mvox/s"
        + (f"  ({mvox / baseline:.2f}× d716e53's {baseline} Mvox/s)" if baseline else "")
    )
    if per_stage:
        total = sum(per_stage.values())
        for key, value in per_stage.items():
            print(
                f"  {key:15s} {value:7.3f} s  {100 * value / total:5.1f} %  ({voxels / value / 1e6:8.1f} Mvox/s)"
            )
    result = {
        "bench": "engine_ceiling",
        "device": device.type,
        "size": "x".join(map(str, shape)),
        "seconds": round(seconds, 4),
        "mvox_per_s": round(mvox, 2),
        "stages_s": None if per_stage is None else {k: round(v, 4) for k, v in per_stage.items()},
    }
    if baseline:
        result["speedup_vs_d716e53"] = round(mvox / baseline, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
