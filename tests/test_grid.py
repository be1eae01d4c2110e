"""PatchGrid: starts, coverage, edges and errors."""

from __future__ import annotations

import numpy as np
import pytest

from exem.data import PatchGrid


def test_hand_case_starts() -> None:
    grid = PatchGrid((10, 10, 10), (4, 4, 4), 1)
    assert grid.starts == ([0, 3, 6], [0, 3, 6], [0, 3, 6])
    assert grid.num_per_axis == (3, 3, 3)
    assert len(grid) == 27


def test_last_start_clamped_and_deduplicated() -> None:
    grid = PatchGrid((10, 8, 7), (4, 4, 7), (0, 0, 0))
    assert grid.starts[0] == [0, 4, 6]  # 8 would overrun → clamped to 6
    assert grid.starts[1] == [0, 4]  # exact fit, no duplicate
    assert grid.starts[2] == [0]  # patch == shape


@pytest.mark.parametrize(
    ("shape", "patch", "overlap"),
    [((10, 37, 23), (4, 8, 5), 0), ((5, 64, 65), (1, 16, 16), (0, 4, 8)), ((3, 9, 9), (3, 9, 2), (2, 0, 1))],
)
def test_full_coverage_edges_and_order(shape, patch, overlap) -> None:
    grid = PatchGrid(shape, patch, overlap)
    covered = np.zeros(shape, dtype=np.int32)
    starts = list(grid)
    assert len(starts) == len(grid)
    assert starts == sorted(starts)  # C order
    for start in starts:
        covered[grid.slices(start)] += 1
    assert covered.min() >= 1  # every voxel covered
    for ax in range(3):
        s = grid.starts[ax]
        assert all(b > a for a, b in zip(s, s[1:], strict=False))  # strictly increasing
        assert s[0] == 0
        assert s[-1] + grid.patch[ax] == shape[ax]  # last patch ends at the edge
    assert [grid[i] for i in range(len(grid))] == starts


def test_slices() -> None:
    grid = PatchGrid((8, 32, 32), (2, 16, 16))
    assert grid.slices((2, 16, 0)) == (slice(2, 4), slice(16, 32), slice(0, 16))


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"patch 16×256×256 is larger than the volume 8×300×300 on axis z"):
        PatchGrid((8, 300, 300), (16, 256, 256))
    with pytest.raises(ValueError, match="at least 1 voxel on axis y"):
        PatchGrid((8, 30, 30), (1, 0, 4))
    with pytest.raises(ValueError, match="overlap .* smaller than the patch"):
        PatchGrid((8, 30, 30), (4, 4, 4), 4)
    with pytest.raises(ValueError, match="overlap"):
        PatchGrid((8, 30, 30), (4, 4, 4), -1)
    with pytest.raises(ValueError, match="3 values"):
        PatchGrid((8, 30), (4, 4, 4))
