"""exem's fp32 training step equals an independent re-implementation of the published step (benchmarks/)."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch

from benchmarks.baseline_published import (
    CONTENT_DECAY_STEPS,
    EM_THRESHOLDS,
    LAMBDA_CONTENT,
    LAMBDA_CYCLE,
    LAMBDA_GAN,
    LM_THRESHOLD,
    LR,
    SIGMOID_SLOPE,
    PublishedCycleGAN,
    published_stitch,
)
from exem.module import ExEMModule

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_WIDTHS = [4, 8, 16, 32]
PATCH = (2, 32, 32)  # the smallest Y, X two discriminator scales can score at Z > 1
STEPS = 3
RTOL = 1e-5


def published_module(replay_buffer_size: int, decay_steps: float = CONTENT_DECAY_STEPS) -> ExEMModule:
    """An ExEMModule with the published loss weights at tiny widths."""
    return ExEMModule(
        generator={"widths": TINY_WIDTHS},
        discriminator={"num_scales": 2, "base_filters": 4},
        loss={
            "lambda_gan": LAMBDA_GAN,
            "lambda_cycle": LAMBDA_CYCLE,
            "lambda_identity": 0.0,
            "lambda_content": LAMBDA_CONTENT,
            "content_decay_steps": decay_steps,
            "content": {
                "lm_thresholds": [LM_THRESHOLD],
                "em_thresholds": list(EM_THRESHOLDS),
                "slope": SIGMOID_SLOPE,
            },
        },
        optimizer={"lr": LR, "betas": [0.5, 0.999]},
        replay_buffer_size=replay_buffer_size,
    )


def batches(batch: int, n: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.rand(batch, 1, *PATCH, generator=g), torch.rand(batch, 1, *PATCH, generator=g))
        for _ in range(n)
    ]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs() / b.abs().clamp_min(1e-12))


@pytest.mark.parametrize(
    ("batch", "pool", "decay"),
    [
        (1, 0, CONTENT_DECAY_STEPS),
        (2, 2, 2.0),
    ],  # the second: replayed fakes, a content weight that decays fast
    ids=["published-defaults", "replay-pool+fast-decay"],
)
def test_exem_step_equals_published_step(batch: int, pool: int, decay: float) -> None:
    torch.manual_seed(0)
    module = published_module(pool, decay)
    nets = [copy.deepcopy(n) for n in (module.G_AB, module.G_BA, module.D_A, module.D_B)]
    baseline = PublishedCycleGAN(*nets, pool_size=pool, content_decay_steps=decay, anomaly_detection=True)
    optimizers, _ = module.configure_optimizers()
    data = batches(batch)

    torch.manual_seed(5)  # the replay pools draw from torch's CPU generator
    ours = [module.train_batch(a, b, optimizers)[0] for a, b in data]
    torch.manual_seed(5)
    theirs = [baseline.train_step(a, b) for a, b in data]

    for step, (o, t) in enumerate(zip(ours, theirs, strict=True)):
        for key in ("adv_AB", "adv_BA", "cycle", "content", "total", "D_A", "D_B"):
            assert rel(o[key], t[key]) <= RTOL, f"step {step}: {key} {float(o[key])} vs {float(t[key])}"
    # the optimizers moved the weights the same way (fused Adam vs the per-tensor loop: rounding only)
    for p, q in zip(module.G_AB.parameters(), nets[0].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    # the steps did train: the last losses differ from the first ones
    assert rel(ours[-1]["total"], ours[0]["total"]) > RTOL


def test_baseline_is_independent_of_exem_losses() -> None:
    """The yardstick must not reuse exem's loss or step code (only the network classes)."""
    import benchmarks.baseline_published as baseline

    tree = ast.parse(Path(baseline.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] == "exem" and m != "exem.models"}, imported


def test_published_stitch_tiles_and_blends() -> None:
    """The baseline stitching of an identity network gives the input back (weights sum to the bump sums)."""
    identity = torch.nn.Conv3d(1, 1, 1, bias=False)
    with torch.no_grad():
        identity.weight.fill_(1.0)
    volume = torch.randint(0, 256, (6, 40, 48), dtype=torch.uint8).numpy()
    out = published_stitch(identity, volume, (4, 16, 16), batch_size=3)
    torch.testing.assert_close(
        torch.from_numpy(out), torch.from_numpy(volume).float() / 255, atol=1e-6, rtol=0
    )
