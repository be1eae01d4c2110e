"""OME-Zarr outputs: 0.5 on Zarr v3 by default, 0.4 on Zarr v2 on request, both read back by exem, ome-zarr-py
and napari-ome-zarr with their physical scale; NGFF label images; Zarr v3 sharding (blocks follow whole shards),
and resume / complete detection in both formats. Tiny volumes: the whole file runs in seconds."""

from __future__ import annotations

import importlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from exem.analysis.segment import segment_volume
from exem.data.ome import (
    SHARDS_NEED_V3,
    ZARR_FORMATS,
    check_ngff_version,
    check_shards,
    create_group,
    is_group,
    level_layout,
    ome_attributes,
    read_multiscales,
    write_ome_zarr,
)
from exem.data.phantom import SEMANTIC_CLASSES
from exem.data.volume import open_volume
from exem.inference.blockio import DONE_DIR
from exem.inference.engine import run_blockwise
from exem.inference.output import create_image
from exem.inference.plan import level_shards, plan_blocks, plan_volume
from exem.inference.translate import translate_volume
from tests.segmenters import Identity2

VERSIONS = ["0.4", "0.5"]
VOXEL = (40.0, 8.0, 8.0)
SHAPE = (8, 64, 96)
# 2 × 2 × 3 blocks of 4×32×32 voxels, each two chunk rows (chunk z 2) deep: a shard row (z 4) gathers two of them
KW = {
    "patch": [4, 32, 32],
    "overlap": [2, 8, 8],
    "chunks": [2, 16, 16],
    "block_shape": [4, 32, 32],
    "batch_size": 4,
    "num_workers": 0,
    "progress": False,
}
SHARDS = [4, 32, 32]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Pointwise(nn.Module):
    """A generator whose output at a voxel depends on that voxel only (so blending changes nothing)."""

    divisor = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.25 + 0.5 * x


@pytest.fixture(scope="module")
def exm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = np.random.default_rng(0).integers(0, 256, SHAPE, dtype=np.uint8)
    return write_ome_zarr(tmp_path_factory.mktemp("input") / "exm.zarr", raw, VOXEL, chunks=(4, 32, 32))


@pytest.fixture(scope="module")
def plain(exm: Path, tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    """Levels 0 and 1 of an unsharded translation (OME-Zarr 0.5 by default)."""
    out = tmp_path_factory.mktemp("plain") / "plain.zarr"
    translate_volume(Pointwise(), exm, out, **KW)
    return _levels(out)


def _levels(path: Path) -> list[np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return [group["0"][...], group["1"][...]]


def _ome_zarr_nodes(path: Path) -> list:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    return list(Reader(parse_url(str(path)))())


def _napari_layers(path: Path) -> list:
    """napari-ome-zarr's layers. NB: it opens the grandparent (or parent, for a group listing ``labels``) of
    ``path`` with ``zarr.open_group(…)`` in mode "a", which writes a ``zarr.json`` there: keep outputs in a
    folder of their own."""
    from napari_ome_zarr import napari_get_reader

    reader = napari_get_reader(str(path))
    assert reader is not None
    return reader()


def _scales(multiscales: dict) -> list[list[float]]:
    return [d["coordinateTransformations"][0]["scale"] for d in multiscales["datasets"]]


# ----------------------------------------------------------------------------------------- images, labels


@pytest.mark.parametrize("version", VERSIONS)
def test_images_read_back_in_both_versions(tmp_path: Path, version: str) -> None:
    data = np.arange(np.prod((6, 40, 48)), dtype=np.uint16).reshape(6, 40, 48)
    path = write_ome_zarr(tmp_path / "a" / "img.zarr", data, VOXEL, chunks=(2, 16, 16), ngff_version=version)
    group = zarr.open_group(str(path), mode="r")
    assert group.metadata.zarr_format == ZARR_FORMATS[version] and is_group(path)
    assert (path / ("zarr.json" if version == "0.5" else ".zgroup")).is_file()
    # today's chunk compressor in both formats: Blosc LZ4 level 5, byte shuffle
    if version == "0.5":
        codecs = json.loads((path / "0" / "zarr.json").read_text())["codecs"]
        assert codecs[-1]["name"] == "blosc" and codecs[-1]["configuration"]["cname"] == "lz4"
        assert group["0"].metadata.dimension_names == ("z", "y", "x")
    else:
        zarray = json.loads((path / "0" / ".zarray").read_text())
        assert zarray["compressor"]["cname"] == "lz4" and zarray["compressor"]["shuffle"] == 1
        assert zarray["dimension_separator"] == "/"  # NGFF 0.4's nested chunk keys
    # valid NGFF (ome-zarr-models' schemas of 0.4 / 0.5)
    importlib.import_module(f"ome_zarr_models.v0{version[-1]}").Image.from_zarr(group)
    # exem
    assert open_volume(path).voxel_size_nm == VOXEL
    assert open_volume(path, level=1).voxel_size_nm == (40, 16, 16)
    np.testing.assert_array_equal(open_volume(path).read((slice(None),) * 3), data)
    # ome-zarr-py
    [node] = _ome_zarr_nodes(path)
    assert [a["name"] for a in node.metadata["axes"]] == ["z", "y", "x"]
    assert {a["unit"] for a in node.metadata["axes"]} == {"nanometer"}
    assert [t[0]["scale"] for t in node.metadata["coordinateTransformations"]] == [[*VOXEL], [40, 16, 16]]
    assert [d.shape for d in node.data] == [(6, 40, 48), (6, 20, 24)]
    # napari: one image layer whose scale is the voxel size in nm
    [(levels, kwargs, kind)] = _napari_layers(path)
    assert kind == "image" and kwargs["scale"] == list(VOXEL) and len(levels) == 2


@pytest.mark.parametrize("version", VERSIONS)
def test_few_labels_get_colours_instance_ids_none(tmp_path: Path, version: str) -> None:
    semantic = (np.arange(np.prod((4, 32, 32))).reshape(4, 32, 32) % 4).astype(np.uint8)
    path = write_ome_zarr(
        tmp_path / "a" / "sem.zarr",
        semantic,
        VOXEL,
        chunks=(2, 16, 16),
        labels=True,
        label_names=SEMANTIC_CLASSES,
        ngff_version=version,
    )
    group = zarr.open_group(str(path), mode="r")
    meta = ome_attributes(group)["image-label"]
    assert [c["label-value"] for c in meta["colors"]] == [0, 1, 2, 3]
    assert meta["colors"][0]["rgba"] == [0, 0, 0, 0]  # the background is transparent
    assert len({tuple(c["rgba"]) for c in meta["colors"]}) == 4
    assert [p["name"] for p in meta["properties"]] == list(SEMANTIC_CLASSES.values())
    models = importlib.import_module(f"ome_zarr_models.v0{version[-1]}.image_label")
    models.ImageLabel.from_zarr(group)
    np.testing.assert_array_equal(group["1"][...], semantic[:, ::2, ::2])  # nearest, never averaged
    [(levels, kwargs, kind)] = _napari_layers(path)
    assert kind == "labels" and kwargs["scale"] == list(VOXEL) and sorted(kwargs["colormap"]) == [0, 1, 2, 3]
    ids = write_ome_zarr(tmp_path / "b" / "ids.zarr", semantic.astype(np.uint32), VOXEL, labels=True)
    assert "colors" not in ome_attributes(zarr.open_group(str(ids), mode="r"))["image-label"]


@pytest.mark.parametrize("version", VERSIONS)
def test_segmentation_opens_as_labels_on_its_probabilities(tmp_path: Path, version: str) -> None:
    image = (np.random.default_rng(1).random((8, 32, 32)) * 255).astype(np.uint8)
    src = write_ome_zarr(tmp_path / "em.zarr", image, VOXEL, chunks=(4, 16, 16), ngff_version=version)
    out = tmp_path / "a" / "seg.zarr"
    kw = {"patch": [4, 16, 16], "chunks": [4, 16, 16], "progress": False, "ngff_version": version}
    res = segment_volume(Identity2(), src, out, **kw)
    root = zarr.open_group(str(out), mode="r")
    assert root.metadata.zarr_format == root["labels/0"].metadata.zarr_format == ZARR_FORMATS[version]
    assert ome_attributes(root)["labels"] == ["labels"] and root.attrs["exem"]["ngff_version"] == version
    label_meta = ome_attributes(root["labels"])["image-label"]
    assert label_meta["source"] == {"image": "../probabilities"} and "colors" not in label_meta
    # ome-zarr-py from the root: the labels, and their source image (hidden)
    nodes = {Path(n.zarr.path).name: n for n in _ome_zarr_nodes(out)}
    assert {"labels", "probabilities"} <= set(nodes) and not nodes["probabilities"].visible
    assert [type(s).__name__ for s in nodes["labels"].specs][:1] == ["Label"]
    assert [t[0]["scale"] for t in nodes["labels"].metadata["coordinateTransformations"]][0] == list(VOXEL)
    # napari-ome-zarr: the root and the label image open as a labels layer with the physical scale
    for path in (out, out / "labels"):
        [(levels, kwargs, kind)] = _napari_layers(path)
        assert kind == "labels" and kwargs["scale"] == list(VOXEL) and levels[0].shape == (8, 32, 32)
    lab = root["labels/0"][...]
    # complete → left alone; killed during post-processing → labels redone, listed once
    assert segment_volume(Identity2(), src, out, **kw).already_complete
    zarr.open_group(str(out), mode="r+").attrs["exem"] = {**root.attrs["exem"], "complete": False}
    redo = segment_volume(Identity2(), src, out, **kw)
    assert not redo.already_complete and redo.blocks_done == 0 and redo.num_objects == res.num_objects
    again = zarr.open_group(str(out), mode="r")
    assert ome_attributes(again)["labels"] == ["labels"]
    np.testing.assert_array_equal(again["labels/0"][...], lab)


# ----------------------------------------------------------------------------------------- sharding


def test_shards_follow_every_level_and_blocks_follow_shards() -> None:
    assert level_layout((16, 100, 100), (1, 2, 2), (4, 16, 16), (8, 64, 64)) == (
        (16, 50, 50),
        (4, 16, 16),
        (8, 32, 32),
    )
    # requested shards are rounded up to whole chunks of every level (level 1's chunks of 16 = 32 level-0 voxels)
    plan = plan_blocks((16, 100, 100), (4, 32, 32), 0, chunks=(4, 16, 16), levels=2, shards=(6, 40, 40))
    assert plan.shards == (8, 64, 64) and plan.align == (8, 64, 64)
    assert level_shards(plan.shape, plan.chunks, plan.shards, 2) == [(8, 64, 64), (8, 32, 32)]
    assert all(s % a == 0 for b in plan.blocks for s, a in zip(b.start, plan.align, strict=True))
    with pytest.raises(ValueError, match="shards need the output's chunks"):
        plan_blocks((16, 100, 100), (4, 32, 32), 0, shards=(8, 64, 64))
    assert check_ngff_version(0.5) == "0.5" and check_shards(None, "0.4") is None
    with pytest.raises(ValueError, match="ngff_version must be one of 0.4, 0.5, got '0.6'"):
        check_ngff_version("0.6")
    with pytest.raises(ValueError, match=re.escape(SHARDS_NEED_V3)):
        check_shards((8, 64, 64), 0.4)
    with pytest.raises(ValueError, match="shards must be 3 positive integers"):
        check_shards((8, 0, 64), "0.5")


def test_sharded_translation_equals_unsharded_and_resumes(
    exm: Path, plain: list[np.ndarray], tmp_path: Path
) -> None:
    out = tmp_path / "sharded.zarr"
    res = translate_volume(Pointwise(), exm, out, shards=SHARDS, **KW)
    assert res.blocks_done == 12
    group = zarr.open_group(str(out), mode="r")
    assert group["0"].shards == (4, 32, 32) and group["1"].shards == (4, 16, 16)
    assert group.attrs["exem"]["shards"] == SHARDS
    for got, want in zip(_levels(out), plain, strict=True):
        np.testing.assert_array_equal(got, want)
    files = [p for p in (out / "0").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(files) == 12  # one file per shard instead of 2×2×2 chunks each
    # killed: 5 blocks lost their markers and their shards hold other values → recomputed on resume
    lost = sorted((out / DONE_DIR / "0").iterdir())[:5]
    for marker in lost:
        marker.unlink()
    zarr.open_group(str(out), mode="r+")["0"][:4, :32, :] = 7
    meta = dict(group.attrs["exem"])
    zarr.open_group(str(out), mode="r+").attrs["exem"] = {**meta, "complete": False}
    again = translate_volume(Pointwise(), exm, out, shards=SHARDS, **KW)
    assert (again.blocks_done, again.blocks_skipped) == (5, 7)
    for got, want in zip(_levels(out), plain, strict=True):
        np.testing.assert_array_equal(got, want)
    zarr.open_group(str(out), mode="r+").attrs["exem"] = {**meta, "complete": False}
    with pytest.raises(FileExistsError, match=r"shards \[4, 32, 32\] \(now \[8, 64, 64\]\)"):
        translate_volume(Pointwise(), exm, out, shards=[8, 64, 64], **KW)
    with pytest.raises(ValueError, match=re.escape(SHARDS_NEED_V3)):
        translate_volume(Pointwise(), exm, tmp_path / "v2.zarr", shards=SHARDS, ngff_version="0.4", **KW)
    assert not (tmp_path / "v2.zarr").exists()


def test_sharded_rows_from_a_pool_of_writer_threads(
    exm: Path, plain: list[np.ndarray], tmp_path: Path
) -> None:
    volume = open_volume(exm)
    plan = plan_volume(
        volume.shape,
        KW["patch"],
        KW["overlap"],
        chunks=KW["chunks"],
        block_shape=KW["block_shape"],
        shards=SHARDS,
    )
    out = tmp_path / "pool.zarr"
    create_image(out, plan, "uint8", VOXEL, {"complete": False}, name="pool")
    run_blockwise(
        Pointwise(), volume, plan, out, out_dtype="uint8", batch_size=4, num_workers=0, write_workers=3
    )
    for got, want in zip(_levels(out), plain, strict=True):
        np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------------------- NGFF 0.4, old records


def test_v04_output_resumes_and_old_records_count_as_04(
    exm: Path, plain: list[np.ndarray], tmp_path: Path
) -> None:
    out = tmp_path / "v04.zarr"
    translate_volume(Pointwise(), exm, out, ngff_version=0.4, **KW)  # as YAML reads `ngff_version: 0.4`
    assert is_group(out) and (out / ".zgroup").is_file() and not (out / "zarr.json").exists()
    group = zarr.open_group(str(out), mode="r")
    assert read_multiscales(group)["version"] == "0.4" and _scales(read_multiscales(group))[1] == [40, 16, 16]
    for got, want in zip(_levels(out), plain, strict=True):
        np.testing.assert_array_equal(got, want)
    # a record written before exem knew NGFF versions or shards (its outputs were all 0.4, unsharded)
    old = {k: v for k, v in group.attrs["exem"].items() if k not in ("ngff_version", "shards")}
    zarr.open_group(str(out), mode="r+").attrs["exem"] = {**old, "complete": False}
    with pytest.raises(FileExistsError, match=r"ngff_version 0\.4 \(now 0\.5\); use overwrite=true"):
        translate_volume(Pointwise(), exm, out, **KW)
    resumed = translate_volume(Pointwise(), exm, out, ngff_version="0.4", **KW)
    assert (resumed.blocks_done, resumed.blocks_skipped) == (0, 12)
    assert zarr.open_group(str(out), mode="r").attrs["exem"]["complete"] is True
    # overwrite turns it into 0.5
    translate_volume(Pointwise(), exm, out, overwrite=True, **KW)
    assert (out / "zarr.json").is_file() and not (out / ".zgroup").exists()


def test_is_group_in_both_formats(tmp_path: Path) -> None:
    for version in VERSIONS:
        group = create_group(tmp_path / version, version)
        group.create_array("a", shape=(2, 2), dtype="uint8")
        assert is_group(tmp_path / version) and not is_group(tmp_path / version / "a")
    assert not is_group(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "zarr.json").write_text("{not json")
    assert not is_group(tmp_path / "bad")
    shutil.rmtree(tmp_path / "0.4")
    assert not is_group(tmp_path / "0.4")


_WINDOW = {"min": 0.0, "max": 255.0, "start": 0.0, "end": 255.0}


def _ome_zarr_py_reference(path: Path, version: str, *, channels: list | None, label: bool) -> dict:
    """The attributes ome-zarr-py writes for the same image (the maintained writer exem's metadata must equal)."""
    import warnings

    from ome_zarr.format import FormatV04, FormatV05

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr import writer
    from exem.data.ome import AXES, CHANNEL_AXIS, datasets_metadata

    fmt = FormatV05() if version == "0.5" else FormatV04()
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    group = root.create_group("img")
    axes = ([CHANNEL_AXIS] if channels else []) + AXES
    datasets = datasets_metadata((40, 8, 8), [(1, 1, 1), (1, 2, 2)], (0, 8, 16), channel_axis=bool(channels))
    writer.write_multiscales_metadata(group, datasets, fmt=fmt, axes=axes, name="image")
    if channels:
        writer.add_metadata(group, {"omero": {"channels": channels}}, fmt=fmt)
    if label:
        writer.add_metadata(
            root, {"labels": [], **({"version": fmt.version} if version == "0.5" else {})}, fmt=fmt
        )
        colors = [{"label-value": 0, "rgba": [0, 0, 0, 0]}, {"label-value": 1, "rgba": [230, 25, 75, 255]}]
        properties = [{"label-value": 0, "name": "bg"}, {"label-value": 1, "name": "mito"}]
        writer.write_label_metadata(
            root, "img", colors=colors, properties=properties, fmt=fmt, source={"image": "../p"}
        )
    return {
        "image": dict(zarr.open_group(str(path / "img")).attrs),
        "parent": dict(zarr.open_group(str(path)).attrs),
    }


@pytest.mark.parametrize("version", ["0.5", "0.4"])
@pytest.mark.parametrize(
    ("channels", "label"),
    [(None, False), ([{"label": "virtual_em", "color": "FFFFFF", "window": _WINDOW}], False), (None, True)],
)
def test_metadata_equals_ome_zarr_py(
    tmp_path: Path, version: str, channels: list | None, label: bool
) -> None:
    """Image, OMERO channels, image-label and the parent's labels list: what ome-zarr-py writes, key for key."""
    from exem.data.ome import create_ome_zarr, write_image_label

    want = _ome_zarr_py_reference(tmp_path / "ref", version, channels=channels, label=label)
    root = zarr.open_group(str(tmp_path / "exem"), mode="w", zarr_format=ZARR_FORMATS[version])
    group = create_ome_zarr(
        tmp_path / "exem" / "img",
        (4, 8, 8),
        "uint8",
        (40, 8, 8),
        chunks=(4, 8, 8),
        factors=[(1, 1, 1), (1, 2, 2)],
        ngff_version=version,
        origin_nm=(0, 8, 16),
        channels=channels,
    )
    if label:
        write_image_label(group, parent=root, source_image="../p", label_names={0: "bg", 1: "mito"})
    assert json.loads(json.dumps(dict(group.attrs))) == json.loads(json.dumps(want["image"]))
    assert dict(zarr.open_group(str(tmp_path / "exem")).attrs) == want["parent"]
    key = {"0.5": {"name": "default", "configuration": {"separator": "/"}}, "0.4": None}[version]
    if key is not None:
        assert group["0"].metadata.to_dict()["chunk_key_encoding"] == key
    else:
        assert group["0"].metadata.dimension_separator == "/"


def test_writing_metadata_does_not_import_ome_zarr_py(tmp_path: Path) -> None:
    """ome-zarr-py's package imports dask, xarray and pandas (1.3 s before every run's first batch on 2 cores):
    exem writes images and label images without it."""
    import subprocess
    import sys

    code = (
        "import sys; from exem.data.ome import create_ome_zarr, write_image_label\n"
        f"g = create_ome_zarr({str(tmp_path / 'l')!r}, (4, 8, 8), 'uint32', (40, 8, 8), chunks=(4, 8, 8))\n"
        "write_image_label(g, label_names={0: 'bg', 1: 'mito'})\n"
        "print(sorted(m for m in ('ome_zarr', 'dask', 'xarray') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
