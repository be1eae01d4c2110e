"""On-the-fly resampling between the input's and the model's voxel sizes (issue 3, item 6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from exem.data.ome import level_scale, read_multiscales, write_ome_zarr
from exem.data.resample import RescaledNetwork, resample_volume, resampled_shape, same_voxel_size, scale_roi
from exem.data.volume import open_volume
from exem.export import export_generator
from exem.inference.translate import translate_volume
from exem.models import AnisotropicUNet3D
from exem.trained import TrainedGenerator
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

INPUT_NM = (40.0, 10.0, 10.0)
MODEL_NM = (40.0, 20.0, 20.0)


def _smooth(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A smooth uint8 volume (low-frequency sines), so interpolation errors are small."""
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    v = 0.5 + 0.2 * np.sin(x / 9.0 + seed) * np.cos(y / 11.0) + 0.1 * np.sin(z / 3.0)
    return np.round(255 * v).astype(np.uint8)


class IdentityNet(torch.nn.Module):
    """An identity network (Y, X divisible by 4)."""

    divisor = 4

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dummy


def Identity() -> TrainedGenerator:  # noqa: N802 - reads like the class it wraps
    """An identity 'generator' trained (so its record says) at MODEL_NM."""
    return TrainedGenerator(IdentityNet(), voxel_size_nm=MODEL_NM)


@pytest.fixture(scope="module")
def volume_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("resample") / "exm.ome.zarr"
    write_ome_zarr(path, _smooth((12, 64, 96)), INPUT_NM, chunks=(8, 32, 32))
    return path


def test_shapes_tolerance_and_roi() -> None:
    assert resampled_shape((12, 64, 96), INPUT_NM, MODEL_NM) == (12, 32, 48)
    assert resampled_shape((5, 7, 7), (40, 10, 10), (40, 20, 20)) == (5, 4, 4)  # round half to even, ≥ 1
    assert same_voxel_size((40, 10, 10), (40, 10.05, 9.95)) and not same_voxel_size(INPUT_NM, MODEL_NM)
    assert scale_roi([0, 12, 3, 61, 10, 90], INPUT_NM, MODEL_NM) == [0, 12, 1, 31, 5, 45]
    with pytest.raises(ValueError, match="positive"):
        resampled_shape((4, 4, 4), (40, 0, 10), MODEL_NM)


@pytest.mark.parametrize("target", [MODEL_NM, (20.0, 10.0, 5.0), (40.0, 7.0, 13.0)])
def test_view_equals_whole_volume_interpolation_and_is_tile_independent(volume_path: Path, target) -> None:
    vol = open_volume(volume_path)
    view = resample_volume(vol, target)
    assert view.voxel_size_nm == tuple(target) and view.intensity_range == vol.intensity_range
    whole = view.read(tuple(slice(0, n) for n in view.shape))
    assert whole.dtype == np.float32 and whole.shape == view.shape
    ref = F.interpolate(
        torch.from_numpy(vol.read((slice(None),) * 3).astype(np.float32))[None, None],
        size=view.shape,
        mode="trilinear",
        align_corners=False,
    )[0, 0].numpy()
    np.testing.assert_allclose(whole, ref, atol=1e-3)
    # any sub-box read alone equals the same box of the whole read, bit for bit
    rng = np.random.default_rng(1)
    for _ in range(5):
        a = [int(rng.integers(0, n - 1)) for n in view.shape]
        b = [int(rng.integers(lo + 1, n + 1)) for lo, n in zip(a, view.shape, strict=True)]
        box = tuple(slice(lo, hi) for lo, hi in zip(a, b, strict=True))
        assert np.array_equal(view.read(box), whole[box])


def test_view_same_size_is_exact_and_needs_a_voxel_size(volume_path: Path) -> None:
    vol = open_volume(volume_path)
    same = resample_volume(vol, INPUT_NM)
    assert np.array_equal(
        same.read((slice(2, 9), slice(5, 40), slice(0, 96))),
        vol.read((slice(2, 9), slice(5, 40), slice(0, 96))),
    )
    unknown = open_volume(np.zeros((4, 16, 16), dtype=np.uint8))
    with pytest.raises(ValueError, match="voxel size unknown"):
        resample_volume(unknown, MODEL_NM)


def test_rescaled_network_resamples_patches_and_checks_shapes() -> None:
    seen: list[tuple[int, ...]] = []

    class Probe(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(x.shape))
            return x

    net = RescaledNetwork(Probe(), INPUT_NM, MODEL_NM)
    x = torch.from_numpy(_smooth((8, 64, 64)).astype(np.float32) / 255)[None, None]
    y = net(x)
    assert seen == [(1, 1, 8, 32, 32)] and y.shape == x.shape
    assert float((y - x).abs().max()) < 0.05  # smooth data survive the round trip
    assert net.input_patch((16, 128, 128)) == (16, 256, 256)
    gnet = RescaledNetwork(AnisotropicUNet3D(widths=(4, 8, 16)), INPUT_NM, MODEL_NM)
    gnet.check_input_shape((8, 64, 64))  # 8×32×32 at the model's scale: fine (divisor 4)
    with pytest.raises(ValueError, match="model's voxel size"):
        gnet.check_input_shape((8, 36, 36))  # 8×18×18: not divisible by 4


def test_translate_output_at_input_scale(volume_path: Path, tmp_path: Path) -> None:
    kw = {"patch": [8, 32, 32], "batch_size": 2, "num_workers": 0, "progress": False, "dtype": "float32"}
    res = translate_volume(Identity(), volume_path, tmp_path / "in.ome.zarr", **kw)
    assert res.resampled == "input" and res.voxel_size_nm == INPUT_NM and res.shape == (12, 64, 96)
    group = zarr.open_group(str(tmp_path / "in.ome.zarr"), mode="r")
    assert level_scale(read_multiscales(group), 0)[1] == INPUT_NM
    assert group.attrs["exem"]["scale"] == {"output": "input", "model_voxel_size_nm": list(MODEL_NM)}
    out = group["0"][...]
    src = open_volume(volume_path).read_normalized((slice(None),) * 3)
    assert float(np.abs(out - src).max()) < 0.05  # identity through down- and up-sampling
    # resample=false: the identity's output is the input itself
    plain = translate_volume(Identity(), volume_path, tmp_path / "raw.ome.zarr", resample=False, **kw)
    assert plain.resampled is None
    np.testing.assert_allclose(zarr.open_group(str(tmp_path / "raw.ome.zarr"))["0"][...], src, atol=1e-6)


def test_translate_output_at_model_scale(volume_path: Path, tmp_path: Path) -> None:
    kw = {"patch": [8, 16, 16], "batch_size": 2, "num_workers": 0, "progress": False, "dtype": "float32"}
    res = translate_volume(Identity(), volume_path, tmp_path / "m.ome.zarr", output_scale="model", **kw)
    assert res.resampled == "model" and res.shape == (12, 32, 48) and res.voxel_size_nm == MODEL_NM
    group = zarr.open_group(str(tmp_path / "m.ome.zarr"), mode="r")
    assert level_scale(read_multiscales(group), 0)[1] == MODEL_NM
    view = resample_volume(open_volume(volume_path), MODEL_NM)
    expected = np.clip(view.read((slice(None),) * 3) / 255.0, 0, 1)
    np.testing.assert_allclose(group["0"][...], expected, atol=1e-5)
    # an ROI is given in input voxels
    roi = translate_volume(
        Identity(),
        volume_path,
        tmp_path / "roi.ome.zarr",
        output_scale="model",
        roi=[0, 12, 0, 64, 0, 64],
        **kw,
    )
    assert roi.shape == (12, 32, 32)
    with pytest.raises(ValueError, match="output_scale"):
        translate_volume(Identity(), volume_path, tmp_path / "bad.ome.zarr", output_scale="em", **kw)


def test_cli_resamples_to_the_checkpoint_voxel_size_and_checks_widths(
    volume_path: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    g = TrainedGenerator(AnisotropicUNet3D(widths=(4, 8, 16)), voxel_size_nm=MODEL_NM)
    export_generator(g, tmp_path / "gen", formats=["exem"])
    base = [f"checkpoint={tmp_path / 'gen'}", f"input={volume_path}", "patch=[8,16,16]", "trainer=cpu"]
    out = tmp_path / "vem.ome.zarr"
    proc = run_cli("exem-translate", *base, f"output={out}", "output_scale=model", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "output at the model's: 40×20×20 nm" in proc.stdout
    group = zarr.open_group(str(out), mode="r")
    assert group["0"].shape == (12, 32, 48) and level_scale(read_multiscales(group), 0)[1] == MODEL_NM

    bad = run_cli(
        "exem-translate", *base, f"output={tmp_path / 'w.ome.zarr'}", "widths=[8,16,32]", cwd=tmp_path
    )
    assert bad.returncode == 1
    lines = [ln for ln in bad.stderr.splitlines() if ln.startswith("exem-translate: error:")]
    assert len(lines) == 1 and "widths" in lines[0], bad.stderr[-2000:]
    assert not (tmp_path / "w.ome.zarr").exists()
