"""`exem-segment` through the installed entry point: TorchScript = ONNX labels, sidecar options, one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.conftest import run_cli
from tests.segmenters import save_segmenters


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from exem.data.synthetic import write_synthetic_dataset

    tmp = tmp_path_factory.mktemp("segment_cli")
    em = write_synthetic_dataset(tmp / "data", shape=[16, 64, 64])["em_test"]
    ts, onnx = save_segmenters(tmp / "models")
    # one sidecar for both files (seg.pt and seg.onnx share the stem "seg"); the command line sets threshold
    (tmp / "models" / "seg.yaml").write_text(
        "kind: foreground\nthreshold: 0.9\npatch: [8, 32, 32]\nmin_size: 2\n"
    )
    return {"tmp": tmp, "em": em, "ts": ts, "onnx": onnx}


def _ok(proc) -> None:  # noqa: ANN001
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_segment_cli_torchscript_and_onnx_give_identical_labels(setup: dict[str, Path]) -> None:
    tmp = setup["tmp"]
    outs = {}
    for name in ("ts", "onnx"):
        out = tmp / f"seg_{name}.zarr"
        proc = run_cli(
            "exem-segment", f"model={setup[name]}", f"input={setup['em']}", f"output={out}", "threshold=0.5",
            "trainer=cpu", cwd=tmp,
        )  # fmt: skip
        _ok(proc)
        assert (
            "exem-segment: 16×64×64 voxels" in proc.stdout
            and "objects (foreground, threshold 0.5)" in proc.stdout
        )
        assert "segmented " not in proc.stdout  # the library's summary record: printed once, by the command
        outs[name] = out
    a, b = (zarr.open_group(str(outs[k]), mode="r") for k in ("ts", "onnx"))
    la, lb = a["labels/0"][...], b["labels/0"][...]
    assert la.dtype == np.uint32 and la.max() > 1
    assert np.array_equal(la, lb) and np.array_equal(a["labels/1"][...], b["labels/1"][...])
    assert np.abs(a["probabilities/0"][...].astype(np.float32) - b["probabilities/0"][...]).max() < 1e-3
    meta = a.attrs["exem"]
    assert meta["patch"] == [8, 32, 32] and meta["min_size"] == 2  # from the sidecar
    assert meta["threshold"] == 0.5 and meta["kind"] == "foreground"  # the command line wins
    assert meta["model"]["format"] == "torchscript" and b.attrs["exem"]["model"]["format"] == "onnx"
    assert meta["num_objects"] == int(la.max())


@pytest.mark.parametrize(
    ("what", "needle"),
    [
        ("unknown_type", "unknown model type '.h5'"),
        ("missing", "does not exist"),
        ("exists", "overwrite=true"),
    ],
)
def test_segment_cli_errors_are_one_line(setup: dict[str, Path], what: str, needle: str) -> None:
    tmp = setup["tmp"]
    model, out = setup["ts"], tmp / f"err_{what}.zarr"
    if what == "unknown_type":
        model = tmp / "model.h5"
        model.write_bytes(b"not a model")
    elif what == "missing":
        model = tmp / "nope" / "model.pt"
    else:
        out.mkdir()
        (out / "precious.txt").write_text("keep me")
    proc = run_cli(
        "exem-segment", f"model={model}", f"input={setup['em']}", f"output={out}", "trainer=cpu", cwd=tmp
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("exem-segment: error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    if what == "exists":
        assert (out / "precious.txt").read_text() == "keep me"
