"""exem-measure: per-object measurements, blockwise, against skimage's regionprops; files, metadata, bad input."""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import zarr
from omegaconf import OmegaConf
from scipy import ndimage as ndi
from skimage.measure import regionprops_table

import exem.analysis.measure as measure_module
from exem.analysis.measure import BASE_COLUMNS, default_names, measure_objects
from exem.data.ome import create_group, write_image_label, write_ome_zarr
from exem.data.volume import VolumeError
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
VOXEL = (40.0, 10.0, 10.0)
REL = 1e-9


def _blobs(shape=(17, 40, 36), n=120, seed=0) -> np.ndarray:
    """Voronoi cells of random seeds with sparse, non-consecutive ids, a third of the voxels background (so some
    ids fall apart into several pieces)."""
    rng = np.random.default_rng(seed)
    seeds = np.zeros(shape, np.int64)
    ids = np.sort(rng.choice(10**6, n, replace=False)) + 1
    seeds[tuple(rng.integers(0, s, n) for s in shape)] = ids
    _, nearest = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    lab = seeds[tuple(nearest)]
    background = ndi.gaussian_filter(rng.random(shape), 1.2)
    lab[background < np.quantile(background, 1 / 3)] = 0
    return lab.astype(np.uint32)


def _zarr(path: Path, data: np.ndarray, chunks=(5, 16, 16)) -> Path:
    arr = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=chunks)
    arr[...] = data
    return path


def _isum(mask: np.ndarray, intensity: np.ndarray) -> np.ndarray:
    return intensity[mask].sum(axis=0)


def _regionprops(lab: np.ndarray, images: list[np.ndarray]) -> dict:
    return regionprops_table(
        lab,
        intensity_image=np.stack([i.astype(np.float64) for i in images], axis=-1),
        properties=("label", "area", "centroid", "bbox", "intensity_mean", "intensity_max"),
        extra_properties=(_isum,),
    )


def _assert_matches(cols: dict, ref: dict, names: list[str], offset=(0, 0, 0)) -> None:
    np.testing.assert_array_equal(cols["label"], ref["label"])
    np.testing.assert_array_equal(cols["voxels"], ref["area"])
    for ax, a in enumerate("zyx"):
        np.testing.assert_allclose(cols[f"centroid_{a}"], ref[f"centroid-{ax}"] + offset[ax], rtol=REL)
        np.testing.assert_array_equal(cols[f"bbox_{a}0"], ref[f"bbox-{ax}"] + offset[ax])
        np.testing.assert_array_equal(cols[f"bbox_{a}1"], ref[f"bbox-{ax + 3}"] + offset[ax])
    for i, name in enumerate(names):
        np.testing.assert_allclose(cols[f"{name}_mean"], ref[f"intensity_mean-{i}"], rtol=REL)
        np.testing.assert_allclose(cols[f"{name}_max"], ref[f"intensity_max-{i}"], rtol=REL)
        np.testing.assert_allclose(cols[f"{name}_sum"], ref[f"_isum-{i}"], rtol=REL)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("measure")
    rng = np.random.default_rng(1)
    lab = _blobs()
    a = rng.random(lab.shape) * 3.0  # float64, outside [0, 1]: raw units
    b = rng.integers(0, 4000, lab.shape).astype(np.uint16)
    paths = {
        "labels": write_ome_zarr(tmp / "labels.ome.zarr", lab, VOXEL, chunks=(5, 16, 16), labels=True),
        "a": _zarr(tmp / "antibody.zarr", a),
        "b": write_ome_zarr(tmp / "virtual_em.ome.zarr", b, VOXEL, chunks=(5, 16, 16)),
    }
    return tmp, lab, [a, b], paths


def test_equals_regionprops_across_many_blocks(world) -> None:
    tmp, lab, images, paths = world
    ref = _regionprops(lab, images)
    res = measure_objects(
        paths["labels"], [paths["a"], paths["b"]], block_shape=(3, 7, 5), expansion_factor=4.0, progress=False
    )
    assert res.names == ("antibody", "virtual_em")  # the file stems
    assert list(res.columns) == [
        *BASE_COLUMNS,
        *(f"{n}_{c}" for n in res.names for c in ("mean", "max", "sum")),
    ]
    _assert_matches(res.columns, ref, list(res.names))
    voxel_um3 = np.prod(np.array(VOXEL) / 4.0) * 1e-9  # pre-expansion frame
    np.testing.assert_allclose(res.columns["volume_um3"], ref["area"] * voxel_um3, rtol=REL)
    assert res.columns["virtual_em_max"].dtype == np.uint16  # an integer image's maximum stays an integer
    one = measure_objects(
        lab, images, names=["antibody", "virtual_em"], block_shape=lab.shape, progress=False
    )
    for key in ("label", "voxels", "bbox_x1", "centroid_y", "antibody_sum", "touches_border"):
        np.testing.assert_allclose(one.columns[key], res.columns[key], rtol=1e-12)
    assert np.isnan(one.columns["volume_um3"]).all()  # an array has no voxel size


def test_partial_tables_merge_exactly(world, monkeypatch: pytest.MonkeyPatch) -> None:
    _, lab, images, _ = world
    monkeypatch.setattr(measure_module, "MERGE_ROWS", 3)  # merge after (almost) every block
    res = measure_objects(lab, images, names=["a", "b"], block_shape=(2, 5, 40), progress=False)
    _assert_matches(res.columns, _regionprops(lab, images), ["a", "b"])


def test_roi_and_touches_border(world) -> None:
    _, lab, images, _ = world
    roi = (1, 16, 2, 38, 1, 35)
    sl = tuple(slice(roi[2 * ax], roi[2 * ax + 1]) for ax in range(3))
    res = measure_objects(lab, images, names=["a", "b"], roi=roi, block_shape=(4, 8, 8), progress=False)
    ref = _regionprops(lab[sl], [i[sl] for i in images])
    _assert_matches(res.columns, ref, ["a", "b"], offset=(roi[0], roi[2], roi[4]))
    crop = lab[sl]
    faces = np.concatenate([np.take(crop, i, axis=ax).ravel() for ax in range(3) for i in (0, -1)])
    np.testing.assert_array_equal(res.columns["touches_border"], np.isin(res.columns["label"], faces))
    assert 0 < res.columns["touches_border"].sum() < res.num_objects


def test_large_sparse_ids_and_no_objects() -> None:
    lab = np.zeros((4, 6, 6), np.uint64)
    lab[1:3, 1:3, 1:4] = 2**62 + 5
    lab[0, 0, 0] = 2**40
    res = measure_objects(lab, voxel_size=(1, 1, 1), progress=False)
    assert res.columns["label"].dtype == np.uint64
    assert res.columns["label"].tolist() == [2**40, 2**62 + 5]
    assert res.columns["voxels"].tolist() == [1, 12]
    assert res.columns["touches_border"].tolist() == [True, False]
    empty = measure_objects(np.zeros((3, 4, 5), np.uint8), [np.ones((3, 4, 5))], progress=False)
    assert (
        empty.num_objects == 0 and "0 objects" in empty.summary() and "median volume n/a" in empty.summary()
    )


def test_files_summary_and_thresholds(world, tmp_path: Path) -> None:
    _, lab, images, paths = world
    out = tmp_path / "out"
    res = measure_objects(
        paths["labels"],
        [paths["a"], paths["b"]],
        out,
        names=["antibody", "vem"],
        expansion_factor=4,
        positive_threshold={"antibody": 1.5},
        progress=False,
    )
    assert (
        res.csv == out / "objects.csv"
        and res.parquet == out / "objects.parquet"
        and res.png == out / "measure.png"
    )
    assert res.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = res.csv.read_text().splitlines()[0].split(",")
    assert header == [*BASE_COLUMNS, "antibody_mean", "antibody_max", "antibody_sum", "antibody_positive",
                      "vem_mean", "vem_max", "vem_sum"]  # fmt: skip
    table = pq.read_table(res.parquet)
    assert table.column_names == header
    from_csv = pa_csv.read_csv(res.csv)
    for name in header:
        np.testing.assert_array_equal(table[name].to_numpy(), res.columns[name])
        np.testing.assert_array_equal(from_csv[name].to_numpy(), res.columns[name])  # CSV floats round-trip
    positive = res.columns["antibody_mean"] > 1.5
    np.testing.assert_array_equal(res.columns["antibody_positive"], positive)
    line = res.summary()
    assert "\n" not in line and f"{res.num_objects} objects" in line
    assert f"antibody positive {100 * positive.mean():.1f} %" in line and "median volume" in line
    assert b"exem" in table.schema.metadata
    with pytest.raises(FileExistsError, match="overwrite=true"):
        measure_objects(paths["labels"], out=out, progress=False)
    assert (
        measure_objects(paths["labels"], out=out, overwrite=True, progress=False).num_objects
        == res.num_objects
    )


def _segmentation(path: Path, lab: np.ndarray, attrs: dict | None = None) -> Path:
    """A folder laid out as exem-segment writes it: a root group listing the label image ``labels``."""
    root = create_group(path)
    if attrs:
        root.attrs.update(attrs)
    write_ome_zarr(path / "labels", lab, VOXEL, chunks=(5, 16, 16), labels=True)
    write_image_label(
        zarr.open_group(str(path / "labels"), mode="r+"), parent=zarr.open_group(str(path), mode="r+")
    )
    return path


def test_segmentation_folder_and_recorded_expansion(world, tmp_path: Path, caplog) -> None:
    _, lab, _, paths = world
    voxels = _regionprops(lab, [lab])["area"]
    seg = _segmentation(tmp_path / "seg.zarr", lab, {"exem": {"expansion_factor": 4.0}})
    res = measure_objects(seg, progress=False)
    assert res.expansion_factor == 4.0
    np.testing.assert_allclose(
        res.columns["volume_um3"], voxels * np.prod(np.array(VOXEL) / 4) * 1e-9, rtol=REL
    )
    top = write_ome_zarr(
        tmp_path / "top.ome.zarr", lab, VOXEL, labels=True, attributes={"expansion_factor": 2.5}
    )
    assert measure_objects(top, progress=False).expansion_factor == 2.5
    assert measure_objects(top, expansion_factor=5, progress=False).expansion_factor == 5.0  # given wins
    with caplog.at_level(logging.WARNING, logger="exem.analysis.measure"):
        plain = measure_objects(paths["labels"], progress=False)
    assert plain.expansion_factor == 1.0 and "expanded frame" in caplog.text
    np.testing.assert_allclose(plain.columns["volume_um3"], voxels * np.prod(VOXEL) * 1e-9, rtol=REL)


def test_one_channel_of_a_multichannel_image(world) -> None:
    _, lab, images, _ = world
    stack = np.stack([images[1], images[0]])  # (C, Z, Y, X)
    res = measure_objects(
        lab, [stack, images[1]], channels=[1, None], block_shape=(5, 16, 16), progress=False
    )
    assert res.names == ("image1_c1", "image2")
    _assert_matches(res.columns, _regionprops(lab, [images[0], images[1]]), list(res.names))


def test_default_names() -> None:
    assert default_names(["a/antibody.ome.zarr", "virtual-em.zarr/", Path("x/2nd.tif"), np.zeros(1)]) == [
        "antibody", "virtual_em", "image_2nd", "image4",
    ]  # fmt: skip
    names = default_names(["s.ome.zarr", "s.ome.zarr", "s.ome.zarr"], ["Alexa 488", 2, None])
    assert names == ["Alexa_488", "s_c2", "s"]


def _bad(world, tmp: Path) -> dict:
    _, lab, images, paths = world
    rng = np.random.default_rng(2)
    return {
        "float labels": (
            dict(labels=_zarr(tmp / "f.zarr", rng.random(lab.shape))),
            "is not an integer dtype",
        ),
        "shapes differ": (
            dict(labels=paths["labels"], images=[_zarr(tmp / "s.zarr", images[0][:, :20])]),
            "has shape 17×20×36 but the labels",
        ),
        "voxel sizes differ": (
            dict(
                labels=paths["labels"],
                images=[write_ome_zarr(tmp / "v.ome.zarr", images[1], (40.0, 20.0, 20.0))],
            ),
            re.escape("has voxel size [40.0, 20.0, 20.0] nm but the labels have [40.0, 10.0, 10.0] nm"),
        ),
        "expansion ≤ 0": (
            dict(labels=paths["labels"], expansion_factor=0),
            "expansion_factor must be a number > 0",
        ),
        "names count": (
            dict(labels=paths["labels"], images=[paths["a"]], names=["a", "b"]),
            r"names has 2 entries \(a, b\) but 1 image\(s\) are given",
        ),
        "names repeated": (
            dict(labels=paths["labels"], images=[paths["a"], paths["a"]]),
            "names must be unique, 'antibody' is given more than once",
        ),
        "name not an identifier": (
            dict(labels=paths["labels"], images=[paths["a"]], names=["anti-body"]),
            "names must be identifiers",
        ),
        "threshold of no image": (
            dict(labels=paths["labels"], images=[paths["a"]], positive_threshold={"ab": 1}),
            r"positive_threshold names 'ab', which is not an image's name \(antibody\)",
        ),
        "negative ids": (dict(labels=-np.ones((2, 3, 3), np.int16)), "negative ids"),
        "no such channel": (
            dict(labels=lab, images=[np.stack(images)], channels=[2]),
            "no channel 2; channels are 0: c0, 1: c1",
        ),
        "channels not chosen": (
            dict(labels=lab, images=[np.stack(images)]),
            r"choose one with channels=\[…\] \(one entry per image\)",
        ),
        "channels count": (dict(labels=lab, images=[images[0]], channels=[0, 1]), "channels has 2 entries"),
        "bad roi": (
            dict(labels=paths["labels"], roi=[0, 99, 0, 5, 0, 5]),
            "ROI z 0:99 is outside the volume",
        ),
    }


def test_bad_inputs_write_nothing(world, tmp_path: Path) -> None:
    for what, (kwargs, message) in _bad(world, tmp_path).items():
        out = tmp_path / f"out_{what.replace(' ', '_')}"
        with pytest.raises((ValueError, VolumeError), match=message):
            measure_objects(out=out, progress=False, **kwargs)
        assert not out.exists(), what


def test_cli(world, tmp_path: Path) -> None:
    _, lab, _, paths = world
    seg = _segmentation(tmp_path / "seg.zarr", lab)
    ok = run_cli(
        "exem-measure", f"labels={seg}", f"images=[{paths['a']},{paths['b']}]", "out=res", "expansion_factor=4.0",
        "names=[antibody,vem]", "positive_threshold={antibody: 1.5}", "block_shape=[4,16,16]", cwd=tmp_path,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "wrote " not in ok.stdout  # the library's record of the files: the summary names them
    summary = ok.stdout.strip().splitlines()[-1]
    assert (
        summary.startswith("exem-measure: ")
        and "antibody positive" in summary
        and "objects.parquet" in summary
    )
    assert pq.read_table(tmp_path / "res" / "objects.parquet").num_rows == int(summary.split()[1])
    float_labels = _zarr(tmp_path / "float.zarr", np.random.default_rng(0).random(lab.shape))
    for args, message in (
        ([f"labels={float_labels}", "out=bad1"], "dtype float64 is not an integer dtype"),
        ([f"labels={seg}", f"images=[{paths['a']}]", "names=[a,b]", "out=bad2"], "names has 2 entries"),
    ):
        bad = run_cli("exem-measure", *args, cwd=tmp_path)
        lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
        assert bad.returncode == 1 and lines[-1].startswith("exem-measure: error: ") and message in lines[-1]
        assert "Traceback" not in bad.stderr and not (tmp_path / args[-1][4:]).exists()


def test_config_names_the_function_with_its_defaults() -> None:
    cfg = OmegaConf.load(ROOT / "conf" / "measure.yaml")
    node = cfg["measure"]
    assert node["_target_"] == "exem.analysis.measure.measure_objects"
    params = inspect.signature(measure_objects).parameters
    keys = [k for k in node if not k.startswith("_")]
    assert set(keys) <= set(params)
    for key in keys:
        default = params[key].default
        if OmegaConf.is_missing(cfg, key):  # mandatory on the command line (labels, out)
            continue
        value = OmegaConf.to_container(cfg, resolve=False)[key]
        assert value == (list(default) if isinstance(default, tuple) else default), key
