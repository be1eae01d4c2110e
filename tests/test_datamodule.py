"""ExEMDataModule / UnpairedPatchDataset: shapes, determinism, epochs, validation split, pairing, errors."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

from exem.data import ExEMDataModule, VolumeError
from exem.data.datamodule import EpochSampler, ValidationSampler, split_volume
from exem.data.ome import write_ome_zarr

PATCH = (4, 16, 16)


def make_zarr(path: Path, data: np.ndarray, zarr_format: int = 3) -> str:
    arr = zarr.create_array(
        str(path), shape=data.shape, chunks=(4, 16, 16), dtype=data.dtype, zarr_format=zarr_format
    )
    arr[...] = data
    return str(path)


@pytest.fixture
def data(tmp_path: Path) -> SimpleNamespace:
    rng = np.random.default_rng(0)
    lm = rng.integers(0, 256, (8, 64, 48), dtype=np.uint8)
    em = rng.integers(0, 65536, (6, 40, 72), dtype=np.uint16)
    paired = rng.integers(0, 256, lm.shape, dtype=np.uint8)
    lm_dir = tmp_path / "lm"
    lm_dir.mkdir()
    write_ome_zarr(lm_dir / "a.zarr", lm, (40.0, 10.0, 10.0), chunks=(4, 16, 16), levels=2)
    make_zarr(lm_dir / "b.zarr", rng.integers(0, 256, (5, 32, 32), dtype=np.uint8), zarr_format=2)
    return SimpleNamespace(
        lm=lm,
        em=em,
        paired=paired,
        lm_dir=str(lm_dir),
        lm_a=str(lm_dir / "a.zarr"),
        em_path=make_zarr(tmp_path / "em.zarr", em),
        paired_path=make_zarr(tmp_path / "paired.zarr", paired, zarr_format=2),
        tmp=tmp_path,
    )


def dm_for(d: SimpleNamespace, **kw) -> ExEMDataModule:
    args = {
        "lm": {"path": d.lm_dir},
        "em": {
            "path": d.em_path,
            "level": 0,
            "voxel_size": None,
            "intensity_range": None,
            "percentiles": None,
        },
        "patch_size": PATCH,
        "batch_size": 2,
        "samples_per_epoch": 6,
        "val_patches": 3,
    }
    args.update(kw)
    dm = ExEMDataModule(**args)
    dm.setup("fit")
    return dm


def test_train_batches(data) -> None:
    dm = dm_for(data)
    assert len(dm.lm_volumes) == 2 and len(dm.em_volumes) == 1
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    for batch in batches:
        assert set(batch) == {"lm", "em"}
        for key in ("lm", "em"):
            x = batch[key]
            assert x.shape == (2, 1, *PATCH) and x.dtype == torch.float32
            assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_volumes_not_opened_in_init(data) -> None:
    dm = ExEMDataModule(lm={"path": str(data.tmp / "not-there.zarr")}, em={"path": data.em_path})
    assert dm.lm_volumes == []
    with pytest.raises(VolumeError, match="not-there.zarr: no such file or directory"):
        dm.setup()


def test_samples_are_deterministic_and_match_coordinates(data) -> None:
    dm = dm_for(data, augment=False)
    ds = dm.train_dataset
    for i in (0, 5, 123):
        a, b = ds[i], ds[i]
        assert torch.equal(a["lm"], b["lm"]) and torch.equal(a["em"], b["em"])
    # without augmentation the patch is exactly the volume at sample_coords
    for i in range(20):
        c = ds.sample_coords(i)
        (va, sa), (_, sb) = c["lm"], c["em"]
        sample = ds[i]
        if va == 0:
            z, y, x = sa
            ref = data.lm[z : z + 4, y : y + 16, x : x + 16] / 255.0
            np.testing.assert_allclose(sample["lm"][0].numpy(), ref, rtol=1e-6)
        z, y, x = sb
        np.testing.assert_allclose(
            sample["em"][0].numpy(), data.em[z : z + 4, y : y + 16, x : x + 16] / 65535.0, rtol=1e-6
        )
    # balanced: both LM volumes are drawn
    assert {ds.sample_coords(i)["lm"][0] for i in range(50)} == {0, 1}


def test_augmented_samples_are_deterministic(data) -> None:
    dm = dm_for(data, augment=True)
    ds = dm.train_dataset
    torch.manual_seed(1)
    first = [ds[i] for i in range(8)]
    torch.manual_seed(2)  # the global RNG does not matter
    second = [ds[i] for i in range(8)]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a["lm"], b["lm"]) and torch.equal(a["em"], b["em"])
    # augmentation changes some patches relative to the raw ones (flips/rotations), not the values' multiset
    raw = ExEMDataModule(lm={"path": data.lm_dir}, em={"path": data.em_path}, patch_size=PATCH, augment=False)
    raw.setup()
    changed = 0
    for i in range(8):
        r = raw.train_dataset[i]
        changed += not torch.equal(r["lm"], first[i]["lm"])
        assert torch.equal(r["lm"].flatten().sort().values, first[i]["lm"].flatten().sort().values)
    assert changed > 0


def test_pickled_dataset_and_workers_give_the_same_samples(data) -> None:
    dm = dm_for(data, num_workers=2, persistent_workers=True, prefetch_factor=2)
    ds = dm.train_dataset
    clone = pickle.loads(pickle.dumps(ds))
    assert all(v._array is None for v in clone.lm + clone.em)  # handles reopened lazily in workers
    assert torch.equal(clone[3]["lm"], ds[3]["lm"])
    batches = list(dm.train_dataloader())
    expected = [ds[i] for i in range(6)]
    got_a = torch.cat([b["lm"] for b in batches])
    assert torch.equal(got_a, torch.stack([e["lm"] for e in expected]))


def test_epochs_differ(data) -> None:
    dm = dm_for(data)
    loader = dm.train_dataloader()
    assert list(loader.sampler) == list(range(0, 6))
    epoch0 = torch.cat([b["lm"] for b in loader])
    dm.trainer = SimpleNamespace(current_epoch=1)
    assert list(loader.sampler) == list(range(6, 12))
    epoch1 = torch.cat([b["lm"] for b in loader])
    assert not torch.equal(epoch0, epoch1)
    loader.sampler.set_epoch(2)  # what Lightning calls at each epoch start
    assert list(loader.sampler) == list(range(12, 18))


def test_epoch_sampler_is_sharded_by_lightnings_ddp_wrapper() -> None:
    sampler = EpochSampler(10)
    for epoch in (0, 3):
        shards = []
        for rank in range(2):
            wrapped = DistributedSamplerWrapper(sampler, num_replicas=2, rank=rank, shuffle=True)
            wrapped.set_epoch(epoch)  # forwarded to EpochSampler.set_epoch
            shards.append(list(wrapped))
        assert len(shards[0]) == len(shards[1]) == 5
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(10 * epoch, 10 * epoch + 10))


def test_training_never_touches_the_validation_region(data) -> None:
    dm = dm_for(data, samples_per_epoch=200, val_fraction=0.25)
    ds = dm.train_dataset
    for domain, splits in (("lm", dm.lm_splits), ("em", dm.em_splits)):
        for i in range(200):
            v, start = ds.sample_coords(i)[domain]
            split = splits[v]
            ax = split.axis
            assert start[ax] + PATCH[ax] <= split.val.offset[ax]
    # held-out axis: the one with the most room in patches (ties → y)
    assert dm.lm_splits[0].axis == 1  # 8×64×48 / 4×16×16 → ratios 2, 4, 3
    assert dm.em_splits[0].axis == 2  # 6×40×72 → ratios 1.5, 2.5, 4.5
    assert dm.lm_splits[1].axis == 1  # 5×32×32 → tie between y and x
    for domain, splits in (("lm", dm.lm_splits), ("em", dm.em_splits)):
        for i in range(len(dm.val_dataset)):
            v, start = dm.val_dataset.coords(i)[domain]
            ax = splits[v].axis
            assert start[ax] >= splits[v].val.offset[ax]


def test_split_rules() -> None:
    s = split_volume((8, 100, 50), (4, 16, 16), 0.1, "v")
    assert s.axis == 1 and s.val.shape[1] == 16 and s.train.shape[1] == 84  # at least one patch long
    s = split_volume((8, 100, 50), (4, 16, 16), 0.5, "v")
    assert s.val.offset == (0, 50, 0) and s.val.shape == (8, 50, 50)
    s = split_volume((8, 40, 40), (4, 16, 16), 0.9, "v")
    assert s.train.shape[1] == 16  # always room for one training patch
    assert split_volume((8, 24, 24), (4, 16, 16), 0.1, "v").axis == 0  # z has the most room in patches
    with pytest.raises(VolumeError, match=r"v: volume 4×24×24 has no room for a training and a validation"):
        split_volume((4, 24, 24), (4, 16, 16), 0.1, "v")


def test_validation_with_paired_em(data) -> None:
    dm = dm_for(data, em_paired={"path": data.paired_path}, val_patches=4)
    val = dm.val_dataset
    assert len(val) == 4
    loader = dm.val_dataloader()
    items = [val[i] for i in range(len(val))]
    for i, item in enumerate(items):
        assert set(item) == {"lm", "em", "em_paired", "counted"} and item["counted"] == 1
        v, (z, y, x) = val.coords(i)["lm"]
        assert v == 0  # pairs with LM volume 0
        np.testing.assert_allclose(item["lm"][0].numpy(), data.lm[z : z + 4, y : y + 16, x : x + 16] / 255.0)
        np.testing.assert_allclose(
            item["em_paired"][0].numpy(), data.paired[z : z + 4, y : y + 16, x : x + 16] / 255.0, rtol=1e-6
        )
    batch = next(iter(loader))
    assert batch["em_paired"].shape == (2, 1, *PATCH)
    assert torch.equal(batch["lm"][0], items[0]["lm"])
    # deterministic and no augmentation
    assert torch.equal(val[1]["em"], val[1]["em"])


def test_validation_size_and_spread(data) -> None:
    dm = dm_for(data, val_patches=100)
    val = dm.val_dataset
    assert len(val) == max(len(val.lm_coords), len(val.em_coords))
    assert {c[0] for c in val.lm_coords} == {0, 1}
    assert set(next(iter(dm.val_dataloader()))) == {"lm", "em", "counted"}
    small = dm_for(data, val_patches=2)
    assert len(small.val_dataset) == 2


def test_validation_is_sharded_over_ranks_with_padding_marked_not_counted(data) -> None:
    dm = dm_for(data, val_patches=3)
    val = dm.val_dataset
    assert len(val) == 3
    seen: list[tuple[torch.Tensor, float]] = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        loader = dm.val_dataloader()
        assert isinstance(loader.sampler, ValidationSampler)  # a DistributedSampler: Lightning keeps it
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        batches = list(loader)
        assert [b["lm"].shape[0] for b in batches] == [2]  # ids (0, 2) and (1, 3): 3 is padding
        seen += [(lm, float(c)) for b in batches for lm, c in zip(b["lm"], b["counted"], strict=True)]
    counted = [lm for lm, c in seen if c == 1.0]
    assert len(counted) == 3 and all(
        torch.equal(lm, val[i]["lm"]) for i, lm in zip((0, 2, 1), counted, strict=True)
    )
    (padding,) = [lm for lm, c in seen if c == 0.0]
    assert torch.equal(padding, val[0]["lm"])  # id 3: item 0 again, not counted
    pad = val[3]
    assert float(pad["counted"]) == 0.0 and torch.equal(pad["em"], val[0]["em"])
    with pytest.raises(IndexError):
        val[-1]


def test_paired_shape_mismatch(data) -> None:
    with pytest.raises(VolumeError, match=r"paired EM shape 6×40×72 differs from the LM volume"):
        dm_for(data, em_paired={"path": data.em_path})


def test_2d_patches(data) -> None:
    dm = dm_for(data, patch_size=(1, 16, 16))
    batch = next(iter(dm.train_dataloader()))
    assert batch["lm"].shape == (2, 1, 1, 16, 16) and batch["em"].shape == (2, 1, 1, 16, 16)
    assert next(iter(dm.val_dataloader()))["lm"].shape == (2, 1, 1, 16, 16)


def test_patch_larger_than_volume(data) -> None:
    with pytest.raises(
        VolumeError, match=r"b\.zarr: patch 4×40×16 is larger than the volume 5×32×32 on axis y"
    ):
        dm_for(data, patch_size=(4, 40, 16))


def test_nan_in_float_volume_raises_on_read(data) -> None:
    em = np.full((6, 40, 72), 0.5, np.float32)
    path = make_zarr(data.tmp / "emf.zarr", em)
    dm = dm_for(data, em={"path": path}, augment=False)
    arr = zarr.open_array(path, mode="r+")
    arr[...] = np.nan  # corrupted after the open-time check: caught on every read
    with pytest.raises(
        VolumeError, match=r"emf\.zarr: non-finite values \(NaN/Inf\) in the patch starting at"
    ):
        dm.train_dataset[0]
    with pytest.raises(VolumeError, match="float data contain NaN"):
        dm_for(data, em={"path": path})


def test_config_errors(data) -> None:
    with pytest.raises(VolumeError, match=r"data\.em\.path is not set"):
        dm_for(data, em={"path": None})
    with pytest.raises(ValueError, match="val_fraction"):
        ExEMDataModule(lm={"path": "x"}, em={"path": "y"}, val_fraction=0)
    with pytest.raises(ValueError, match="patch_size"):
        ExEMDataModule(lm={"path": "x"}, em={"path": "y"}, patch_size=(16, 256))


def test_dictconfig_and_path_lists(data) -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "lm": {"path": [data.lm_a], "level": 1, "voxel_size": None},
            "em": {"path": data.em_path, "percentiles": [1, 99]},
        }
    )
    dm = ExEMDataModule(lm=cfg.lm, em=cfg.em, patch_size=PATCH)
    dm.setup()
    assert dm.lm_volumes[0].shape == (8, 32, 24) and dm.lm_volumes[0].voxel_size_nm == (40.0, 20.0, 20.0)
    lo, hi = dm.em_volumes[0].intensity_range
    assert 0 < lo < hi < 65535


def test_lightning_fit_draws_new_ids_each_epoch(data) -> None:
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[tuple[int, torch.Tensor]] = []
            self.val_keys: set[str] = set()

        def training_step(self, batch, batch_idx):
            self.seen.append((self.current_epoch, batch["lm"].clone()))
            return (self.w * batch["lm"].mean()).sum()

        def validation_step(self, batch, batch_idx):
            self.val_keys |= set(batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = ExEMDataModule(
        lm={"path": data.lm_dir},
        em={"path": data.em_path},
        em_paired=None,
        patch_size=PATCH,
        batch_size=2,
        samples_per_epoch=4,
        augment=False,
    )
    model = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    assert model.val_keys == {"lm", "em", "counted"}
    ds = dm.train_dataset
    for epoch in (0, 1):
        got = torch.cat([a for e, a in model.seen if e == epoch])
        expected = torch.stack([ds[i]["lm"] for i in range(4 * epoch, 4 * epoch + 4)])
        assert torch.equal(got, expected)


def test_rectangular_patches_keep_their_shape_under_augmentation(data) -> None:
    dm = dm_for(data, patch_size=(4, 16, 32), augment=True)
    for i in range(6):
        item = dm.train_dataset[i]
        assert item["lm"].shape == (1, 4, 16, 32) and item["em"].shape == (1, 4, 16, 32)


def test_hydra_config_instantiates(data) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).parents[1] / "conf" / "data" / "default.yaml")
    cfg.lm.path, cfg.em.path, cfg.seed = data.lm_a, data.em_path, 3
    cfg.patch_size = list(PATCH)
    dm = instantiate(cfg, _convert_="all")
    assert isinstance(dm, ExEMDataModule) and dm.seed == 3
    dm.setup()
    assert len(dm.lm_volumes) == 1
