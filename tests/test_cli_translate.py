"""`exem-translate` through the installed entry point: output, summary, resume refusal, one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from exem.data.ome import level_scale, read_multiscales
from exem.models import AnisotropicUNet3D
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("translate")
    torch.manual_seed(0)
    g = AnisotropicUNet3D(widths=(4, 8, 16))
    ckpt = tmp / "G_AB_1000.pth"  # an original-ExEM-style state dict saved from a DataParallel wrapper
    torch.save({f"module.{k}": v for k, v in g.state_dict().items()}, ckpt)
    data = np.random.default_rng(0).integers(0, 256, (12, 80, 96), dtype=np.uint8)
    arr = zarr.create_array(str(tmp / "exm.zarr"), shape=data.shape, dtype=data.dtype, chunks=(8, 64, 64))
    arr[...] = data
    return {"tmp": tmp, "ckpt": ckpt, "input": tmp / "exm.zarr"}


def _args(s: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        f"checkpoint={s['ckpt']}", f"input={s['input']}", f"output={out}", "patch=[8,32,32]", "trainer=cpu", *extra,
    ]  # fmt: skip


def test_translate_cli_writes_pyramid_and_refuses_to_clobber(setup: dict[str, Path]) -> None:
    out = setup["tmp"] / "vem.ome.zarr"
    proc = run_cli("exem-translate", *_args(setup, out), cwd=setup["tmp"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exem-translate: 12×80×96 voxels" in proc.stdout and "Mvox/s" in proc.stdout
    assert "translated " not in proc.stdout  # the library's own summary record: the command prints it once
    first = re.search(
        r"first batch ([0-9.]+) s after start", proc.stdout
    )  # the command's start-up (issue 13)
    assert first is not None and 0 < float(first.group(1)) < 120
    # conf/trainer's training-loop settings do not reach the inference Trainer (nor Lightning's announcements)
    assert "validation will run" not in proc.stdout + proc.stderr
    group = zarr.open_group(str(out), mode="r")
    assert group["0"].shape == (12, 80, 96) and group["0"].dtype == np.uint8
    assert group["1"].shape == (12, 40, 48)
    assert level_scale(read_multiscales(group), 1)[0] == "1"

    again = run_cli("exem-translate", *_args(setup, out), cwd=setup["tmp"])
    assert again.returncode == 1
    lines = [ln for ln in again.stderr.splitlines() if ln.startswith("exem-translate: error:")]
    assert len(lines) == 1 and "overwrite" in lines[0], again.stderr[-2000:]
    assert zarr.open_group(str(out), mode="r")["0"][...].any()  # untouched


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["checkpoint=/nonexistent/G_AB.pth"], "G_AB.pth"),
        (["roi=[0,12,0,80,0,500]"], "outside"),
        (["patch=[8,34,34]"], "divisible"),
    ],
)
def test_translate_cli_errors_are_one_line(setup: dict[str, Path], extra: list[str], needle: str) -> None:
    out = setup["tmp"] / f"err_{len(extra[0])}.ome.zarr"
    proc = run_cli("exem-translate", *_args(setup, out), *extra, cwd=setup["tmp"])
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("exem-translate: error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_inference_trainer_drops_training_loop_settings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from exem.config import TRAINING_LOOP_KEYS, compose_config, inference_trainer

    cfg = compose_config(
        ["trainer=cpu", "trainer.deterministic=true"], output_dir=tmp_path, config_name="translate"
    )
    assert TRAINING_LOOP_KEYS & set(cfg.trainer.keys())  # the shipped trainer config has some
    with caplog.at_level("INFO"):
        trainer = inference_trainer(cfg.trainer)
    assert "validation will run" not in caplog.text
    assert trainer.max_steps == -1 and trainer.val_check_interval == 1.0  # Lightning's own, not conf's
    # the settings that do matter for inference go through
    assert trainer.precision == "32-true" and trainer.strategy.root_device.type == "cpu"
    assert torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
