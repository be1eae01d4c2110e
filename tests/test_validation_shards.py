"""Validation metrics count each held-out patch once, however the patches are split over DDP ranks.

Lightning's own ``DistributedSampler`` pads the ranks with repeated patches, which then counted twice in the metric
that selects checkpoints. :class:`~exem.data.sampling.ValidationSampler` pads with patches marked not counted, and
:func:`~exem.training_logs.counted_metrics` leaves them out (a batch of padding logs zeros for 0 patches).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.bench_train import SIZES, model_config
from exem.data.sampling import ValidationSampler
from exem.module import ExEMModule
from exem.training_logs import counted_metrics, cycle_metrics

PATCH = (4, 16, 16)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_patch_once_over_the_ranks_and_the_same_count_on_each(n: int, world: int) -> None:
    shards = [list(ValidationSampler(n, rank=r, world_size=world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # the same number of batches on every rank
    assert all(len(s) == len(ValidationSampler(n, rank=r, world_size=world)) for r, s in enumerate(shards))
    ids = sorted(i for s in shards for i in s)
    assert [i for i in ids if i < n] == list(range(n))  # each patch counted once
    assert len(ids) - n == len(shards[0]) * world - n < world  # the padding (ids ≥ n), as little as possible
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        ValidationSampler(n, rank=2, world_size=2)


class Patches(Dataset):
    """Three fixed held-out items; ids ≥ 3 are padding (as ValidationPatchDataset serves them)."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i % 3)
        lm, em = torch.rand((1, *PATCH), generator=g), torch.rand((1, *PATCH), generator=g)
        return {"lm": lm, "em": em, "counted": torch.tensor(float(i < 3))}


def tiny_module() -> ExEMModule:
    torch.manual_seed(0)
    return ExEMModule(**model_config(SIZES["tiny"], "fp32")).eval()


@torch.no_grad()
def metrics_of(module: ExEMModule, ids: list[int]) -> dict[str, float]:
    """cycle_metrics of the given items as one batch (the reference: no padding, no sampler)."""
    batch = torch.utils.data.default_collate([Patches()[i] for i in ids])
    fake_b = module.G_AB(batch["lm"])
    rec_a, rec_b = module.G_BA(fake_b), module.G_AB(module.G_BA(batch["em"]))
    return {
        k: float(v) for k, v in cycle_metrics(batch["lm"], rec_a, batch["em"], rec_b, fake_b, None).items()
    }


def test_padding_is_left_out_of_a_batch_and_a_batch_of_padding_adds_nothing() -> None:
    module = tiny_module()
    items = [Patches()[i] for i in (0, 3, 2)]  # 3: padding (item 0 again)
    batch = torch.utils.data.default_collate(items)
    with torch.no_grad():
        fake_b = module.G_AB(batch["lm"])
        rec_a, rec_b = module.G_BA(fake_b), module.G_AB(module.G_BA(batch["em"]))
        metrics, n = counted_metrics(batch, rec_a, rec_b, fake_b)
    assert n == 2
    expected = metrics_of(module, [0, 2])
    assert {k: float(v) for k, v in metrics.items()} == pytest.approx(expected, rel=1e-6)
    assert metrics_of(module, [0, 0, 2])["val/cycle_psnr"] != pytest.approx(
        expected["val/cycle_psnr"], rel=1e-6
    )
    padding = torch.utils.data.default_collate([Patches()[3]])
    with torch.no_grad():
        fake_b = module.G_AB(padding["lm"])
        zeros, n = counted_metrics(
            padding, module.G_BA(fake_b), module.G_AB(module.G_BA(padding["em"])), fake_b
        )
    assert n == 0 and set(zeros) == set(expected) and all(float(v) == 0.0 for v in zeros.values())
    del padding["counted"]  # no marks: every patch counts
    with torch.no_grad():
        _, n = counted_metrics(padding, module.G_BA(fake_b), module.G_AB(module.G_BA(padding["em"])), fake_b)
    assert n == 1


def validate(module: ExEMModule, rank: int, world: int) -> dict[str, float]:
    """Lightning's validation of this rank's shard (batches of 1), as the metrics it logged."""
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    loader = DataLoader(Patches(), batch_size=1, sampler=ValidationSampler(3, rank=rank, world_size=world))
    (logged,) = trainer.validate(module, dataloaders=loader, verbose=False)
    return logged


def test_lightnings_weighted_means_over_two_shards_equal_one_process() -> None:
    module = tiny_module()
    whole = validate(module, 0, 1)
    per_patch = [metrics_of(module, [i]) for i in range(3)]
    for key in whole:
        assert whole[key] == pytest.approx(sum(m[key] for m in per_patch) / 3, rel=1e-6)
    # rank 1 of 2 gets item 1 and a batch of padding only: its logged means are item 1's
    rank1 = validate(module, 1, 2)
    assert rank1 == pytest.approx(per_patch[1], rel=1e-6)
    # what DDP's sum of value·n and n makes of the two ranks (2 and 1 patches) is the one-process mean
    rank0 = validate(module, 0, 2)
    for key in whole:
        assert (2 * rank0[key] + rank1[key]) / 3 == pytest.approx(whole[key], rel=1e-6)
