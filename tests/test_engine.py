"""Blockwise inference engine: plan, equivalence with the published whole-volume stitching, resume, errors."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from exem.data.grid import PatchGrid
from exem.data.ome import create_ome_zarr, downsample_inplane
from exem.data.volume import normalize, open_volume
from exem.inference import blockrun, engine
from exem.inference.blend import ZStreamBlender
from exem.inference.blockio import DONE_DIR, BlockWriter, done_blocks, raw_tensor
from exem.inference.engine import run_blockwise
from exem.inference.plan import plan_blocks, resolve_region

SHAPE = (20, 96, 80)
PATCH = (8, 32, 32)
OVERLAP = (4, 16, 16)
SIGMA = 0.5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def raw() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, SHAPE, dtype=np.uint8)


@pytest.fixture(scope="module")
def raw_zarr(tmp_path_factory: pytest.TempPathFactory, raw: np.ndarray) -> Path:
    path = tmp_path_factory.mktemp("engine") / "in.zarr"
    zarr.create_array(str(path), shape=raw.shape, chunks=(8, 32, 32), dtype=raw.dtype)[...] = raw
    return path


def reference_stitch(net: nn.Module, x: np.ndarray, patch, overlap, sigma: float) -> np.ndarray:
    """The published stitching, whole volume in RAM: Σ w·G(x[p]) / Σ w over the PatchGrid's patches."""
    grid = PatchGrid(x.shape, patch, overlap)
    z, y, xx = (np.linspace(-1, 1, n) if n > 1 else np.zeros(1) for n in patch)
    r2 = z[:, None, None] ** 2 + y[None, :, None] ** 2 + xx[None, None, :] ** 2
    w = np.maximum(np.exp(-r2 / (2 * sigma**2)), 1e-4).astype(np.float32)
    out = np.zeros(x.shape, np.float32)
    norm = np.zeros(x.shape, np.float32)
    with torch.no_grad():
        for start in grid:
            sl = grid.slices(start)
            g = net(torch.from_numpy(np.ascontiguousarray(x[sl]))[None, None])[0, 0].numpy()
            out[sl] += w * g
            norm[sl] += w
    return out / norm


def run(
    net: nn.Module,
    source,
    out: Path,
    *,
    dtype: str = "float32",
    chunks=(4, 16, 16),
    levels: int = 1,
    roi=None,
    **kwargs,
) -> np.ndarray:
    """Plan once, run_blockwise into a freshly created group; returns level 0."""
    volume = source if hasattr(source, "intensity_range") else open_volume(source)
    plan = plan_blocks(
        volume.shape,
        PATCH,
        OVERLAP,
        roi=roi,
        block_shape=kwargs.pop("block_shape", None),
        chunks=chunks,
        levels=levels,
    )
    create_ome_zarr(
        out, plan.shape, dtype, (1, 1, 1), chunks=chunks, factors=[(1, 2**i, 2**i) for i in range(levels)]
    )
    kwargs.setdefault("num_workers", 0)
    run_blockwise(net, volume, plan, out, sigma=SIGMA, batch_size=4, out_dtype=dtype, **kwargs)
    return zarr.open_group(str(out), mode="r")["0"][...]


# --------------------------------------------------------------------------------------------- plan


def test_plan_blocks_tile_the_region_and_respect_chunks() -> None:
    plan = plan_blocks(SHAPE, PATCH, OVERLAP, block_shape=(5, 40, 20), chunks=(4, 16, 16), levels=2)
    # rounded up to whole chunks of level 0 (4, 16, 16) and level 1 (4, 16, 16 → 32 level-0 voxels in Y, X)
    assert plan.align == (4, 32, 32)
    assert plan.block_shape == (8, 64, 32)
    covered = np.zeros(SHAPE, np.int32)
    for b in plan.blocks:
        covered[b.slices()] += 1
        assert all(s % a == 0 for s, a in zip(b.start, plan.align, strict=True))
        # the block's patches are exactly the global grid's patches that intersect it, in the grid's order
        expected = [
            s
            for s in plan.grid
            if all(s[ax] < b.stop[ax] and s[ax] + PATCH[ax] > b.start[ax] for ax in range(3))
        ]
        assert list(b.patches()) == expected
        assert all(
            c0 <= s0 and c1 >= s1
            for c0, s0, c1, s1 in zip(b.context_start, b.start, b.context_stop, b.stop, strict=True)
        )
    assert (covered == 1).all()
    assert len({b.id for b in plan.blocks}) == len(plan.blocks)
    assert plan.duplicate_fraction > 0
    single = plan_blocks(SHAPE, PATCH, OVERLAP)
    assert len(single.blocks) == 1 and single.duplicate_fraction == 0.0


def test_default_block_shape_follows_the_budget() -> None:
    shape, patch = (300, 8192, 8192), (16, 256, 256)
    plan = plan_blocks(shape, patch, (4, 64, 64), chunks=(32, 256, 256), levels=2, block_voxels=2**28)
    bz, by, bx = plan.block_shape
    assert bz * by * bx <= 2**28
    assert bz % 32 == 0 and by % 512 == 0 and bx % 512 == 0
    assert by == bx


@pytest.mark.parametrize(
    ("roi", "message"),
    [
        ((0, 20, 0, 96, 100, 5000), "ROI x 100:5000 is outside the volume \\(x size 80\\)"),
        ((10, 5, 0, 96, 0, 80), "ROI z 10:5 is empty or reversed"),
        ((0, 20, 0, 20, 0, 80), "larger than the ROI y 0:20"),
        ((0, 20, 0, 96), "6 integers"),
    ],
)
def test_roi_errors(roi, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_region(SHAPE, roi, PATCH)


class _Stretch(nn.Module):
    """Outputs beyond [0, 1]: 2x − 0.5 of a [0, 1] input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * x - 0.5


def test_uint8_output_clips_values_beyond_the_unit_range(raw, tmp_path) -> None:
    """The clip of the uint8 cast (skipped for slabs within [0, 1]) still applies where values leave [0, 1]."""
    f = run(_Stretch(), raw, tmp_path / "f.zarr")
    u8 = run(_Stretch(), raw, tmp_path / "u8.zarr", dtype="uint8", block_shape=(4, 48, 48))
    assert f.min() < 0.0 and f.max() > 1.0
    np.testing.assert_array_equal(u8, np.clip(np.round(255 * f), 0, 255).astype(np.uint8))
    assert u8.min() == 0 and u8.max() == 255


def test_chunks_equal_to_the_fill_value_are_written(raw, tmp_path) -> None:
    """Dense outputs skip zarr's per-chunk fill-value scan: an all-zero result still has every chunk on disk."""
    run(_Stretch(), np.zeros_like(raw), tmp_path / "z.zarr", dtype="uint8")  # 2·0 − 0.5 → clipped to 0
    arr = zarr.open_group(str(tmp_path / "z.zarr"))["0"]
    assert int(np.asarray(arr[...]).max()) == 0
    assert arr.nchunks_initialized == arr.nchunks


def test_patch_larger_than_volume() -> None:
    with pytest.raises(ValueError, match="larger than the volume 20×96×80 on axis z"):
        resolve_region(SHAPE, None, (32, 32, 32))


# -------------------------------------------------------------------------------------- equivalence


def test_engine_equals_published_stitching(net, raw, tmp_path) -> None:
    """Acceptance: one block and many blocks both equal the whole-volume stitching."""
    ref = reference_stitch(net, normalize(raw, 0, 255), PATCH, OVERLAP, SIGMA)
    one = run(net, raw, tmp_path / "one.zarr")
    many = run(net, raw, tmp_path / "many.zarr", block_shape=(8, 32, 32))
    plan = plan_blocks(SHAPE, PATCH, OVERLAP, block_shape=(8, 32, 32), chunks=(4, 16, 16))
    assert [len(set(s)) for s in zip(*(b.start for b in plan.blocks), strict=True)] == [
        3,
        3,
        3,
    ]  # several blocks per axis
    assert float(np.abs(one - ref).max()) <= 1e-5
    assert float(np.abs(many - ref).max()) <= 1e-5
    assert float(np.abs(one - many).max()) <= 1e-6  # (bit-identical on x86 CPUs: fixed network batch size)
    # uint8 = clip(round(255·float32)), computed on the device
    u8 = run(net, raw, tmp_path / "u8.zarr", dtype="uint8", block_shape=(4, 48, 48))
    np.testing.assert_array_equal(u8, np.clip(np.round(255 * one), 0, 255).astype(np.uint8))


@pytest.mark.parametrize(
    ("dtype", "block_shape", "halo"), [("float32", (8, 32, 32), (0, 0, 0)), ("uint8", None, (1, 2, 2))]
)
def test_window_sums_change_no_bit_of_the_output(
    net, raw, tmp_path, monkeypatch, dtype, block_shape, halo
) -> None:
    """Dividing by the blocks' WindowSums instead of weights summed patch by patch: the same float32 and uint8
    output, bit for bit, on many blocks and on one (with a halo)."""
    kwargs = {"dtype": dtype, "block_shape": block_shape, "halo": halo}
    fast = run(net, raw, tmp_path / "sums.zarr", **kwargs)
    with monkeypatch.context() as m:
        m.setattr(blockrun, "WindowSums", lambda *a, **k: None)  # ZStreamBlender sums the weights itself
        slow = run(net, raw, tmp_path / "weights.zarr", **kwargs)
    assert fast.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(fast, slow)


def test_roi_equals_translating_the_cropped_volume(net, raw, tmp_path) -> None:
    roi = (2, 18, 16, 80, 8, 72)
    got = run(net, raw, tmp_path / "roi.zarr", roi=roi)
    crop = raw[2:18, 16:80, 8:72]
    ref = reference_stitch(net, normalize(crop, 0, 255), PATCH, OVERLAP, SIGMA)
    assert got.shape == crop.shape
    assert float(np.abs(got - ref).max()) <= 1e-5


def test_identity_net_keeps_a_constant_volume(tmp_path) -> None:
    const = np.full(SHAPE, 1000, np.uint16)
    volume = open_volume(const, intensity_range=(0, 4000))
    got = run(nn.Identity(), volume, tmp_path / "c.zarr", block_shape=(8, 32, 32))
    assert float(np.abs(got - 0.25).max()) < 1e-6


@pytest.mark.parametrize("full_range", [False, True])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", ">u2", "uint32", "int16", "float16", "float32", ">f8"])
def test_device_normalisation_is_bit_identical_to_normalize(dtype: str, full_range: bool) -> None:
    """Also where the engine skips steps that change nothing (lo = 0, scale 1, no clip over the dtype's range) or
    fuses the conversion to float32 into the first step, and as the engine calls it: a strided patch of the raw
    context into one slot of the batch buffer."""
    rng = np.random.default_rng(3)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "ui" else None
    lo, hi = (100.0, 3000.5) if info is None or info.max > 255 else (3.0, 200.0)
    if full_range:
        lo, hi = (0.0, 1.0) if info is None else (float(info.min), float(info.max))
    if info is not None:
        a = rng.integers(info.min, info.max, (4, 8, 8), endpoint=True).astype(dtype)
        a.flat[:2] = [info.min, info.max]
    else:
        a = (rng.random((4, 8, 8)) * 4000 - 200).astype(dtype)
    predictor = engine.BlockPredictor(
        nn.Identity(), plan_blocks((4, 8, 8), (4, 8, 8)), (lo, hi), raw_dtype=a.dtype
    )
    raw = raw_tensor(a)
    got = predictor.normalize(raw).numpy()
    np.testing.assert_array_equal(got, normalize(a, lo, hi))
    batch = torch.full((2, 4, 4, 4), -7.0)
    predictor.normalize(raw[:, 2:6, 1:5], out=batch[1])
    np.testing.assert_array_equal(batch[1].numpy(), normalize(a[:, 2:6, 1:5], lo, hi))
    assert bool((batch[0] == -7.0).all())
    seen = torch.int64 if predictor._unsigned_mask and raw.dtype in (torch.int16, torch.int32) else raw.dtype
    assert predictor._maps_into_unit(seen) == (full_range and info is not None)  # the clip is skipped


def test_uint16_volume_through_the_engine(tmp_path) -> None:
    data = np.random.default_rng(2).integers(0, 65536, SHAPE).astype(np.uint16)
    volume = open_volume(data, intensity_range=(1000, 60000))
    got = run(nn.Identity(), volume, tmp_path / "u16.zarr", block_shape=(8, 32, 32))
    assert float(np.abs(got - normalize(data, 1000, 60000)).max()) < 1e-6


def test_workers_and_pyramid(net, raw_zarr, tmp_path) -> None:
    a = run(net, raw_zarr, tmp_path / "w0.zarr", dtype="uint8", levels=2, block_shape=(8, 32, 32))
    b = run(
        net, raw_zarr, tmp_path / "w1.zarr", dtype="uint8", levels=2, block_shape=(8, 32, 32), num_workers=1
    )
    np.testing.assert_array_equal(a, b)
    group = zarr.open_group(str(tmp_path / "w1.zarr"), mode="r")
    np.testing.assert_array_equal(group["1"][...], downsample_inplane(a))
    assert group.attrs["exem"]["complete"] is True


def test_resume_skips_done_blocks(net, raw, tmp_path) -> None:
    out = tmp_path / "r.zarr"
    full = run(net, raw, out, block_shape=(8, 32, 32))
    plan = plan_blocks(SHAPE, PATCH, OVERLAP, block_shape=(8, 32, 32), chunks=(4, 16, 16))
    assert done_blocks(out, plan, 1) == {b.index for b in plan.blocks}
    # forget three blocks (marker and data), rerun: only they are computed, the result is the same
    group = zarr.open_group(str(out), mode="r+")
    for b in plan.blocks[:3]:
        (out / DONE_DIR / "0" / b.id).unlink()
        group["0"][b.slices()] = 0
    volume = open_volume(raw)
    result = run_blockwise(net, volume, plan, out, batch_size=4, num_workers=0)
    assert (result.blocks_skipped, result.blocks_done) == (len(plan.blocks) - 3, 3)
    np.testing.assert_array_equal(group["0"][...], full)


# ------------------------------------------------------------------------------------------- errors


def test_nan_block_raises_and_is_not_marked(net, tmp_path) -> None:
    data = np.random.default_rng(1).random(SHAPE, dtype=np.float32)
    volume = open_volume(data)
    data[10, 50, 40] = np.nan  # after opening (its sample check would refuse it)
    out = tmp_path / "nan.zarr"
    with pytest.raises(
        ValueError, match="non-finite values .* block (z\\d+-\\d+_y\\d+-\\d+_x\\d+-\\d+)"
    ) as info:
        run(net, volume, out, block_shape=(8, 32, 32))
    block_id = str(info.value).split("block ")[1].split(" ")[0]
    assert not (out / DONE_DIR / "0" / block_id).exists()
    assert "incomplete" not in str(info.value)
    assert not zarr.open_group(str(out), mode="r").attrs.get("exem", {}).get("complete", False)


@pytest.mark.parametrize("write_workers", [1, 3], ids=["one-writer", "writer-threads"])
def test_writer_error_reaches_the_caller(net, raw, tmp_path, monkeypatch, write_workers: int) -> None:
    """A write error (in the writer thread, or in one of a pool's threads) ends the run; no block is marked done."""

    def broken(self, index, z0, data, lower_levels=()):
        raise OSError("disk full")

    monkeypatch.setattr(BlockWriter, "write_slab", broken)
    out = tmp_path / "broken.zarr"
    with pytest.raises(OSError, match="disk full"):
        run(net, raw, out, block_shape=(8, 32, 32), write_workers=write_workers)
    assert not (out / DONE_DIR).exists()


def test_a_lower_level_write_error_reaches_the_caller(net, raw, tmp_path, monkeypatch) -> None:
    """Levels 1, 2, … are written by a helper thread while level 0 is: its error ends the run, no block is marked."""

    def broken(self, block, z0, data, lower_levels):
        raise OSError("level 1: disk full")

    monkeypatch.setattr(BlockWriter, "_write_lower_levels", broken)
    out = tmp_path / "broken1.zarr"
    with pytest.raises(OSError, match="level 1: disk full"):
        run(net, raw, out, dtype="uint8", levels=2, block_shape=(8, 32, 32))
    assert not (out / DONE_DIR).exists()


def test_a_level_0_write_error_is_the_one_reported(net, raw, tmp_path, monkeypatch) -> None:
    """When level 0 and the helper's levels both fail, the caller sees level 0's error (after the helper ended)."""

    def broken(self, lvl, block, z0, level_data):
        raise OSError(f"level {lvl}: disk full")

    monkeypatch.setattr(BlockWriter, "_write_level", broken)
    with pytest.raises(OSError, match="level 0: disk full"):
        run(net, raw, tmp_path / "broken0.zarr", dtype="uint8", levels=2, block_shape=(8, 32, 32))


def test_three_levels_each_the_mean_of_the_one_above(net, raw, tmp_path) -> None:
    """The helper thread chains the levels: level 2 is downsampled from level 1, not from level 0."""
    level0 = run(net, raw, tmp_path / "l3.zarr", dtype="uint8", levels=3, chunks=(4, 16, 16))
    group = zarr.open_group(str(tmp_path / "l3.zarr"), mode="r")
    level1 = downsample_inplane(level0)
    np.testing.assert_array_equal(group["1"][...], level1)
    np.testing.assert_array_equal(group["2"][...], downsample_inplane(level1))


def test_block_ids_are_unique_across_plans() -> None:
    a = plan_blocks(SHAPE, PATCH, OVERLAP, block_shape=(8, 32, 32), chunks=(4, 16, 16))
    b = plan_blocks(SHAPE, PATCH, OVERLAP, block_shape=(4, 64, 16), chunks=(4, 16, 16))
    boxes = {(x.start, x.stop): x.id for x in itertools.chain(a.blocks, b.blocks)}
    assert len(set(boxes.values())) == len(boxes)


def test_default_trainer_is_quiet() -> None:
    """No 'GPU available …' lines or tips per call from the inference trainer (a plain Trainer logs them)."""
    import logging

    import lightning as L

    from exem.inference.engine import default_trainer
    from exem.quiet import LIGHTNING_ANNOUNCER

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    announcer = logging.getLogger(LIGHTNING_ANNOUNCER)
    announcer.addHandler(handler)
    try:
        L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
        assert any("available" in r.getMessage() for r in records)  # the control: Lightning does announce
        records.clear()
        default_trainer(accelerator="cpu")
        assert [r.getMessage() for r in records if r.levelno < logging.WARNING] == []
    finally:
        announcer.removeHandler(handler)


# --------------------------------------------------------------------------------------------- streaming


def _reference_downsample(array: np.ndarray) -> np.ndarray:
    """The definition: the float64 mean of each 2×2 square (odd edges replicated), rounded half to even for ints."""
    z, y, x = array.shape
    a = np.pad(array, ((0, 0), (0, y % 2), (0, x % 2)), mode="edge")
    a = a.reshape(z, a.shape[1] // 2, 2, a.shape[2] // 2, 2).astype(np.float64).mean(axis=(2, 4))
    return (np.round(a) if np.issubdtype(array.dtype, np.integer) else a).astype(array.dtype)


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16", "int32", "float16", "float32"])
@pytest.mark.parametrize("shape", [(3, 33, 17), (2, 64, 64), (1, 1, 1), (2, 1, 5), (7, 20, 30)])
def test_fast_downsample_equals_the_float64_mean(dtype: str, shape, monkeypatch) -> None:
    """The integer path (sum, then round half to even by shifts) is exact; floats agree to rounding. (7, 20, 30)
    goes 3 slices at a time (the last step shorter)."""
    import exem.data.ome as ome

    if shape == (7, 20, 30):
        monkeypatch.setattr(ome, "DOWNSAMPLE_STEP_VOXELS", 3 * 10 * 15)
    rng = np.random.default_rng(sum(shape))
    if np.dtype(dtype).kind in "ui":
        info = np.iinfo(dtype)
        a = rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)
        a.flat[:4] = [info.min, info.max, info.min, info.max][: a.size] if a.size >= 4 else a.flat[:4]
        np.testing.assert_array_equal(downsample_inplane(a), _reference_downsample(a))
    else:
        a = (rng.random(shape) * 4 - 1).astype(dtype)
        got, ref = downsample_inplane(a), _reference_downsample(a)
        assert got.dtype == ref.dtype
        np.testing.assert_allclose(got.astype(np.float64), ref.astype(np.float64), rtol=1e-6, atol=1e-7)


def test_downsample_block_is_downsample_inplane_per_channel(monkeypatch) -> None:
    """The writer's host levels: each channel of a (C, Z, Y, X) block downsampled into the result (odd edges, several
    Z steps); ``out=`` writes into the given array and returns it."""
    import exem.data.ome as ome
    from exem.inference.pyramid import downsample_block

    monkeypatch.setattr(ome, "DOWNSAMPLE_STEP_VOXELS", 2 * 9 * 4)  # two slices of the 9×4 output per step
    a = np.random.default_rng(3).integers(0, 256, (2, 5, 17, 8), dtype=np.uint8)
    got = downsample_block(a)
    assert got.shape == (2, 5, 9, 4) and got.dtype == np.uint8
    for c in range(2):
        np.testing.assert_array_equal(got[c], _reference_downsample(a[c]))
    out = np.full((5, 9, 4), 7, dtype=np.uint8)
    assert downsample_inplane(a[1], out=out) is out
    np.testing.assert_array_equal(out, got[1])


def test_chunk_rows_go_to_the_sink_while_the_block_is_computed(net, raw) -> None:
    """With a sink, each chunk row of a block is handed over as soon as it is final, in order, covering the block
    once; the rows equal the block's result."""
    plan = plan_blocks(SHAPE, PATCH, OVERLAP, chunks=(4, 32, 32))
    predictor = engine.BlockPredictor(net, plan, (0, 255), batch_size=4, out_dtype="uint8")
    block = plan.blocks[0]
    ctx = tuple(slice(a, b) for a, b in zip(block.context_start, block.context_stop, strict=True))
    rows: list[tuple[int, np.ndarray, int]] = []
    patches_seen: list[int] = []
    real_add = ZStreamBlender.add

    def counting_add(self, out, start, window=None):  # noqa: ANN001, ANN202
        patches_seen.append(1)
        return real_add(self, out, start, window)

    def sink(index: int, z0: int, levels, ready) -> None:  # noqa: ANN001
        assert ready is None  # on the CPU: a view, nothing to wait for
        rows.append((z0, np.array(levels[0]), len(patches_seen)))

    ZStreamBlender.add = counting_add
    try:
        result = predictor.predict_block(block, raw_tensor(raw[ctx]), sink=sink).numpy()
    finally:
        ZStreamBlender.add = real_add
    assert [z0 for z0, _, _ in rows] == list(range(0, block.shape[0], 4))
    np.testing.assert_array_equal(np.concatenate([r for _, r, _ in rows], axis=1), result)
    assert rows[0][2] < block.num_patches  # the first row left before the last patch was blended


def test_keep_freed_memory_is_opt_out(monkeypatch) -> None:
    import exem.allocator as allocator

    monkeypatch.setattr(allocator, "_done", False)
    monkeypatch.setenv(allocator.ALLOCATOR_ENV, "0")
    assert allocator.keep_freed_memory() is False
    monkeypatch.delenv(allocator.ALLOCATOR_ENV)
    import sys

    if sys.platform.startswith("linux"):
        assert allocator.keep_freed_memory() is True
        assert allocator.keep_freed_memory() is True  # once per process, then a no-op


def test_automatic_batch_size() -> None:
    """The batch fills half the device memory, in powers of two, 1 ≤ batch ≤ 64; the CPU keeps 8."""
    from exem.inference.batching import DEFAULT_BATCH_SIZE, batch_for_memory, probe_batch_size

    gib = 2**30
    assert batch_for_memory(per_patch_bytes=1 * gib, device_bytes=80 * gib) == 32  # 40 patches fit → 32
    assert batch_for_memory(per_patch_bytes=gib // 8, device_bytes=140 * gib) == 64  # capped
    assert batch_for_memory(per_patch_bytes=100 * gib, device_bytes=16 * gib) == 1  # never 0
    # what the process can still allocate: ample on an idle GPU (the batch from the total stays), halving it when
    # another process holds much of the device, never below 1
    assert batch_for_memory(gib, 80 * gib, available_bytes=75 * gib) == 32
    assert batch_for_memory(gib, 80 * gib, available_bytes=30 * gib) == 16
    assert batch_for_memory(gib, 80 * gib, available_bytes=gib // 2) == 1
    assert probe_batch_size(nn.Identity(), (4, 8, 8), torch.device("cpu"), None) == DEFAULT_BATCH_SIZE


def test_a_batch_size_of_none_is_resolved_once_per_run(net, raw) -> None:
    plan = plan_blocks(SHAPE, PATCH, OVERLAP, block_shape=(8, 32, 32), chunks=(4, 16, 16))
    auto = engine.BlockPredictor(net, plan, (0, 255), batch_size=None, out_dtype="float32")
    fixed = engine.BlockPredictor(net, plan, (0, 255), batch_size=8, out_dtype="float32")
    block = plan.blocks[0]
    ctx = tuple(slice(a, b) for a, b in zip(block.context_start, block.context_stop, strict=True))
    got = auto.predict_block(block, raw_tensor(raw[ctx]))
    assert auto.batch_size == 8
    assert torch.equal(got, fixed.predict_block(block, raw_tensor(raw[ctx])))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.float16, torch.float32])
def test_device_pyramid_equals_the_host_one(dtype) -> None:
    """downsample_rows (on the device) equals downsample_inplane (writer thread) exactly, odd edges included."""
    from exem.inference.pyramid import downsample_rows

    g = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        rows = (torch.rand((2, 3, 33, 17), generator=g) * 4 - 1).to(dtype)
    else:
        info = torch.iinfo(dtype)
        rows = torch.randint(info.min, info.max, (2, 3, 33, 17), generator=g, dtype=torch.int64).to(dtype)
    before = rows.clone()
    got = downsample_rows(rows).numpy()
    assert torch.equal(rows, before)  # the input is left as it is
    ref = np.stack([downsample_inplane(c) for c in rows.numpy()])
    assert got.dtype == ref.dtype and np.array_equal(got, ref)


def test_rows_can_carry_their_pyramid_from_the_device(net, raw, tmp_path) -> None:
    """With levels computed where the rows are (as on a GPU), the sink gets level 1 too, equal to the writer's."""
    plan = plan_blocks(SHAPE, PATCH, OVERLAP, chunks=(4, 32, 32), levels=2)
    predictor = engine.BlockPredictor(net, plan, (0, 255), batch_size=4, out_dtype="uint8")
    predictor.device_levels = True
    block = plan.blocks[0]
    ctx = tuple(slice(a, b) for a, b in zip(block.context_start, block.context_stop, strict=True))
    got: list[tuple[int, list]] = []
    predictor.predict_block(
        block, raw_tensor(raw[ctx]), sink=lambda i, z0, levels, ready: got.append((z0, levels))
    )
    assert all(len(levels) == 2 for _, levels in got)
    for _, (rows, level1) in got:
        np.testing.assert_array_equal(level1.numpy()[0], downsample_inplane(rows.numpy()[0]))


def test_several_writer_threads_write_the_same_output(net, raw, tmp_path) -> None:
    """Chunk rows written by a pool of threads (as on a GPU host) give the same pyramid as one writer thread."""
    one = run(net, raw, tmp_path / "one.zarr", dtype="uint8", levels=2, chunks=(4, 16, 16), write_workers=1)
    many = run(net, raw, tmp_path / "many.zarr", dtype="uint8", levels=2, chunks=(4, 16, 16), write_workers=3)
    np.testing.assert_array_equal(one, many)
    a = zarr.open_group(str(tmp_path / "one.zarr"), mode="r")["1"][...]
    b = zarr.open_group(str(tmp_path / "many.zarr"), mode="r")["1"][...]
    np.testing.assert_array_equal(a, b)
