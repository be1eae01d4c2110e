"""exem-export formats=[bioimageio]: the translator as a bioimage.io package that bioimageio.core's test passes with
the network switched off, and that exem's own package reader runs back to its test output."""

from __future__ import annotations

import contextlib
import io
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
import zarr

from exem.bioimageio.export import package_preprocessing
from exem.bioimageio.package import open_package
from exem.models import AnisotropicUNet3D


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Any]:
    """No network: every socket connection fails (and is recorded); bioimageio's cache in a temporary folder."""
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any, *args: Any) -> None:
        attempts.append(address)
        raise OSError("network switched off by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("BIOIMAGEIO_CACHE_PATH", str(tmp_path / "bioimageio-cache"))
    return attempts


def _export_cli(*args: str) -> tuple[int, str, str]:
    from exem import cli

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["exem-export", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.export_main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def test_exported_package_passes_bioimageio_core_offline(tmp_path: Path, offline: list[Any]) -> None:
    from bioimageio.core import test_model

    torch.manual_seed(0)
    net = AnisotropicUNet3D(widths=(4, 8, 16)).eval()
    ckpt = tmp_path / "G_AB_100.pth"
    torch.save(net.state_dict(), ckpt)
    volume = (np.random.default_rng(0).random((10, 40, 44)) * 255).astype(np.uint8)
    z = zarr.create_array(str(tmp_path / "exm.zarr"), shape=volume.shape, dtype="uint8", chunks=(5, 20, 22))
    z[:] = volume
    out = tmp_path / "exported"
    code, stdout, stderr = _export_cli(
        f"checkpoint={ckpt}", f"output={out}", "formats=[bioimageio]", f"test_volume={tmp_path / 'exm.zarr'}",
        "example_shape=[1,1,4,16,16]", "package.authors=[{name: exem tests}]",
    )  # fmt: skip
    assert code == 0, stderr
    folder, archive = out / "bioimageio", out / "exem_exm_to_virtual_em.zip"
    assert "bioimageio.core test passed" in stdout and str(archive) in stdout
    assert sorted(p.name for p in out.iterdir()) == ["bioimageio", archive.name]  # no stray weight files
    for source in (folder / "rdf.yaml", archive):
        assert test_model(source, devices=["cpu"]).status == "passed"

    rdf = yaml.safe_load((folder / "rdf.yaml").read_text())
    inp, outp = rdf["inputs"][0], rdf["outputs"][0]
    assert [a.get("id", a["type"]) for a in inp["axes"]] == ["batch", "channel", "z", "y", "x"]
    assert inp["axes"][3]["size"] == {"min": 16, "step": 4}  # Y: 4 · divisor + k · divisor
    assert [a.get("halo") for a in outp["axes"][2:]] == [1, 4, 4]
    assert [s["id"] for s in inp["preprocessing"]] == ["scale_linear", "clip"]
    assert inp["preprocessing"][0]["kwargs"]["gain"] == pytest.approx(1 / 255)  # uint8 test volume, no record
    assert set(rdf["weights"]) == {"torchscript", "onnx"}
    assert [c["url"] for c in rdf["cite"]] == ["https://pypi.org/project/exem/"]
    readme = (folder / "README.md").read_text()
    assert "## Validation" in readme and "ExEM" in readme
    test_input = np.load(folder / "test_input.npy")
    assert test_input.shape == (1, 1, 10, 40, 44)  # the volume's centre, capped by the volume
    assert np.array_equal(test_input[0, 0], volume.astype(np.float32))
    from PIL import Image

    with Image.open(folder / "cover.png") as cover:
        assert cover.width * 40 == cover.height * 2 * 44  # ExM | virtual EM, middle Z slices side by side

    package = open_package(
        archive
    )  # exem's reader runs it back (PackageNet: preprocessing fitted on the test)
    assert package.weights_format == "torchscript" and package.halo3 == (1, 4, 4)


def test_preprocessing_follows_the_training_normalisation() -> None:
    assert package_preprocessing({"intensity_range": [100, 1100]}, "uint16")[0] == {
        "id": "scale_linear",
        "kwargs": {"gain": 0.001, "offset": -0.1},
    }
    steps = package_preprocessing({"percentiles": [0.5, 99.5]}, "uint16")
    assert steps[0]["id"] == "scale_range" and steps[0]["kwargs"]["max_percentile"] == 99.5
    assert package_preprocessing(None, "uint16")[0]["kwargs"]["gain"] == pytest.approx(1 / 65535)
    assert package_preprocessing(None, "float32") == [{"id": "clip", "kwargs": {"min": 0.0, "max": 1.0}}]


def test_too_small_a_test_volume_is_one_line_and_writes_no_package(
    tmp_path: Path, offline: list[Any]
) -> None:
    torch.manual_seed(0)
    ckpt = tmp_path / "G_AB_100.pth"
    torch.save(AnisotropicUNet3D(widths=(4, 8, 16)).state_dict(), ckpt)
    z = zarr.create_array(str(tmp_path / "small.zarr"), shape=(4, 8, 8), dtype="uint8", chunks=(4, 8, 8))
    z[:] = 7
    out = tmp_path / "exported"
    code, _, stderr = _export_cli(
        f"checkpoint={ckpt}",
        f"output={out}",
        "formats=[bioimageio]",
        f"test_volume={tmp_path / 'small.zarr'}",
    )
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code != 0 and lines[-1].startswith("exem-export: error:") and "too small" in lines[-1], stderr
    assert not (out / "bioimageio").exists() and not list(out.glob("*.zip"))


def test_the_test_volume_is_judged_by_the_training_normalisation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from exem.bioimageio.export import _test_input
    from exem.trained import TrainedGenerator

    # a dark 12-bit-like uint16 volume, as the synthetic ExM: its dtype's range would make every patch dark
    volume = np.random.default_rng(0).integers(100, 4000, (8, 32, 32)).astype(np.uint16)
    path = tmp_path / "dark.zarr"
    zarr.create_array(str(path), shape=volume.shape, dtype="uint16", chunks=(8, 32, 32))[:] = volume
    trained = TrainedGenerator(
        AnisotropicUNet3D(widths=(4, 8)), lm_normalization={"percentiles": [0.5, 99.8]}
    )
    with caplog.at_level("WARNING"):
        raw = _test_input(trained, path, (8, 32, 32), seed=0)
    assert np.array_equal(raw, volume)  # raw values, as the package's test input
    assert "dark" not in caplog.text  # the generator was trained on percentiles: no dtype-range warning
    with caplog.at_level("WARNING"):
        _test_input(TrainedGenerator(AnisotropicUNet3D(widths=(4, 8))), path, (8, 32, 32), seed=0)
    assert "dark" in caplog.text  # no training record: the dtype's range, and the warning is right
