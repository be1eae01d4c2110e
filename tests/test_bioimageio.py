"""bioimage.io model packages in exem-segment: spec 0.5 and 0.4, 3D and 2D, TorchScript and ONNX, zip and folder.

Each run is compared with the model applied to the whole volume in memory, normalised with the statistics the run
recorded (and those are the volume's own): any seam at block borders, any axis mix-up, any halo voxel that
leaks into the blend would show.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from exem.analysis.segment import segment_volume
from exem.bioimageio.package import AxisSize, PackageError, open_package
from tests.bioimageio_packages import make_package, reference


@pytest.fixture(scope="module")
def em_volume(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A synthetic uint8 (12, 40, 48) EM volume (exem's EM rendering of a phantom) in a Zarr with small chunks."""
    from exem.data.phantom import make_phantom
    from exem.data.render import render_em

    vol = render_em(make_phantom((12, 40, 48), seed=3), seed=3)
    path = tmp_path_factory.mktemp("em") / "em.zarr"
    z = zarr.create_array(str(path), shape=vol.shape, chunks=(6, 20, 24), dtype="uint8")
    z[:] = vol
    return path, vol


def _probabilities(out: Path) -> np.ndarray:
    return zarr.open_group(str(out / "probabilities"), mode="r")["0"][:]


def _record(out: Path) -> dict:
    return dict(zarr.open_group(str(out), mode="r").attrs["exem"])


CASES = [
    pytest.param("0.5", 3, "torchscript", False, id="spec0.5-3d-torchscript"),
    pytest.param("0.4", 3, "torchscript", True, id="spec0.4-3d-torchscript-zip"),
    pytest.param("0.5", 2, "torchscript", False, id="spec0.5-2d-torchscript"),
    pytest.param("0.5", 3, "onnx", True, id="spec0.5-3d-onnx-zip"),
    pytest.param("0.5", 3, "state_dict", False, id="spec0.5-3d-state-dict-importable"),
]


@pytest.mark.parametrize(("version", "dims", "weights", "to_zip"), CASES)
def test_package_segmentation_equals_the_whole_volume_in_memory(
    tmp_path: Path, em_volume: tuple[Path, np.ndarray], version: str, dims: int, weights: str, to_zip: bool
) -> None:
    src, vol = em_volume
    pkg, net = make_package(tmp_path / "pkg", version=version, dims=dims, weights=weights, to_zip=to_zip)
    out = tmp_path / "seg"
    res = segment_volume(
        pkg,
        src,
        out,
        patch=(8 if dims == 3 else 4, 24, 24),
        dtype="float32",
        chunks=(4, 8, 8),
        block_shape=(4, 16, 16),
        check=True,
        progress=False,
    )
    assert res.check is not None and res.check["passed"] and res.check["max_abs_error"] < 1e-5
    assert res.blocks_done > 4  # several blocks: their borders would show as seams
    record = _record(out)
    stats = record["model"]["statistics"]["preprocessing"][0]
    assert stats["mean"] == pytest.approx(float(vol.mean()), rel=1e-9)  # the whole (small) volume was sampled
    assert stats["std"] == pytest.approx(float(vol.std()), rel=1e-9)
    assert record["model"]["format"] == "bioimageio/" + {"state_dict": "pytorch_state_dict"}.get(
        weights, weights
    )
    expected = reference(net, vol.astype(np.float32), stats["mean"], stats["std"], dims=dims)[0]
    assert np.abs(_probabilities(out) - expected).max() < 2e-5


def test_channel_by_name_and_boundary_kind(tmp_path: Path, em_volume: tuple[Path, np.ndarray]) -> None:
    src, vol = em_volume
    pkg, net = make_package(tmp_path / "pkg")
    out = tmp_path / "seg"
    res = segment_volume(pkg, src, out, channel="boundary", dtype="float32", progress=False)
    assert res.kind == "boundary"  # suggested by the channel's name
    stats = _record(out)["model"]["statistics"]["preprocessing"][0]
    expected = reference(net, vol.astype(np.float32), stats["mean"], stats["std"])[1]
    assert np.abs(_probabilities(out) - expected).max() < 2e-5
    with pytest.raises(
        PackageError, match="no output channel 'nucleus'; channels are 0: foreground, 1: boundary"
    ):
        segment_volume(pkg, src, tmp_path / "seg2", channel="nucleus", progress=False)


def test_default_patch_is_a_size_the_model_accepts(tmp_path: Path) -> None:
    pkg, _ = make_package(tmp_path / "pkg")
    package = open_package(pkg)
    assert package.sizes == (AxisSize(4, 4), AxisSize(16, 8), AxisSize(16, 8))
    assert package.halo3 == (1, 1, 1)
    assert package.default_patch((30, 1000, 100), (16, 256, 256)) == (16, 256, 96)
    assert package.default_overlap((16, 256, 96), (4, 64, 24)) == (4, 64, 24)
    assert package.default_overlap((4, 16, 16), (0, 0, 0)) == (2, 2, 2)  # twice the halo
    with pytest.raises(PackageError, match="has 20 voxels along y; the model takes 16 \\+ 8·k"):
        package.check_patch((8, 20, 24))
    with pytest.raises(PackageError, match="the volume has 3 voxels along z; the model needs at least 4"):
        package.default_patch((3, 64, 64), (16, 256, 256))


def test_check_fails_on_a_package_exem_cannot_reproduce(
    tmp_path: Path, em_volume: tuple[Path, np.ndarray]
) -> None:
    src, _ = em_volume
    pkg, _ = make_package(tmp_path / "pkg", corrupt_test_output=True)
    out = tmp_path / "seg"
    with pytest.raises(PackageError, match="does not reproduce the package's test output"):
        segment_volume(pkg, src, out, check=True, progress=False)
    assert not out.exists()


def test_exem_segment_cli_runs_a_package(tmp_path: Path, em_volume: tuple[Path, np.ndarray]) -> None:
    """The console script with a spec 0.5 package and check=true: the same probabilities as in memory."""
    from tests.conftest import run_cli

    src, vol = em_volume
    pkg, net = make_package(tmp_path / "pkg")
    out = tmp_path / "seg.zarr"
    proc = run_cli(
        "exem-segment", f"model={pkg}", f"input={src}", f"output={out}", "check=true", "dtype=float32",
        "trainer=cpu", "patch=[8,24,24]", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "the package's test output reproduced" in proc.stdout
    stats = _record(out)["model"]["statistics"]["preprocessing"][0]
    expected = reference(net, vol.astype(np.float32), stats["mean"], stats["std"])[0]
    assert np.abs(_probabilities(out) - expected).max() < 2e-5


def test_state_dict_with_architecture_in_the_package_is_refused(tmp_path: Path) -> None:
    pkg, _ = make_package(tmp_path / "pkg", weights="state_dict_file")
    with pytest.raises(PackageError, match="weights in pytorch_state_dict; exem runs torchscript, onnx"):
        open_package(pkg)
