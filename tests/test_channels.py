"""Multi-channel volumes: the pan-protein channel of an ExM sample with antibody channels, by index or name."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

from exem.data.errors import channel_option
from exem.data.volume import VolumeError, open_volume

PAN, ANTIBODY = 0, 1
TRANSLATE = {"patch": (4, 16, 16), "progress": False, "intensity_range": (0, 4000)}


def _generator() -> torch.nn.Module:
    from exem.models import AnisotropicUNet3D

    torch.manual_seed(0)
    return AnisotropicUNet3D(widths=(2, 4)).eval()


@pytest.fixture
def two_channels() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([rng.integers(0, 4000, (6, 32, 32)), rng.integers(0, 200, (6, 32, 32))]).astype(np.uint16)


def _ome(path: Path, data: np.ndarray, names: list[str]) -> Path:
    """A (c, z, y, x) OME-Zarr 0.5 written by ome-zarr-py, with omero channel labels, voxel 40×10×10 nm."""
    from ome_zarr.writer import add_metadata, write_image

    group = zarr.open_group(str(path), mode="w")
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"
    ]
    write_image(data, group, axes=axes, scaler=None)
    ome = dict(group.attrs["ome"])
    ome["multiscales"][0]["datasets"] = [
        {
            "path": d["path"],
            "coordinateTransformations": [{"type": "scale", "scale": [1.0, 40.0, 10.0, 10.0]}],
        }
        for d in ome["multiscales"][0]["datasets"][:1]
    ]
    group.attrs["ome"] = ome
    add_metadata(group, {"omero": {"channels": [{"label": n, "color": "FFFFFF"} for n in names]}})
    return path


def test_ome_zarr_channel_by_name_and_index(tmp_path: Path, two_channels: np.ndarray) -> None:
    path = _ome(tmp_path / "sample.ome.zarr", two_channels, ["nhs_ester", "antibody"])
    by_name = open_volume(path, channel="antibody")
    by_index = open_volume(path, channel=1)
    assert by_name.shape == (6, 32, 32) and by_name.voxel_size_nm == (40.0, 10.0, 10.0)
    assert by_name.channel == by_index.channel == ANTIBODY and by_name.channel_names == (
        "nhs_ester",
        "antibody",
    )
    box = (slice(1, 3), slice(4, 9), slice(0, 32))
    assert np.array_equal(by_name.read(box), two_channels[ANTIBODY][box])
    again = pickle.loads(
        pickle.dumps(open_volume(path, channel="nhs_ester"))
    )  # a DataLoader worker reopens it
    assert np.array_equal(again.read(box), two_channels[PAN][box])


def test_channel_errors_are_one_line(tmp_path: Path, two_channels: np.ndarray) -> None:
    path = _ome(tmp_path / "sample.ome.zarr", two_channels, ["nhs_ester", "antibody"])
    with pytest.raises(
        VolumeError, match=r"got 2 channels \(0: nhs_ester, 1: antibody\); .* channel="
    ) as err:
        open_volume(path)
    assert "\n" not in str(err.value) and str(err.value).endswith("choose one with channel=<index or name>")
    # raised in a DataLoader worker, it comes back through pickle with the same line
    assert str(pickle.loads(pickle.dumps(err.value))) == str(err.value)
    with pytest.raises(VolumeError) as renamed, channel_option("input_channel=<index or name>"):
        open_volume(path)
    assert str(renamed.value) == str(err.value).replace("with channel=", "with input_channel=")
    with pytest.raises(VolumeError, match="no channel 'tubulin'; channels are 0: nhs_ester, 1: antibody"):
        open_volume(path, channel="tubulin")
    with pytest.raises(VolumeError, match="no channel 2"):
        open_volume(path, channel=2)
    single = zarr.create_array(str(tmp_path / "one.zarr"), shape=(4, 8, 8), dtype="uint8", chunks=(4, 8, 8))
    single[:] = 1
    assert (
        open_volume(tmp_path / "one.zarr", channel=0).channel is None
    )  # channel 0 of a single-channel volume
    with pytest.raises(VolumeError, match="channel 1 asked, but the volume has no channel axis"):
        open_volume(tmp_path / "one.zarr", channel=1)


def test_czyx_tiff_and_zarr_v3_dimension_names(tmp_path: Path, two_channels: np.ndarray) -> None:
    tifffile.imwrite(tmp_path / "s.tif", two_channels, metadata={"axes": "CZYX"})
    z = zarr.create_array(
        str(tmp_path / "s.zarr"), shape=two_channels.shape, dtype="uint16", chunks=(1, 6, 32, 32),
        dimension_names=["c", "z", "y", "x"],
    )  # fmt: skip
    z[:] = two_channels
    plain = zarr.create_array(str(tmp_path / "plain.zarr"), shape=two_channels.shape, dtype="uint16")
    plain[:] = two_channels
    for path in (
        "s.tif",
        "s.zarr",
        "plain.zarr",
    ):  # plain 4D: the caller declares the axis by naming a channel
        vol = open_volume(tmp_path / path, channel=1)
        assert vol.channel_names == ("c0", "c1") and np.array_equal(
            vol.read((slice(None),) * 3), two_channels[1]
        )
    with pytest.raises(VolumeError, match="got 2 channels"):
        open_volume(tmp_path / "s.tif")
    with pytest.raises(VolumeError, match="a 4D array of shape"):
        open_volume(tmp_path / "plain.zarr")


def test_translate_and_training_data_take_the_pan_protein_channel(
    tmp_path: Path, two_channels: np.ndarray
) -> None:
    from exem.data.datamodule import ExEMDataModule
    from exem.inference.translate import translate_volume

    path = _ome(tmp_path / "sample.ome.zarr", two_channels, ["nhs_ester", "antibody"])
    net = _generator()
    kwargs = {**TRANSLATE, "dtype": "float32"}
    by_channel = translate_volume(net, path, tmp_path / "a.ome.zarr", channel="nhs_ester", **kwargs)
    single = tmp_path / "pan.zarr"
    zarr.create_array(str(single), data=two_channels[PAN], chunks=(6, 32, 32))
    plain = translate_volume(net, single, tmp_path / "b.ome.zarr", **kwargs)
    a = zarr.open_group(str(by_channel.output), mode="r")["0"][0]  # channel 0: the virtual EM
    b = zarr.open_group(str(plain.output), mode="r")["0"][:]
    assert np.array_equal(a, b)

    dm = ExEMDataModule(
        lm={"path": str(path), "channel": "nhs_ester"}, em={"path": str(single)}, patch_size=(4, 16, 16),
        num_workers=0, val_patches=1, samples_per_epoch=2,
    )  # fmt: skip
    dm.setup("fit")
    assert dm.lm_volumes[0].channel == PAN


def test_translation_writes_the_other_channels_beside_the_virtual_em(
    tmp_path: Path, two_channels: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    from exem.data.ome import ome_attributes
    from exem.inference.output import read_record, update_record
    from exem.inference.translate import translate_volume

    path = _ome(tmp_path / "sample.ome.zarr", two_channels, ["nhs_ester", "antibody"])
    net = _generator()
    kwargs = {
        "patch": (4, 16, 16),
        "progress": False,
        "intensity_range": (0, 4000),
        "block_shape": (6, 16, 16),
    }
    out = tmp_path / "multi.ome.zarr"
    translate_volume(net, path, out, channel="nhs_ester", chunks=(6, 16, 16), **kwargs)
    alone = translate_volume(
        net, path, tmp_path / "alone.ome.zarr", channel=0, other_channels=False, **kwargs
    )
    group = zarr.open_group(str(out), mode="r")
    level0, level1 = group["0"], group["1"]
    assert level0.shape == (2, 6, 32, 32) and level0.dtype == np.uint16  # uint8 virtual EM + uint16 antibody
    assert level1.shape == (2, 6, 16, 16)
    virtual = zarr.open_group(str(alone.output), mode="r")
    # the uint8 virtual EM keeps its values in the uint16 store (EM models with a fixed [0, 255] read it as usual)
    assert np.array_equal(level0[0], virtual["0"][:]) and np.array_equal(level1[0], virtual["1"][:])
    assert np.array_equal(level0[1], two_channels[ANTIBODY])  # raw units, the input's grid
    from exem.data.ome import downsample_inplane

    assert np.array_equal(level1[1], downsample_inplane(two_channels[ANTIBODY]))
    meta = ome_attributes(group)
    assert [c["label"] for c in meta["omero"]["channels"]] == ["virtual_em", "antibody"]
    assert [a["name"] for a in meta["multiscales"][0]["axes"]] == ["c", "z", "y", "x"]
    reopened = open_volume(out, channel="antibody")
    assert reopened.voxel_size_nm == (40.0, 10.0, 10.0) and reopened.channel_names == (
        "virtual_em",
        "antibody",
    )
    # the virtual EM opens with its own uint8 range, not the store's uint16 one (no "data use only 0.4 %" warning)
    caplog.clear()
    with caplog.at_level("WARNING", logger="exem.data.volume"):
        assert open_volume(out, channel="virtual_em").intensity_range == (0.0, 255.0)
    assert "normalised patches will be dark" not in caplog.text
    assert reopened.intensity_range == (0.0, 65535.0)  # the antibody: its store's (and input's) dtype

    # killed after the virtual EM, before the antibody: the rerun writes the antibody (and only that)
    zarr.open_group(str(out), mode="r+")["0"][1] = 0
    update_record(out, channels_written=False)
    again = translate_volume(
        net, path, out, channel="nhs_ester", chunks=(6, 16, 16), complete_ok=True, **kwargs
    )
    assert again.blocks_done == 0 and read_record(out)["channels_written"]
    assert np.array_equal(zarr.open_group(str(out), mode="r")["0"][1], two_channels[ANTIBODY])


def test_segmentation_reads_the_virtual_em_channel_of_a_multichannel_translation(
    tmp_path: Path, two_channels: np.ndarray
) -> None:
    from exem.analysis.segment import segment_volume
    from exem.inference.translate import translate_volume

    path = _ome(tmp_path / "sample.ome.zarr", two_channels, ["nhs_ester", "antibody"])
    net = _generator()
    kwargs = dict(TRANSLATE)
    multi = translate_volume(net, path, tmp_path / "multi.ome.zarr", channel=0, **kwargs).output
    alone = translate_volume(
        net, path, tmp_path / "alone.ome.zarr", channel=0, other_channels=False, **kwargs
    ).output
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 1, 3, padding=1), torch.nn.Sigmoid()).eval()
    opts = {"patch": (4, 16, 16), "dtype": "float32", "progress": False}
    a = segment_volume(
        model, multi, tmp_path / "seg_multi", **opts
    )  # its virtual_em channel, its uint8 range
    b = segment_volume(model, alone, tmp_path / "seg_alone", **opts)
    fixed = segment_volume(
        model, multi, tmp_path / "seg_fixed", normalize=(0, 255), **opts
    )  # an EM sidecar's range
    pf = zarr.open_group(str(fixed.probabilities), mode="r")["0"][:]
    pa = zarr.open_group(str(a.probabilities), mode="r")["0"][:]
    pb = zarr.open_group(str(b.probabilities), mode="r")["0"][:]
    assert np.abs(pa - pb).max() < 1e-5 and a.num_objects == b.num_objects
    assert np.abs(pf - pb).max() < 1e-5
    # a multi-channel input without a virtual_em channel: the hint names exem-segment's option, not its channel=
    # (the model's output channel)
    with pytest.raises(VolumeError, match=r"choose one with input_channel=<index or name>$"):
        segment_volume(model, path, tmp_path / "seg_raw", **opts)
    assert not (tmp_path / "seg_raw").exists()


def test_other_channels_follow_the_translation_onto_the_models_grid(
    tmp_path: Path, two_channels: np.ndarray
) -> None:
    """output_scale=model: the virtual EM is at the generator's voxel size, and the antibody is resampled with it."""
    from exem.data.resample import resample_volume
    from exem.inference.translate import translate_volume
    from exem.trained import TrainedGenerator

    path = _ome(tmp_path / "sample.ome.zarr", two_channels, ["nhs_ester", "antibody"])
    generator = TrainedGenerator(network=_generator(), voxel_size_nm=(40.0, 20.0, 20.0))
    out = translate_volume(
        generator,
        path,
        tmp_path / "model_grid.ome.zarr",
        channel="nhs_ester",
        output_scale="model",
        **TRANSLATE,
    ).output
    level0 = zarr.open_group(str(out), mode="r")["0"]
    assert level0.shape == (2, 6, 16, 16) and level0.dtype == np.float32  # resampled values are float32
    expected = resample_volume(open_volume(path, channel="antibody"), (40.0, 20.0, 20.0)).read(
        (slice(None),) * 3
    )
    assert np.allclose(level0[1], expected)
    assert open_volume(out, channel="antibody", intensity_range=(0, 4000)).voxel_size_nm == (40.0, 20.0, 20.0)

    # the uint8 virtual EM in that float32 store reads 0…255 (its recorded range), not as floats outside [0, 1]
    from exem.analysis.segment import segment_volume

    for channel in (0, "virtual_em"):
        assert open_volume(out, channel=channel).intensity_range == (0.0, 255.0)
    assert open_volume(out, channel=0, intensity_range=(0, 1000)).intensity_range == (0.0, 1000.0)  # as asked
    with pytest.raises(VolumeError, match="float data outside"):  # the antibody has no recorded range
        open_volume(out, channel="antibody")
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 1, 1), torch.nn.Sigmoid()).eval()
    seg = segment_volume(model, out, tmp_path / "seg", patch=(4, 16, 16), dtype="float32", progress=False)
    assert seg.shape == (6, 16, 16)


DDP_SCRIPT = """
import json, sys

import lightning as L
import torch

import exem.inference.companions as companions
from exem.inference.translate import translate_volume
from exem.models import AnisotropicUNet3D

if __name__ == "__main__":
    src, dst, kw = sys.argv[1:4]
    torch.manual_seed(0)
    net = AnisotropicUNet3D(widths=(2, 4)).eval()
    copied = []
    real = companions.write_companions

    def spy(volume, others, plan, *args, blocks=None, **kwargs):
        copied.extend(b.index for b in (plan.blocks if blocks is None else blocks))
        return real(volume, others, plan, *args, blocks=blocks, **kwargs)

    companions.write_companions = spy
    trainer = L.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    translate_volume(net, src, dst, trainer=trainer, **json.loads(kw))
    with open(f"{dst}.rank{trainer.global_rank}.json", "w") as f:
        json.dump(copied, f)
"""


def test_ranks_share_the_copy_of_the_other_channels(tmp_path: Path, two_channels: np.ndarray) -> None:
    """Under DDP every rank copies its share of the blocks (rank 0 alone used to copy them all while the others
    waited, e.g. for the reliability map's first barrier); the output equals a single process's."""
    import json
    import os
    import subprocess
    import sys

    from exem.inference.output import read_record
    from exem.inference.translate import translate_volume

    path = _ome(tmp_path / "sample.ome.zarr", two_channels, ["nhs_ester", "antibody"])
    kw = {
        "channel": "nhs_ester", "patch": [4, 16, 16], "chunks": [2, 16, 16], "block_shape": [2, 32, 32],
        "intensity_range": [0, 4000], "progress": False, "num_workers": 0,
    }  # fmt: skip
    script, out = tmp_path / "ddp_channels.py", tmp_path / "ddp.ome.zarr"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(path), str(out), json.dumps(kw)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    copied = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    assert copied == [[0, 2], [1]]  # three blocks of 2 slices: every other one each
    assert read_record(out)["channels_written"] is True
    alone = translate_volume(_generator(), path, tmp_path / "alone.ome.zarr", **kw)
    got, want = zarr.open_group(str(out), mode="r"), zarr.open_group(str(alone.output), mode="r")
    for level in ("0", "1"):
        assert np.array_equal(got[level][:], want[level][:]), level
    assert np.array_equal(got["0"][1], two_channels[ANTIBODY])


def test_a_complete_ddp_translation_copies_every_block_of_the_other_channels(
    tmp_path: Path, two_channels: np.ndarray
) -> None:
    """A rerun under DDP that finds the virtual EM complete starts no ranks (no prediction): this process alone then
    copies the other channels whole (it used to copy every world_size-th block and record them all written)."""
    import lightning as L

    from exem.inference.output import read_record, update_record
    from exem.inference.translate import translate_volume

    path = _ome(tmp_path / "sample.ome.zarr", two_channels, ["nhs_ester", "antibody"])
    kw = {
        "channel": "nhs_ester", "patch": (4, 16, 16), "chunks": (2, 16, 16), "block_shape": (2, 32, 32),
        "intensity_range": (0, 4000), "progress": False, "num_workers": 0,
    }  # fmt: skip
    out = tmp_path / "multi.ome.zarr"
    net = _generator()
    translate_volume(net, path, out, **kw)
    zarr.open_group(str(out), mode="r+")["0"][1] = 0  # killed after the virtual EM, before the antibody
    update_record(out, channels_written=False)
    trainer = L.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    assert trainer.world_size == 2 and not torch.distributed.is_initialized()
    again = translate_volume(net, path, out, trainer=trainer, complete_ok=True, **kw)
    assert again.blocks_done == 0 and read_record(out)["channels_written"] is True
    assert np.array_equal(zarr.open_group(str(out), mode="r")["0"][1], two_channels[ANTIBODY])
