"""`exem-evaluate` / exem.analysis.evaluate on tiny synthetic data: CSV + PNG with the three rows, user errors."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from exem.analysis.evaluate import COLUMNS, dice_ratio_line, evaluate
from exem.analysis.metrics import dice
from exem.models import AnisotropicUNet3D
from tests.conftest import run_cli
from tests.segmenters import save_segmenters

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from exem.data.synthetic import write_synthetic_dataset

    tmp = tmp_path_factory.mktemp("evaluate")
    paths = write_synthetic_dataset(tmp / "data", shape=[16, 64, 64])
    torch.manual_seed(0)
    ckpt = tmp / "G_AB_1.pth"  # an untrained tiny generator, saved as an ExEM-style state dict
    torch.save(AnisotropicUNet3D(widths=(4, 8, 16)).state_dict(), ckpt)
    ts, _ = save_segmenters(tmp / "models")
    return {"tmp": tmp, "ckpt": ckpt, "seg": ts, **paths}


def test_evaluate_cli_writes_table_and_figure(setup: dict[str, Path]) -> None:
    tmp = setup["tmp"]
    out = tmp / "eval"
    proc = run_cli(
        "exem-evaluate", f"exm={setup['exm_test']}", f"checkpoint={setup['ckpt']}", f"segmenter={setup['seg']}",
        f"labels={setup['mito_test']}", f"em={setup['em_test']}", f"out={out}", "exm_percentiles=[0.5,99.8]",
        "translate.patch=[8,64,64]", "segment.patch=[8,32,32]", "trainer=cpu", cwd=tmp,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one summary (the command's), while its steps' summaries still show
    assert "evaluation in " not in proc.stdout and "exem-evaluate: segmenter" in proc.stdout
    assert "translated " in proc.stdout and proc.stdout.count("segmented ") == 3
    with open(out / "evaluation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["input"] for r in rows] == ["em", "virtual_em", "exm"]
    assert list(rows[0]) == list(COLUMNS)
    for row in rows:
        for key in ("dice", "iou", "voi_split", "voi_merge", "adapted_rand_error"):
            assert math.isfinite(float(row[key])), (row["input"], key)
        assert 0.0 <= float(row["dice"]) <= 1.0
    assert math.isfinite(float(rows[1]["psnr"])) and math.isfinite(float(rows[1]["ssim"]))
    assert rows[0]["psnr"] == "" and rows[2]["ssim"] == ""
    # the table is what the written segmentations give
    truth = zarr.open_group(str(setup["mito_test"]), mode="r")["0"][...] > 0
    for row in rows:
        pred = zarr.open_group(str(out / f"segment_{row['input']}.zarr" / "labels"), mode="r")["0"][...]
        assert float(row["dice"]) == pytest.approx(dice(pred > 0, truth), abs=1e-5)
    assert float(rows[0]["dice"]) > 0.1  # the EM segmenter finds mitochondria on EM
    png = Image.open(out / "evaluation.png")
    assert png.size[0] > 3 * 64 and png.size[1] > 3 * 64  # three rows of three tiles
    assert "virtual_em" in proc.stdout and "adapted_rand_error" in proc.stdout
    assert str(out / "evaluation.csv") in proc.stdout
    ratio = float(rows[1]["dice"]) / float(rows[0]["dice"])
    assert f"Dice relative to EM ({float(rows[0]['dice']):.4f}): virtual EM {ratio:.2f}×" in proc.stdout


def test_dice_ratio_line() -> None:
    rows = [{"input": "em", "dice": 0.8}, {"input": "virtual_em", "dice": 0.4}, {"input": "exm", "dice": 0.0}]
    assert dice_ratio_line(rows) == "Dice relative to EM (0.8000): virtual EM 0.50×, raw ExM 0.00×"
    assert dice_ratio_line(rows[1:]) is None
    assert dice_ratio_line([{"input": "em", "dice": 0.0}, rows[1]]) is None


def test_evaluate_api_semantic_labels_without_em(setup: dict[str, Path]) -> None:
    out = setup["tmp"] / "eval_api"
    kw = {
        "translate_options": {"patch": [8, 64, 64]},
        "segment_options": {"patch": [8, 32, 32]},
        "progress": False,
    }
    res = evaluate(
        setup["exm_test"], setup["ckpt"], setup["seg"], setup["labels_test"], labels_class=2, out=out, **kw
    )
    assert [r["input"] for r in res.rows] == ["virtual_em", "exm"]
    assert all(math.isnan(r["psnr"]) for r in res.rows)
    truth = zarr.open_group(str(setup["labels_test"]), mode="r")["0"][...] == 2
    pred = zarr.open_group(str(res.segmentations["exm"] / "labels"), mode="r")["0"][...]
    assert res.rows[1]["iou"] == pytest.approx(
        np.logical_and(pred > 0, truth).sum() / np.logical_or(pred > 0, truth).sum()
    )
    assert res.csv.is_file() and res.png.is_file()

    with pytest.raises(ValueError, match="class 7 does not occur"):
        evaluate(
            setup["exm_test"], setup["ckpt"], setup["seg"], setup["labels_test"], labels_class=7, out=out
        )
    with pytest.raises(ValueError, match="same sample on the same voxel grid"):
        evaluate(setup["exm_test"], setup["ckpt"], setup["seg"], np.zeros((4, 8, 8), np.uint32), out=out)
    with pytest.raises(FileExistsError, match="overwrite"):
        evaluate(
            setup["exm_test"],
            setup["ckpt"],
            setup["seg"],
            setup["labels_test"],
            labels_class=2,
            out=out,
            **kw,
        )


def test_evaluate_multichannel_exm_scores_the_chosen_channel(setup: dict[str, Path]) -> None:
    """A (C, Z, Y, X) ExM sample (pan-protein + an antibody): ``exm_channel`` picks the stain; the rows are those of
    the same channel stored alone, and without a channel the error names exem-evaluate's option."""
    tmp = setup["tmp"]
    exm = zarr.open_group(str(setup["exm_test"]), mode="r")["0"][...]
    antibody = np.random.default_rng(1).integers(0, 256, exm.shape).astype(exm.dtype)
    stack = zarr.create_array(
        str(tmp / "two.zarr"), shape=(2, *exm.shape), dtype=exm.dtype, chunks=(1, *exm.shape)
    )
    stack[...] = np.stack([antibody, exm])
    kw = {
        "translate_options": {"patch": [8, 64, 64]},
        "segment_options": {"patch": [8, 32, 32]},
        "labels_class": 2,
        "progress": False,
    }
    alone = evaluate(
        setup["exm_test"], setup["ckpt"], setup["seg"], setup["labels_test"], out=tmp / "e1", **kw
    )
    chosen = evaluate(
        tmp / "two.zarr",
        setup["ckpt"],
        setup["seg"],
        setup["labels_test"],
        exm_channel=1,
        out=tmp / "e2",
        **kw,
    )
    assert [r["input"] for r in chosen.rows] == ["virtual_em", "exm"]
    for a, b in zip(alone.rows, chosen.rows, strict=True):
        assert a == pytest.approx(b, nan_ok=True), (a, b)
    assert zarr.open_group(str(chosen.virtual_em), mode="r")["0"].ndim == 3  # the virtual EM alone
    with pytest.raises(ValueError, match=r"got a 4D array .*choose one with exm_channel=<index or name>$"):
        evaluate(tmp / "two.zarr", setup["ckpt"], setup["seg"], setup["labels_test"], out=tmp / "e3", **kw)
