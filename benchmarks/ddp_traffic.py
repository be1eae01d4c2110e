"""DDP training: gradient bytes all-reduced per batch, and time per batch, with and without exem's hook.

    torchrun --nproc-per-node 2 benchmarks/ddp_traffic.py                     # CPU (gloo), tiny networks
    torchrun --nproc-per-node 2 benchmarks/ddp_traffic.py --size published --patch 16 64 64
    torchrun --nproc-per-node 2 benchmarks/ddp_traffic.py --device cuda --size published   # 2 GPUs (NCCL)

Each rank fits an :class:`~exem.module.ExEMModule` for ``--batches`` batches on random patches under Lightning's
``DDPStrategy(find_unused_parameters=True)``, as ``trainer=ddp``, with exem's default on the device (``--variant``:
``fp32`` on the CPU, ``bf16-compile`` on CUDA, as ``benchmarks/bench_train.py`` names them). By default exem registers
:func:`exem.ddp.allreduce_trainable` (only the buckets of the networks a step trains are all-reduced);
``--all-buckets`` leaves DDP's own all-reduce of every bucket at every backward. The bytes are the hook's counts:
``sent`` is what it all-reduced, ``sent + skipped`` what DDP sends without it. The traffic does not depend on the
patch, so a small patch measures the published networks' traffic on a CPU.

``--out DIR`` makes every rank write ``rank<r>.json`` (its figures and a digest of all weights after the run).
The last line printed (rank 0) is a JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from benchmarks._common import machine, pick_device  # noqa: E402
from benchmarks.bench_train import SIZES, default_variant, model_config, parse_variant  # noqa: E402

MB = 1e6
# Tiny networks keep every parameter in one of DDP's default 25 MB buckets (one bucket holding all four networks
# is never skipped); --bucket-cap-mb makes buckets small enough to part them, as the published sizes do.
TINY_BUCKET_CAP_MB = 0.002


class RandomPatches(Dataset):
    """``n`` pairs of seeded random ``(1, Z, Y, X)`` patches in [0, 1]: ``{"lm": ..., "em": ...}``."""

    def __init__(self, n: int, patch: tuple[int, int, int]) -> None:
        self.n, self.patch = n, patch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return {
            "lm": torch.rand((1, *self.patch), generator=g),
            "em": torch.rand((1, *self.patch), generator=g),
        }


class BatchClock(L.Callback):
    """Wall-clock seconds of each training batch (device synchronised at its end)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        self.seconds.append(time.perf_counter() - self._t0)


def weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("tiny", "published"), default="tiny")
    ap.add_argument("--patch", type=int, nargs=3, default=None, help="Z Y X (default: the size's)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1, help="batches left out of the time per batch")
    ap.add_argument(
        "--bucket-cap-mb", type=float, default=None, help="DDP's bucket size (default: DDP's own)"
    )
    ap.add_argument("--all-buckets", action="store_true", help="DDP's own all-reduce of every bucket")
    ap.add_argument("--variant", default=None, help="fp32|bf16[-compile] (default: exem's on the device)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if "WORLD_SIZE" not in os.environ:
        raise SystemExit(
            "start it with torchrun (or srun): torchrun --nproc-per-node 2 benchmarks/ddp_traffic.py"
        )
    device = pick_device(args.device)
    size = SIZES[args.size]
    patch = tuple(args.patch or size["patch"])
    variant = args.variant or default_variant(device)
    precision, flags = parse_variant(variant)
    bucket_cap = args.bucket_cap_mb
    if bucket_cap is None and args.size == "tiny" and "compile" not in flags:
        # (compiled, DDP's graph splitting refuses buckets smaller than its first one: DDP's own size is kept)
        bucket_cap = TINY_BUCKET_CAP_MB

    import exem.module

    if args.all_buckets:
        exem.module.register_trainable_allreduce = lambda model: None  # type: ignore[assignment]
    L.seed_everything(0, workers=True)
    module = exem.module.ExEMModule(**model_config(size, variant))
    strategy = DDPStrategy(
        find_unused_parameters=True, **({} if bucket_cap is None else {"bucket_cap_mb": bucket_cap})
    )
    clock = BatchClock()
    world = int(os.environ["WORLD_SIZE"])
    trainer = L.Trainer(
        accelerator=device.type,
        devices=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
        num_nodes=world // int(os.environ.get("LOCAL_WORLD_SIZE", world)),
        strategy=strategy,
        precision="bf16-mixed" if precision == "bf16" else "32-true",
        max_steps=3 * args.batches,  # three optimizer steps per batch
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    data = DataLoader(
        RandomPatches(world * args.batches, patch), batch_size=int(size["batch"]), num_workers=0
    )
    trainer.fit(module, train_dataloaders=data)
    traffic = module.gradient_traffic
    sent = traffic.sent_bytes if traffic else None
    skipped = traffic.skipped_bytes if traffic else None
    timed = clock.seconds[args.warmup :] or clock.seconds
    result = {
        "bench": "ddp_traffic",
        "device": device.type,
        "size": args.size,
        "patch": list(patch),
        "world_size": world,
        "mode": "all_buckets" if args.all_buckets else "trainable",
        "variant": variant,
        # still compiled after the run (a compilation failure falls back to eager: exem.perf.compile_or_eager)
        "compiled": all(
            getattr(n, "_compiled_call_impl", None) is not None for n in (module.G_AB, module.D_A)
        ),
        "batches": len(clock.seconds),
        "sent_mb_per_batch": None if sent is None else round(sent / MB / len(clock.seconds), 3),
        "ddp_default_mb_per_batch": None
        if sent is None
        else round((sent + (skipped or 0)) / MB / len(clock.seconds), 3),
        "ms_per_batch": round(1e3 * statistics.median(timed), 1),
        "weights_sha1": weights_digest(module),
        "machine": machine(device),
    }
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    if trainer.global_rank == 0:
        if sent is not None:
            print(
                f"gradients all-reduced per batch: {result['sent_mb_per_batch']} MB"
                f" (DDP without the hook: {result['ddp_default_mb_per_batch']} MB)"
            )
        print(f"{result['ms_per_batch']} ms per batch (median of {len(timed)}), {world} ranks")
        print(json.dumps(result))


if __name__ == "__main__":
    main()
