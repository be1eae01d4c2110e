"""Property tests (hypothesis): the patch grid and the Gaussian blending, for any shape, patch and overlap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from exem.data.grid import PatchGrid
from exem.inference.blend import BlendAccumulator, WindowCache, WindowSums, ZStreamBlender, gaussian_window

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def axis(draw, max_size: int = 40) -> tuple[int, int, int]:
    """(size, patch, overlap) of one axis with 1 ≤ patch ≤ size and 0 ≤ overlap < patch."""
    size = draw(st.integers(1, max_size))
    patch = draw(st.integers(1, size))
    overlap = draw(st.integers(0, patch - 1))
    return size, patch, overlap


@st.composite
def grids(draw, max_size: int = 40) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    axes = [draw(axis(max_size)) for _ in range(3)]
    return tuple(a[0] for a in axes), tuple(a[1] for a in axes), tuple(a[2] for a in axes)


# ------------------------------------------------------------------------------------------------ PatchGrid


@FAST
@given(grids(max_size=200))
def test_grid_covers_everything_inside_with_monotone_starts(g) -> None:
    shape, patch, overlap = g
    grid = PatchGrid(shape, patch, overlap)
    for ax in range(3):
        starts = grid.starts[ax]
        s, p, o = shape[ax], patch[ax], overlap[ax]
        assert starts[0] == 0 and starts[-1] == s - p  # first at the start, last ends at the edge
        assert all(b > a for a, b in zip(starts, starts[1:], strict=False))  # strictly increasing
        assert all(a >= 0 and a + p <= s for a in starts)  # inside the volume
        assert all(b - a <= p - o for a, b in zip(starts, starts[1:], strict=False))  # never a gap
        covered = np.zeros(s, bool)
        for a in starts:
            covered[a : a + p] = True
        assert covered.all()  # every voxel of the axis (so of the volume: the grid is a product)
    assert len(grid) == int(np.prod(grid.num_per_axis))


@FAST
@given(grids(max_size=12))
def test_grid_iteration_indexing_and_3d_coverage_agree(g) -> None:
    shape, patch, overlap = g
    grid = PatchGrid(shape, patch, overlap)
    starts = list(grid)
    assert starts == sorted(starts)  # C order
    assert [grid[i] for i in range(len(grid))] == starts
    count = np.zeros(shape, np.int32)
    for start in starts:
        count[grid.slices(start)] += 1
    assert (count >= 1).all()


@FAST
@given(axis(), st.integers(1, 30))
def test_grid_refuses_patch_larger_than_volume_or_overlap_not_below_patch(a, extra: int) -> None:
    size, patch, overlap = a
    with pytest.raises(ValueError, match="larger than the volume"):
        PatchGrid((size, size, size), (patch, size + extra, patch), 0)
    with pytest.raises(ValueError, match="smaller than the patch"):
        PatchGrid((size, size, size), (patch, patch, patch), (0, patch + extra - 1, 0))


# ------------------------------------------------------------------------------------------------- blending

U32 = 2.0**-24  # float32 unit roundoff


def blend_rtol(grid: PatchGrid) -> float:
    """A bound on the float32 relative error of a weighted mean over the n patches that cover a voxel (at most):
    the weighted sum and the weight sum are float32 sums of n positive terms (≤ (n − 1) u each, first order), plus
    the products and the division: (2n + 2) u. With overlap = patch − 1, n reaches hundreds here."""
    n = 1
    for starts, p in zip(grid.starts, grid.patch, strict=True):
        a = np.asarray(starts)
        coords = np.arange(a[-1] + p)[:, None]
        n *= int(((coords >= a) & (coords < a + p)).sum(axis=1).max())
    return (2 * n + 2) * U32


@FAST
@given(
    st.lists(st.integers(1, 9), min_size=3, max_size=3),
    st.floats(0.05, 3.0),
)
def test_gaussian_window_is_positive_bounded_and_symmetric(patch, sigma: float) -> None:
    w = gaussian_window(patch, sigma)
    assert tuple(w.shape) == tuple(patch)
    assert float(w.min()) >= 1e-4 * (1 - 1e-6) and float(w.max()) <= 1.0
    for dim in range(3):
        assert torch.equal(w, w.flip(dim))


@FAST
@given(grids(max_size=24), st.floats(-5.0, 5.0), st.floats(0.1, 2.0))
@example(
    ((19, 15, 17), (17, 9, 9), (16, 8, 8)), 4.5, 0.1
)  # 189 patches per voxel: 1.05e-5 off, within 2.3e-5
def test_blending_a_constant_gives_the_constant(g, value: float, sigma: float) -> None:
    """Constant predictions (an identity network on a constant volume) blend to that constant, everywhere."""
    shape, patch, overlap = g
    grid = PatchGrid(shape, patch, overlap)
    acc = BlendAccumulator((0, 0, 0), shape, gaussian_window(patch, sigma))
    for start in grid:
        acc.add(torch.full((1, *patch), value), start)
    out = acc.result()
    assert tuple(out.shape) == (1, *shape)
    np.testing.assert_allclose(out.numpy(), value, rtol=blend_rtol(grid), atol=1e-6)


@FAST
@given(grids(max_size=20), st.integers(0, 2**31 - 1))
def test_identity_network_reproduces_any_volume(g, seed: int) -> None:
    """Blending the input's own patches (an identity network) gives back the input; streamed along Z the same."""
    shape, patch, overlap = g
    x = torch.from_numpy(np.random.default_rng(seed).random(shape, dtype=np.float32))
    grid = PatchGrid(shape, patch, overlap)
    window = gaussian_window(patch)
    acc = BlendAccumulator((0, 0, 0), shape, window)
    stream = ZStreamBlender((0, 0, 0), shape, window)
    slabs = []
    for start in grid:
        piece = x[grid.slices(start)][None]
        acc.add(piece, start)
        slabs += stream.add(piece, start)
    slabs += stream.finish()
    out = acc.result()[0]
    np.testing.assert_allclose(out.numpy(), x.numpy(), rtol=blend_rtol(grid), atol=1e-6)
    streamed = torch.cat([v for _, v in slabs], dim=1)[0]
    assert torch.equal(streamed, out)  # bit-identical to the whole-box accumulator


@FAST
@given(grids(max_size=24), st.data())
def test_window_sums_equal_the_weights_summed_patch_by_patch(g, data) -> None:
    """For any grid, box and halo the grid allows, dividing by WindowSums gives the bits of dividing by the
    weights the patches add one by one (BlendAccumulator)."""
    shape, patch, overlap = g
    grid = PatchGrid(shape, patch, overlap)
    halo = tuple(
        data.draw(st.integers(0, max(0, o // 2)), label=f"halo {ax}") for ax, o in enumerate(overlap)
    )
    try:
        windows = WindowCache(grid, halo=halo)
    except ValueError:  # a halo this grid cannot honour (tested in test_blend)
        windows = WindowCache(grid)
    start = tuple(data.draw(st.integers(0, n - 1), label=f"box start {ax}") for ax, n in enumerate(shape))
    box = tuple(
        data.draw(st.integers(1, n - a), label=f"box size {ax}")
        for ax, (a, n) in enumerate(zip(start, shape, strict=True))
    )
    starts = [
        [s for s in grid.starts[ax] if s < start[ax] + box[ax] and s + patch[ax] > start[ax]]
        for ax in range(3)
    ]
    acc = BlendAccumulator(start, box, windows.get("cpu"))
    for s in grid:
        acc.add(torch.zeros(1, *patch), s, windows.get("cpu", s))
    values = torch.rand((1, *box), generator=torch.Generator().manual_seed(0))
    expected = values / acc.weight
    assert torch.equal(WindowSums(windows, start, box, starts, "cpu").divide_(values), expected)


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.tuples(st.integers(4, 12), st.integers(8, 40), st.integers(8, 40)),
    st.integers(0, 3),
    st.integers(0, 65535),
)
def test_engine_keeps_a_constant_volume_constant(tmp_path_factory, shape, overlap: int, value: int) -> None:
    """The whole engine (blocks, context, blending, cast) with an identity network: constant in, constant out."""
    from torch import nn

    from exem.data.ome import create_ome_zarr
    from exem.data.volume import open_volume
    from exem.inference.engine import run_blockwise
    from exem.inference.plan import plan_blocks

    patch = (min(4, shape[0]), 8, 8)
    out = tmp_path_factory.mktemp("engine") / "c.zarr"
    create_ome_zarr(out, shape, "float32", (1, 1, 1), chunks=(4, 8, 8))
    volume = open_volume(np.full(shape, value, np.uint16))
    overlap3 = (min(overlap, patch[0] - 1), overlap, overlap)
    plan = plan_blocks(shape, patch, overlap3, block_shape=(4, 16, 16), chunks=(4, 8, 8))
    run_blockwise(nn.Identity(), volume, plan, out, batch_size=2, num_workers=0)
    import zarr

    got = zarr.open_group(str(out), mode="r")["0"][...]
    np.testing.assert_allclose(got, value / 65535, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- the plan and the predictor


@FAST
@given(
    grids(max_size=40),
    st.tuples(st.integers(1, 12), st.integers(1, 24), st.integers(1, 24)),
    st.tuples(st.integers(1, 8), st.integers(1, 16), st.integers(1, 16)),
    st.integers(1, 3),
)
def test_any_plan_tiles_the_region_and_no_two_blocks_share_a_chunk(g, block, chunks, levels: int) -> None:
    """Blocks cover every voxel once, their patches are the grid's that touch them, and every chunk of every
    pyramid level belongs to one block (so ranks can write blocks concurrently)."""
    from exem.inference.plan import plan_blocks

    shape, patch, overlap = g
    plan = plan_blocks(shape, patch, overlap, block_shape=block, chunks=chunks, levels=levels)
    covered = np.zeros(shape, np.int16)
    for b in plan.blocks:
        covered[b.slices()] += 1
        for lvl in range(levels):
            f = (1, 2**lvl, 2**lvl)
            for ax in range(3):  # block borders at whole chunks of this level (or at the region's end)
                step = chunks[ax] * f[ax]
                assert b.start[ax] % step == 0
                assert b.stop[ax] % step == 0 or b.stop[ax] == shape[ax]
        n = sum(
            all(s[ax] < b.stop[ax] and s[ax] + patch[ax] > b.start[ax] for ax in range(3)) for s in plan.grid
        )
        assert b.num_patches == n
    assert (covered == 1).all()
    assert plan.patches_computed >= len(plan.grid)


@FAST
@given(
    grids(max_size=16), st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(1, 8)), st.integers(0, 99)
)
def test_predicted_blocks_do_not_depend_on_the_split(g, block, seed: int) -> None:
    """The engine's per-block prediction (normalise, patches, batches, streamed blend, cast) of any block split
    equals one block over the whole region, for an identity network on random uint16 data."""
    from torch import nn

    from exem.inference.blockio import raw_tensor
    from exem.inference.engine import BlockPredictor
    from exem.inference.plan import plan_blocks

    shape, patch, overlap = g
    raw = np.random.default_rng(seed).integers(0, 65536, shape).astype(np.uint16)

    def predict(plan) -> np.ndarray:
        net = BlockPredictor(
            nn.Identity(), plan, (0, 65535), batch_size=3, out_dtype="float32", raw_dtype=raw.dtype
        )
        out = np.zeros(shape, np.float32)
        for b in plan.blocks:
            ctx = tuple(slice(a, z) for a, z in zip(b.context_start, b.context_stop, strict=True))
            out[b.slices()] = net.predict_block(b, raw_tensor(raw[ctx]))[0].numpy()
        return out

    whole = predict(plan_blocks(shape, patch, overlap))
    split = predict(plan_blocks(shape, patch, overlap, block_shape=block))
    np.testing.assert_allclose(whole, raw / 65535, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(split, whole)
