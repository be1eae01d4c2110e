"""Seam visibility: the measure sees seams where patches disagree, and the engine's blending hides them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from exem.data.grid import PatchGrid
from exem.data.synthetic import make_phantom, render_exm
from exem.data.volume import normalize
from exem.inference.plan import default_overlap
from exem.inference.seams import border_steps, seam_visibility
from exem.inference.translate import translate_volume
from exem.models import AnisotropicUNet3D


def test_border_steps_by_hand() -> None:
    grid = PatchGrid((4, 10, 10), (4, 4, 4), (0, 1, 0))
    # y: starts 0, 3, 6 → starts give steps 2, 5; ends 4, 7 give steps 3, 6; the last patch ends at the edge
    # x: starts 0, 4, 6 → steps 3, 5 (starts) and 3, 7 (ends)
    assert border_steps(grid) == ([], [2, 3, 5, 6], [3, 5, 7])


def smooth_field(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.random(shape, dtype=np.float32))[None, None]
    return torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1)[0, 0].numpy()


def test_tile_offsets_are_seams_and_plain_texture_is_not() -> None:
    shape, patch = (8, 96, 96), (8, 32, 32)
    grid = PatchGrid(shape, patch, 0)
    field = smooth_field(shape)
    plain = seam_visibility(field, grid)
    assert 0.8 < plain.ratio < 1.2
    assert plain.axis_ratio(0) is None  # one patch along Z: no border there
    tiled = field.copy()
    rng = np.random.default_rng(1)
    for start in grid:  # every tile shifted by its own offset, as disagreeing patches without blending
        tiled[grid.slices(start)] += rng.normal(0, 0.2)
    assert seam_visibility(tiled, grid).ratio > 2.0
    with pytest.raises(ValueError, match="is not the grid's"):
        seam_visibility(field[:, :64], grid)


def test_blending_hides_the_seams_of_disagreeing_patches(tmp_path: Path) -> None:
    """A freshly initialised GroupNorm U-Net normalises every patch with its own statistics (patches disagree)."""
    shape, patch = (16, 96, 96), (8, 32, 32)
    exm = render_exm(make_phantom(shape, seed=0), seed=0).astype(np.float32)
    volume = normalize(exm, *np.percentile(exm, [0.5, 99.8]))
    torch.manual_seed(0)
    net = AnisotropicUNet3D(widths=(4, 8, 16)).eval()
    ratios = {}
    for overlap in ((0, 0, 0), default_overlap(patch)):
        out = tmp_path / f"{overlap[1]}.ome.zarr"
        translate_volume(net, volume, out, patch=patch, overlap=overlap, dtype="float32", progress=False)
        result = zarr.open_group(str(out), mode="r")["0"][:]
        ratios[overlap] = seam_visibility(result, PatchGrid(shape, patch, overlap)).ratio
    no_blend, blended = ratios[(0, 0, 0)], ratios[default_overlap(patch)]
    assert no_blend > 1.5, ratios
    assert blended < 0.75 * no_blend, ratios
