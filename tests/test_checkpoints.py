"""load_generator / export_generator / exem-export: every checkpoint kind, exports checked, one-line errors."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from exem.checkpoints import CheckpointError, load_generator
from exem.export import export_generator
from exem.models import AnisotropicUNet3D, MultiScaleDiscriminator3D
from exem.trained import TrainedGenerator
from tests.conftest import run_cli

TINY = (4, 8, 16)
KEYS_FILE = Path(__file__).parent / "data" / "published_generator_keys.txt"


def _tiny(seed: int = 0, widths: tuple[int, ...] = TINY) -> AnisotropicUNet3D:
    torch.manual_seed(seed)
    return AnisotropicUNet3D(widths=widths).eval()


def _same_outputs(a: Any, b: Any, shape: tuple[int, ...] = (2, 1, 3, 16, 24)) -> bool:
    """Whether two networks (or trained-generator records) give equal outputs on one random input."""
    a, b = (getattr(n, "network", n) for n in (a, b))
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


@pytest.fixture
def tiny_pth(tmp_path: Path) -> tuple[Path, AnisotropicUNet3D]:
    model = _tiny()
    path = tmp_path / "G_AB_1000.pth"
    torch.save(model.state_dict(), path)
    return path, model


def _module() -> Any:
    from exem.module import ExEMModule

    torch.manual_seed(0)
    return ExEMModule(
        generator={"in_channels": 1, "out_channels": 1, "widths": list(TINY)},
        discriminator={"in_channels": 1, "num_scales": 1, "base_filters": 4},
        loss={"lambda_content": 0.0, "content_decay_steps": 10},
        optimizer={"lr": 1e-3},
    )


def _lightning_checkpoint(module: Any) -> dict[str, Any]:
    """The dict Lightning's Trainer.save_checkpoint writes (the parts load_generator reads, and the hook's)."""
    import lightning as L

    ckpt: dict[str, Any] = {
        "epoch": 0,
        "global_step": 6,
        "pytorch-lightning_version": L.__version__,
        "state_dict": module.state_dict(),
        "hparams_name": "kwargs",
        "hyper_parameters": dict(module.hparams),
    }
    module.on_save_checkpoint(ckpt)
    return ckpt


# ------------------------------------------------------------------------------------------------ loading
def test_lightning_checkpoint_round_trip(tmp_path: Path) -> None:
    module = _module().eval()
    module.voxel_size_nm = (40.0, 10.0, 10.0)
    module.training_patch = (4, 32, 32)
    module.batch_step = 2
    path = tmp_path / "last.ckpt"
    torch.save(_lightning_checkpoint(module), path)
    # hyper-parameters and the exem keys survive a weights-only load (no OmegaConf / custom objects inside)
    assert torch.load(path, weights_only=True)["hyper_parameters"]["generator"]["widths"] == list(TINY)

    g_ab = load_generator(path)
    assert isinstance(g_ab, TrainedGenerator) and isinstance(g_ab.network, AnisotropicUNet3D)
    assert not g_ab.network.training
    assert g_ab.widths == TINY
    assert g_ab.voxel_size_nm == (40.0, 10.0, 10.0)
    assert g_ab.training_patch == (4, 32, 32)  # translation's default patch
    assert g_ab.checkpoint_kind == "lightning" and g_ab.direction == "lm_to_em"
    assert _same_outputs(g_ab, module.G_AB)
    assert not hasattr(g_ab.network, "voxel_size_nm")  # facts live in the record, not on the module

    g_ba = load_generator(path, direction="em_to_lm", widths=TINY)
    assert g_ba.direction == "em_to_lm"
    assert _same_outputs(g_ba, module.G_BA)
    g_ba = load_generator(path, direction="BA", widths=TINY)  # the network's name is accepted too
    assert _same_outputs(g_ba, module.G_BA)
    assert not _same_outputs(g_ba, module.G_AB)


def test_lightning_hparams_disagreeing_with_weights(tmp_path: Path) -> None:
    ckpt = _lightning_checkpoint(_module())
    ckpt["hyper_parameters"]["generator"]["widths"] = [4, 8, 16, 32]
    path = tmp_path / "odd.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"config says widths \(4, 8, 16, 32\) but the weights have"):
        load_generator(path)


@pytest.fixture(scope="module")
def published_model() -> AnisotropicUNet3D:
    torch.manual_seed(0)
    return AnisotropicUNet3D().eval()  # default widths: the published generator, 27.5 M parameters


@pytest.mark.parametrize("prefix", ["module.", ""], ids=["data-parallel", "plain"])
def test_published_pth(tmp_path: Path, published_model: AnisotropicUNet3D, prefix: str) -> None:
    path = tmp_path / "G_AB_200000.pth"
    torch.save({prefix + k: v for k, v in published_model.state_dict().items()}, path)
    loaded = load_generator(path, widths=(32, 64, 128, 256, 512))
    assert loaded.voxel_size_nm is None and loaded.checkpoint_kind == "state_dict"

    expected = {}
    for line in KEYS_FILE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, shape = line.split(" ", 1)
            expected[name] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    state = loaded.network.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    reference = published_model.state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in expected)


def test_exported_round_trip(tmp_path: Path) -> None:
    model = _tiny(seed=3)
    norm = {"intensity_range": None, "percentiles": [1.0, 99.0]}
    trained = TrainedGenerator(
        model, voxel_size_nm=(40.0, 9.0, 9.0), lm_normalization=norm, training_patch=(4, 16, 16)
    )
    files = export_generator(trained, tmp_path / "exp", formats=["exem"])
    assert set(files) == {"safetensors", "json"}
    meta = json.loads(files["json"].read_text())
    assert meta["format"] == "exem-generator" and meta["version"] == 1
    assert meta["widths"] == list(TINY) and meta["voxel_size_nm"] == [40.0, 9.0, 9.0]
    assert meta["direction"] == "lm_to_em" and meta["training_patch"] == [4, 16, 16]

    for target in (tmp_path / "exp", files["safetensors"]):
        loaded = load_generator(target)
        assert loaded.checkpoint_kind == "exported" and loaded.voxel_size_nm == (40.0, 9.0, 9.0)
        assert loaded.lm_normalization == norm and loaded.training_patch == (4, 16, 16)
        assert _same_outputs(loaded, model)
    with pytest.raises(CheckpointError, match="holds the lm_to_em generator, but direction=em_to_lm"):
        load_generator(tmp_path / "exp", direction="BA")

    files["json"].unlink()  # the safetensors header carries the same config
    assert load_generator(files["safetensors"]).voxel_size_nm == (40.0, 9.0, 9.0)


def test_export_from_a_checkpoint_path_and_overwrite(tmp_path: Path, tiny_pth: tuple[Path, Any]) -> None:
    path, model = tiny_pth
    out = tmp_path / "exp"
    export_generator(path, out, formats="exem")
    assert json.loads((out / "generator.json").read_text())["source"] == str(path.resolve())
    with pytest.raises(CheckpointError, match="already holds files .*overwrite=true"):
        export_generator(path, out, formats="exem")
    export_generator(_tiny(seed=5), out, formats="exem", overwrite=True)
    assert _same_outputs(load_generator(out), _tiny(seed=5))
    assert not list(out.glob(".*tmp*"))  # no temporary files left behind


def test_torchscript_and_onnx_match_eager(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = _tiny(seed=7)
    files = export_generator(
        model, tmp_path / "exp", formats=("torchscript", "onnx"), example_shape=(1, 1, 4, 16, 16)
    )
    assert set(files) == {"torchscript", "onnx"}
    assert files.torchscript_max_abs_diff is not None and files.torchscript_max_abs_diff <= 1e-5
    assert files.onnx_max_abs_diff is not None and files.onnx_max_abs_diff <= 1e-4

    x = torch.rand(
        3, 1, 2, 12, 20, generator=torch.Generator().manual_seed(2)
    )  # a shape not checked on export
    with torch.no_grad():
        ref = model(x)
        traced = torch.jit.load(str(files["torchscript"]))
        assert (traced(x) - ref).abs().max() <= 1e-5
    session = ort.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    got = session.run(None, {"input": x.numpy()})[0]
    assert got.shape == tuple(ref.shape)
    assert np.abs(got - ref.numpy()).max() <= 1e-4


@pytest.mark.slow
def test_onnx_dynamo_exporter(tmp_path: Path) -> None:
    files = export_generator(
        _tiny(), tmp_path / "exp", formats="onnx", example_shape=(1, 1, 4, 16, 16), onnx_exporter="dynamo"
    )
    assert files.onnx_max_abs_diff is not None and files.onnx_max_abs_diff <= 1e-4


# ------------------------------------------------------------------------------------------------ errors
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _bad_file(kind: str, tmp_path: Path, good: Path) -> Path:
    path = tmp_path / f"{kind}.pth"
    if kind == "missing":
        return tmp_path / "nope.ckpt"
    if kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "discriminator":
        torch.save(MultiScaleDiscriminator3D(base_filters=4).state_dict(), path)
    elif kind == "lightning-without-generator":
        torch.save({"state_dict": {"D_A.w": torch.zeros(1)}, "hyper_parameters": {}}, path)
    elif kind == "list":
        torch.save([torch.zeros(1)], path)
    elif kind == "missing-key":
        state = _tiny().state_dict()
        del state["final_conv.bias"]
        torch.save(state, path)
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "does not exist"),
        ("truncated", "is not a readable checkpoint (truncated or not a torch file)"),
        ("random", "is not a readable checkpoint (truncated or not a torch file)"),
        ("empty", "is not a readable checkpoint (empty file)"),
        ("discriminator", "holds no exem/ExEM generator (found keys like scales.0."),
        ("lightning-without-generator", "holds no exem/ExEM generator G_AB (found keys like D_A.w)"),
        ("list", "holds no exem/ExEM generator (found none: a list)"),
        (
            "missing-key",
            "weights do not fit AnisotropicUNet3D(in_channels=1, out_channels=1, widths=(4, 8, 16)): "
            "missing keys final_conv.bias",
        ),
    ],
)
def test_load_errors(tmp_path: Path, tiny_pth: tuple[Path, Any], kind: str, message: str) -> None:
    path = _bad_file(kind, tmp_path, tiny_pth[0])
    with pytest.raises(CheckpointError) as info:
        load_generator(path)
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_payload_is_refused_not_run(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pth"
    obj = {"first_conv.weight": torch.zeros(1), "x": _Payload(marker)}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        with path.open("wb") as fh:
            pickle.dump(obj, fh, protocol=4)
    with pytest.raises(CheckpointError, match=r"refuses to unpickle .*system.*: not a plain weights file"):
        load_generator(path)
    assert not marker.exists()


def test_widths_mismatch(tiny_pth: tuple[Path, Any]) -> None:
    with pytest.raises(
        CheckpointError,
        match=r"widths mismatch: checkpoint has \(4, 8, 16\), config asks for \(4, 8, 16, 32\)",
    ):
        load_generator(tiny_pth[0], widths=[4, 8, 16, 32])


def test_export_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export_generator(_tiny(), tmp_path / "a", formats=["tflite"])
    with pytest.raises(ValueError, match="not divisible by 4"):
        export_generator(_tiny(), tmp_path / "b", example_shape=(1, 1, 4, 18, 16))


# ------------------------------------------------------------------------------------------------ CLI
def test_exem_export_cli(tmp_path: Path, tiny_pth: tuple[Path, Any]) -> None:
    path, model = tiny_pth
    out = tmp_path / "exported"
    proc = run_cli(
        "exem-export", f"checkpoint={path}", f"output={out}", "example_shape=[1,1,4,16,16]", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("generator.safetensors", "generator.json", "generator.ts", "generator.onnx"):
        assert (out / name).is_file()
        assert str(out / name) in proc.stdout
    assert "onnx check: max |onnx - torch| = " in proc.stdout
    # the library's records of the same files and checks are not printed a second time
    assert "ONNX check" not in proc.stdout and "wrote " not in proc.stdout
    assert _same_outputs(load_generator(out), model)

    again = run_cli("exem-export", f"checkpoint={path}", f"output={out}", cwd=tmp_path)
    assert again.returncode == 1
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("exem-export: error:") and "overwrite=true" in lines[0]


def test_exem_export_cli_bad_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "random.ckpt"
    bad.write_bytes(b"\x00not a checkpoint" * 10)
    proc = run_cli("exem-export", f"checkpoint={bad}", f"output={tmp_path / 'out'}", cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("exem-export: error:"), proc.stderr
    assert "is not a readable checkpoint" in lines[0]
    assert not (tmp_path / "out").exists()
