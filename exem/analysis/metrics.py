"""Metrics of image quality, image statistics and segmentation.

- image quality (:func:`psnr`, :func:`ssim`, :func:`ssim3d`, :func:`image_quality`): float tensors
  ``(B, 1, Z, Y, X)`` with intensities in [0, 1] (``data_range`` = 1);
- distribution distance between two volumes that needs no paired ground truth and no download
  (:func:`distribution_distance`): ``(Z, Y, X)`` float arrays in [0, 1];
- binary masks (:func:`dice`, :func:`iou`): bool or 0/1 numpy arrays or torch tensors of equal shape;
- instance labelings (:func:`variation_of_information`, :func:`adapted_rand_error`): integer arrays of equal
  shape, computed with scikit-image.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
from numpy.typing import ArrayLike
from scipy.stats import wasserstein_distance
from skimage.metrics import adapted_rand_error as _skimage_are
from skimage.metrics import variation_of_information as _skimage_voi
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

DISTRIBUTION_BINS = 256
"""Default number of histogram bins of :func:`distribution_distance`."""
DISTRIBUTION_MAX_VOXELS = 1 << 22
"""At most this many voxels (about 4 M) of each volume enter :func:`distribution_distance`."""
# torchmetrics builds a Gaussian window of 2 * int(3.5 * sigma + 0.5) + 1 taps: a sigma of (k - 1) / 7 makes
# it exactly k taps; a 1-tap axis needs a sigma below 1 / 7 (any positive value that small gives one tap).
_TAPS_PER_SIGMA = 7.0
_ONE_TAP_SIGMA = 0.1


_Metric = TypeVar("_Metric", bound=Callable[..., Tensor])


def _full_precision(metric: _Metric) -> _Metric:
    """Run ``metric`` with autocast off: under a ``bf16-mixed`` trainer (validation on a GPU) autocast would run
    SSIM's convolutions in bfloat16, whose variances (E[x²] − μ²) then lose digits; metrics are float32."""

    @functools.wraps(metric)
    def wrapped(pred: Tensor, *args: object, **kwargs: object) -> Tensor:
        with torch.autocast(device_type=pred.device.type, enabled=False):
            return metric(pred, *args, **kwargs)

    return wrapped  # type: ignore[return-value]


@_full_precision
def psnr(pred: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB over the whole batch, ``pred``/``target`` of equal shape."""
    return peak_signal_noise_ratio(pred.float(), target.float(), data_range=data_range)


@_full_precision
def ssim(pred: Tensor, target: Tensor, data_range: float = 1.0, kernel_size: int = 7) -> Tensor:
    """Structural similarity of ``(B, 1, Z, Y, X)`` volumes, averaged over in-plane (Y, X) slices.

    ExM and EM volumes are strongly anisotropic (Z is coarse, and a 2D patch has Z = 1), so SSIM is computed
    slice-wise in-plane with a Gaussian window of ``kernel_size`` pixels rather than with a 3D window.
    """
    if pred.shape != target.shape:
        raise ValueError(f"ssim: shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    b, c, z, y, x = pred.shape
    k = min(kernel_size, y, x)
    k = k if k % 2 == 1 else k - 1
    p = pred.float().permute(0, 2, 1, 3, 4).reshape(b * z, c, y, x)
    t = target.float().permute(0, 2, 1, 3, 4).reshape(b * z, c, y, x)
    return structural_similarity_index_measure(p, t, data_range=data_range, kernel_size=k)


@torch.no_grad()
def image_quality(pred: Tensor, target: Tensor) -> dict[str, Tensor]:
    """``{"psnr": dB, "ssim": [-1, 1]}`` of ``pred`` against ``target`` (both ``(B, 1, Z, Y, X)`` in [0, 1])."""
    return {"psnr": psnr(pred, target), "ssim": ssim(pred, target)}


def _odd_at_most(k: int, *limits: int) -> int:
    k = min(int(k), *(int(v) for v in limits))
    return max(1, k if k % 2 == 1 else k - 1)


@_full_precision
def ssim3d(pred: Tensor, target: Tensor, data_range: float = 1.0, kernel_size: int = 7) -> Tensor:
    """Structural similarity of ``(B, 1, Z, Y, X)`` volumes with a true 3D Gaussian window (batch mean).

    The window has ``kernel_size`` voxels along each axis (clamped to the volume's extent and made odd, so a
    thin volume gets a shorter Z window; Z = 1 reduces to 2D SSIM) and a Gaussian of sigma
    ``(taps - 1) / 7`` voxels per axis. Borders are reflection padded (torchmetrics' 5D SSIM).

    Args:
        pred, target: float tensors ``(B, 1, Z, Y, X)`` of equal shape, intensities in ``[0, data_range]``.
        data_range: intensity range of the inputs.
        kernel_size: window size in voxels (odd; even values are rounded down).

    Returns:
        scalar tensor in [-1, 1]; 1 for identical inputs.
    """
    if pred.shape != target.shape:
        raise ValueError(f"ssim3d: shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.dim() != 5:
        raise ValueError(f"ssim3d expects (B, 1, Z, Y, X) tensors, got shape {tuple(pred.shape)}")
    if int(kernel_size) < 1:
        raise ValueError(f"ssim3d: kernel_size must be a positive int, got {kernel_size}")
    taps = [_odd_at_most(kernel_size, n) for n in pred.shape[-3:]]
    sigma = [(k - 1) / _TAPS_PER_SIGMA if k > 1 else _ONE_TAP_SIGMA for k in taps]
    return structural_similarity_index_measure(
        pred.float(),
        target.float(),
        gaussian_kernel=True,
        sigma=sigma,
        kernel_size=taps,
        data_range=data_range,
    )


# -------------------------------------------------------------------------------------------------------
# distribution distance (unpaired)
# -------------------------------------------------------------------------------------------------------


def _check_volume(name: str, a: ArrayLike) -> np.ndarray:
    arr = a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)
    if arr.ndim != 3 or arr.size == 0:
        raise ValueError(
            f"distribution_distance: {name} must be a non-empty (Z, Y, X) array, got {arr.shape}"
        )
    return arr


def _subsample_values(arr: np.ndarray, max_voxels: int) -> np.ndarray:
    """At most ``max_voxels`` values of ``arr``: every ``step``-th voxel of the flattened volume."""
    flat = arr.reshape(-1)
    step = max(1, math.ceil(flat.size / max_voxels))
    return flat[::step].astype(np.float64)


def _gradient_magnitudes(arr: np.ndarray, max_voxels: int) -> np.ndarray:
    """In-plane gradient magnitudes (central differences, intensity per voxel) of evenly spaced slices.

    Whole slices are used (gradients need neighbours); a slice larger than ``max_voxels`` is cropped to a
    central square of about ``max_voxels`` voxels.
    """
    z, y, x = arr.shape
    side = math.isqrt(max_voxels)
    if y * x > max_voxels:
        y0, x0 = max(0, (y - side) // 2), max(0, (x - side) // 2)
        arr = arr[:, y0 : y0 + side, x0 : x0 + side]
        y, x = arr.shape[1:]
    n_slices = max(1, min(z, max_voxels // (y * x)))
    picks = np.unique(np.linspace(0, z - 1, n_slices).round().astype(int))
    planes = arr[picks].astype(np.float64)
    gy = np.gradient(planes, axis=1) if y > 1 else np.zeros_like(planes)
    gx = np.gradient(planes, axis=2) if x > 1 else np.zeros_like(planes)
    return np.hypot(gy, gx).reshape(-1)


def _histogram_w1(u: np.ndarray, v: np.ndarray, bins: int, hi: float) -> float:
    """1D Wasserstein distance between the ``bins``-bin histograms of ``u`` and ``v`` on ``[0, hi]``."""
    edges = np.linspace(0.0, hi, bins + 1)
    hu, _ = np.histogram(np.clip(u, 0.0, hi), bins=edges)
    hv, _ = np.histogram(np.clip(v, 0.0, hi), bins=edges)
    centers = (edges[:-1] + edges[1:]) / 2
    return float(wasserstein_distance(centers, centers, u_weights=hu, v_weights=hv))


def distribution_distance(
    a: ArrayLike, b: ArrayLike, bins: int = DISTRIBUTION_BINS, max_voxels: int = DISTRIBUTION_MAX_VOXELS
) -> dict[str, float]:
    """How far the grey-level statistics of two volumes are apart, without pairing or a learned model.

    Both volumes are ``(Z, Y, X)`` float arrays with intensities in [0, 1] (values outside are clipped); they
    may differ in shape (e.g. virtual EM and a real EM volume). Two 1D Wasserstein (earth mover's)
    distances between ``bins``-bin histograms, in intensity units:

    - ``"intensity_w1"``: of the voxel intensities (histograms on [0, 1]);
    - ``"gradient_w1"``: of the in-plane gradient magnitudes ``sqrt(dI/dy² + dI/dx²)`` (central differences,
      intensity per voxel; histograms on [0, sqrt 2], the largest possible value), a texture/sharpness
      statistic.

    Identical volumes give 0 for both; a constant shift ``s`` of the intensities gives ``intensity_w1 ≈ s``.
    Big volumes are subsampled deterministically to at most ``max_voxels`` voxels each: a regular stride
    over the flattened volume for intensities, evenly spaced whole slices for gradients.

    Args:
        a, b: ``(Z, Y, X)`` arrays (numpy or torch) in [0, 1].
        bins: number of histogram bins.
        max_voxels: cap on the voxels used per volume and statistic.

    Returns:
        ``{"intensity_w1": float, "gradient_w1": float}``.
    """
    if int(bins) < 1 or int(max_voxels) < 1:
        raise ValueError(f"distribution_distance: bins and max_voxels must be >= 1, got {bins}, {max_voxels}")
    va, vb = _check_volume("a", a), _check_volume("b", b)
    return {
        "intensity_w1": _histogram_w1(
            _subsample_values(va, max_voxels), _subsample_values(vb, max_voxels), int(bins), 1.0
        ),
        "gradient_w1": _histogram_w1(
            _gradient_magnitudes(va, max_voxels),
            _gradient_magnitudes(vb, max_voxels),
            int(bins),
            math.sqrt(2),
        ),
    }


# -------------------------------------------------------------------------------------------------------
# segmentation: binary masks and instance labelings
# -------------------------------------------------------------------------------------------------------


def _as_numpy(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def _masks(pred: ArrayLike, target: ArrayLike, name: str) -> tuple[np.ndarray, np.ndarray]:
    p, t = _as_numpy(pred), _as_numpy(target)
    if p.shape != t.shape:
        raise ValueError(f"{name}: shapes differ: {p.shape} vs {t.shape}")
    return p.astype(bool), t.astype(bool)


def dice(pred: ArrayLike, target: ArrayLike) -> float:
    """Dice coefficient ``2 |P ∩ T| / (|P| + |T|)`` of two binary masks of equal shape, in [0, 1].

    Inputs are bool or 0/1 numpy arrays or torch tensors (any non-zero value counts as foreground). Two empty
    masks agree perfectly: 1.0.
    """
    p, t = _masks(pred, target, "dice")
    total = int(p.sum()) + int(t.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(p, t).sum()) / total


def iou(pred: ArrayLike, target: ArrayLike) -> float:
    """Intersection over union (Jaccard index) ``|P ∩ T| / |P ∪ T|`` of two binary masks, in [0, 1].

    Same inputs as :func:`dice`; two empty masks give 1.0.
    """
    p, t = _masks(pred, target, "iou")
    union = int(np.logical_or(p, t).sum())
    return 1.0 if union == 0 else int(np.logical_and(p, t).sum()) / union


def _labelings(pred: ArrayLike, gt: ArrayLike, name: str) -> tuple[np.ndarray, np.ndarray]:
    p, g = _as_numpy(pred), _as_numpy(gt)
    if p.shape != g.shape:
        raise ValueError(f"{name}: shapes differ: {p.shape} vs {g.shape}")
    if not (np.issubdtype(p.dtype, np.integer) or p.dtype == bool) or not (
        np.issubdtype(g.dtype, np.integer) or g.dtype == bool
    ):
        raise ValueError(f"{name}: labelings must be integer arrays, got {p.dtype} and {g.dtype}")
    # skimage's contingency table wants non-negative ints of one kind
    return p.astype(np.int64, copy=False), g.astype(np.int64, copy=False)


def variation_of_information(pred_labels: ArrayLike, gt_labels: ArrayLike) -> tuple[float, float]:
    """Variation of information of an instance labeling against the ground truth, as ``(split, merge)``.

    ``split = H(pred | gt)`` and ``merge = H(gt | pred)``, conditional entropies in bits (log2) over all voxels
    (label 0 = background is a label like any other, nothing is ignored); VOI = split + merge. A pure
    over-segmentation (each predicted segment inside one true one) has merge = 0 and split > 0; a pure
    under-segmentation has split = 0 and merge > 0; identical labelings (up to renaming) give (0, 0).
    This is ``skimage.metrics.variation_of_information(gt, pred)``, whose two entries are documented as
    "false splits, false merges" with ``image0`` the ground truth.

    Args:
        pred_labels, gt_labels: non-negative integer arrays of equal shape.
    """
    p, g = _labelings(pred_labels, gt_labels, "variation_of_information")
    split, merge = _skimage_voi(g, p)
    return float(split), float(merge)


def adapted_rand_error(pred_labels: ArrayLike, gt_labels: ArrayLike) -> float:
    """Adapted Rand error (SNEMI3D) of an instance labeling against the ground truth; 0 = perfect, ≤ 1.

    ``1 - F-score`` of the Rand precision and recall of voxel pairs (``skimage.metrics.adapted_rand_error``
    with its defaults: voxels with ground-truth label 0 are ignored, alpha = 0.5). Identical labelings (up to
    renaming) give 0. The ground truth must contain some non-zero label.

    Args:
        pred_labels, gt_labels: non-negative integer arrays of equal shape.
    """
    p, g = _labelings(pred_labels, gt_labels, "adapted_rand_error")
    if not g.any():
        raise ValueError("adapted_rand_error: the ground truth has no labelled (non-zero) voxel")
    are, _precision, _recall = _skimage_are(g, p)
    return float(are)
