"""Small bioimage.io model packages built by the tests (spec 0.5 and 0.4; TorchScript / ONNX weights).

The model is a zero-padded convolution (halo = kernel // 2) with a sigmoid, two output channels named
``foreground`` and ``boundary``, and ``zero_mean_unit_variance`` preprocessing; its test output is the model
applied to the test input normalised with the test input's own statistics, as bioimage.io prescribes.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

EPS = 1e-6


class ConvSigmoid(nn.Module):
    """``(B, 1, *space)`` → ``(B, 2, *space)``: a zero-padded convolution and a sigmoid."""

    def __init__(self, dims: int = 3, kernel: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.conv = conv(1, 2, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(x))


def zmuv(x: np.ndarray, mean: float | None = None, std: float | None = None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    mean = float(x.mean()) if mean is None else mean
    std = float(x.std()) if std is None else std
    return ((x - mean) / (std + EPS)).astype(np.float32)


def reference(net: nn.Module, volume: np.ndarray, mean: float, std: float, dims: int = 3) -> np.ndarray:
    """The model on a whole ``(Z, Y, X)`` volume in memory: ``(C, Z, Y, X)`` (2D: slice by slice)."""
    x = torch.from_numpy(zmuv(volume, mean, std))
    with torch.no_grad():
        if dims == 3:
            return net(x[None, None])[0].numpy()
        return net(x[:, None]).permute(1, 0, 2, 3).numpy()


def make_package(
    folder: Path,
    *,
    version: str = "0.5",
    dims: int = 3,
    kernel: int = 3,
    weights: str = "torchscript",
    test_shape: tuple[int, ...] | None = None,
    to_zip: bool = False,
    corrupt_test_output: bool = False,
    rdf_overrides: dict[str, Any] | None = None,
) -> tuple[Path, nn.Module]:
    """Write a package into ``folder`` (created); returns (its folder, or the ``.zip`` next to it; the network)."""
    folder.mkdir(parents=True, exist_ok=True)
    net = ConvSigmoid(dims, kernel).eval()
    space = ("z", "y", "x") if dims == 3 else ("y", "x")
    example = torch.zeros((1, 1, *((8, 32, 32) if dims == 3 else (32, 32))))
    if weights == "torchscript":
        torch.jit.trace(net, example).save(str(folder / "weights.pt"))
        weights_entry: dict[str, Any] = {"torchscript": {"source": "weights.pt", "pytorch_version": "2.3"}}
    elif weights in ("state_dict", "state_dict_file"):
        torch.save(net.state_dict(), folder / "state.pt")
        arch: dict[str, Any] = {"callable": "ConvSigmoid", "kwargs": {"dims": dims, "kernel": kernel}}
        if weights == "state_dict":
            arch["import_from"] = "tests.bioimageio_packages"  # importable: exem builds it
        else:
            (folder / "arch.py").write_text("raise SystemExit('package code must not run')\n")
            arch["source"] = "arch.py"  # code in the package: exem refuses to run it
        weights_entry = {
            "pytorch_state_dict": {"source": "state.pt", "architecture": arch, "pytorch_version": "2.3"}
        }
    else:
        torch.onnx.export(
            net,
            (example,),
            str(folder / "weights.onnx"),
            input_names=["raw"],
            output_names=["prob"],
            dynamic_axes={t: {i: f"d{i}" for i in (0, *range(2, 2 + dims))} for t in ("raw", "prob")},
            dynamo=False,
        )
        weights_entry = {"onnx": {"source": "weights.onnx", "opset_version": 17}}
    rng = np.random.default_rng(1)
    shape = test_shape or ((1, 1, 8, 32, 32) if dims == 3 else (1, 1, 32, 32))
    test_input = (rng.random(shape) * 180 + 40).astype(np.float32)
    with torch.no_grad():
        test_output = net(torch.from_numpy(zmuv(test_input))).numpy()
    if corrupt_test_output:
        test_output = 1.0 - test_output
    np.save(folder / "test_input.npy", test_input)
    np.save(folder / "test_output.npy", test_output)
    (folder / "README.md").write_text("# A test model\n\n## Validation\nNone: built by exem's tests.\n")
    halo = kernel // 2
    sizes = {"z": (4, 4), "y": (16, 8), "x": (16, 8)}
    common: dict[str, Any] = {
        "type": "model",
        "name": "exem test conv",
        "description": "a zero-padded convolution for exem's tests",
        "authors": [{"name": "exem tests"}],
        "cite": [{"text": "exem", "url": "https://example.org/exem"}],
        "license": "MIT",
        "documentation": "README.md",
    }
    if version == "0.5":
        in_axes: list[dict[str, Any]] = [{"type": "batch"}, {"type": "channel", "channel_names": ["raw"]}]
        out_axes: list[dict[str, Any]] = [
            {"type": "batch"},
            {"type": "channel", "channel_names": ["foreground", "boundary"]},
        ]
        for a in space:
            in_axes.append({"type": "space", "id": a, "size": {"min": sizes[a][0], "step": sizes[a][1]}})
            out_axes.append(
                {"type": "space", "id": a, "size": {"tensor_id": "raw", "axis_id": a}, "halo": halo}
            )
        rdf: dict[str, Any] = {
            "format_version": "0.5.4",
            **common,
            "tags": ["electron-microscopy", f"{dims}d"],
            "inputs": [
                {
                    "id": "raw",
                    "axes": in_axes,
                    "test_tensor": {"source": "test_input.npy"},
                    "data": {"type": "float32"},
                    "preprocessing": [{"id": "zero_mean_unit_variance"}],
                }
            ],
            "outputs": [
                {
                    "id": "prob",
                    "axes": out_axes,
                    "test_tensor": {"source": "test_output.npy"},
                    "data": {"type": "float32"},
                }
            ],
            "weights": weights_entry,
        }
    else:
        axes = "bc" + "".join(space)
        rdf = {
            "format_version": "0.4.10",
            **common,
            "timestamp": "2026-11-29T00:00:00",
            "tags": ["electron-microscopy"],
            "inputs": [
                {
                    "name": "raw",
                    "axes": axes,
                    "data_type": "float32",
                    "shape": {
                        "min": [1, 1, *(sizes[a][0] for a in space)],
                        "step": [0, 0, *(sizes[a][1] for a in space)],
                    },
                    "preprocessing": [
                        {
                            "name": "zero_mean_unit_variance",
                            "kwargs": {"mode": "per_sample", "axes": "".join(space)},
                        }
                    ],
                }
            ],
            "outputs": [
                {
                    "name": "prob",
                    "axes": axes,
                    "data_type": "float32",
                    "shape": {"reference_tensor": "raw", "scale": [1] * len(axes), "offset": [0] * len(axes)},
                    "halo": [0, 0, *([halo] * len(space))],
                }
            ],
            "test_inputs": ["test_input.npy"],
            "test_outputs": ["test_output.npy"],
            "weights": weights_entry,
        }
    if rdf_overrides:
        rdf.update(rdf_overrides)
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
    if not to_zip:
        return folder, net
    archive = folder.with_suffix(".zip")
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f.name)
    return archive, net
