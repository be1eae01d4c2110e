"""Block contexts read in Z parts: the engine starts a block before all of its context is read, same output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from torch import nn

from exem.data.ome import create_ome_zarr
from exem.data.volume import open_volume
from exem.inference import engine
from exem.inference.blockio import BlockDataset, raw_tensor
from exem.inference.blockrun import BlockRun
from exem.inference.engine import run_blockwise
from exem.inference.plan import plan_blocks

SHAPE = (20, 96, 80)
PATCH = (8, 32, 32)
OVERLAP = (4, 16, 16)
CHUNK_Z = 8  # the input's Z chunk


@pytest.fixture(scope="module")
def raw_zarr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = np.random.default_rng(5).integers(0, 256, SHAPE, dtype=np.uint8)
    path = tmp_path_factory.mktemp("parts") / "in.zarr"
    zarr.create_array(str(path), shape=SHAPE, chunks=(CHUNK_Z, 32, 32), dtype="uint8")[...] = raw
    return path


def _run(net: nn.Module, src: Path, out: Path, dtype: str, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    volume = open_volume(src)
    plan = plan_blocks(volume.shape, PATCH, OVERLAP, block_shape=(8, 64, 64), chunks=(4, 32, 32), levels=2)
    create_ome_zarr(out, plan.shape, dtype, (1, 1, 1), chunks=(4, 32, 32), factors=[(1, 1, 1), (1, 2, 2)])
    run_blockwise(net, volume, plan, out, batch_size=3, out_dtype=dtype, **kwargs)
    group = zarr.open_group(str(out), mode="r")
    return group["0"][...], group["1"][...]


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
@pytest.mark.parametrize("num_workers", [0, 1], ids=["main-process", "reader-process"])
def test_parts_give_the_output_of_whole_contexts(
    net, raw_zarr, tmp_path, dtype: str, num_workers: int
) -> None:
    """Several parts per block (and several blocks): both pyramid levels equal the whole-context run, bit for bit."""
    whole = _run(net, raw_zarr, tmp_path / "whole.zarr", dtype, num_workers=0, context_part_voxels=0)
    parts = _run(
        net, raw_zarr, tmp_path / "parts.zarr", dtype, num_workers=num_workers, context_part_voxels=1
    )
    for a, b in zip(whole, parts, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("part_voxels", [None, 1, 9 * 96 * 80, 10**9])
def test_parts_tile_each_context_on_input_chunks(raw_zarr, part_voxels: int | None) -> None:
    """A block's parts come in order, cover its context once, and cut it only on the input's Z chunk borders."""
    volume = open_volume(raw_zarr)
    plan = plan_blocks(SHAPE, PATCH, OVERLAP, block_shape=(8, 96, 80), chunks=(4, 32, 32))
    dataset = BlockDataset(volume, plan, range(len(plan.blocks)), part_voxels)
    seen: dict[int, list[np.ndarray]] = {}
    for i in range(len(dataset)):
        index, z0, rows = dataset[i]
        block = plan.blocks[index]
        parts = seen.setdefault(index, [])
        assert z0 == sum(p.shape[0] for p in parts)  # in order, no gap
        if z0:
            assert (block.context_start[0] + z0) % CHUNK_Z == 0
        parts.append(rows.numpy())
    assert sorted(seen) == [b.index for b in plan.blocks]
    for index, parts in seen.items():
        block = plan.blocks[index]
        ctx = tuple(slice(a, b) for a, b in zip(block.context_start, block.context_stop, strict=True))
        np.testing.assert_array_equal(np.concatenate(parts), volume.read(ctx))
        if part_voxels is None or part_voxels >= 10**9:
            assert len(parts) == 1
    if part_voxels == 1:
        assert len(dataset) > len(plan.blocks)  # a context starting inside a chunk still gets several parts


def test_a_block_starts_before_its_context_is_complete(net, raw_zarr) -> None:
    """The first part runs the batches it holds; the rest run as rows arrive; parts out of order are refused."""
    volume = open_volume(raw_zarr)
    plan = plan_blocks(SHAPE, PATCH, OVERLAP, chunks=(4, 32, 32))
    predictor = engine.BlockPredictor(net, plan, (0, 255), batch_size=2, out_dtype="uint8")
    block = plan.blocks[0]
    ctx = tuple(slice(a, b) for a, b in zip(block.context_start, block.context_stop, strict=True))
    raw = raw_tensor(volume.read(ctx))
    run = BlockRun(predictor, block)
    with pytest.raises(ValueError, match="context rows 8:"):
        run.feed(8, raw[8:])
    run.feed(0, raw[:12])
    assert 0 < run.next < len(run.starts)  # some patches ran, not all
    with pytest.raises(RuntimeError, match="context rows received"):
        run.finish()
    run.feed(12, raw[12:])
    np.testing.assert_array_equal(run.finish().numpy(), predictor.predict_block(block, raw).numpy())
    with pytest.raises(RuntimeError, match="without its first part"):
        predictor.predict_step((block.index, 8, raw[8:]), 0)
