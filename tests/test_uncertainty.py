"""Reliability maps: TTA standard deviation over the 8 in-plane symmetries, through translate_volume and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from exem.data.ome import read_multiscales, write_ome_zarr
from exem.inference.translate import translate_volume
from exem.inference.uncertainty import D4, TTAStd, d4_transforms, default_uncertainty_path, reliability_map
from exem.models import AnisotropicUNet3D
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KW = {"patch": [4, 32, 32], "batch_size": 2, "num_workers": 0, "progress": False}


class Pointwise(torch.nn.Module):
    """Commutes with every flip and rotation: its reliability map is 0."""

    divisor = 1

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(4 * x - 2) * self.a


class XGradient(torch.nn.Module):
    """Sees direction (a forward difference along X): rotated copies disagree."""

    divisor = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 + 0.5 * (torch.roll(x, -1, dims=-1) - x)


def test_d4_is_the_eight_symmetries_and_inverts() -> None:
    x = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(1, 1, 2, 3, 3)
    copies = [t for t, _ in d4_transforms(x)]
    assert len(D4) == 8 and torch.equal(copies[0], x)
    assert len({tuple(c.flatten().tolist()) for c in copies}) == 8  # all different on an asymmetric patch
    net = TTAStd(torch.nn.Identity())
    assert float(net(torch.rand(2, 1, 3, 8, 8)).abs().max()) < 1e-6  # identity: every copy maps back exactly


def test_std_is_zero_for_an_equivariant_net_and_matches_numpy_otherwise() -> None:
    x = torch.rand(2, 1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float(TTAStd(Pointwise())(x).max()) < 1e-6
    got = TTAStd(XGradient())(x).numpy()
    xs = x.numpy()
    outs = []
    for k in range(4):
        for mirror in (False, True):
            t = np.rot90(xs, k, axes=(-2, -1))
            t = t[..., ::-1] if mirror else t
            y = 0.5 + 0.5 * (np.roll(t, -1, axis=-1) - t)
            y = y[..., ::-1] if mirror else y
            outs.append(np.rot90(y, -k, axes=(-2, -1)))
    np.testing.assert_allclose(got, np.std(np.stack(outs), axis=0), atol=1e-6)
    assert got.mean() > 0.01


def test_tta_checks_both_orientations() -> None:
    net = TTAStd(AnisotropicUNet3D(widths=(4, 8, 16)))
    net.check_input_shape((4, 32, 64))
    with pytest.raises(ValueError):
        net.check_input_shape((4, 32, 66))


@pytest.fixture(scope="module")
def exm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("unc") / "exm.ome.zarr"
    data = np.random.default_rng(0).integers(0, 256, (8, 64, 64), dtype=np.uint8)
    write_ome_zarr(path, data, (40.0, 10.0, 10.0), chunks=(8, 32, 32))
    return path


def test_reliability_map_next_to_a_finished_translation(exm: Path, tmp_path: Path) -> None:
    out = tmp_path / "vem.ome.zarr"
    translate_volume(XGradient(), exm, out, **KW)  # as if a run had stopped after the virtual EM
    assert not default_uncertainty_path(out).exists()
    again = translate_volume(XGradient(), exm, out, complete_ok=True, **KW)
    assert again.already_complete and again.blocks_done == 0  # the virtual EM is not recomputed
    res = reliability_map(XGradient(), exm, default_uncertainty_path(out), **KW)
    assert res.output == tmp_path / "vem_uncertainty.ome.zarr"
    group = zarr.open_group(str(res.output), mode="r")
    std = group["0"][...]
    assert std.dtype == np.float16 and std.shape == (8, 64, 64) and group["1"].shape == (8, 32, 32)
    assert group.attrs["exem"]["complete"] and read_multiscales(group)["name"] == "virtual_em_std"
    assert float(std.mean()) > 0.01 and np.isfinite(std).all()
    # a pointwise generator is fully reliable
    flat = reliability_map(Pointwise(), exm, tmp_path / "p.ome.zarr", **KW)
    assert float(np.abs(zarr.open_group(str(flat.output))["0"][...]).max()) < 1e-3
    # rerunning a finished translation with other settings is still refused, with what differs
    with pytest.raises(
        FileExistsError, match="exists \\(complete\\) with other settings: sigma 0.5 \\(now 0.3\\)"
    ):
        translate_volume(XGradient(), exm, out, complete_ok=True, sigma=0.3, **KW)
    with pytest.raises(ValueError, match="dtype cannot be set"):
        reliability_map(XGradient(), exm, tmp_path / "x.ome.zarr", dtype="uint8", **KW)


def test_cli_uncertainty(exm: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ckpt = tmp_path / "G_AB_1.pth"
    torch.save(AnisotropicUNet3D(widths=(4, 8, 16)).state_dict(), ckpt)
    unc = tmp_path / "reliability.ome.zarr"
    args = [f"checkpoint={ckpt}", f"input={exm}", f"output={tmp_path / 'v.ome.zarr'}", "patch=[4,32,32]"]
    proc = run_cli(
        "exem-translate", *args, "trainer=cpu", "uncertainty=true", f"uncertainty_output={unc}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"reliability map (std over 8 in-plane flips/rotations) → {unc}" in proc.stdout
    assert zarr.open_group(str(unc), mode="r")["0"].shape == (8, 64, 64)
