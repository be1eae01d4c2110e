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
