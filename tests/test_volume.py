"""open_volume / open_volumes / normalize: every source kind and every VolumeError."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from exem.data import Volume, VolumeError, normalize, open_volume
from exem.data.ome import AXES, write_ome_zarr
from exem.data.volume import open_volumes, sample_voxels

SHAPE = (6, 40, 48)


def ramp(dtype: str = "uint8", shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return (np.arange(int(np.prod(shape))) % 200).reshape(shape).astype(dtype)


def make_zarr(path: Path, data: np.ndarray, zarr_format: int = 3, chunks=None) -> Path:
    chunks = chunks or tuple(
        min(s, c) for s, c in zip(data.shape, (4, 16, 16, 16)[-data.ndim :], strict=True)
    )
    arr = zarr.create_array(
        str(path), shape=data.shape, chunks=chunks, dtype=data.dtype, zarr_format=zarr_format
    )
    arr[...] = data
    return path


SL = (slice(1, 3), slice(5, 21), slice(7, 23))


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_zarr_array_store(tmp_path: Path, zarr_format: int, dtype: str) -> None:
    data = ramp(dtype)
    vol = open_volume(make_zarr(tmp_path / "v.zarr", data, zarr_format))
    assert isinstance(vol, Volume)
    assert vol.shape == SHAPE and vol.dtype == np.dtype(dtype)
    assert vol.voxel_size_nm is None and vol.level is None
    info = np.iinfo(dtype)
    assert vol.intensity_range == (float(info.min), float(info.max))
    np.testing.assert_array_equal(vol.read(SL), data[SL])
    out = vol.read_normalized(SL)
    assert out.dtype == np.float32 and out.shape == (2, 16, 16)
    np.testing.assert_allclose(out, data[SL] / info.max, rtol=1e-6)
    assert isinstance(vol.array, zarr.Array)  # lazy


def test_ome_zarr_levels_and_voxel_size(tmp_path: Path) -> None:
    data = ramp("uint16")
    write_ome_zarr(tmp_path / "o.zarr", data, (40.0, 8.0, 8.0), chunks=(4, 16, 16), levels=2)
    v0 = open_volume(tmp_path / "o.zarr")
    v1 = open_volume(tmp_path / "o.zarr", level=1)
    assert v0.level == 0 and v0.shape == SHAPE and v0.voxel_size_nm == (40.0, 8.0, 8.0)
    assert v1.level == 1 and v1.shape == (6, 20, 24) and v1.voxel_size_nm == (40.0, 16.0, 16.0)
    # the config value overrides the metadata
    assert open_volume(tmp_path / "o.zarr", voxel_size=[30, 5, 5]).voxel_size_nm == (30.0, 5.0, 5.0)
    with pytest.raises(VolumeError, match=r"o\.zarr: OME-Zarr has 2 level\(s\); level 2 does not exist"):
        open_volume(tmp_path / "o.zarr", level=2)


def test_ome_zarr_05_micrometer_units(tmp_path: Path) -> None:
    group = zarr.open_group(str(tmp_path / "o5.zarr"), mode="w", zarr_format=3)
    arr = group.create_array("s0", shape=SHAPE, chunks=(2, 16, 16), dtype="uint8")
    arr[...] = ramp()
    scale = {"type": "scale", "scale": [0.04, 0.01, 0.01]}  # as another writer puts it, in micrometres
    ms = {"axes": copy.deepcopy(AXES), "datasets": [{"path": "s0", "coordinateTransformations": [scale]}]}
    for ax in ms["axes"]:
        ax["unit"] = "micrometer"
    group.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    vol = open_volume(tmp_path / "o5.zarr")
    assert vol.shape == SHAPE
    assert vol.voxel_size_nm == pytest.approx((40.0, 10.0, 10.0))


def test_plain_group_single_array_and_many(tmp_path: Path) -> None:
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=2)
    group.create_array("raw", shape=SHAPE, dtype="uint8")
    assert open_volume(tmp_path / "g.zarr").shape == SHAPE
    group.create_array("labels", shape=SHAPE, dtype="uint8")
    with pytest.raises(VolumeError, match=r"not an OME-Zarr and holds 2 arrays \(labels, raw\)"):
        open_volume(tmp_path / "g.zarr")
    assert open_volume(tmp_path / "g.zarr" / "raw").shape == SHAPE
    empty = zarr.open_group(str(tmp_path / "e.zarr"), mode="w")
    assert empty is not None
    with pytest.raises(VolumeError, match="holds no arrays"):
        open_volume(tmp_path / "e.zarr")


def test_tiff_memmap_and_compressed(tmp_path: Path) -> None:
    data = ramp("uint16")
    tifffile.imwrite(tmp_path / "a.tif", data)
    tifffile.imwrite(tmp_path / "b.tiff", data, compression="zlib")
    for name in ("a.tif", "b.tiff"):
        vol = open_volume(tmp_path / name, voxel_size=(40, 10, 10))
        assert vol.shape == SHAPE and vol.dtype == np.uint16 and vol.voxel_size_nm == (40.0, 10.0, 10.0)
        np.testing.assert_array_equal(vol.read(SL), data[SL])
    assert isinstance(open_volume(tmp_path / "a.tif").array, np.memmap)


def test_numpy_and_zarr_array_objects(tmp_path: Path) -> None:
    data = ramp()
    vol = open_volume(data, voxel_size=(1, 2, 3))
    assert vol.path == "<numpy array>" and vol.voxel_size_nm == (1.0, 2.0, 3.0)
    np.testing.assert_array_equal(vol.read(SL), data[SL])
    arr = zarr.open_array(str(make_zarr(tmp_path / "z.zarr", data)), mode="r")
    assert open_volume(arr).shape == SHAPE


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_singleton_channel_is_squeezed_lazily(tmp_path: Path, zarr_format: int) -> None:
    data = ramp(shape=(1, *SHAPE))
    vol = open_volume(make_zarr(tmp_path / "c.zarr", data, zarr_format))
    assert vol.shape == SHAPE and vol.array.shape == SHAPE and vol.array.dtype == np.uint8
    assert not isinstance(vol.array, np.ndarray)  # a view, nothing loaded
    np.testing.assert_array_equal(vol.read(SL), data[0][SL])
    assert open_volume(data).shape == SHAPE


def test_pickle_drops_and_reopens_the_array(tmp_path: Path) -> None:
    data = ramp(shape=(1, *SHAPE))
    vol = open_volume(make_zarr(tmp_path / "c.zarr", data))
    clone = pickle.loads(pickle.dumps(vol))
    assert clone._array is None  # reopened lazily in the receiving process
    np.testing.assert_array_equal(clone.read(SL), data[0][SL])
    assert clone.intensity_range == vol.intensity_range


def test_float_range_percentiles_and_intensity_range(tmp_path: Path) -> None:
    data = np.linspace(0, 1, int(np.prod(SHAPE)), dtype=np.float32).reshape(SHAPE)
    vol = open_volume(make_zarr(tmp_path / "f.zarr", data, 2))
    assert vol.intensity_range == (0.0, 1.0)
    np.testing.assert_allclose(vol.read_normalized(SL), data[SL])
    big = make_zarr(tmp_path / "big.zarr", data * 1000 - 10)
    with pytest.raises(
        VolumeError, match=r"big\.zarr: float data outside \[0, 1\].*set an intensity range or perc"
    ):
        open_volume(big)
    lo, hi = open_volume(big, percentiles=(1, 99)).intensity_range
    assert -10 < lo < hi < 990
    assert open_volume(big, intensity_range=(-10, 990)).intensity_range == (-10.0, 990.0)
    ints = open_volume(ramp("uint16"), percentiles=[0, 100])
    assert ints.intensity_range == (0.0, 199.0)


def test_sample_is_bounded() -> None:
    class Counting:
        shape = (64, 512, 512)
        dtype = np.dtype("uint8")
        chunks = (8, 64, 64)
        read = 0

        def __getitem__(self, key):
            out = np.zeros(tuple(s.stop - s.start for s in key), np.uint8)
            Counting.read += out.size
            return out

    sample = sample_voxels(Counting())
    assert sample.size == Counting.read <= 32 * 8 * 64 * 64 < 64 * 512 * 512 // 4


@pytest.mark.parametrize(
    ("bright", "warns"),
    [
        (0.0, True),  # 12-bit data in uint16
        (0.0005, True),  # a few bright outliers leave the 99.9th percentile low (the full percentile path)
        (0.01, False),  # 1 % bright: the 99.9th percentile is high (the one-count shortcut)
        (1.0, False),  # the whole range used
    ],
)
def test_narrow_range_warning(bright: float, warns: bool, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(5)
    data = rng.integers(0, 4096, (32, 64, 64)).astype(np.uint16)
    hit = rng.random(data.shape) < bright
    data[hit] = rng.integers(40000, 65536, int(hit.sum()))
    with caplog.at_level("WARNING", logger="exem.data.volume"):
        open_volume(data)
    assert ("normalised patches will be dark" in caplog.text) is warns


def test_normalize() -> None:
    x = np.array([-5, 0, 50, 100, 200], dtype=np.int16)
    y = normalize(x, 0, 100)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(normalize(np.array([10.0, 30.0]), 10, 30), [0, 1])
    with pytest.raises(ValueError, match="hi > lo"):
        normalize(x, 1, 1)


def test_folder_of_volumes(tmp_path: Path) -> None:
    folder = tmp_path / "vols"
    folder.mkdir()
    make_zarr(folder / "b.zarr", ramp())
    make_zarr(folder / "a.zarr", ramp("uint16"), 2)
    (folder / "notes.txt").write_text("ignored")
    vols = open_volumes(folder)
    assert [Path(v.path).name for v in vols] == ["a.zarr", "b.zarr"]
    assert len(open_volumes([folder / "a.zarr", str(folder / "b.zarr")])) == 2
    assert len(open_volumes(folder / "a.zarr")) == 1
    with pytest.raises(VolumeError, match="folder of 2 volumes"):
        open_volume(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeError, match=r"empty is not a Zarr store and holds no \*\.zarr volumes"):
        open_volumes(tmp_path / "empty")
    with pytest.raises(VolumeError, match="no volume paths"):
        open_volumes([])


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_errors_path(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match=r"missing\.zarr: no such file or directory") as e:
        open_volume(tmp_path / "missing.zarr")
    _one_line(e)
    (tmp_path / "x.npy").write_bytes(b"123")
    with pytest.raises(VolumeError, match=r"x\.npy is a file, not a Zarr store"):
        open_volume(tmp_path / "x.npy")
    bad = tmp_path / "bad.zarr"
    bad.mkdir()
    (bad / "zarr.json").write_text("{not json")
    with pytest.raises(VolumeError, match=r"bad\.zarr: unreadable Zarr metadata") as e:
        open_volume(bad)
    _one_line(e)
    bad2 = tmp_path / "bad2.zarr"
    bad2.mkdir()
    (bad2 / ".zarray").write_text('{"foo": 1}')
    with pytest.raises(VolumeError, match=r"bad2\.zarr: unreadable Zarr metadata"):
        open_volume(bad2)
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    with pytest.raises(VolumeError, match=r"bad\.tif: unreadable TIFF"):
        open_volume(tmp_path / "bad.tif")
    with pytest.raises(VolumeError, match="level 1 requested but this is a single Zarr array"):
        open_volume(make_zarr(tmp_path / "v.zarr", ramp()), level=1)


def test_errors_content(tmp_path: Path) -> None:
    with pytest.raises(
        VolumeError, match=r"expected a 3D .* got shape \(40, 48\); store a 2D image as \(1, Y, X\)"
    ):
        open_volume(make_zarr(tmp_path / "2d.zarr", ramp(shape=(40, 48))))
    with pytest.raises(
        VolumeError, match=r"4D array of shape \(2, 6, 40, 48\); if the first axis holds channels"
    ):
        open_volume(ramp(shape=(2, *SHAPE)))
    for dtype in ("bool", "complex64"):
        with pytest.raises(VolumeError, match=f"dtype {np.dtype(dtype)} is not numeric"):
            open_volume(make_zarr(tmp_path / f"{dtype}.zarr", np.zeros(SHAPE, dtype)))
    with pytest.raises(VolumeError, match="is not numeric"):
        open_volume(np.full(SHAPE, "a"))
    with pytest.raises(VolumeError, match=r"volume is empty \(shape 6×0×48\)"):
        open_volume(make_zarr(tmp_path / "empty.zarr", np.zeros((6, 0, 48), np.uint8), chunks=(4, 1, 16)))
    with pytest.raises(VolumeError, match=r"voxel size must be positive, got \[40\.0, 0\.0, 10\.0\] nm"):
        open_volume(ramp(), voxel_size=(40, 0, 10))
    with pytest.raises(VolumeError, match="voxel size must be 3 numbers"):
        open_volume(ramp(), voxel_size=(40, 10))
    write_ome_zarr(tmp_path / "neg.zarr", ramp(), (40.0, -8.0, 8.0), chunks=(4, 16, 16), levels=1)
    with pytest.raises(VolumeError, match=r"neg\.zarr: OME-Zarr voxel size \(scale\) must be positive"):
        open_volume(tmp_path / "neg.zarr")
    with pytest.raises(VolumeError, match=r"intensity range \[5, 5\] must have hi > lo"):
        open_volume(ramp(), intensity_range=(5, 5))
    with pytest.raises(VolumeError, match="percentiles .* must satisfy"):
        open_volume(ramp(), percentiles=(50, 10))
    with pytest.raises(VolumeError, match="intensity range collapses"):
        open_volume(np.full(SHAPE, 7, np.uint8), percentiles=(1, 99))


def test_nan_and_inf(tmp_path: Path) -> None:
    data = np.full(SHAPE, 0.5, np.float32)
    data[2, 3, 4] = np.nan
    with pytest.raises(VolumeError, match=r"n\.zarr: float data contain NaN or Inf"):
        open_volume(make_zarr(tmp_path / "n.zarr", data))
    data[2, 3, 4] = np.inf
    with pytest.raises(VolumeError, match="NaN or Inf"):
        open_volume(data, intensity_range=(0, 1))
    # NaN that appears where the open-time sample did not look is caught on read, naming the patch
    clean = np.full(SHAPE, 0.5, np.float32)
    vol = open_volume(clean)
    clean[3, 20, 30] = np.nan
    vol.read_normalized((slice(0, 2), slice(0, 8), slice(0, 8)))  # clean patch reads fine
    with pytest.raises(
        VolumeError, match=r"<numpy array>: non-finite .* patch starting at \(z, y, x\) = \(2, 16, 16\)"
    ):
        vol.read_normalized((slice(2, 4), slice(16, 32), slice(16, 32)))
