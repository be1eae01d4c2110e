"""exem.analysis.segment / instances: model loading, blockwise connected components, watershed, resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from scipy import ndimage as ndi

from exem.analysis.instances import label_components, seeded_watershed
from exem.analysis.segment import Segmenter, load_segmenter, read_sidecar, segment_volume
from exem.data.grid import PatchGrid
from exem.data.ome import ome_attributes, write_ome_zarr
from exem.inference.plan import default_overlap
from tests.segmenters import BandSegmenter, Identity2, save_segmenters

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOXEL = (40.0, 10.0, 10.0)
KW = {"patch": [8, 32, 32], "chunks": [4, 16, 16], "label_block": [4, 32, 32], "progress": False}


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label arrays are equal up to renaming the non-zero ids (0 stays 0)."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()], axis=1), axis=0)
    return len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1]))


def _blobs(shape: tuple[int, int, int], seed: int, level: float = 0.52) -> np.ndarray:
    """Random smooth blobs (many of them long and winding): a float32 'probability' volume in [0, 1]."""
    noise = ndi.gaussian_filter(np.random.default_rng(seed).random(shape), (1.0, 2.0, 2.0))
    return (1.0 / (1.0 + np.exp(-60.0 * (noise - level)))).astype(np.float32)


@pytest.mark.parametrize(("seed", "block"), [(0, (3, 7, 9)), (1, (5, 4, 13)), (2, (1, 40, 44))])
def test_blockwise_components_equal_scipy_on_the_whole_array(seed: int, block: tuple[int, int, int]) -> None:
    prob = _blobs((12, 40, 44), seed)
    ref, n_ref = ndi.label(prob > 0.5)
    assert n_ref > 10
    out = np.zeros(prob.shape, np.uint32)
    n = label_components(prob, [out], threshold=0.5, block_shape=block)
    assert n == n_ref
    assert _same_partition(out, ref)
    assert set(np.unique(out)) == set(range(n + 1))  # consecutive ids
    # objects do cross block borders, so merging was needed
    single = np.zeros_like(out)
    assert label_components(prob, [single], threshold=0.5, block_shape=prob.shape) == n_ref
    assert np.array_equal(out, single) and np.array_equal(out, ref)  # scipy's numbering, whatever the blocks


def test_blockwise_components_min_size_and_pyramid_level() -> None:
    prob = _blobs((8, 32, 48), 3)
    ref, n_ref = ndi.label(prob > 0.5)
    sizes = np.bincount(ref.ravel())
    big = np.flatnonzero(sizes >= 20)
    big = big[big > 0]
    assert 0 < len(big) < n_ref
    levels = [np.zeros(prob.shape, np.uint32), np.zeros((8, 16, 24), np.uint32)]
    n = label_components(prob, levels, threshold=0.5, block_shape=(3, 8, 16), min_size=20)
    assert n == len(big)
    assert _same_partition(levels[0], np.where(np.isin(ref, big), ref, 0))
    assert np.array_equal(levels[1], levels[0][:, ::2, ::2])


def _voronoi_cells(shape: tuple[int, int, int], grid: tuple[int, int, int], seed: int) -> np.ndarray:
    """A phantom-like tessellation: cells around jittered grid points (ids 1..N)."""
    rng = np.random.default_rng(seed)
    centres = []
    for idx in np.ndindex(*grid):
        cell = np.array(shape) / np.array(grid)
        centres.append((np.array(idx) + 0.5 + rng.uniform(-0.2, 0.2, 3)) * cell)
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    pts = np.stack([zz, yy, xx], -1).astype(np.float32)
    d = np.stack([((pts - c) ** 2).sum(-1) for c in centres])
    return (d.argmin(0) + 1).astype(np.uint32)


def _membranes(cells: np.ndarray) -> np.ndarray:
    """1 where a voxel has a face neighbour in another cell."""
    edge = np.zeros(cells.shape, bool)
    for ax in range(3):
        diff = np.diff(cells, axis=ax) != 0
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[ax], hi[ax] = slice(0, -1), slice(1, None)
        edge[tuple(lo)] |= diff
        edge[tuple(hi)] |= diff
    return edge


def test_boundary_watershed_finds_the_cells_of_a_phantom(tmp_path: Path) -> None:
    cells = _voronoi_cells((16, 64, 64), (2, 3, 3), seed=0)
    image = np.where(_membranes(cells), 230, 25).astype(np.uint8)  # bright membranes = a boundary map
    path = write_ome_zarr(tmp_path / "boundary.ome.zarr", image, VOXEL, chunks=(8, 32, 32))
    res = segment_volume(Identity2(), path, tmp_path / "cells", kind="boundary", **KW)
    assert res.num_objects == 18
    labels = zarr.open_group(str(res.labels), mode="r")["0"][...]
    inside = ~_membranes(cells)
    assert _same_partition(np.where(inside, labels, 0), np.where(inside, cells, 0))
    # foreground connected components on the same map cannot separate the touching cells
    res_fg = segment_volume(Identity2(), path, tmp_path / "fg", kind="foreground", threshold=0.5, **KW)
    assert res_fg.num_objects == 1


def test_watershed_separates_two_touching_objects_and_refuses_large_volumes() -> None:
    boundary = np.zeros((4, 12, 20), np.float32)
    boundary[:, :, 10] = 1.0  # one membrane plane between two touching boxes
    out = np.zeros(boundary.shape, np.uint32)
    assert seeded_watershed(boundary, [out], threshold=0.5, seed_erosion=1, max_voxels=10**6) == 2
    assert len(np.unique(out[:, :, :10])) == 1 and len(np.unique(out[:, :, 11:])) == 1
    assert out[0, 0, 0] != out[0, 0, 19]
    with pytest.raises(ValueError, match="max_watershed_voxels=100 "):
        seeded_watershed(boundary, [out], threshold=0.5, max_voxels=100)


@pytest.fixture(scope="module")
def em(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exem.data.synthetic import write_synthetic_dataset

    paths = write_synthetic_dataset(tmp_path_factory.mktemp("syn"), shape=[16, 64, 64])
    return paths["em_test"]


def test_segment_volume_layout_resume_and_settings(tmp_path: Path, em: Path) -> None:
    ts, _ = save_segmenters(tmp_path)
    out = tmp_path / "seg.zarr"
    res = segment_volume(ts, em, out, **KW)
    assert res.num_objects > 0 and res.blocks_done > 0 and not res.already_complete
    root = zarr.open_group(str(out), mode="r")
    assert root.attrs["exem"]["complete"] and root.attrs["exem"]["num_objects"] == res.num_objects
    prob = root["probabilities/0"]
    assert (
        prob.dtype == np.float16
        and prob.shape == (16, 64, 64)
        and root["probabilities/1"].shape == (16, 32, 32)
    )
    lab = root["labels/0"][...]
    assert lab.dtype == np.uint32 and lab.max() == res.num_objects
    assert np.array_equal(root["labels/1"][...], lab[:, ::2, ::2])
    attrs = ome_attributes(root["labels"])
    assert attrs["image-label"]["source"] == {"image": "../probabilities"}
    assert attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == list(VOXEL)
    ref, _ = ndi.label(prob[...] > 0.5)
    assert np.array_equal(lab, ref)  # blockwise (16 blocks) = scipy on the whole array
    # the probabilities are the model's channel 0, blended (the 3×3 conv's zero padding differs at patch edges)
    with torch.no_grad():
        x = torch.from_numpy(zarr.open_group(str(em), mode="r")["0"][...].astype(np.float32) / 255.0)
        direct = BandSegmenter()(x[None, None])[0, 0].numpy()
    grid = PatchGrid((16, 64, 64), KW["patch"], default_overlap(KW["patch"]))
    edge = np.zeros((64, 64), bool)
    for s in grid.starts[1]:
        edge[[s, s + KW["patch"][1] - 1], :] = True
    for s in grid.starts[2]:
        edge[:, [s, s + KW["patch"][2] - 1]] = True
    diff = np.abs(prob[...].astype(np.float32) - direct)
    assert diff[:, ~edge].max() < 1e-3 and diff.max() < 0.5

    # resume after a completed run: nothing is computed, same labels
    again = segment_volume(ts, em, out, **KW)
    assert again.already_complete and again.blocks_done == 0 and again.num_objects == res.num_objects
    assert np.array_equal(zarr.open_group(str(out), mode="r")["labels/0"][...], lab)

    # killed during post-processing: the probabilities are kept, the labels are redone
    meta = dict(root.attrs["exem"])
    zarr.open_group(str(out), mode="r+").attrs["exem"] = {**meta, "complete": False}
    shutil.rmtree(out / "labels")
    redo = segment_volume(ts, em, out, **KW)
    assert not redo.already_complete and redo.blocks_done == 0
    assert np.array_equal(zarr.open_group(str(out), mode="r")["labels/0"][...], lab)

    # other settings: refused, then overwritten on request
    with pytest.raises(FileExistsError, match="threshold 0.5 \\(now 0.3\\).*overwrite=true"):
        segment_volume(ts, em, out, threshold=0.3, **KW)
    more = segment_volume(ts, em, out, threshold=0.3, overwrite=True, **KW)
    assert more.blocks_done > 0 and more.threshold == 0.3


def test_torchscript_and_onnx_give_identical_labels_api(tmp_path: Path, em: Path) -> None:
    ts, onnx = save_segmenters(tmp_path)
    a = segment_volume(ts, em, tmp_path / "a", **KW)
    b = segment_volume(onnx, em, tmp_path / "b", **KW)
    la = zarr.open_group(str(a.labels), mode="r")["0"][...]
    lb = zarr.open_group(str(b.labels), mode="r")["0"][...]
    assert a.num_objects == b.num_objects > 0 and np.array_equal(la, lb)


def test_onnx_sessions_run_on_the_inputs_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With onnxruntime-gpu, each DDP rank's ONNX session must sit on that rank's GPU: the CUDA provider's
    default is GPU 0 (every rank there: one GPU does all the work and holds every arena)."""
    import onnxruntime as ort

    from exem.analysis.em_models import OnnxModule

    _, onnx = save_segmenters(tmp_path)
    module = OnnxModule(onnx)  # its CPU session, made with the real onnxruntime
    made: list[list] = []

    def session(path, sess_options, providers):  # noqa: ANN001, ANN202
        made.append(providers)
        return object()

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(ort, "InferenceSession", session)
    for device in ("cuda:1", "cuda:1", "cuda:0", "cpu"):
        module._session(torch.device(device))
    assert made == [
        [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"],
        [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"],
    ]  # one session per GPU, made once; the CPU one already existed


def test_load_segmenter_and_sidecar_errors(tmp_path: Path) -> None:
    ts, onnx = save_segmenters(tmp_path)
    (tmp_path / "seg.yaml").write_text("kind: boundary\nthreshold: 0.25\npatch: [4, 16, 16]\n")
    net, options = load_segmenter(onnx)
    assert isinstance(net, Segmenter) and net.model_format == "onnx"
    assert options == {"kind": "boundary", "threshold": 0.25, "patch": [4, 16, 16]}
    (tmp_path / "seg.pt.yaml").write_text("threshold: 0.75\n")  # <model>.yaml wins over <stem>.yaml
    assert read_sidecar(ts) == {"threshold": 0.75}
    x = torch.rand(2, 1, 4, 16, 16)
    ts_net, _ = load_segmenter(ts)
    with torch.no_grad():
        assert torch.allclose(ts_net(x), net(x), atol=1e-5) and ts_net(x).shape == (2, 1, 4, 16, 16)

    (tmp_path / "seg.pt.yaml").write_text("treshold: 0.75\n")
    with pytest.raises(ValueError, match="unknown option\\(s\\) treshold"):
        load_segmenter(ts)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_segmenter(tmp_path / "nope.pt")
    (tmp_path / "m.h5").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown model type '.h5'"):
        load_segmenter(tmp_path / "m.h5")
    torch.save({"w": torch.zeros(1)}, tmp_path / "state.pt")
    with pytest.raises(ValueError, match="not a TorchScript file"):
        load_segmenter(tmp_path / "state.pt")
    bad = Segmenter(torch.nn.Conv3d(1, 1, 3), source="conv", model_format="module", fingerprint="-")
    with pytest.raises(ValueError, match="returned \\(2, 1, 2, 14, 14\\)"):
        bad(x)
