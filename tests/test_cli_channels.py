"""A two-channel ExM sample (pan-protein + antibody) through the console scripts: exem-train on its pan-protein
channel → exem-translate (both channels out) → exem-segment (the virtual EM channel) → exem-measure (the antibody
channel of the translation); the measured table equals skimage's regionprops on the same data."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import zarr
from skimage.measure import regionprops_table

from exem.data.volume import open_volume
from tests.conftest import DEMO_FAST, run_cli

SEGMENTER = Path(__file__).resolve().parent.parent / "exem" / "assets" / "segmenters" / "em_mito.pt"


def _ok(proc) -> None:  # noqa: ANN001
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-2000:]}\nSTDERR:\n{proc.stderr[-4000:]}"
    )


def test_two_channel_sample_train_translate_segment_measure(tmp_path: Path, synthetic_dir: Path) -> None:
    syn = synthetic_dir / "synthetic"
    run = tmp_path / "train"
    _ok(
        run_cli(
            "exem-train", *DEMO_FAST, f"paths.data_dir={synthetic_dir}", f"hydra.run.dir={run}",
            f"data.lm.path={syn / 'exm_antibody_test.zarr'}", "data.lm.channel=nhs_ester", cwd=tmp_path,
        )
    )  # fmt: skip
    translated = tmp_path / "sample_virtual_em.ome.zarr"
    _ok(
        run_cli(
            "exem-translate", f"checkpoint={run / 'checkpoints' / 'last.ckpt'}",
            f"input={syn / 'exm_antibody_test.zarr'}", f"output={translated}", "channel=nhs_ester", "trainer=cpu",
            cwd=tmp_path,
        )
    )  # fmt: skip
    assert open_volume(translated, channel="antibody").channel_names == ("virtual_em", "antibody")
    seg = tmp_path / "mito.zarr"
    _ok(  # a 6-step generator draws few mitochondria: a low threshold gives objects to measure
        run_cli(
            "exem-segment", f"model={SEGMENTER}", f"input={translated}", f"output={seg}", "threshold=0.02",
            "trainer=cpu", cwd=tmp_path,
        )
    )  # fmt: skip
    out = tmp_path / "measured"
    proc = run_cli(
        "exem-measure", f"labels={seg}", f"images=[{translated}]", "channels=[antibody]", "names=[antibody]",
        "expansion_factor=4.0", "block_shape=[8,64,64]", f"out={out}", cwd=tmp_path,
    )  # fmt: skip
    _ok(proc)
    assert "objects" in proc.stdout

    labels = zarr.open_group(str(seg / "labels"), mode="r")["0"][:]
    antibody = zarr.open_group(str(translated), mode="r")["0"][1].astype(np.float64)
    ref = regionprops_table(
        labels,
        intensity_image=antibody,
        properties=("label", "area", "centroid", "intensity_mean", "intensity_max"),
    )
    with open(out / "objects.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(ref["label"]) > 0
    got = {
        k: np.array([float(r[k]) for r in rows]) for k in ("label", "voxels", "centroid_z", "antibody_mean")
    }
    assert np.array_equal(got["label"], ref["label"]) and np.array_equal(got["voxels"], ref["area"])
    assert np.allclose(got["centroid_z"], ref["centroid-0"], rtol=1e-9)
    assert np.allclose(got["antibody_mean"], ref["intensity_mean"], rtol=1e-9)
    voxel_um3 = (40 / 4) * (10 / 4) * (10 / 4) * 1e-9  # the phantom's nm voxel, pre-expansion, in µm³
    assert float(rows[0]["volume_um3"]) == pytest.approx(float(rows[0]["voxels"]) * voxel_um3, rel=1e-9)
