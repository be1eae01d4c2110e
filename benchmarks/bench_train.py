"""Training speed: exem vs the published step, Lightning's overhead per step, and the data rate.

    python benchmarks/bench_train.py --size tiny          # CPU, under a minute on 2 idle cores
    python benchmarks/bench_train.py --size published     # GPU: batch 1, patch 16×256×256, default widths

Everything is measured side by side in one process, after a warm-up, as the median of ``--steps`` (CUDA events
on a GPU):

1. **steps**: one training batch (G, D_A, D_B) of exem (``ExEMModule.train_batch`` with the configured
   optimizers; variants: ``fp32``/``bf16`` autocast, ``-cl`` channels_last_3d, ``-compile`` torch.compile,
   ``-ckpt`` activation checkpointing; first exem's default on the device as conf/ sets it, ``bf16-compile`` on
   CUDA and ``fp32`` on the CPU: its figures are ``exem_ms`` and ``exem_peak_gib``) against the published step
   (``benchmarks/baseline_published.py``: strict fp32, anomaly detection, plain Adam), from the same weights, on
   the same batches. ms/step, voxels/s (patch voxels × batch per step), peak memory (CUDA: max_memory_allocated;
   CPU: peak RSS over the run, from before the networks were built), and MFLOP per voxel
   (``torch.utils.flop_counter``) with, on a GPU, the share of the bf16 floor reached.
2. **lightning** (``--size tiny``): the same ExEMModule driven by a Lightning Trainer (CSV logger, LR monitor,
   ``log_every_n_steps=10``, no progress bar, no checkpoints) vs by a plain PyTorch loop over the same batches
   with the same optimizers: median time between consecutive batch starts. The weights of both runs are
   compared at the end (same maths → equal). Issue 5 asks for a ratio ≤ 1.10 on the CPU.
3. **data**: samples/s (one LM + one EM patch each) of the ExEMDataModule alone, in-process (reads from Zarr,
   normalisation, augmentation), vs the model's steps/s: how many reader processes keep one device fed.

The last line printed is a JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    GIB,
    PeakMemory,
    machine,
    median,
    pick_device,
    textured_volume,
    time_calls,
    write_zarr,
)
from benchmarks.baseline_published import PublishedCycleGAN  # noqa: E402
from exem.data import ExEMDataModule  # noqa: E402
from exem.module import ExEMModule  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL_CONF = REPO / "conf" / "model" / "exem.yaml"
# bf16 dense tensor throughput assumed for the FLOP floor (issue 5: ≈20 TFLOP per published step ≈ 25 ms).
H100_BF16_TFLOPS = 800.0
LIGHTNING_TARGET = 1.10

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "patch": (4, 64, 64),
        "widths": (4, 8, 16, 32),
        "base_filters": 4,
        "batch": 1,
        "steps": 5,
        "warmup": 2,
        "rounds": 2,
        "lightning_batches": 10,
        "lightning_warmup": 2,
        "data_volume": (32, 256, 256),
        "data_batches": 40,
    },
    "published": {
        "patch": (16, 256, 256),
        "widths": (32, 64, 128, 256, 512),
        "base_filters": 64,
        "batch": 1,
        "steps": 20,
        "warmup": 5,
        "rounds": 1,
        "lightning_batches": 0,  # Lightning's overhead is a CPU question (issue 5, point 6)
        "lightning_warmup": 0,
        "data_volume": (64, 1024, 1024),
        "data_batches": 30,
    },
}
# Measured after exem's own default (first: the run's ``exem_ms``), on a GPU for comparison with it.
OTHER_VARIANTS = {"cpu": (), "cuda": ("bf16", "fp32", "bf16-cl", "bf16-cl-compile", "bf16-ckpt")}
FLAGS = ("cl", "compile", "ckpt")


def default_variant(device: torch.device) -> str:
    """What ``exem-train`` does on ``device`` by default, as a variant name (e.g. ``bf16-compile`` on CUDA).

    The precision of ``conf/trainer/gpu.yaml`` (CUDA) or ``cpu.yaml``, the switches of ``conf/model/exem.yaml``.
    """
    from exem.perf import switch_on

    trainer = OmegaConf.load(
        REPO / "conf" / "trainer" / ("gpu.yaml" if device.type == "cuda" else "cpu.yaml")
    )
    model = OmegaConf.load(MODEL_CONF)
    on = {
        "cl": switch_on(model.channels_last, device),
        "compile": switch_on(model.torch_compile, device),
        "ckpt": bool(model.generator.activation_checkpointing),
    }
    precision = "bf16" if str(trainer.precision).startswith("bf16") else "fp32"
    return "-".join([precision, *(flag for flag in FLAGS if on[flag])])


def default_variants(device: torch.device) -> list[str]:
    """exem's default on ``device`` first, then the others measured there."""
    first = default_variant(device)
    return [first, *(v for v in OTHER_VARIANTS[device.type] if v != first)]


def model_config(size: dict[str, Any], variant: str = "fp32") -> dict[str, Any]:
    """ExEMModule keyword arguments: conf/model/exem.yaml with the size's widths and the variant's switches."""
    cfg = OmegaConf.to_container(OmegaConf.load(MODEL_CONF), resolve=False)
    assert isinstance(cfg, dict)
    cfg.pop("_target_", None)
    cfg.pop("_recursive_", None)
    cfg["generator"]["widths"] = list(size["widths"])
    cfg["discriminator"]["base_filters"] = int(size["base_filters"])
    cfg["image_every_n_steps"] = 0
    cfg["image_dir"] = None
    cfg["report_dir"] = None
    # the configured (published) content groups: a step costs the same with fitted ones
    cfg["loss"]["content"]["auto"] = False
    _, flags = parse_variant(variant)
    cfg["generator"]["activation_checkpointing"] = "ckpt" in flags
    cfg["channels_last"] = "cl" in flags
    cfg["torch_compile"] = "compile" in flags
    return cfg


def parse_variant(variant: str) -> tuple[str, set[str]]:
    precision, *flags = variant.split("-")
    if precision not in ("fp32", "bf16") or not set(flags) <= set(FLAGS):
        raise SystemExit(f"bad variant {variant!r}: fp32|bf16 followed by any of -cl -compile -ckpt")
    return precision, set(flags)


def make_batches(
    size: dict[str, Any], device: torch.device, n: int = 4
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    shape = (size["batch"], 1, *size["patch"])
    return [
        (torch.rand(shape, generator=g).to(device), torch.rand(shape, generator=g).to(device))
        for _ in range(n)
    ]


# ---------------------------------------------------------------------------------------------- steps


def exem_stepper(
    size: dict[str, Any], state: dict[str, torch.Tensor], device: torch.device, variant: str, batches: list
) -> Callable[[int], object]:
    precision, _ = parse_variant(variant)
    module = ExEMModule(**model_config(size, variant))
    module.load_state_dict(state)
    module.to(device)
    module.optimize_for(device)
    optimizers, _ = module.configure_optimizers()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def step(i: int) -> object:
        a, b = batches[i % len(batches)]
        with autocast:
            return module.train_batch(a, b, optimizers)

    return step


def baseline_stepper(
    size: dict[str, Any], state: dict[str, torch.Tensor], device: torch.device, batches: list
) -> Callable[[int], object]:
    nets = ExEMModule(**model_config(size))
    nets.load_state_dict(state)
    nets.to(device)
    published = PublishedCycleGAN(nets.G_AB, nets.G_BA, nets.D_A, nets.D_B)

    def step(i: int) -> object:
        a, b = batches[i % len(batches)]
        return published.train_step(a, b)

    return step


def flops_per_step(size: dict[str, Any], state: dict[str, torch.Tensor], device: torch.device) -> float:
    """FLOPs of one exem training batch (forward + backward of all networks; the optimizers are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    batches = make_batches(size, device, n=1)
    step = exem_stepper(size, state, device, "fp32", batches)
    with FlopCounterMode(display=False) as counter:
        step(0)
    return float(counter.get_total_flops())


def bench_steps(
    size: dict[str, Any], device: torch.device, variants: list[str], steps: int, rounds: int
) -> dict[str, Any]:
    torch.manual_seed(0)
    state = ExEMModule(**model_config(size)).state_dict()
    batches = make_batches(size, device)
    voxels = size["batch"] * int(np.prod(size["patch"]))
    names = ["baseline", *variants]
    steppers: dict[str, Callable[[int], object]] = {}
    times: dict[str, list[float]] = {}
    peaks: dict[str, int] = {}
    for name in names:
        with PeakMemory(device) as mem:
            if name == "baseline":
                steppers[name] = baseline_stepper(size, state, device, batches)
            else:
                steppers[name] = exem_stepper(size, state, device, name, batches)
            times[name] = time_calls(steppers[name], steps, size["warmup"], device)
        peaks[name] = mem.peak
    for _ in range(1, rounds):  # more rounds, alternating, against the noise of a shared machine
        for name in names:
            times[name] += time_calls(steppers[name], steps, 0, device)
    steppers.clear()

    flops = flops_per_step(size, state, device)
    out: dict[str, Any] = {"mflop_per_voxel": round(flops / voxels / 1e6, 3), "variants": {}}
    for name in names:
        s = median(times[name])
        out["variants"][name] = {
            "ms": round(s * 1e3, 2),
            "mvox_per_s": round(voxels / s / 1e6, 4),
            "peak_gib": round(peaks[name] / GIB, 3),
        }
        if device.type == "cuda":
            floor_s = flops / (H100_BF16_TFLOPS * 1e12)
            out["variants"][name]["floor_pct"] = round(100 * floor_s / s, 1)
    return out


# ------------------------------------------------------------------------------------------ lightning


class _ListDataset(Dataset):
    def __init__(self, items: list[dict[str, torch.Tensor]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def bench_lightning(size: dict[str, Any], n_batches: int, warmup: int, rounds: int) -> dict[str, Any]:
    """Median seconds per batch: Lightning Trainer vs plain loop, same module maths, batches and optimizers."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    class BatchClock(L.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_train_batch_start(self, *args: Any) -> None:
            self.starts.append(time.perf_counter())

    device = torch.device("cpu")
    torch.manual_seed(0)
    state = ExEMModule(**model_config(size)).state_dict()
    items = [{"lm": a, "em": b} for a, b in make_batches(size, device, n=n_batches)]
    loader = DataLoader(_ListDataset(items), batch_size=None, num_workers=0)

    lightning_s: list[float] = []
    plain_s: list[float] = []
    max_diff = 0.0
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="exem-bench-") as tmp:
            lit = ExEMModule(**model_config(size))
            lit.load_state_dict(state)
            clock = BatchClock()
            trainer = L.Trainer(
                accelerator="cpu",
                devices=1,
                precision="32-true",
                max_steps=3 * n_batches,  # three optimizer steps per batch
                max_epochs=1,
                logger=CSVLogger(tmp),
                callbacks=[clock, LearningRateMonitor(logging_interval="step")],
                log_every_n_steps=10,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                limit_val_batches=0,
            )
            trainer.fit(lit, train_dataloaders=loader)
            lightning_s += np.diff(clock.starts)[warmup:].tolist()

        plain = ExEMModule(**model_config(size))
        plain.load_state_dict(state)
        plain.optimize_for(device)
        optimizers, schedulers = plain.configure_optimizers()
        starts = []
        for batch in loader:
            starts.append(time.perf_counter())
            plain.train_batch(batch["lm"], batch["em"], optimizers, [s["scheduler"] for s in schedulers])
        plain_s += np.diff(starts)[warmup:].tolist()
        for p, q in zip(lit.parameters(), plain.parameters(), strict=True):
            max_diff = max(max_diff, float((p.detach() - q.detach()).abs().max()))
    lightning_ms, plain_ms = median(lightning_s) * 1e3, median(plain_s) * 1e3
    return {
        "lightning_ms": round(lightning_ms, 2),
        "plain_ms": round(plain_ms, 2),
        "lightning_ratio": round(lightning_ms / plain_ms, 4),
        "lightning_weights_max_abs_diff": max_diff,
    }


# ----------------------------------------------------------------------------------------------- data


def bench_data(size: dict[str, Any], n_batches: int) -> dict[str, Any]:
    """Samples/s of ExEMDataModule's training loader, in-process (one reader)."""
    with tempfile.TemporaryDirectory(prefix="exem-bench-") as tmp:
        shape = size["data_volume"]
        lm = write_zarr(Path(tmp) / "lm.zarr", textured_volume(shape, np.dtype(np.uint16), seed=1))
        em = write_zarr(Path(tmp) / "em.zarr", textured_volume(shape, np.dtype(np.uint8), seed=2))
        dm = ExEMDataModule(
            lm={"path": str(lm)},
            em={"path": str(em)},
            patch_size=size["patch"],
            batch_size=size["batch"],
            num_workers=0,
            samples_per_epoch=(n_batches + 1) * size["batch"],
        )
        dm.setup("fit")
        it = iter(dm.train_dataloader())
        next(it)  # warm-up: opening the stores
        t0 = time.perf_counter()
        n = sum(1 for _ in it)
        seconds = time.perf_counter() - t0
    return {"data_samples_per_s": round(n * size["batch"] / seconds, 2), "data_volume": list(shape)}


# ----------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument(
        "--variants",
        default=None,
        help="comma list, e.g. bf16,bf16-cl-compile (default: exem's default on the device first, then others)",
    )
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round (default per size)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: steps, lightning, data")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    size = SIZES[args.size]
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as conf/trainer/gpu.yaml
    variants = args.variants.split(",") if args.variants else default_variants(device)
    skip = set(filter(None, args.skip.split(",")))
    steps = args.steps or size["steps"]
    result: dict[str, Any] = {
        "bench": "train",
        "device": device.type,
        "size": args.size,
        "patch": list(size["patch"]),
        "widths": list(size["widths"]),
        "batch": size["batch"],
        "machine": machine(device),
    }
    print(f"{result['machine']}; patch {size['patch']}, widths {size['widths']}, batch {size['batch']}")

    if "steps" not in skip:
        res = bench_steps(size, device, variants, steps, size["rounds"])
        result["variants"] = res["variants"]
        result["mflop_per_voxel"] = res["mflop_per_voxel"]
        base, exem = res["variants"]["baseline"], res["variants"][variants[0]]
        result.update(
            exem_variant=variants[0],
            exem_ms=exem["ms"],
            baseline_ms=base["ms"],
            speedup=round(base["ms"] / exem["ms"], 3),
            exem_peak_gib=exem["peak_gib"],
            baseline_peak_gib=base["peak_gib"],
        )
        for name, v in res["variants"].items():
            print(
                f"  {name:>18}: {v['ms']:9.1f} ms/step  {v['mvox_per_s']:8.3f} Mvox/s  peak {v['peak_gib']:.3f} GiB"
                + (f"  {v['floor_pct']:.1f} % of the bf16 floor" if "floor_pct" in v else "")
            )
        print(
            f"  {res['mflop_per_voxel']} MFLOP/voxel; speedup baseline/exem ({variants[0]}): {result['speedup']}"
        )

    if "lightning" not in skip and size["lightning_batches"]:
        res = bench_lightning(size, size["lightning_batches"], size["lightning_warmup"], size["rounds"])
        result.update(res)
        print(
            f"  Lightning {res['lightning_ms']:.1f} ms/batch vs plain loop {res['plain_ms']:.1f} ms/batch: "
            f"ratio {res['lightning_ratio']:.3f} (target ≤ {LIGHTNING_TARGET}); "
            f"weights differ by {res['lightning_weights_max_abs_diff']:.3g}"
        )

    if "data" not in skip:
        res = bench_data(size, size["data_batches"])
        result.update(res)
        if "exem_ms" in result:
            steps_per_s = 1e3 / result["exem_ms"]
            result["model_steps_per_s"] = round(steps_per_s, 3)
            result["data_vs_model"] = round(res["data_samples_per_s"] / steps_per_s, 3)
        print(
            f"  DataModule alone: {res['data_samples_per_s']:.2f} samples/s per reader process"
            + (
                f" vs model {result['model_steps_per_s']:.2f} steps/s: ratio {result['data_vs_model']:.2f}"
                if "data_vs_model" in result
                else ""
            )
        )
    result["torch"] = torch.__version__
    print(json.dumps(result))


if __name__ == "__main__":
    main()
