"""Export a generator for inference elsewhere, each file checked against the eager model before it is kept.

:func:`export_generator` writes ``generator.safetensors`` + ``generator.json`` (format ``"exem-generator"``,
version 1, with what is known about the training: LM voxel size and normalisation, training patch, content
groups), a TorchScript module ``generator.ts`` and an ONNX model ``generator.onnx``. All exported models map
``(B, in_channels, Z, Y, X)`` float32 volumes (intensities in [0, 1]) to ``(B, out_channels, Z, Y, X)``, with
any B and Z >= 1, and Y, X multiples of ``2 ** (len(widths) - 1)``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from exem.checkpoints import (
    FORMAT_NAME,
    FORMAT_VERSION,
    JSON_NAME,
    SAFETENSORS_NAME,
    CheckpointError,
    load_generator,
)
from exem.checks import positive_ints
from exem.errors import exception_line
from exem.models import AnisotropicUNet3D
from exem.quiet import summary_of
from exem.trained import NETWORK_OF_DIRECTION, TrainedGenerator, check_direction

__all__ = ["EXPORT_FORMATS", "ExportedFiles", "export_generator", "onnx_export"]

log = logging.getLogger(__name__)

EXPORT_FORMATS: tuple[str, ...] = ("exem", "torchscript", "onnx", "bioimageio")
TORCHSCRIPT_NAME = "generator.ts"
ONNX_NAME = "generator.onnx"
# Every file an export may write (the .data file only if an exporter splits large weights off).
_EXPORT_FILES = (SAFETENSORS_NAME, JSON_NAME, TORCHSCRIPT_NAME, ONNX_NAME, ONNX_NAME + ".data")

_TORCHSCRIPT_ATOL = 1e-5
_DEFAULT_ONNX_ATOL = 1e-4
_DEFAULT_OPSET = 18


class ExportedFiles(dict[str, Path]):
    """What :func:`export_generator` wrote: file kind → path, plus the results of the export checks.

    Keys (only of the formats asked for): ``"safetensors"`` and ``"json"`` (format ``exem``), ``"torchscript"``,
    ``"onnx"``.

    Attributes:
        torchscript_max_abs_diff: max |TorchScript − eager| over the checked inputs, or None.
        onnx_max_abs_diff: max |onnxruntime − eager| over the checked inputs, or None.
        checked_shapes: the ``(B, C, Z, Y, X)`` input shapes the checks ran on.
    """

    def __init__(self) -> None:
        super().__init__()
        self.torchscript_max_abs_diff: float | None = None
        self.onnx_max_abs_diff: float | None = None
        self.checked_shapes: list[tuple[int, ...]] = []
        self.package: Any = None  # exem.bioimageio.export.PackageFiles of format bioimageio

    def summary(self) -> str:
        """The export checks on a line each (empty when none ran), as ``exem-export`` prints them."""
        lines = []
        if self.torchscript_max_abs_diff is not None:
            lines.append(f"torchscript check: max |ts - torch| = {self.torchscript_max_abs_diff:.3g}")
        if self.onnx_max_abs_diff is not None:
            diff = self.onnx_max_abs_diff
            lines.append(f"onnx check: max |onnx - torch| = {diff:.3g} (onnxruntime CPU, tolerance 1e-4)")
        if self.package is not None:
            lines.append(self.package.summary())
        return "\n".join(lines)


def export_generator(
    generator_or_path: nn.Module | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    formats: Sequence[str] | str = EXPORT_FORMATS,
    example_shape: Sequence[int] = (1, 1, 16, 64, 64),
    overwrite: bool = False,
    direction: str | None = None,
    onnx_opset: int = _DEFAULT_OPSET,
    onnx_atol: float = _DEFAULT_ONNX_ATOL,
    onnx_exporter: str = "auto",
    test_volume: Any = None,
    package: Mapping[str, Any] | None = None,
) -> ExportedFiles:
    """Export a generator as safetensors + JSON (``exem``), TorchScript and/or ONNX, each checked before kept.

    The TorchScript module (``torch.jit.trace``) and the ONNX model take any batch size B, depth Z and Y, X
    that are multiples of ``2 ** (len(widths) - 1)``; they do not check their input (the eager model does).
    Both are compared with the eager model on a random ``example_shape`` input and on a second input of
    another B, Z, Y and X: TorchScript must agree within 1e-5, ONNX (onnxruntime, CPU) within ``onnx_atol``.

    Args:
        generator_or_path: a :class:`~exem.trained.TrainedGenerator`, an :class:`AnisotropicUNet3D` (or an
            ``ExEMModule``, whose ``G_AB`` / ``G_BA`` is taken), or any checkpoint :func:`load_generator` reads.
        out_dir: folder to write into; created if needed.
        formats: some of ``"exem"`` (``generator.safetensors`` + ``generator.json``), ``"torchscript"``
            (``generator.ts``), ``"onnx"`` (``generator.onnx``, input ``"input"``, output ``"output"``),
            ``"bioimageio"`` (a bioimage.io model package: ``bioimageio/rdf.yaml`` … and its ``.zip``, passing
            ``bioimageio.core``'s test).
        example_shape: ``(B, C, Z, Y, X)`` of the tracing / check input; C = the generator's in_channels.
        overwrite: replace the export files in a folder that already holds files; False refuses.
        direction: ``lm_to_em`` | ``em_to_lm`` (or ``AB`` | ``BA``): which generator to take from a checkpoint or
            ExEMModule (default lm_to_em = G_AB).
        onnx_opset: ONNX opset version (>= 17).
        onnx_atol: largest max |onnxruntime − PyTorch| accepted.
        onnx_exporter: ``"torchscript"`` (torch's TorchScript-based exporter: fast, all of B, Z, Y, X dynamic),
            ``"dynamo"`` (``torch.export``-based; slower, needs onnxscript) or ``"auto"`` (the TorchScript-based
            one while this torch still has it, else dynamo).
        test_volume: ``bioimageio``: the ExM volume the package's test patch is cut from (None: a synthetic one).
        package: ``bioimageio``: ``name``, ``authors``, ``cite``, ``license_id`` of the description
            (:func:`exem.bioimageio.export.write_package`).

    Returns:
        :class:`ExportedFiles`: ``{"safetensors", "json", "torchscript", "onnx"}`` → path (those asked for),
        with the check results as attributes.

    Raises:
        CheckpointError: unreadable checkpoint, output folder not empty without ``overwrite``, or an export that
            does not reproduce the eager model.
        ValueError: unknown format or an example shape the generator cannot take.
    """
    wanted = _formats(formats)
    trained = _resolve_generator(generator_or_path, direction)
    model = trained.network
    shape = _example_shape(example_shape, model)
    if onnx_exporter not in ("auto", "torchscript", "dynamo"):
        raise ValueError(f"onnx_exporter must be auto, torchscript or dynamo, got {onnx_exporter!r}")
    if int(onnx_opset) < 17:
        raise ValueError(f"onnx_opset must be >= 17, got {onnx_opset}")
    out = _prepare_out_dir(Path(out_dir), overwrite)

    result = ExportedFiles()
    inputs: list[Tensor] = []
    references: list[Tensor] = []
    if {"torchscript", "onnx", "bioimageio"} & set(wanted):
        gen = torch.Generator().manual_seed(0)
        inputs = [torch.rand(s, generator=gen) for s in (shape, _second_shape(shape, model.divisor))]
        with torch.no_grad():
            references = [model(x) for x in inputs]
        result.checked_shapes = [tuple(x.shape) for x in inputs]
    config = _export_config(trained)
    record: dict[str, Any] = {}
    if "exem" in wanted:
        result["safetensors"] = _write_safetensors(model, out / SAFETENSORS_NAME, config)
    if "torchscript" in wanted:
        result["torchscript"], diff = _write_torchscript(model, out / TORCHSCRIPT_NAME, inputs, references)
        result.torchscript_max_abs_diff = diff
        record["torchscript"] = {
            "file": TORCHSCRIPT_NAME,
            "method": "torch.jit.trace",
            "input": _input_doc(model),
            "max_abs_diff": diff,
            "checked_shapes": [list(s) for s in result.checked_shapes],
        }
    if "onnx" in wanted:
        path, diff, used = _write_onnx(
            model, out / ONNX_NAME, inputs, references, int(onnx_opset), float(onnx_atol), onnx_exporter
        )
        result["onnx"] = path
        result.onnx_max_abs_diff = diff
        record["onnx"] = {
            "file": ONNX_NAME,
            "opset": int(onnx_opset),
            "exporter": used,
            "input_name": "input",
            "output_name": "output",
            "dynamic_axes": {"0": "batch", "2": "z", "3": "y", "4": "x"},
            "input": _input_doc(model),
            "max_abs_diff": diff,
            "checked_with": "onnxruntime CPUExecutionProvider",
            "checked_shapes": [list(s) for s in result.checked_shapes],
        }
    if "bioimageio" in wanted:
        _write_bioimageio(
            trained,
            out,
            result,
            inputs,
            references,
            int(onnx_opset),
            float(onnx_atol),
            onnx_exporter,
            test_volume,
            dict(package or {}),
        )
    if "exem" in wanted:
        document = {
            **config,
            "files": {"weights": SAFETENSORS_NAME, **{k: v["file"] for k, v in record.items()}},
        }
        document.update(record)
        document["torch_version"] = torch.__version__
        result["json"] = _atomic_write_text(out / JSON_NAME, _json_text(document))
    for name, path in result.items():
        log.info("wrote %s %s", name, path, extra=summary_of("exem-export"))
    return result


def _write_bioimageio(
    trained: TrainedGenerator,
    out: Path,
    result: ExportedFiles,
    inputs: list[Tensor],
    references: list[Tensor],
    opset: int,
    atol: float,
    exporter: str,
    test_volume: Any,
    package: dict[str, Any],
) -> None:
    """The bioimage.io package, from this export's checked TorchScript / ONNX files (made aside if not asked for)."""
    import tempfile

    from exem.bioimageio.export import write_package

    with tempfile.TemporaryDirectory(dir=out, prefix=".weights-") as tmp:
        ts = result.get("torchscript")
        if ts is None:
            ts = _write_torchscript(trained.network, Path(tmp) / TORCHSCRIPT_NAME, inputs, references)[0]
        onnx = result.get("onnx")
        if onnx is None:
            onnx = _write_onnx(
                trained.network, Path(tmp) / ONNX_NAME, inputs, references, opset, atol, exporter
            )[0]
        files = write_package(
            trained, out, torchscript=ts, onnx=onnx, onnx_opset=opset, test_volume=test_volume, **package
        )
    result["bioimageio"] = files.zip
    result["bioimageio_folder"] = files.folder
    result.package = files


_FLAT_LIST = re.compile(r"\[\s+([^\[\]{}\"]*?)\s+\]")


def _json_text(document: Mapping[str, Any]) -> str:
    """Indented JSON with lists of numbers kept on one line."""
    text = json.dumps(document, indent=2)
    return (
        _FLAT_LIST.sub(lambda m: "[" + ", ".join(p.strip() for p in m.group(1).split(",")) + "]", text) + "\n"
    )


def _formats(formats: Sequence[str] | str) -> list[str]:
    items = [formats] if isinstance(formats, str) else list(formats)
    wanted = []
    for f in items:
        f = str(f).lower()
        if f not in EXPORT_FORMATS:
            raise ValueError(f"unknown export format {f!r}; choose from {', '.join(EXPORT_FORMATS)}")
        if f not in wanted:
            wanted.append(f)
    if not wanted:
        raise ValueError(f"no export format given; choose from {', '.join(EXPORT_FORMATS)}")
    return wanted


def _resolve_generator(obj: Any, direction: str | None) -> TrainedGenerator:
    """The generator's record around a CPU float32 eval copy of its network.

    ``obj``: a :class:`~exem.trained.TrainedGenerator`, an :class:`AnisotropicUNet3D`, an ``ExEMModule`` (its
    ``G_AB`` or ``G_BA`` and what it knows of its training data), or a path :func:`load_generator` reads.
    """
    dirn = check_direction(direction or "lm_to_em")
    if isinstance(obj, TrainedGenerator):
        trained = obj if direction is None else replace(obj, direction=dirn)
    elif isinstance(obj, AnisotropicUNet3D):
        trained = TrainedGenerator(network=obj, direction=dirn)
    elif isinstance(obj, nn.Module):
        inner = getattr(obj, f"G_{NETWORK_OF_DIRECTION[dirn]}", None)
        if not isinstance(inner, AnisotropicUNet3D):
            raise ValueError(f"expected an AnisotropicUNet3D or an ExEMModule, got a {type(obj).__name__}")
        groups = getattr(obj, "content_groups", None)
        trained = TrainedGenerator(
            network=inner,
            direction=dirn,
            voxel_size_nm=getattr(obj, "voxel_size_nm", None),
            lm_normalization=getattr(obj, "lm_normalization", None),
            training_patch=getattr(obj, "training_patch", None),
            content_groups=None if groups is None else groups.as_config(),
            source=type(obj).__name__,
        )
    else:
        trained = load_generator(obj, direction=dirn)
        trained = replace(trained, source=str(Path(obj).resolve()))
    if not isinstance(trained.network, AnisotropicUNet3D):
        raise ValueError(
            f"only an AnisotropicUNet3D generator can be exported, got {type(trained.network).__name__}"
        )
    return trained.with_network(copy.deepcopy(trained.network).to("cpu", torch.float32).eval())


def _example_shape(example_shape: Sequence[int], model: AnisotropicUNet3D) -> tuple[int, ...]:
    shape = positive_ints(example_shape, 5, "example_shape", "B, C, Z, Y, X")
    if shape[1] != model.in_channels:
        raise ValueError(f"example_shape has {shape[1]} channel(s); the generator takes {model.in_channels}")
    try:
        model.check_input_shape(shape)
    except ValueError as exc:
        raise ValueError(f"example_shape {list(shape)}: {exc}") from None
    return shape


def _second_shape(shape: tuple[int, ...], divisor: int) -> tuple[int, ...]:
    """A check shape differing from ``shape`` in B, Z, Y and X (so fixed-shape exports are caught)."""
    b, c, z, y, x = shape
    return (b + 1, c, z // 2 if z > 1 else 2, y + divisor, x - divisor if x > divisor else x + 2 * divisor)


def _input_doc(model: AnisotropicUNet3D) -> str:
    return (
        f"(B, {model.in_channels}, Z, Y, X) float32 in [0, 1]; any B, Z >= 1; Y, X multiples of "
        f"{model.divisor} (not checked by the exported model) -> (B, {model.out_channels}, Z, Y, X)"
    )


def _export_config(trained: TrainedGenerator) -> dict[str, Any]:
    """``generator.json``'s description of the network and of its training."""
    model = trained.network
    voxel = trained.voxel_size_nm
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "in_channels": model.in_channels,
        "out_channels": model.out_channels,
        "widths": list(model.widths),
        "divisor": model.divisor,
        "voxel_size_nm": [float(v) for v in voxel] if voxel else None,
        "lm_normalization": None if trained.lm_normalization is None else dict(trained.lm_normalization),
        "training_patch": list(trained.training_patch) if trained.training_patch else None,
        "content_groups": None if trained.content_groups is None else dict(trained.content_groups),
        "direction": trained.direction,
        "source": trained.source,
    }


def _prepare_out_dir(out: Path, overwrite: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output {out} exists and is not a directory")
    if out.is_dir():
        present = sorted(p.name for p in out.iterdir())
        if present and not overwrite:
            shown = ", ".join(present[:3]) + (", …" if len(present) > 3 else "")
            raise CheckpointError(
                f"output directory {out} already holds files ({shown}); pass overwrite=true to replace them"
            )
        for name in _EXPORT_FILES:  # only our own files: stale exports must not pass for new ones
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def _temp_path(final: Path) -> Iterator[Path]:
    """A temporary name beside ``final``; renamed onto it if the block succeeds, removed otherwise."""
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write_text(final: Path, text: str) -> Path:
    with _temp_path(final) as tmp:
        tmp.write_text(text)
    return final


def _write_safetensors(model: AnisotropicUNet3D, final: Path, config: dict[str, Any]) -> Path:
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {"format": FORMAT_NAME, "exem_config": json.dumps(config)}
    with _temp_path(final) as tmp:
        tmp.write_bytes(save(tensors, metadata=header))  # (save_file would create the file with mode 0600)
    return final


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the tracer's and exporters' advisory warnings (the outputs are checked numerically instead)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*is deprecated.*")
        yield


def _max_abs_diff(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.double() - b.double()).abs().max())


def _write_torchscript(
    model: AnisotropicUNet3D, final: Path, inputs: list[Tensor], references: list[Tensor]
) -> tuple[Path, float]:
    with _quiet_export(), torch.no_grad():
        traced = torch.jit.trace(model, inputs[0], check_trace=False)
    with _temp_path(final) as tmp:
        torch.jit.save(traced, str(tmp))
        with _quiet_export():
            loaded = torch.jit.load(str(tmp), map_location="cpu").eval()
        diff = 0.0
        with torch.no_grad():
            for x, ref in zip(inputs, references, strict=True):
                try:
                    diff = max(diff, _max_abs_diff(loaded(x), ref))
                except RuntimeError:
                    diff = float("inf")
        if not diff <= _TORCHSCRIPT_ATOL:
            raise CheckpointError(
                f"{final}: the traced TorchScript module differs from the model by {diff:.3g} "
                f"(> {_TORCHSCRIPT_ATOL:g}) on inputs {[tuple(x.shape) for x in inputs]}"
            )
    log.info(
        "TorchScript check: max |ts - torch| = %.3g on %s",
        diff,
        [tuple(x.shape) for x in inputs],
        extra=summary_of("exem-export"),
    )
    return final, diff


def onnx_export(model: AnisotropicUNet3D, example: Tensor, target: Path, opset: int, exporter: str) -> None:
    if exporter == "torchscript":
        kwargs: dict[str, Any] = {
            "input_names": ["input"],
            "output_names": ["output"],
            "dynamic_axes": {name: {0: "batch", 2: "z", 3: "y", 4: "x"} for name in ("input", "output")},
            "opset_version": opset,
            "do_constant_folding": True,
        }
        if "dynamo" in inspect.signature(torch.onnx.export).parameters:
            kwargs["dynamo"] = False
        with _quiet_export(), torch.no_grad():
            torch.onnx.export(model, (example,), str(target), **kwargs)
        return
    # torch.export-based: the eager input check turns Y and X into Python ints (specialising them), so it is
    # switched off on this private copy while exporting.
    model.check_input_shape = lambda shape: None  # type: ignore[method-assign]
    chatty = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [lg.level for lg in chatty]
    for lg in chatty:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        with _quiet_export(), torch.no_grad():
            torch.onnx.export(
                model,
                (example,),
                str(target),
                dynamo=True,
                external_data=False,
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes={"x": {0: "batch", 2: "z", 3: "y", 4: "x"}},
                opset_version=opset,
                verbose=False,
            )
    finally:
        del model.check_input_shape
        for lg, level in zip(chatty, levels, strict=True):
            lg.setLevel(level)


def _write_onnx(
    model: AnisotropicUNet3D,
    final: Path,
    inputs: list[Tensor],
    references: list[Tensor],
    opset: int,
    atol: float,
    exporter: str,
) -> tuple[Path, float, str]:
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as exc:
        raise CheckpointError(
            f"ONNX export needs onnx and onnxruntime ({exc}); pip install onnx onnxruntime"
        ) from None

    model = copy.deepcopy(model)  # the dynamo path patches the instance
    with _temp_path(final) as tmp:
        used = exporter
        if exporter == "auto":
            used = "torchscript"
            try:
                onnx_export(model, inputs[0], tmp, opset, "torchscript")
            except Exception as exc:  # noqa: BLE001 - e.g. a torch without the TorchScript-based exporter
                log.warning(
                    "TorchScript-based ONNX export failed (%s); trying the dynamo exporter",
                    exception_line(exc, limit=200),
                )
                used = "dynamo"
                onnx_export(model, inputs[0], tmp, opset, "dynamo")
        else:
            onnx_export(model, inputs[0], tmp, opset, exporter)
        onnx.checker.check_model(str(tmp))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(tmp), sess_options=options, providers=["CPUExecutionProvider"])
        in_name = session.get_inputs()[0].name
        diff = 0.0
        for x, ref in zip(inputs, references, strict=True):
            try:
                got = torch.from_numpy(session.run(None, {in_name: x.numpy()})[0])
                diff = max(diff, _max_abs_diff(got, ref))
            except Exception:  # noqa: BLE001 - onnxruntime errors: a shape the export cannot take
                diff = float("inf")
        shapes = [tuple(x.shape) for x in inputs]
        if not diff <= atol:
            raise CheckpointError(
                f"{final}: ONNX export check failed: max |onnx - torch| = {diff:.3g} > {atol:g} "
                f"(onnxruntime CPU, inputs {shapes}, {used} exporter)"
            )
        del session
    log.info(
        "ONNX check (onnxruntime CPU, %s exporter): max |onnx - torch| = %.3g on %s",
        used,
        diff,
        shapes,
        extra=summary_of("exem-export"),
    )
    return final, diff, used
