"""The demo's last step on the held-out phantom: segment mitochondria, measure the antibody per object, call
positives (Otsu of the object means) and compare with the phantom's truth (≥ 0.9 of the calls agree)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from exem.analysis.measure import measure_objects
from exem.analysis.positives import match_objects, positive_call_report
from exem.analysis.segment import segment_volume
from exem.data.synthetic import write_synthetic_dataset

SEGMENTER = Path(__file__).resolve().parent.parent / "exem" / "assets" / "segmenters" / "em_mito.pt"


def test_match_objects_takes_the_largest_overlap() -> None:
    labels = np.array([[[1, 1, 1, 2, 2, 0, 3]]])
    truth = np.array([[[5, 5, 0, 0, 6, 6, 0]]])
    assert match_objects(labels, truth) == {
        1: 5,
        2: 0,
        3: 0,
    }  # 2: one voxel on 6, one on background (first wins)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_synthetic_dataset(tmp_path_factory.mktemp("syn"), shape=(32, 192, 192))


def test_antibody_positive_calls_match_the_phantom(tmp_path: Path, phantom: dict[str, Path]) -> None:
    seg = segment_volume(SEGMENTER, phantom["em_test"], tmp_path / "seg", progress=False)
    result = measure_objects(
        tmp_path / "seg", [phantom["antibody_test"]], tmp_path / "measured", names=["antibody"],
        positive_threshold={"antibody": "otsu"}, expansion_factor=4.0, progress=False,
    )  # fmt: skip
    calls = dict(
        zip(result.columns["label"].tolist(), result.columns["antibody_positive"].tolist(), strict=True)
    )
    truth = zarr.open_group(str(phantom["antibody_test"]), mode="r").attrs["exem_synthetic"]
    report = positive_call_report(
        calls, tmp_path / "seg", phantom["mito_test"], truth["antibody_positive_mito_ids"]
    )
    assert report.objects == seg.num_objects >= 10
    assert report.accuracy >= 0.9 and report.matched_accuracy >= 0.9, report.summary()
    assert report.found >= 0.7 * report.true_mitochondria, report.summary()  # 19 of 24 seen here
    assert 0.3 <= report.true_fraction <= 0.5
    assert (tmp_path / "measured" / "measure.png").is_file()


def test_positives_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from exem.analysis.positives import main

    missing = str(tmp_path / "nothing.zarr")
    with pytest.raises(SystemExit) as stop:
        main(
            [
                "--objects",
                str(tmp_path / "objects.csv"),
                "--labels",
                missing,
                "--truth",
                missing,
                "--antibody",
                missing,
            ]
        )
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.count("\n") == 1 and "nothing.zarr" in err and "Traceback" not in err
