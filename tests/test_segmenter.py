"""The built-in EM segmenter: tiny on-the-fly training (API and CLI), TorchScript export, shipped assets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from exem.analysis.metrics import dice
from exem.analysis.segmenter import (
    BUILTIN_SEGMENTERS,
    CLASSES,
    builtin_segmenter,
    predict_probabilities,
    train_segmenter,
)
from exem.data.synthetic import DEFAULT_SEEDS, make_phantom, render_em
from tests.conftest import run_cli

# Seconds-long settings: 2-level U-Net, one 8×64×64 phantom, a handful of steps.
TINY = {
    "widths": [4, 8],
    "steps": 4,
    "batch": 2,
    "patch": [4, 32, 32],
    "seeds": [101],
    "val_seed": 201,
    "phantom_shape": [8, 64, 64],
    "export_patch": [4, 32, 32],
    "export_overlap": [1, 8, 8],
    "log_every": 2,
}
SIDECAR_KEYS = {"kind", "threshold", "normalize", "patch", "overlap"}
MAX_ASSET_BYTES = 2 * 1024 * 1024
# Measured with the shipped assets on the EM rendering of phantom seed 777, 16×128×128: mito 0.920, membrane
# 0.973 (seeds 778, 779: mito 0.85, 0.84; membrane 0.97). A random or broken network is far below these floors
# (mitochondria are 3 % of the voxels, membranes 21 %).
MITO_DICE_FLOOR = 0.75
MEMBRANE_DICE_FLOOR = 0.85


def _check_exports(files: dict[str, Path], export_patch: list[int], overlap: list[int]) -> None:
    assert set(files) == set(CLASSES)
    outputs = {}
    x = torch.rand(2, 1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    for name, path in files.items():
        assert path.is_file() and path.suffix == ".pt"
        side = yaml.safe_load(path.with_suffix(".yaml").read_text())
        assert set(side) == SIDECAR_KEYS
        assert side["kind"] == CLASSES[name]["kind"]
        assert side["normalize"] == [0, 255] and 0 < side["threshold"] < 1
        assert side["patch"] == export_patch and side["overlap"] == overlap
        model = torch.jit.load(str(path)).eval()
        with torch.no_grad():
            y = model(x)
        assert y.shape == (2, len(CLASSES), 3, 32, 48) and y.dtype == torch.float32
        assert float(y.min()) >= 0 and float(y.max()) <= 1
        outputs[name] = y
    # one network exported twice: channel 0 of each file is the class it is named after
    torch.testing.assert_close(outputs["mito"][:, 0], outputs["membrane"][:, 1])
    torch.testing.assert_close(outputs["membrane"][:, 0], outputs["mito"][:, 1])


def test_train_tiny_segmenter_api(tmp_path, one_torch_thread):
    files = train_segmenter(tmp_path / "seg", **TINY)
    _check_exports(files, TINY["export_patch"], TINY["export_overlap"])
    assert files.steps == TINY["steps"] and files.parameters > 0 and files.seconds > 0
    for scores in (files.train_dice, files.val_dice):
        assert set(scores) == set(CLASSES) and all(0 <= v <= 1 for v in scores.values())
    # deterministic for a seed: a second run gives the same network
    again = train_segmenter(tmp_path / "again", **TINY)
    assert again.val_dice == files.val_dice
    x = torch.rand(1, 1, 4, 32, 32)
    with torch.no_grad():
        a, b = torch.jit.load(str(files["mito"]))(x), torch.jit.load(str(again["mito"]))(x)
    torch.testing.assert_close(a, b)
    # refuses to overwrite unless asked
    with pytest.raises(FileExistsError, match="overwrite"):
        train_segmenter(tmp_path / "seg", **TINY)


def test_exported_sidecars_are_valid_exem_segment_options(tmp_path, one_torch_thread):
    from exem.analysis.segment import read_sidecar

    files = train_segmenter(tmp_path, **{**TINY, "steps": 1})
    for name, path in files.items():
        options = read_sidecar(path)
        assert options["kind"] == CLASSES[name]["kind"]


def test_train_segmenter_cli(tmp_path):
    args = [f"{k}={v}".replace(" ", "") for k, v in TINY.items()]
    args += ["out_dir=segs", "threads=1", "progress=false"]
    proc = run_cli("exem-train-segmenter", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = {name: tmp_path / "segs" / BUILTIN_SEGMENTERS[name] for name in CLASSES}
    for path in files.values():
        assert str(path.name) in proc.stdout
    assert "val   Dice" in proc.stdout and "mito=" in proc.stdout and "membrane=" in proc.stdout
    assert (
        "EM segmenter trained" not in proc.stdout and "wrote " not in proc.stdout
    )  # said once, by the command
    _check_exports(files, TINY["export_patch"], TINY["export_overlap"])


def test_train_segmenter_cli_user_error_is_one_line(tmp_path):
    proc = run_cli("exem-train-segmenter", "seeds=[3]", "out_dir=segs", cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("exem-train-segmenter: error: ")
    assert "held-out test phantom" in lines[0]
    assert not (tmp_path / "segs").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"seeds": [DEFAULT_SEEDS["test"]]}, "held-out test phantom"),
        ({"val_seed": 101}, "also a training seed"),
        ({"patch": [4, 33, 32]}, "not divisible"),
        ({"patch": [16, 32, 32]}, "larger than phantom_shape"),
        ({"augment": {"sharpness": 2}}, "bad augment"),
    ],
)
def test_train_segmenter_user_errors(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        train_segmenter(tmp_path, **{**TINY, **override})


# ----------------------------------------------------------------------------------------- shipped assets


def test_builtin_assets_ship_and_load():
    for name in CLASSES:
        path = builtin_segmenter(name)
        assert path.stat().st_size < MAX_ASSET_BYTES
        side = yaml.safe_load(path.with_suffix(".yaml").read_text())
        assert set(side) == SIDECAR_KEYS and side["kind"] == CLASSES[name]["kind"]
    with pytest.raises(ValueError, match="unknown built-in segmenter"):
        builtin_segmenter("synapse")


@pytest.fixture(scope="module")
def fresh_em_phantom():
    """An EM phantom of a seed neither the segmenter nor the synthetic dataset uses."""
    phantom = make_phantom((16, 128, 128), seed=777)
    return render_em(phantom, seed=777).astype(np.float32) / 255, phantom.semantic


@pytest.mark.parametrize(("name", "floor"), [("mito", MITO_DICE_FLOOR), ("membrane", MEMBRANE_DICE_FLOOR)])
def test_builtin_segmenter_segments_a_fresh_em_phantom(name, floor, fresh_em_phantom, one_torch_thread):
    image, semantic = fresh_em_phantom
    path = builtin_segmenter(name)
    threshold = yaml.safe_load(path.with_suffix(".yaml").read_text())["threshold"]
    probs = predict_probabilities(torch.jit.load(str(path)).eval(), image)
    assert probs.shape == (len(CLASSES), *image.shape)
    score = dice(probs[0] > threshold, semantic == CLASSES[name]["semantic"])
    assert score > floor, f"built-in {name} segmenter: Dice {score:.3f} on a fresh EM phantom"
