"""Gaussian window and blending accumulator."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from exem.data.grid import PatchGrid
from exem.inference.blend import (
    BlendAccumulator,
    WindowCache,
    WindowSums,
    ZStreamBlender,
    gaussian_window,
    halo_gap,
)


@pytest.mark.parametrize("sigma", [0.5, 0.3, 0.2])
def test_window_centre_and_corner(sigma: float) -> None:
    w = gaussian_window((5, 7, 9), sigma=sigma)
    assert w.shape == (5, 7, 9)
    assert w.dtype == torch.float32
    assert w[2, 3, 4].item() == 1.0
    corner = max(math.exp(-3 / (2 * sigma**2)), 1e-4)
    for idx in [(0, 0, 0), (4, 6, 8), (0, 6, 0), (4, 0, 8)]:
        assert w[idx].item() == pytest.approx(corner, rel=1e-6)
    assert float(w.min()) >= float(np.float32(1e-4))
    # symmetric, and decreasing away from the centre along each axis
    assert torch.equal(w, w.flip(0)) and torch.equal(w, w.flip(1)) and torch.equal(w, w.flip(2))
    assert bool((w[2, 3, 4:].diff() <= 0).all())


def test_window_formula_matches_numpy() -> None:
    patch, sigma = (4, 6, 10), 0.5
    z, y, x = (np.linspace(-1, 1, n) for n in patch)
    ref = np.exp(-(z[:, None, None] ** 2 + y[None, :, None] ** 2 + x[None, None, :] ** 2) / (2 * sigma**2))
    np.testing.assert_allclose(gaussian_window(patch, sigma).numpy(), np.maximum(ref, 1e-4), rtol=1e-6)


@pytest.mark.parametrize("patch", [(16, 256, 256), (5, 7, 9), (1, 64, 64), (12, 131, 96), (2, 2, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mirrored_window_equals_the_direct_formula(patch, dtype) -> None:
    """The window is computed on half of each mirror-symmetric axis and mirrored: bit for bit the direct formula."""
    sigma, floor = 0.5, 1e-4
    axes = [
        torch.linspace(-1.0, 1.0, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
        for n in patch
    ]
    r2 = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
    direct = torch.exp(-r2 / (2.0 * sigma**2)).clamp_min_(floor).to(dtype)
    assert torch.equal(gaussian_window(patch, sigma, floor, dtype=dtype), direct)


def test_window_single_slice_patch() -> None:
    w = gaussian_window((1, 5, 5), sigma=0.5, dtype=torch.float64)
    assert w.shape == (1, 5, 5) and w.dtype == torch.float64
    assert w[0, 2, 2].item() == 1.0
    assert w[0, 0, 0].item() == pytest.approx(math.exp(-2 / (2 * 0.25)))


def test_window_floor_and_errors() -> None:
    w = gaussian_window((3, 3, 3), sigma=0.1, floor=1e-3)
    assert w[0, 0, 0].item() == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_window((3, 3, 3), sigma=0)
    with pytest.raises(ValueError, match="patch"):
        gaussian_window((3, 0, 3))


@pytest.mark.parametrize(("sigma", "floor", "match"), [(0.0, 1e-4, "sigma"), (0.5, 0.0, "floor")])
def test_window_cache_checks_its_parameters_when_built(sigma: float, floor: float, match: str) -> None:
    """Bad blending parameters fail when the engine is set up, not at the first patch of a run."""
    grid = PatchGrid((8, 32, 32), (4, 16, 16), (2, 8, 8))
    with pytest.raises(ValueError, match=match):
        WindowCache(grid, sigma, floor)


@pytest.mark.parametrize(
    ("shape", "patch", "overlap", "box"),
    [
        ((10, 40, 33), (4, 16, 16), (2, 8, 8), None),
        ((7, 19, 23), (3, 8, 5), (1, 3, 2), None),
        ((1, 30, 30), (1, 16, 16), (0, 6, 6), None),
        ((12, 50, 40), (5, 16, 16), (3, 10, 2), ((2, 10, 7), (6, 25, 20))),  # a box inside the volume
    ],
)
def test_constant_through_identity_is_constant(shape, patch, overlap, box) -> None:
    """Blending constant predictions gives the constant, for any grid and any box."""
    grid = PatchGrid(shape, patch, overlap)
    start, bshape = box if box is not None else ((0, 0, 0), shape)
    acc = BlendAccumulator(start, bshape, gaussian_window(patch, 0.5))
    value = 0.3712
    for s in grid:
        acc.add(torch.full((1, *patch), value), s)
    out = acc.result()
    assert out.shape == (1, *bshape)
    assert float((out - value).abs().max()) < 1e-6


def test_accumulator_ignores_patches_outside_and_detects_gaps() -> None:
    acc = BlendAccumulator((0, 0, 0), (2, 4, 4), gaussian_window((2, 4, 4)))
    acc.add(torch.ones(1, 2, 4, 4), (0, 10, 10))  # misses the box
    with pytest.raises(RuntimeError, match="no patch"):
        acc.result()
    acc.add(torch.ones(2, 2, 4, 4), (0, 2, 2))  # covers part of the box only
    with pytest.raises(RuntimeError, match="covered by no patch"):
        acc.result()


@pytest.mark.parametrize(
    ("shape", "patch", "overlap", "box"),
    [
        ((10, 40, 33), (4, 16, 16), (2, 8, 8), None),
        ((13, 20, 20), (5, 8, 8), (4, 2, 2), None),  # stride 1 in Z: every slice has its own row
        ((12, 50, 40), (5, 16, 16), (3, 10, 2), ((2, 10, 7), (6, 25, 20))),  # rows straddle the box's Z ends
        ((1, 30, 30), (1, 16, 16), (0, 6, 6), None),
    ],
)
@pytest.mark.parametrize("window_sums", [False, True])
def test_zstream_equals_full_accumulator(shape, patch, overlap, box, window_sums: bool) -> None:
    """Streaming along Z gives bit-identical values to the whole-box accumulator, in ordered, covering slabs,
    with the weights summed patch by patch or divided by the box's WindowSums."""
    grid = PatchGrid(shape, patch, overlap)
    start, bshape = box if box is not None else ((0, 0, 0), shape)
    window = gaussian_window(patch, 0.5)
    full = BlendAccumulator(start, bshape, window)
    sums = None
    if window_sums:
        sums = WindowSums(WindowCache(grid), start, bshape, _starts_over(grid, start, bshape), "cpu")
    stream = ZStreamBlender(start, bshape, window, window_sums=sums)
    gen = torch.Generator().manual_seed(0)
    slabs = []
    for s in grid:
        pred = torch.rand((2, *patch), generator=gen)
        full.add(pred, s)
        slabs += stream.add(pred, s)
    slabs += stream.finish()
    z = 0
    for z0, values in slabs:
        assert z0 == z and values.shape[0] == 2 and tuple(values.shape[2:]) == bshape[1:]
        z += values.shape[1]
    assert z == bshape[0]
    assert torch.equal(torch.cat([v for _, v in slabs], dim=1), full.result())
    # memory: the stream never holds more than one patch depth of Z slices (and no weights with window sums)
    assert stream._sums is not None and stream._sums.shape[1] <= patch[0]
    assert (stream._weight is None) == window_sums


def _starts_over(grid: PatchGrid, start, shape) -> list[list[int]]:
    """Per axis, the grid starts of the patches over the box (as Block.patch_starts)."""
    return [
        [s for s in grid.starts[ax] if s < start[ax] + shape[ax] and s + grid.patch[ax] > start[ax]]
        for ax in range(3)
    ]


@pytest.mark.parametrize(
    ("shape", "patch", "overlap", "halo", "box", "sigma"),
    [
        ((32, 1024, 1024), (16, 256, 256), (4, 64, 64), (0, 0, 0), None, 0.5),  # the CPU ceiling benchmark's
        ((10, 40, 33), (4, 16, 16), (2, 8, 8), (0, 0, 0), None, 0.5),
        ((13, 20, 20), (5, 8, 8), (4, 2, 2), (0, 0, 0), None, 0.1),  # stride 1 in Z; the floor is reached
        ((12, 50, 40), (5, 16, 16), (3, 10, 2), (0, 0, 0), ((2, 10, 7), (6, 25, 20)), 0.5),
        ((1, 30, 30), (1, 16, 16), (0, 6, 6), (0, 0, 0), None, 0.5),
        ((13, 37, 41), (8, 16, 16), (2, 4, 6), (1, 1, 1), None, 0.5),
        ((13, 37, 41), (8, 16, 16), (4, 4, 6), (2, 2, 3), ((3, 5, 6), (7, 20, 30)), 0.3),
    ],
)
def test_window_sums_divide_as_the_patch_by_patch_weights(shape, patch, overlap, halo, box, sigma) -> None:
    """Dividing by WindowSums gives the bits of dividing by the weights summed patch by patch (with halos, boxes
    inside the region, and a floor-clamped window), from far fewer sums than voxels."""
    grid = PatchGrid(shape, patch, overlap)
    windows = WindowCache(grid, sigma=sigma, halo=halo)
    start, bshape = box if box is not None else ((0, 0, 0), shape)
    acc = BlendAccumulator(start, bshape, windows.get("cpu"))
    starts = _starts_over(grid, start, bshape)
    for s in itertools.product(*starts):
        acc.add(torch.zeros(1, *patch), s, windows.get("cpu", s))
    sums = WindowSums(windows, start, bshape, starts, "cpu")
    values = torch.rand((2, *bshape), generator=torch.Generator().manual_seed(1)) * 5.0
    expected = values / acc.weight
    got = values.clone()
    assert sums.divide_(got) is got
    assert torch.equal(got, expected)
    # in Z parts, as ZStreamBlender releases them
    parts = values.clone()
    cuts = [0, *sorted({1, bshape[0] // 2}), bshape[0]]
    for z0, z1 in itertools.pairwise(cuts):
        if z1 > z0:
            sums.divide_(parts[:, z0:z1], z0)
    assert torch.equal(parts, expected)
    if bshape[1] >= 256:
        assert sums.sums.numel() * 8 < math.prod(bshape)


def test_window_sums_reject_a_voxel_no_patch_weighs() -> None:
    grid = PatchGrid((8, 40, 40), (8, 16, 16), (0, 4, 4))
    with pytest.raises(RuntimeError, match="covered by no patch"):
        WindowSums(WindowCache(grid), (0, 0, 0), (8, 40, 40), [[0], [0, 24], [0, 12, 24]], "cpu")
    stream_box = ((0, 0, 0), (8, 40, 40))
    sums = WindowSums(WindowCache(grid), *stream_box, grid.starts, "cpu")
    with pytest.raises(ValueError, match="window sums of box"):
        ZStreamBlender((0, 0, 0), (8, 40, 32), gaussian_window((8, 16, 16)), window_sums=sums)


def test_zstream_rejects_unordered_rows_and_gaps() -> None:
    window = gaussian_window((2, 4, 4))
    stream = ZStreamBlender((0, 0, 0), (6, 4, 4), window)
    with pytest.raises(RuntimeError, match="no patch"):
        stream.add(torch.ones(1, 2, 4, 4), (2, 0, 0))  # slices 0:2 would never be covered
    stream = ZStreamBlender((0, 0, 0), (6, 4, 4), window)
    stream.add(torch.ones(1, 2, 4, 4), (0, 0, 0))
    stream.add(torch.ones(1, 2, 4, 4), (2, 0, 0))
    with pytest.raises(ValueError, match="increasing Z"):
        stream.add(torch.ones(1, 2, 4, 4), (0, 0, 0))
    with pytest.raises(RuntimeError, match="no patch"):
        stream.finish()  # slices 4:6 were never covered


# ----------------------------------------------------------------------------------------------------------
# halo: patches' wrong borders get no weight (bioimage.io output axes' halo)


def _blend_with(windows, grid, net, volume):

    acc = BlendAccumulator((0, 0, 0), grid.shape, windows.get("cpu"))
    pz, py, px = grid.patch
    for start in itertools.product(*grid.starts):
        z, y, x = start
        with torch.no_grad():
            out = net(volume[None, None, z : z + pz, y : y + py, x : x + px])[0]
        acc.add(out, start, windows.get("cpu", start))
    return acc.result()


@pytest.mark.parametrize(("kernel", "overlap"), [(3, (2, 4, 6)), (5, (4, 4, 6))])
def test_halo_blend_equals_the_whole_volume_prediction(kernel: int, overlap: tuple[int, int, int]) -> None:
    """A zero-padded convolution (halo = kernel // 2) blended over patches with the halo excluded equals the
    convolution of the whole volume; the plain Gaussian window does not."""

    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, kernel, padding=kernel // 2)
    volume = torch.rand(13, 37, 41)
    grid = PatchGrid(volume.shape, (8, 16, 16), overlap)
    h = kernel // 2
    with torch.no_grad():
        whole = net(volume[None, None])[0]
    halo = _blend_with(WindowCache(grid, halo=(h, h, h)), grid, net, volume)
    plain = _blend_with(WindowCache(grid), grid, net, volume)
    assert (halo - whole).abs().max() < 1e-5
    assert (plain - whole).abs().max() > 1e-3


def test_halo_needs_overlap_of_twice_the_halo() -> None:

    grid = PatchGrid((8, 40, 40), (8, 16, 16), (0, 2, 4))
    WindowCache(grid, halo=(0, 1, 2))  # overlap = 2 × halo: fine
    with pytest.raises(ValueError, match="overlap ≥ 2 × halo"):
        WindowCache(grid, halo=(0, 2, 2))
    assert halo_gap([0, 14, 24], 16, 40, 1) is None
    assert halo_gap([0, 16, 24], 16, 40, 1) == 15  # the last voxel of patch 0 and the first of patch 1


def test_halo_windows_are_the_float64_window_with_zeroed_sides() -> None:
    """Each border case's window: the bump computed in float64, its halo sides zeroed (kept on the region's border),
    then cast to float32, bit for bit (the cache builds it in float32 directly)."""
    grid = PatchGrid((8, 40, 40), (8, 16, 16), (0, 4, 6))
    windows = WindowCache(grid, halo=(0, 2, 3))
    for start in [(0, 0, 0), (0, 12, 10), (0, 24, 24), (0, 0, 24)]:
        ref = gaussian_window(grid.patch, dtype=torch.float64)
        for ax, (t, h) in enumerate(zip(start, (0, 2, 3), strict=True)):
            p, n = grid.patch[ax], grid.shape[ax]
            if h and t > 0:
                ref.narrow(ax, 0, h).zero_()
            if h and t + p < n:
                ref.narrow(ax, p - h, h).zero_()
        assert torch.equal(windows.get("cpu", start), ref.to(torch.float32)), start
    assert torch.equal(windows.plain("cpu"), gaussian_window(grid.patch))
