"""exem.analysis.compare: PSNR/SSIM of virtual EM against ground truth, and the panel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from exem.analysis.compare import compare_translation


def _store(path: Path, data: np.ndarray) -> Path:
    arr = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=data.shape)
    arr[...] = data
    return path


def test_compare_values_and_panel(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    em = rng.integers(0, 256, (4, 32, 32), dtype=np.uint8)
    exm = _store(tmp_path / "exm.zarr", rng.integers(0, 4000, (4, 32, 32), dtype=np.uint16))
    same = compare_translation(
        exm, _store(tmp_path / "v.zarr", em), _store(tmp_path / "em.zarr", em), tmp_path / "a.png"
    )
    assert same["ssim"] == pytest.approx(1.0) and np.isinf(same["psnr"])
    off = np.clip(em.astype(int) + 16, 0, 255).astype(np.uint8)  # every voxel off by ≤ 16 grey levels
    q = compare_translation(exm, _store(tmp_path / "off.zarr", off), tmp_path / "em.zarr", tmp_path / "b.png")
    mse = np.mean(((off.astype(float) - em) / 255) ** 2)
    assert q["psnr"] == pytest.approx(10 * np.log10(1 / mse), rel=1e-4)
    assert q["ssim"] < 1.0
    w, h = Image.open(tmp_path / "b.png").size
    assert w > 3 * h / 2  # one row of three tiles


def test_compare_shape_mismatch(tmp_path: Path) -> None:
    a = _store(tmp_path / "a.zarr", np.random.default_rng(1).integers(0, 256, (4, 32, 32), dtype=np.uint8))
    b = _store(tmp_path / "b.zarr", np.zeros((4, 32, 16), np.uint8))
    with pytest.raises(ValueError, match="differ in shape"):
        compare_translation(a, a, b, tmp_path / "x.png")


def test_compare_reads_the_virtual_em_of_a_multichannel_translation(tmp_path: Path) -> None:
    """exem-translate's two-channel output (virtual EM + antibody, uint16 store): the virtual EM channel, 0…255."""
    import torch

    from exem.data.ome import write_ome_zarr
    from exem.inference.translate import translate_volume
    from exem.models import AnisotropicUNet3D

    rng = np.random.default_rng(2)
    sample = rng.integers(0, 4000, (2, 6, 32, 32)).astype(np.uint16)  # pan-protein, antibody
    path = write_ome_zarr(
        tmp_path / "s.ome.zarr", sample, (40.0, 10.0, 10.0), channel_names=["nhs", "antibody"]
    )
    torch.manual_seed(0)
    net = AnisotropicUNet3D(widths=(2, 4)).eval()
    opts = {"patch": (4, 16, 16), "intensity_range": (0, 4000), "progress": False}
    multi = translate_volume(net, path, tmp_path / "multi.ome.zarr", channel="nhs", **opts).output
    alone = translate_volume(
        net, path, tmp_path / "alone.ome.zarr", channel="nhs", other_channels=False, **opts
    ).output
    em = _store(tmp_path / "em.zarr", rng.integers(0, 256, (6, 32, 32), dtype=np.uint8))
    exm = _store(tmp_path / "exm.zarr", sample[0])
    q_multi = compare_translation(exm, multi, em, tmp_path / "m.png")
    assert q_multi == compare_translation(exm, alone, em, tmp_path / "a.png")


def test_compare_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from exem.analysis.compare import main

    a = _store(tmp_path / "a.zarr", np.random.default_rng(3).integers(0, 256, (4, 32, 32), dtype=np.uint8))
    with pytest.raises(SystemExit) as stop:
        main(
            [
                "--exm",
                str(a),
                "--virtual-em",
                str(tmp_path / "missing.zarr"),
                "--em",
                str(a),
                "--out",
                "x.png",
            ]
        )
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.count("\n") == 1 and "missing.zarr" in err and "Traceback" not in err
