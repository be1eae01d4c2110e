"""End-to-end tests through the real `exem-train` entry point (subprocesses)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from tests.conftest import DEMO_FAST, run_cli


def _ok(proc) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    proc = run_cli(
        "exem-train",
        *DEMO_FAST,
        f"paths.data_dir={synthetic_dir}",
        f"hydra.run.dir={run_dir}",
        cwd=run_dir.parent,
    )
    _ok(proc)
    assert "checkpoint" in proc.stdout and "metrics CSV" in proc.stdout and "image panel" in proc.stdout
    # Lightning announces "validation will run at the end of the training epoch" only to a config that sets its default
    assert "validation will run" not in proc.stdout + proc.stderr
    # exem's model table (exem.model_table), not Lightning's with its FLOPs of 0 and per-mode module counts
    assert "parameters (all trainable)" in proc.stdout and "AnisotropicUNet3D" in proc.stdout
    assert "FLOPs" not in proc.stdout and "train mode" not in proc.stdout
    return run_dir


def test_demo_writes_checkpoint_metrics_and_panels(demo_run: Path) -> None:
    ckpt = demo_run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 6  # 2 batches x 3 optimizer steps
    assert state["exem_batch_step"] == 2
    assert state["exem_voxel_size_nm"] == [40.0, 10.0, 10.0]  # the synthetic data's voxel size
    assert state["exem_lm_normalization"] == {"intensity_range": None, "percentiles": [0.5, 99.8]}
    csv = demo_run / "csv" / "metrics.csv"
    header = csv.read_text().splitlines()[0].split(",")
    for col in (
        "train/G_cycle",
        "train/G_content",
        "train/D_A",
        "train/D_B",
        "val/cycle_psnr",
        "val/paired_ssim",
    ):
        assert col in header, header
    pngs = sorted((demo_run / "images").glob("*.png"))
    assert any(p.name.startswith("train_") for p in pngs) and any(p.name.startswith("val_") for p in pngs)
    # content groups fitted before the first step (model.loss.content.auto): stored in the checkpoint, written out
    content = state["hyper_parameters"]["loss"]["content"]
    assert content["em_to_lm"][0] == 1 and 0 in content["lm_to_em"][1]  # EM dark ↔ ExM bright (pan-protein)
    assert content["lm_fractions"] and content["score"] > 0.5
    record = json.loads((demo_run / "content_groups.json").read_text())
    assert record["em_to_lm"] == content["em_to_lm"] and record["lm_thresholds"] == content["lm_thresholds"]
    assert (demo_run / "content_groups.png").is_file()


def test_translate_a_training_checkpoint_without_a_patch(demo_run: Path, synthetic_dir: Path) -> None:
    """The checkpoint records the training patch; exem-translate (and exem-evaluate) use it when none is given."""
    ckpt = demo_run / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["exem_training_patch"] == [8, 64, 64]
    out = demo_run / "vem.ome.zarr"
    exm = synthetic_dir / "synthetic" / "exm_test.zarr"
    if not exm.exists():
        exm = next(synthetic_dir.rglob("exm_test.zarr"))
    proc = run_cli(
        "exem-translate", f"checkpoint={ckpt}", f"input={exm}", f"output={out}", "trainer=cpu", cwd=demo_run
    )
    _ok(proc)
    assert zarr.open_group(str(out), mode="r").attrs["exem"]["patch"] == [8, 64, 64]


def test_resume_continues_step_counter(demo_run: Path, synthetic_dir: Path, tmp_path: Path) -> None:
    ckpt = demo_run / "checkpoints" / "last.ckpt"
    run_dir = tmp_path / "resumed"
    proc = run_cli(
        "exem-train",
        *DEMO_FAST,
        "trainer.max_steps=12",
        f"ckpt_path={ckpt}",
        f"paths.data_dir={synthetic_dir}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    _ok(proc)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 12
    assert state["exem_batch_step"] == 4  # continued from 2, so the content decay continues too
    assert len(state["optimizer_states"]) == 3
    assert all(s["state"] for s in state["optimizer_states"])  # Adam moments restored and updated
    # the resumed run trains with the stored content groups: same record, no new fit
    first = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]["loss"]["content"]
    assert state["hyper_parameters"]["loss"]["content"] == first
    assert not (run_dir / "content_groups.json").exists()


def test_multirun_two_jobs(synthetic_dir: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "exem-train",
        "-m",
        *DEMO_FAST,
        "trainer.max_steps=3",
        "model.optimizer.lr=0.001,0.002",
        f"paths.data_dir={synthetic_dir}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    _ok(proc)
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()


def test_wandb_logger_offline(synthetic_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(
        "exem-train",
        *DEMO_FAST,
        "trainer.max_steps=3",
        "logger=wandb",
        f"paths.data_dir={synthetic_dir}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    _ok(proc)
    assert list((run_dir / "wandb").glob("offline-run-*")), list(run_dir.rglob("*"))[:20]


def _write(path: Path, data: np.ndarray, zarr_format: int) -> None:
    arr = zarr.create_array(
        str(path), shape=data.shape, chunks=(8, 64, 64), dtype=data.dtype, zarr_format=zarr_format
    )
    arr[...] = data


@pytest.mark.parametrize(("dtype", "zarr_format"), [(np.uint16, 3), (np.uint8, 2)])
def test_train_on_user_zarr_arrays(tmp_path: Path, dtype: type, zarr_format: int) -> None:
    rng = np.random.default_rng(0)
    hi = np.iinfo(dtype).max
    _write(tmp_path / "lm.zarr", rng.integers(0, hi, (16, 64, 160), dtype=dtype), zarr_format)
    _write(tmp_path / "em.zarr", rng.integers(0, hi, (16, 96, 128), dtype=dtype), zarr_format)
    run_dir = tmp_path / "run"
    proc = run_cli(
        "exem-train",
        "experiment=mouse_cortex",
        f"data.lm.path={tmp_path / 'lm.zarr'}",
        f"data.em.path={tmp_path / 'em.zarr'}",
        "trainer=cpu",
        "trainer.max_steps=2",
        "model.generator.widths=[4,8,16,32,64]",
        "model.discriminator.base_filters=4",
        "data.patch_size=[8,64,64]",
        "data.num_workers=0",
        "data.persistent_workers=false",
        "callbacks.progress_bar=null",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    _ok(proc)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["exem_batch_step"] == 1


def test_mouse_cortex_without_paths_fails_in_one_line(tmp_path: Path) -> None:
    proc = run_cli(
        "exem-train", "experiment=mouse_cortex", "trainer=cpu", f"hydra.run.dir={tmp_path}", cwd=tmp_path
    )
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "data.lm.path" in lines[0] and "data.em.path" in lines[0]


def test_ddp_two_cpu_processes(synthetic_dir: Path, tmp_path: Path) -> None:
    import lightning as L
    from hydra.utils import instantiate

    from exem.config import compose_config

    run_dir = tmp_path / "run"
    # 3 validation patches on 2 ranks: one rank gets a padding patch, which must not count
    data = [*DEMO_FAST, "data.val_patches=3", f"paths.data_dir={synthetic_dir}"]
    proc = run_cli(
        "exem-train", *data, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        f"hydra.run.dir={run_dir}", cwd=tmp_path,
    )  # fmt: skip
    _ok(proc)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # 4 samples per epoch split over 2 ranks with batch 2: one batch per rank per epoch, 2 epochs for 6 steps
    assert state["exem_batch_step"] == 2 and state["global_step"] == 6

    # the last validation's metrics equal one process's validation of the final weights on the same patches
    rows = [r for r in csv.DictReader((run_dir / "csv" / "metrics.csv").open()) if r["val/cycle_l1"]]
    cfg = compose_config(data, output_dir=tmp_path / "one")
    datamodule, module = instantiate(cfg.data, _convert_="all"), instantiate(cfg.model, _convert_="all")
    assert len(rows) == 2 and datamodule.val_patches == 3
    module.load_state_dict(state["state_dict"])
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (one,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    assert len(datamodule.val_dataset) == 3
    # PSNR is of each batch's pooled squared error: it depends on which patches share a batch
    for key in ("val/cycle_l1", "val/cycle_ssim", "val/paired_ssim"):
        assert float(rows[-1][key]) == pytest.approx(one[key], rel=1e-5), key


def test_optuna_sweep_optimises_returned_metric(synthetic_dir: Path, tmp_path: Path) -> None:
    import yaml

    sweep = tmp_path / "sweep"
    proc = run_cli(
        "exem-train", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=1", *DEMO_FAST,
        f"paths.data_dir={synthetic_dir}", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    _ok(proc)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna"
    assert -1.0 <= float(results["best_value"]) <= 1.0  # val/cycle_ssim returned by train()
    assert set(results["best_params"]) == {
        "model.optimizer.lr",
        "model.loss.lambda_cycle",
        "model.loss.lambda_content",
    }


def test_only_the_global_rank_zero_prints_the_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under srun every process has SLURM_PROCID but no LOCAL_RANK/NODE_RANK: the rank comes from Lightning."""
    from lightning.pytorch.utilities import rank_zero_only

    from exem import cli

    for key in ("LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)
    assert not cli._rank_zero()
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    assert cli._rank_zero()
