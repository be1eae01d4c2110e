"""The bad-input catalogue: every CLI refuses bad input with ONE clear line, exit code ≠ 0, outputs untouched.

Each case runs a real console script (``exem-train``, ``exem-calibrate``, ``exem-translate``, ``exem-export``,
``exem-segment``, ``exem-evaluate``) on a tiny prepared input and checks: exit code ≠ 0; the last non-empty line of
stderr is one line ``<prog>: error: …`` containing the case's key phrase; no ``Traceback``; existing outputs hash the
same before and after. The cases run concurrently in one module fixture (each is a process start, ~2-5 s of CPU).

Disk-full during a write is simulated in-process (a zarr store whose chunk writes fail with ENOSPC) through the
real ``exem-translate`` entry point; nothing may be marked done.

docs/errors.md is generated from :data:`CASES` and the observed messages::

    .venv/bin/python -m tests.test_bad_inputs --write-doc

and ``test_errors_doc_is_in_sync`` fails when the case list and the document disagree.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr

from tests.conftest import cli_env

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "errors.md"
BIN = Path(sys.executable).parent
# Cases run at the same time (each is mostly a Python start-up: imports of torch, Lightning, Hydra).
PARALLEL = max(2, min(4, os.cpu_count() or 2))
CASE_TIMEOUT_S = 300


# ----------------------------------------------------------------------------------------------- the inputs


def _zarr(path: Path, data: np.ndarray, zarr_format: int = 3) -> Path:
    chunks = tuple(max(1, s) for s in data.shape)
    arr = zarr.create_array(
        str(path), shape=data.shape, dtype=data.dtype, chunks=chunks, zarr_format=zarr_format
    )
    if data.size:
        arr[...] = data
    return path


class _Payload:
    """Unpickling this would run a shell command: a malicious "checkpoint"."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


TRAIN_WIDTHS = [4, 8, 16]


def _training_checkpoint(path: Path, widths: list[int]) -> Path:
    """An exem-train-like checkpoint (state dict, hyper-parameters, optimizer and loop entries) of tiny widths."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from exem.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=mouse_cortex", *_train_model_args(widths)])
    model = instantiate(cfg.model, image_dir=None, report_dir=None, _convert_="all")
    state = {
        "epoch": 0,
        "global_step": 3,
        "state_dict": model.state_dict(),
        "loops": {},
        "optimizer_states": [],
        "lr_schedulers": [],
        "hyper_parameters": dict(model.hparams),
    }
    torch.save(state, path)
    return path


def _train_model_args(widths: list[int]) -> list[str]:
    return [f"model.generator.widths=[{','.join(map(str, widths))}]", "model.discriminator.base_filters=4"]


def build_world(tmp: Path) -> SimpleNamespace:
    """Every input the cases need, in ``tmp`` (a few MB, ~1 s)."""
    from exem.data.ome import write_ome_zarr
    from exem.inference.translate import translate_volume
    from exem.models import AnisotropicUNet3D, MultiScaleDiscriminator3D

    tmp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shape = (16, 64, 64)
    w = SimpleNamespace(tmp=tmp)
    w.good = _zarr(tmp / "good.zarr", rng.integers(0, 256, shape, dtype=np.uint8))
    w.missing = tmp / "missing.zarr"
    w.text_file = tmp / "notes.txt"
    w.text_file.write_text("not a volume\n")
    w.corrupt = _zarr(tmp / "corrupt.zarr", rng.integers(0, 256, shape, dtype=np.uint8))
    (w.corrupt / "zarr.json").write_text("{ this is not json")
    w.corrupt_v2 = _zarr(tmp / "corrupt_v2.zarr", rng.integers(0, 256, shape, dtype=np.uint8), zarr_format=2)
    (w.corrupt_v2 / ".zarray").write_text('{"zarr_format": 2, "shape": [16, 64')
    w.flat = _zarr(tmp / "flat.zarr", np.zeros((64, 64), np.uint8))
    w.five_d = _zarr(tmp / "five_d.zarr", np.zeros((2, 1, 16, 64, 64), np.uint8))
    w.boolean = _zarr(tmp / "bool.zarr", np.zeros(shape, bool))
    w.complex = _zarr(tmp / "complex.zarr", np.zeros(shape, np.complex64))
    w.strings = tmp / "strings.zarr"
    zarr.create_array(str(w.strings), shape=(4, 8, 8), dtype=str, chunks=(4, 8, 8))
    w.float_range = _zarr(tmp / "float_range.zarr", (rng.random(shape, dtype=np.float32) * 3000))
    w.constant = _zarr(tmp / "constant.zarr", np.full(shape, 7, np.uint8))
    channels = zarr.create_array(
        str(tmp / "two_channels.zarr"), shape=(2, *shape), dtype="uint8", chunks=(1, *shape),
        dimension_names=["c", "z", "y", "x"],
    )  # fmt: skip
    channels[:] = rng.integers(0, 256, (2, *shape), dtype=np.uint8)
    w.two_channels = tmp / "two_channels.zarr"
    w.labels = _zarr(tmp / "labels.zarr", (rng.random(shape) < 0.05).astype(np.uint32) * 7)
    w.half = _zarr(tmp / "half.zarr", rng.integers(0, 256, (8, 64, 64), dtype=np.uint8))

    w.labels_ome = write_ome_zarr(tmp / "labels.ome.zarr", np.zeros(shape, np.uint32), (40.0, 10.0, 10.0))
    w.coarse_ome = write_ome_zarr(tmp / "coarse.ome.zarr", np.zeros(shape, np.uint8), (40.0, 20.0, 20.0))
    w.two_levels = _zarr(tmp / "two_levels.zarr", np.where(rng.random(shape) < 0.3, 50, 200).astype(np.uint8))
    nan = rng.random(shape, dtype=np.float32)
    nan[4:8, 10:20, 10:20] = np.nan
    w.nan = _zarr(tmp / "nan.zarr", nan)
    inf = rng.random(shape, dtype=np.float32)
    inf[2, 3, 4] = np.inf
    w.inf = _zarr(tmp / "inf.zarr", inf)
    w.empty = _zarr(tmp / "empty.zarr", np.zeros((0, 64, 64), np.uint8))
    w.negative_voxel = write_ome_zarr(
        tmp / "negative_voxel.ome.zarr", rng.integers(0, 256, shape, dtype=np.uint8), (-40.0, 10.0, 10.0)
    )

    torch.manual_seed(0)
    generator = AnisotropicUNet3D(widths=(4, 8, 16))
    w.gen = tmp / "G_AB_100.pth"
    torch.save(generator.state_dict(), w.gen)
    w.gen_truncated = tmp / "G_AB_truncated.pth"
    w.gen_truncated.write_bytes(w.gen.read_bytes()[: w.gen.stat().st_size // 2])
    w.disc = tmp / "D_B_100.pth"
    torch.save(MultiScaleDiscriminator3D(base_filters=4).state_dict(), w.disc)
    w.payload_marker = tmp / "PAYLOAD_RAN"
    w.payload = tmp / "payload.pth"
    torch.save({"weights": torch.zeros(3), "hook": _Payload(w.payload_marker)}, w.payload)
    w.train_ckpt = _training_checkpoint(tmp / "last.ckpt", TRAIN_WIDTHS)
    w.train_ckpt_truncated = tmp / "truncated.ckpt"
    w.train_ckpt_truncated.write_bytes(w.train_ckpt.read_bytes()[: w.train_ckpt.stat().st_size * 2 // 3])

    w.unknown_model = tmp / "segmenter.h5"
    w.unknown_model.write_bytes(b"\x89HDF\r\n\x1a\n")
    w.seg_model = tmp / "segmenter.ts"
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 1, 1), torch.nn.Sigmoid()).eval()
    torch.jit.save(torch.jit.trace(net, torch.rand(1, 1, 4, 32, 32)), str(w.seg_model))
    _packages(w, tmp)

    # existing outputs that a failing command must leave alone
    w.done_translation = tmp / "done.ome.zarr"
    translate_volume(generator.eval(), w.good, w.done_translation, patch=[4, 32, 32], progress=False)
    w.foreign_output = _zarr(tmp / "foreign.zarr", np.ones((4, 8, 8), np.uint8))
    w.export_dir = tmp / "exported"
    w.export_dir.mkdir()
    (w.export_dir / "generator.safetensors").write_bytes(b"earlier export")
    w.readonly = tmp / "readonly"
    w.readonly.mkdir()
    w.full = tmp / "full"
    w.full.mkdir()
    return w


def _packages(w: SimpleNamespace, tmp: Path) -> None:
    """Broken bioimage.io packages (tests/bioimageio_packages.py builds a valid one, then one thing is wrong)."""
    import yaml

    from tests.bioimageio_packages import make_package

    w.pkg_no_rdf, _ = make_package(tmp / "pkg_no_rdf")
    (w.pkg_no_rdf / "rdf.yaml").unlink()
    w.pkg_version, _ = make_package(tmp / "pkg_version", rdf_overrides={"format_version": "0.9.1"})
    tf = {"tensorflow_saved_model_bundle": {"source": "tf_model.zip", "tensorflow_version": "2.15"}}
    w.pkg_tensorflow, _ = make_package(tmp / "pkg_tensorflow", rdf_overrides={"weights": tf})
    w.pkg_url, _ = make_package(tmp / "pkg_url")
    rdf = yaml.safe_load((w.pkg_url / "rdf.yaml").read_text())
    rdf["weights"]["torchscript"]["source"] = "https://example.org/weights.pt"
    (w.pkg_url / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    w.pkg_axes, _ = make_package(tmp / "pkg_axes")
    rdf = yaml.safe_load((w.pkg_axes / "rdf.yaml").read_text())
    rdf["inputs"][0]["axes"].insert(2, {"type": "time", "size": 1})
    rdf["outputs"][0]["axes"].insert(2, {"type": "time", "size": {"tensor_id": "raw", "axis_id": "time"}})
    (w.pkg_axes / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    w.pkg_wrong_test, _ = make_package(tmp / "pkg_wrong_test", corrupt_test_output=True)


# ---------------------------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """One bad input: which command, what is wrong, the arguments, the key phrase of the expected error line.

    ``args(w)`` builds the command-line arguments from the prepared inputs ``w``; ``watch(w)`` names an existing
    output that must stay untouched; ``mount`` runs the command in a private mount namespace with a tiny
    read-only (``"ro"``) or full (``"full"``) tmpfs at ``w.readonly`` / ``w.full``. ``slow`` cases repeat a
    default case's check through another command (each case is a process start: the default run keeps one
    case per kind of problem).
    """

    id: str
    prog: str
    problem: str
    args: Callable[[SimpleNamespace], list[str]]
    expect: str
    watch: Callable[[SimpleNamespace], Path] | None = None
    mount: str | None = None
    slow: bool = False  # the same check as a default case through another command: make test-slow only


# Every case runs in its own empty folder (its outputs are relative paths there).


def _train(w: SimpleNamespace, *extra: str, lm: Path | None = None) -> list[str]:
    return [
        "experiment=mouse_cortex", "trainer=cpu", "trainer.max_steps=1", *_train_model_args(TRAIN_WIDTHS),
        "data.patch_size=[4,32,32]", "data.num_workers=0", "data.persistent_workers=false",
        "callbacks.progress_bar=null", f"data.lm.path={lm or w.good}", f"data.em.path={w.good}",
        "hydra.run.dir=run", *extra,
    ]  # fmt: skip


def _translate(
    w: SimpleNamespace, *extra: str, input: Path | None = None, out: str = "out.ome.zarr"
) -> list[str]:  # noqa: A002
    return [
        f"checkpoint={w.gen}", f"input={input or w.good}", f"output={out}", "patch=[4,32,32]",
        "trainer=cpu", *extra,
    ]  # fmt: skip


def _export(w: SimpleNamespace, *extra: str, out: Path | str = "exported") -> list[str]:
    return [f"checkpoint={w.gen}", f"output={out}", "formats=[exem]", *extra]


def _segment(
    w: SimpleNamespace, *extra: str, input: Path | None = None, model: Path | None = None
) -> list[str]:  # noqa: A002
    return [
        f"model={model or w.seg_model}", f"input={input or w.good}", "output=seg.zarr", "kind=foreground",
        "patch=[4,32,32]", "trainer=cpu", *extra,
    ]  # fmt: skip


def _calibrate(w: SimpleNamespace, *extra: str, lm: Path | None = None, em: Path | None = None) -> list[str]:
    return [
        f"data.lm.path={lm or w.good}", f"data.em.path={em or w.good}", "data.patch_size=[4,32,32]",
        "model.loss.content.sample_voxels=50000", "out_dir=calib", *extra,
    ]  # fmt: skip


def _evaluate(w: SimpleNamespace, *extra: str) -> list[str]:
    return [
        f"exm={w.good}", f"checkpoint={w.gen}", f"segmenter={w.seg_model}", f"labels={w.good}",
        "out=evaluation", "trainer=cpu",
        "translate.patch=[4,32,32]", "segment.patch=[4,32,32]", *extra,
    ]  # fmt: skip


T, X, E, S, V = "exem-train", "exem-translate", "exem-export", "exem-segment", "exem-evaluate"
C, M = "exem-calibrate", "exem-measure"


def _measure(
    w: SimpleNamespace, *extra: str, labels: Path | None = None, images: str | None = None
) -> list[str]:
    return [f"labels={labels or w.labels}", f"images=[{images or w.good}]", "out=measured", *extra]


CASES: list[Case] = [
    # --- training data
    Case("train-missing-path", T, "LM volume path does not exist",
         lambda w: _train(w, lm=w.missing), "no such file or directory", slow=True),
    Case("train-file-not-store", T, "path is a plain file, not a Zarr store",
         lambda w: _train(w, lm=w.text_file), "is a file, not a zarr store", slow=True),
    Case("train-corrupt-metadata", T, "zarr.json is not valid JSON",
         lambda w: _train(w, lm=w.corrupt), "unreadable zarr metadata", slow=True),
    Case("train-2d-array", T, "a 2D array", lambda w: _train(w, lm=w.flat), "expected a 3D", slow=True),
    Case("train-bool-dtype", T, "boolean voxels", lambda w: _train(w, lm=w.boolean), "is not numeric", slow=True),
    Case("train-float-outside-range", T, "float data outside [0, 1] and no intensity range",
         lambda w: _train(w, lm=w.float_range), "outside [0, 1]", slow=True),
    Case("train-constant-volume", T, "all-constant volume, percentile normalisation",
         lambda w: _train(w, "data.lm.percentiles=[1,99]", lm=w.constant), "collapses", slow=True),
    Case("train-nan", T, "NaN in float data", lambda w: _train(w, lm=w.nan), "nan", slow=True),
    Case("train-empty-array", T, "array with a zero-length axis",
         lambda w: _train(w, lm=w.empty), "volume is empty", slow=True),
    Case("train-patch-larger-than-volume", T, "patch deeper than the volume",
         lambda w: _train(w, "data.patch_size=[32,32,32]"), "larger than", slow=True),
    Case("train-xy-not-divisible", T, "patch Y×X not divisible by 2^(levels-1)",
         lambda w: _train(w, "data.patch_size=[4,34,34]"), "not divisible by 4", slow=True),
    Case("train-zero-voxel-size", T, "voxel size 0", lambda w: _train(w, "data.lm.voxel_size=[0,10,10]"),
         "voxel size must be positive"),
    # --- training configuration
    Case("train-unknown-config-key", T, "a config key that does not exist",
         lambda w: _train(w, "model.generator.width=[4,8]"),
         "unknown option 'model.generator.width'; did you mean 'model.generator.widths'?"),
    Case("train-missing-mandatory", T, "data paths not given",
         lambda w: ["experiment=mouse_cortex", "trainer=cpu", "hydra.run.dir=run"],
         "missing mandatory config value(s): data.em.path, data.lm.path", slow=True),
    Case("train-ddp-zero-devices", T, "trainer=ddp with 0 devices",
         lambda w: _train(w, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=0"), "devices=0"),
    # --- resuming training
    Case("train-ckpt-missing", T, "ckpt_path does not exist",
         lambda w: _train(w, f"ckpt_path={w.tmp / 'nope.ckpt'}"), "does not exist", slow=True),
    Case("train-ckpt-truncated", T, "ckpt_path is a truncated checkpoint",
         lambda w: _train(w, f"ckpt_path={w.train_ckpt_truncated}"), "truncated", slow=True),
    Case("train-ckpt-other-model", T, "ckpt_path is a generator state dict, not a training checkpoint",
         lambda w: _train(w, f"ckpt_path={w.gen}"), "is not an exem-train checkpoint"),
    Case("train-ckpt-payload", T, "ckpt_path is a pickle that would run code",
         lambda w: _train(w, f"ckpt_path={w.payload}"), "refuses to unpickle"),
    Case("train-ckpt-widths-mismatch", T, "model.generator.widths differ from the checkpoint's",
         lambda w: _train(w, "model.generator.widths=[4,8,16,32]", f"ckpt_path={w.train_ckpt}"),
         "widths mismatch"),
    # --- content-group calibration (exem-calibrate; exem-train fits the same way before its first step)
    Case("calibrate-constant-volume", C, "all-constant ExM volume",
         lambda w: _calibrate(w, lm=w.constant), "intensities are constant"),
    Case("calibrate-fewer-levels-than-groups", C, "EM volume with 2 grey levels, 3 EM groups asked for",
         lambda w: _calibrate(w, em=w.two_levels), "fewer than the 3 groups"),
    Case("calibrate-nan", C, "NaN in float data", lambda w: _calibrate(w, lm=w.nan), "nan", slow=True),
    Case("calibrate-empty-array", C, "array with a zero-length axis",
         lambda w: _calibrate(w, em=w.empty), "volume is empty", slow=True),
    Case("calibrate-unknown-stain", C, "data.lm.stain not pan_protein, direct or null",
         lambda w: _calibrate(w, "data.lm.stain=cytosolic"), "data.lm.stain must be one of", slow=True),
    # --- translation input
    Case("translate-missing-path", X, "input does not exist",
         lambda w: _translate(w, input=w.missing), "no such file or directory"),
    Case("translate-file-not-store", X, "input is a plain file, not a Zarr store",
         lambda w: _translate(w, input=w.text_file), "is a file, not a zarr store"),
    Case("translate-corrupt-metadata", X, "input's .zarray (Zarr v2) is not valid JSON",
         lambda w: _translate(w, input=w.corrupt_v2), "unreadable zarr metadata"),
    Case("translate-float-outside-range", X, "float data outside [0, 1] and no intensity range",
         lambda w: _translate(w, input=w.float_range), "outside [0, 1]"),
    Case("translate-constant-volume", X, "all-constant volume, percentile normalisation",
         lambda w: _translate(w, "percentiles=[1,99]", input=w.constant), "collapses"),
    Case("translate-empty-array", X, "array with a zero-length axis",
         lambda w: _translate(w, input=w.empty), "volume is empty"),
    Case("translate-patch-larger-than-volume", X, "patch deeper than the volume",
         lambda w: _translate(w, "patch=[32,32,32]"), "larger than the volume"),
    Case("translate-xy-not-divisible", X, "patch Y×X not divisible by 2^(levels-1)",
         lambda w: _translate(w, "patch=[4,30,32]"), "not divisible by 4"),
    Case("translate-5d-array", X, "a 5D array", lambda w: _translate(w, input=w.five_d), "expected a 3D"),
    Case("translate-complex-dtype", X, "complex voxels",
         lambda w: _translate(w, input=w.complex), "is not numeric", slow=True),
    Case("translate-string-dtype", X, "string (object) voxels",
         lambda w: _translate(w, input=w.strings), "is not numeric"),
    Case("translate-inf", X, "Inf in float data", lambda w: _translate(w, input=w.inf), "nan or inf"),
    Case("translate-negative-voxel-size", X, "negative voxel size in the OME-Zarr metadata",
         lambda w: _translate(w, input=w.negative_voxel), "voxel size (scale) must be positive"),
    Case("translate-overlap-not-below-patch", X, "overlap ≥ patch",
         lambda w: _translate(w, "overlap=[0,32,8]"), "smaller than the patch"),
    Case("translate-roi-out-of-bounds", X, "ROI beyond the volume",
         lambda w: _translate(w, "roi=[0,16,0,64,0,500]"), "is outside the volume"),
    Case("translate-roi-reversed", X, "ROI with z1 < z0",
         lambda w: _translate(w, "roi=[12,4,0,64,0,64]"), "empty or reversed"),
    Case("translate-misspelt-option", X, "a misspelt option",
         lambda w: _translate(w, "overlapp=[0,8,8]"), "unknown option 'overlapp'; did you mean 'overlap'?",
         slow=True),
    Case("translate-training-experiment", X, "exem-train's experiment= given to exem-translate",
         lambda w: _translate(w, "experiment=demo"), "this command has no experiment= option", slow=True),
    Case("translate-bad-dtype", X, "output dtype not supported",
         lambda w: _translate(w, "dtype=int16"), "dtype must be one of", slow=True),
    Case("translate-weight-precision", X, "a trainer precision that converts the weights (bf16-true)",
         lambda w: _translate(w, "trainer.precision=bf16-true"), "cannot run inference"),
    # --- translation output
    Case("translate-output-exists", X, "output is a finished translation",
         lambda w: _translate(w, out=str(w.done_translation)), "exists (complete); use overwrite=true",
         watch=lambda w: w.done_translation),
    Case("translate-output-foreign", X, "output is some other Zarr store",
         lambda w: _translate(w, out=str(w.foreign_output)), "is not an exem translation",
         watch=lambda w: w.foreign_output, slow=True),
    Case("translate-output-read-only", X, "output folder on a read-only file system",
         lambda w: _translate(w, out=str(w.readonly / "out.ome.zarr")), "is not writable", mount="ro"),
    Case("translate-disk-full", X, "output file system full during the write",
         lambda w: _translate(w, out=str(w.full / "out.ome.zarr")), "no space left on device", mount="full"),
    # --- generator checkpoints
    Case("translate-ckpt-missing", X, "checkpoint does not exist",
         lambda w: _translate(w, f"checkpoint={w.tmp / 'G_AB_nope.pth'}"), "does not exist", slow=True),
    Case("translate-ckpt-truncated", X, "checkpoint truncated",
         lambda w: _translate(w, f"checkpoint={w.gen_truncated}"), "truncated"),
    Case("translate-ckpt-other-model", X, "checkpoint of a discriminator",
         lambda w: _translate(w, f"checkpoint={w.disc}"), "holds no exem/exem generator", slow=True),
    Case("translate-ckpt-payload", X, "checkpoint is a pickle that would run code",
         lambda w: _translate(w, f"checkpoint={w.payload}"), "refuses to unpickle", slow=True),
    Case("translate-widths-mismatch", X, "widths= differ from the checkpoint's",
         lambda w: _translate(w, "widths=[8,16,32]"), "widths mismatch", slow=True),
    Case("translate-missing-mandatory", X, "output not given",
         lambda w: [f"checkpoint={w.gen}", f"input={w.good}", "trainer=cpu"],
         "missing mandatory config value(s): output"),
    Case("translate-ddp-zero-devices", X, "trainer=ddp with 0 devices",
         lambda w: _translate(w, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=0"), "devices=0",
         slow=True),
    # --- export
    Case("export-ckpt-missing", E, "checkpoint does not exist",
         lambda w: _export(w, f"checkpoint={w.tmp / 'nope.pth'}"), "does not exist"),
    Case("export-output-exists", E, "output folder holds an earlier export",
         lambda w: _export(w, out=w.export_dir), "already holds files", watch=lambda w: w.export_dir),
    Case("export-unknown-format", E, "unknown export format",
         lambda w: _export(w, "formats=[exem,pdf]"), "unknown export format 'pdf'", slow=True),
    Case("export-example-not-divisible", E, "example shape Y×X not divisible",
         lambda w: _export(w, "formats=[torchscript]", "example_shape=[1,1,4,30,32]"), "example_shape", slow=True),
    Case("translate-missing-channel", X, "a channel the multi-channel input does not have",
         lambda w: _translate(w, "channel=tubulin", input=w.two_channels), "no channel 'tubulin'"),
    Case("translate-multichannel-no-channel", X, "a multi-channel input and no channel chosen",
         lambda w: _translate(w, input=w.two_channels), "choose one with channel=", slow=True),
    # --- measurements (exem-measure)
    Case("measure-float-labels", M, "labels that are not integers",
         lambda w: _measure(w, labels=w.float_range), "is not an integer dtype"),
    Case("measure-shapes-differ", M, "labels and an image of different shapes",
         lambda w: _measure(w, images=str(w.half)), "give volumes on the same voxel grid"),
    Case("measure-voxel-sizes-differ", M, "labels and an image of different voxel sizes",
         lambda w: _measure(w, labels=w.labels_ome, images=str(w.coarse_ome)), "voxel size"),
    Case("measure-expansion-factor-zero", M, "an expansion factor ≤ 0",
         lambda w: _measure(w, "expansion_factor=0"), "expansion_factor must be a number > 0"),
    Case("measure-missing-channel", M, "a channel the image does not have",
         lambda w: _measure(w, "channels=[tubulin]", images=str(w.two_channels)), "no channel 'tubulin'"),
    Case("measure-names-count", M, "more names than images",
         lambda w: _measure(w, "names=[a,b]"), "names has 2 entries", slow=True),
    # --- segmentation
    Case("segment-unknown-model-type", S, "segmenter file of unknown type (.h5)",
         lambda w: _segment(w, model=w.unknown_model), "model"),
    Case("segment-package-without-rdf", S, "a bioimage.io package folder without rdf.yaml",
         lambda w: _segment(w, model=w.pkg_no_rdf), "no rdf.yaml"),
    Case("segment-package-unknown-version", S, "a package of an unknown format_version",
         lambda w: _segment(w, model=w.pkg_version), "is not one exem reads"),
    Case("segment-package-tensorflow-weights", S, "a package with TensorFlow weights only",
         lambda w: _segment(w, model=w.pkg_tensorflow), "exem runs torchscript, onnx"),
    Case("segment-package-time-axis", S, "a package whose axes include time",
         lambda w: _segment(w, model=w.pkg_axes), "cannot be mapped onto a 3D volume"),
    Case("segment-package-url", S, "a package whose weights are a URL",
         lambda w: _segment(w, model=w.pkg_url), "download the package first"),
    Case("segment-package-test-not-reproduced", S, "check=true on a package whose test output exem cannot reproduce",
         lambda w: _segment(w, "check=true", "patch=null", model=w.pkg_wrong_test),
         "does not reproduce the package's test output"),
    Case("segment-missing-input", S, "input does not exist",
         lambda w: _segment(w, input=w.missing), "no such file or directory", slow=True),
    Case("segment-patch-larger-than-volume", S, "patch deeper than the volume",
         lambda w: _segment(w, "patch=[32,32,32]"), "larger than", slow=True),
    Case("segment-missing-model", S, "model not given",
         lambda w: _segment(w)[1:], "missing mandatory config value model", slow=True),
    Case("segment-multichannel-no-channel", S, "a multi-channel input without a virtual_em channel, none chosen",
         lambda w: _segment(w, input=w.two_channels), "choose one with input_channel="),
    # --- evaluation
    Case("evaluate-unknown-segmenter-type", V, "segmenter file of unknown type (.h5)",
         lambda w: _evaluate(w, f"segmenter={w.unknown_model}"), "segmenter"),
    Case("evaluate-missing-exm", V, "ExM volume does not exist",
         lambda w: _evaluate(w, f"exm={w.missing}"), "no such file or directory", slow=True),
    Case("evaluate-ckpt-payload", V, "generator checkpoint is a pickle that would run code",
         lambda w: _evaluate(w, f"checkpoint={w.payload}"), "refuses to unpickle", slow=True),
    Case("evaluate-missing-mandatory", V, "labels not given",
         lambda w: [a for a in _evaluate(w) if not a.startswith("labels=")],
         "missing mandatory config value(s): labels", slow=True),
    Case("evaluate-multichannel-exm-no-channel", V, "a multi-channel ExM volume and no channel chosen",
         lambda w: _evaluate(w, f"exm={w.two_channels}"), "choose one with exm_channel=", slow=True),
]  # fmt: skip

# Simulated through the real entry point, in-process (see test_disk_full_during_write_*).
API_CASES = {
    "translate-failing-store": (
        X,
        "the output store fails with ENOSPC while blocks are written (in-process, Python API)",
        "No space left on device",
    ),
    "napari-layer-not-3d": (
        "exem napari plugin",
        "a napari layer that is not 3D, given to any widget (tests/test_napari.py runs the widgets)",
        "exem works on 3D volumes",
    ),
}


def napari_2d_layer_line() -> str:
    """The napari widgets' message for a 2D layer (their one check, without a viewer)."""
    from exem.napari.layers import check_3d

    try:
        check_3d(SimpleNamespace(name="slice", data=np.zeros((64, 48), np.uint8), rgb=False))
    except ValueError as exc:
        return str(exc)
    raise AssertionError("check_3d accepted a 2D layer")


def test_napari_2d_layer_is_one_line() -> None:
    line = napari_2d_layer_line()
    assert line.count("\n") == 0 and API_CASES["napari-layer-not-3d"][2] in line


# ---------------------------------------------------------------------------------------------- running


def _tree_hash(path: Path) -> str | None:
    if not path.exists():
        return None
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(path.parent)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def mount_available(kind: str) -> bool:
    """Whether a private tmpfs mount (``unshare -m``) works here; without it, ``ro`` falls back to chmod."""
    if kind == "ro" and os.geteuid() != 0:
        return True  # chmod is enough for non-root users
    if shutil.which("unshare") is None:
        return False
    probe = "mount -t tmpfs -o size=4k tmpfs /mnt 2>/dev/null || mount -t tmpfs -o size=4k tmpfs /tmp"
    return subprocess.run(["unshare", "-m", "sh", "-c", probe], capture_output=True).returncode == 0


def command(case: Case, w: SimpleNamespace) -> list[str]:
    cmd = [str(BIN / case.prog), *case.args(w)]
    if case.mount is None:
        return cmd
    where = w.readonly if case.mount == "ro" else w.full
    if case.mount == "ro" and os.geteuid() != 0:
        where.chmod(0o555)
        return cmd
    options = "ro,size=64k" if case.mount == "ro" else "size=8k"
    script = f"mount -t tmpfs -o {options} tmpfs {shlex.quote(str(where))} && exec {shlex.join(cmd)}"
    return ["unshare", "-m", "sh", "-c", script]


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    before: str | None
    after: str | None

    @property
    def last_line(self) -> str:
        lines = [ln for ln in self.stderr.splitlines() if ln.strip()]
        return lines[-1] if lines else ""


def available(case: Case) -> bool:
    return (BIN / case.prog).exists() and (case.mount is None or mount_available(case.mount))


def run_case(case: Case, w: SimpleNamespace) -> Outcome:
    watched = case.watch(w) if case.watch else None
    before = _tree_hash(watched) if watched else None
    cwd = w.tmp / "cases" / case.id
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        command(case, w), cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=CASE_TIMEOUT_S
    )
    after = _tree_hash(watched) if watched else None
    return Outcome(proc.returncode, proc.stdout, proc.stderr, before, after)


def run_cases(w: SimpleNamespace, cases: list[Case]) -> dict[str, Outcome]:
    todo = [c for c in cases if available(c)]
    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        outcomes = list(pool.map(lambda c: run_case(c, w), todo))
    return {c.id: o for c, o in zip(todo, outcomes, strict=True)}


# ------------------------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    torch.set_num_threads(1)
    return build_world(tmp_path_factory.mktemp("bad_inputs"))


@pytest.fixture(scope="module")
def outcomes(world: SimpleNamespace, request: pytest.FixtureRequest) -> dict[str, Outcome]:
    """The outcomes of the cases selected in this session (``-m "not slow"`` leaves the slow ones out)."""
    selected = {
        item.callspec.params["case"].id
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_bad_input_gives_one_line"
    }
    return run_cases(world, [c for c in CASES if c.id in selected])


def test_the_catalogue_is_complete() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) + len(API_CASES) >= 30
    assert {c.prog for c in CASES} == {T, C, X, E, S, V, M}
    assert all(sum(c.prog == p for c in CASES) >= 3 for p in (S, V))
    assert sum(not c.slow for c in CASES) + len(API_CASES) >= 30  # in the default run


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else []) for c in CASES]
)
def test_bad_input_gives_one_line(case: Case, outcomes: dict[str, Outcome], world: SimpleNamespace) -> None:
    if case.id not in outcomes:
        pytest.skip(f"{case.prog} not installed or no private tmpfs mount here")
    o = outcomes[case.id]
    report = f"exit {o.returncode}\nSTDERR:\n{o.stderr[-3000:]}"
    assert o.returncode != 0, report
    assert "Traceback" not in o.stderr, report
    assert o.last_line.startswith(f"{case.prog}: error: "), report
    assert case.expect.lower() in o.last_line.lower(), report
    assert sum(ln.startswith(f"{case.prog}: error:") for ln in o.stderr.splitlines()) == 1, report
    if case.watch is not None:
        assert o.before is not None and o.after == o.before, "an existing output was modified"
    written = {S: "seg.zarr", M: "measured"}.get(case.prog)
    if written is not None:
        assert not (world.tmp / "cases" / case.id / written).exists(), "a refused command wrote its output"
    assert not world.payload_marker.exists(), "a pickled payload was executed"


def failing_store_run(w: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, Path]:
    """``exem-translate`` in-process with a zarr store whose chunk writes fail with ENOSPC (metadata succeed).

    Returns the exit code, the last non-empty stderr line and the output path.
    """
    import contextlib
    import io

    from zarr.storage import LocalStore

    from exem import cli

    out = w.tmp / "failing_store.ome.zarr"
    real_set = LocalStore.set

    async def failing_set(self, key, value, *args, **kwargs):
        if str(out) in str(self.root) and not key.rsplit("/", 1)[-1].startswith((".z", "zarr.json")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{self.root}/{key}")
        return await real_set(self, key, value, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "set", failing_set)
    monkeypatch.setattr(sys, "argv", ["exem-translate", *_translate(w, out=str(out))])
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err):
        try:
            cli.translate_main()
        except SystemExit as exc:
            code = int(exc.code or 0)
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    return code, lines[-1] if lines else "", out


def test_disk_full_during_write_is_one_line_and_marks_nothing_done(
    world: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    from exem.inference.blockio import DONE_DIR

    code, line, out = failing_store_run(world, monkeypatch)
    assert code == 1
    assert line.startswith("exem-translate: error: No space left on device: "), line
    assert str(out) in line  # names the file that could not be written
    markers = [p for p in (out / DONE_DIR).rglob("*") if p.is_file()] if (out / DONE_DIR).exists() else []
    assert markers == []  # nothing marked done
    assert zarr.open_group(str(out), mode="r").attrs["exem"]["complete"] is False


# --------------------------------------------------------------------------------------------- the document

DOC_HEADER = """# Error catalogue

What exem says when it is given something wrong. Every row is a test case of `tests/test_bad_inputs.py`: the
command exits with code 1 and prints exactly one line `<command>: error: <message>` on stderr, without a traceback,
and leaves existing outputs untouched. Paths are shortened to file names; `<tmp>` is the test's folder.

Regenerate after changing a case: `.venv/bin/python -m tests.test_bad_inputs --write-doc` (a default test fails
when this file and the case list disagree).

| case | problem | command | message |
|---|---|---|---|
"""


def _short(text: str, w: SimpleNamespace) -> str:
    return text.replace(str(w.tmp) + "/", "").replace(str(w.tmp), "<tmp>").replace(str(BIN) + "/", "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    """A table cell as inline code (double backticks: messages may contain single ones)."""
    return f"`` {_cell(text)} ``"


def write_doc(path: Path = DOC) -> None:
    """Run every case and write the table (case → command → observed message) to ``path``."""
    import _pytest.monkeypatch

    with tempfile.TemporaryDirectory() as d:
        w = build_world(Path(d) / "catalogue")
        outcomes = run_cases(w, CASES)
        rows = []
        for case in CASES:
            cmd = f"{case.prog} {shlex.join(case.args(w))}"
            if case.mount:
                cmd += " (on a read-only tmpfs)" if case.mount == "ro" else " (on a full tmpfs)"
            o = outcomes.get(case.id)
            message = o.last_line if o else f"{case.prog}: error: … {case.expect} … (not run here)"
            rows.append((case.id, case.problem, _short(cmd, w), _short(message, w)))
        mp = _pytest.monkeypatch.MonkeyPatch()
        try:
            _, line, _ = failing_store_run(w, mp)
        finally:
            mp.undo()
        how = {
            "translate-failing-store": ("… (Python: a zarr store failing with ENOSPC)", line),
            "napari-layer-not-3d": (
                "widget … (a 2D layer named 'slice', shape (64, 48))",
                napari_2d_layer_line(),
            ),
        }
        for case_id, (prog, problem, _) in API_CASES.items():
            rows.append((case_id, problem, f"{prog} {how[case_id][0]}", _short(how[case_id][1], w)))
    text = DOC_HEADER + "".join(f"| `{a}` | {_cell(b)} | {_code(c)} | {_code(d)} |\n" for a, b, c, d in rows)
    path.write_text(text)


def doc_rows(path: Path = DOC) -> dict[str, str]:
    """``case id → message`` of the table in ``path``."""
    rows = {}
    for line in path.read_text().splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0].strip("`")] = cells[-1].strip("`").strip().replace("\\|", "|")
    return rows


def test_errors_doc_is_in_sync() -> None:
    rows = doc_rows()
    expected = {c.id: c.expect for c in CASES} | {k: v[2] for k, v in API_CASES.items()}
    assert sorted(rows) == sorted(expected), (
        "docs/errors.md is out of date: python -m tests.test_bad_inputs --write-doc"
    )
    for case_id, phrase in expected.items():
        assert phrase.lower() in rows[case_id].lower(), (case_id, rows[case_id])


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-doc"]:
        sys.exit("usage: python -m tests.test_bad_inputs --write-doc")
    write_doc()
    print(f"wrote {DOC}")
