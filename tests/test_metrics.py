"""Metrics of exem.analysis.metrics against hand-computed values on small arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from exem.analysis.metrics import (
    adapted_rand_error,
    dice,
    distribution_distance,
    iou,
    ssim,
    ssim3d,
    variation_of_information,
)

# ---------------------------------------------------------------------------------------------- dice / iou


def _half_overlapping_cubes() -> tuple[np.ndarray, np.ndarray]:
    """Two 4³ cubes in an 8³ volume, shifted by 2 voxels in X: 64 voxels each, 32 shared."""
    a = np.zeros((8, 8, 8), dtype=bool)
    b = np.zeros((8, 8, 8), dtype=bool)
    a[0:4, 0:4, 0:4] = True
    b[0:4, 0:4, 2:6] = True
    return a, b


def test_dice_iou_half_overlapping_cubes():
    a, b = _half_overlapping_cubes()
    assert dice(a, b) == pytest.approx(2 * 32 / (64 + 64))  # 0.5
    assert iou(a, b) == pytest.approx(32 / 96)  # 1/3
    assert dice(a, a) == 1.0 and iou(a, a) == 1.0


def test_dice_iou_accept_torch_and_01_ints():
    a, b = _half_overlapping_cubes()
    assert dice(torch.from_numpy(a), torch.from_numpy(b.astype(np.uint8))) == pytest.approx(0.5)
    assert iou(a.astype(np.int32), torch.from_numpy(b)) == pytest.approx(1 / 3)


def test_dice_iou_empty_masks():
    empty = np.zeros((2, 3, 4), dtype=bool)
    full = np.ones((2, 3, 4), dtype=bool)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0  # documented convention
    assert dice(empty, full) == 0.0 and iou(full, empty) == 0.0


def test_dice_shape_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match="shapes differ"):
        dice(np.zeros((2, 2)), np.zeros((2, 3)))


# ----------------------------------------------------------------------------------------- VOI / ARE


def test_voi_identical_labelings_up_to_renaming():
    gt = np.array([[[0, 1, 1, 2, 2, 3]]])
    assert variation_of_information(gt, gt) == (0.0, 0.0)
    renamed = np.array([[[7, 4, 4, 9, 9, 1]]])
    split, merge = variation_of_information(renamed, gt)
    assert split == pytest.approx(0.0, abs=1e-12) and merge == pytest.approx(0.0, abs=1e-12)


def test_voi_pure_split_and_pure_merge():
    gt = np.ones((1, 1, 4), dtype=np.uint32)
    halves = np.array([[[1, 1, 2, 2]]], dtype=np.uint32)
    # splitting one object into two equal halves costs H(pred | gt) = 1 bit and no merge
    assert variation_of_information(halves, gt) == pytest.approx((1.0, 0.0))
    # merging two equal halves is the mirror image
    assert variation_of_information(gt, halves) == pytest.approx((0.0, 1.0))


def test_voi_rejects_float_labels():
    with pytest.raises(ValueError, match="integer"):
        variation_of_information(np.zeros((2, 2)), np.zeros((2, 2), dtype=int))


def test_adapted_rand_error_identical_and_split():
    gt = np.array([[[1, 1, 2, 2, 0, 3]]])
    assert adapted_rand_error(gt, gt) == 0.0
    assert adapted_rand_error(gt * 5 + 1, gt) == pytest.approx(0.0, abs=1e-12)  # renamed
    # one 4-voxel object split in two halves: ordered same-object voxel pairs are 12 in gt, 4 in pred,
    # all 4 correct → precision 1, recall 1/3, F = 0.5, ARE = 0.5
    one = np.ones((1, 1, 4), dtype=np.int64)
    halves = np.array([[[1, 1, 2, 2]]])
    assert adapted_rand_error(halves, one) == pytest.approx(0.5)


def test_adapted_rand_error_needs_labelled_ground_truth():
    with pytest.raises(ValueError, match="no labelled"):
        adapted_rand_error(np.ones((2, 2), dtype=int), np.zeros((2, 2), dtype=int))


# --------------------------------------------------------------------------------------------- ssim3d


def test_ssim3d_identical_is_one_and_decreases_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 6, 32, 32, generator=g)
    assert ssim3d(x, x).item() == pytest.approx(1.0, abs=1e-5)
    noise = torch.randn(x.shape, generator=g)
    values = [ssim3d((x + s * noise).clamp(0, 1), x).item() for s in (0.02, 0.1, 0.3)]
    assert 1.0 > values[0] > values[1] > values[2]


def test_ssim3d_is_3d_unlike_the_slicewise_ssim():
    # one corrupted slice: slice-wise SSIM is exactly 1 on the 8 other slices, while a 3D window carries the
    # corruption into its Z neighbours, so the 3D score is clearly lower
    g = torch.Generator().manual_seed(1)
    smooth = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 9, 32, 32, generator=g), 3, 1, 1)
    corrupted = smooth.clone()
    corrupted[:, :, 4] = torch.rand(32, 32, generator=g)
    assert ssim3d(corrupted, smooth).item() < ssim(corrupted, smooth).item() - 0.1
    # a thin volume (Z smaller than the window) and Z = 1 both work
    assert ssim3d(smooth[:, :, :2], smooth[:, :, :2]).item() == pytest.approx(1.0, abs=1e-5)
    assert ssim3d(smooth[:, :, :1], smooth[:, :, :1]).item() == pytest.approx(1.0, abs=1e-5)
    assert ssim3d(corrupted[:, :, 4:5], smooth[:, :, 4:5]).item() < 0.5


def test_ssim3d_shape_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match="shapes differ"):
        ssim3d(torch.zeros(1, 1, 2, 8, 8), torch.zeros(1, 1, 3, 8, 8))


# ------------------------------------------------------------------------------ distribution distance


def _textured(shape=(6, 48, 48), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.2, 0.6, shape)


def test_distribution_distance_identical_is_zero():
    x = _textured()
    assert distribution_distance(x, x) == {"intensity_w1": 0.0, "gradient_w1": 0.0}


def test_distribution_distance_grows_with_a_shift_and_ignores_it_in_gradients():
    x = _textured()
    d1 = distribution_distance(x, x + 0.05)
    d2 = distribution_distance(x, x + 0.2)
    # a constant shift s moves the intensity histogram by s (up to one bin, 1/256)
    assert d1["intensity_w1"] == pytest.approx(0.05, abs=1 / 256)
    assert d2["intensity_w1"] == pytest.approx(0.2, abs=1 / 256)
    assert d1["gradient_w1"] == pytest.approx(0.0, abs=1e-12) and d2["gradient_w1"] == pytest.approx(
        0, abs=1e-12
    )


def test_distribution_distance_sees_texture_and_takes_other_shapes():
    x = _textured()
    flat = np.full((3, 20, 30), float(x.mean()))  # same mean, no texture, other shape
    d = distribution_distance(x, flat)
    assert d["gradient_w1"] > 0.05
    assert 0 < d["intensity_w1"] < 0.2


def test_distribution_distance_subsamples_deterministically():
    x, y = _textured((16, 64, 64), 0), _textured((16, 64, 64), 1) ** 2
    full = distribution_distance(x, y)
    sub1 = distribution_distance(x, y, max_voxels=5000)
    sub2 = distribution_distance(torch.from_numpy(x), torch.from_numpy(y), max_voxels=5000)
    assert sub1 == sub2
    assert sub1["intensity_w1"] == pytest.approx(full["intensity_w1"], rel=0.1)
    assert sub1["gradient_w1"] == pytest.approx(full["gradient_w1"], rel=0.1)
    assert math.isfinite(full["gradient_w1"]) and full["gradient_w1"] > 0


def test_distribution_distance_rejects_non_3d():
    with pytest.raises(ValueError, match=r"\(Z, Y, X\)"):
        distribution_distance(np.zeros((4, 4)), np.zeros((4, 4, 4)))


def test_image_metrics_are_float32_under_a_bf16_autocast():
    """Validation on a GPU runs under bf16-mixed autocast: SSIM's convolutions must not run in bfloat16 there
    (shown with the CPU's bf16 autocast, which also casts convolutions)."""
    from exem.analysis.metrics import image_quality, psnr, ssim

    torch.manual_seed(0)
    a = torch.rand(2, 1, 4, 64, 64)
    b = (a + 0.3 * torch.randn_like(a)).clamp(0, 1)
    plain = {"ssim": ssim(a, b), "ssim3d": ssim3d(a, b), "psnr": psnr(a, b), **image_quality(a, b)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = {"ssim": ssim(a, b), "ssim3d": ssim3d(a, b), "psnr": psnr(a, b), **image_quality(a, b)}
        assert torch.is_autocast_enabled("cpu")  # given back as it was
    assert all(torch.equal(plain[k], mixed[k]) and mixed[k].dtype == torch.float32 for k in plain), (
        plain,
        mixed,
    )
