"""Load the ExEM generator from any checkpoint kind, and export it for inference elsewhere.

:func:`load_generator` accepts

- a Lightning checkpoint written by ``exem-train`` (``state_dict`` with ``G_AB.*`` / ``G_BA.*`` keys);
- an exported generator: a folder (or the ``generator.safetensors`` inside it) holding ``generator.safetensors``
  and ``generator.json`` (see :func:`export_generator`);
- an original ExEM ``G_AB_<iter>.pth`` state dict, with or without the ``module.`` prefix of a
  DataParallel / DistributedDataParallel wrapper.

Loading never unpickles arbitrary objects: torch files are read with ``torch.load(..., weights_only=True)``
and safetensors files hold nothing but tensors. The network's widths and channel counts are inferred from the
weight shapes, so no config is needed to load a checkpoint.

:func:`export_generator` writes ``generator.safetensors`` + ``generator.json`` (format ``"exem-generator"``,
version 1), a TorchScript module ``generator.ts`` and an ONNX model ``generator.onnx``; the TorchScript and
ONNX files are checked against the eager PyTorch model before they are kept. All exported models map
``(B, in_channels, Z, Y, X)`` float32 volumes (intensities in [0, 1]) to ``(B, out_channels, Z, Y, X)``, with
any B and Z >= 1, and Y, X multiples of ``2 ** (len(widths) - 1)``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import json
import logging
import os
import pickletools
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from exem.models import AnisotropicUNet3D

__all__ = [
    "EXPORT_FORMATS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CheckpointError",
    "ExportedFiles",
    "check_resume_checkpoint",
    "export_generator",
    "infer_generator_config",
    "load_generator",
    "trained_normalization",
]

log = logging.getLogger(__name__)

FORMAT_NAME = "exem-generator"
FORMAT_VERSION = 1
EXPORT_FORMATS: tuple[str, ...] = ("exem", "torchscript", "onnx")
DIRECTIONS: tuple[str, ...] = ("AB", "BA")

SAFETENSORS_NAME = "generator.safetensors"
JSON_NAME = "generator.json"
TORCHSCRIPT_NAME = "generator.ts"
ONNX_NAME = "generator.onnx"
# Every file an export may write (the .data file only if an exporter splits large weights off).
_EXPORT_FILES = (SAFETENSORS_NAME, JSON_NAME, TORCHSCRIPT_NAME, ONNX_NAME, ONNX_NAME + ".data")

_TORCHSCRIPT_ATOL = 1e-5
_DEFAULT_ONNX_ATOL = 1e-4
_DEFAULT_OPSET = 18
_DATA_PARALLEL_PREFIX = "module."


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or exported; the message is one line naming the path and the problem."""


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

    def summary(self) -> str:
        """The export checks on a line each (empty when none ran), as ``exem-export`` prints them."""
        lines = []
        if self.torchscript_max_abs_diff is not None:
            lines.append(f"torchscript check: max |ts - torch| = {self.torchscript_max_abs_diff:.3g}")
        if self.onnx_max_abs_diff is not None:
            diff = self.onnx_max_abs_diff
            lines.append(f"onnx check: max |onnx - torch| = {diff:.3g} (onnxruntime CPU, tolerance 1e-4)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- loading
def infer_generator_config(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """``in_channels``, ``out_channels`` and ``widths`` of an :class:`AnisotropicUNet3D` state dict.

    Read from the weight shapes: ``first_conv.weight`` is ``(widths[0], in_channels, 1, 5, 5)``,
    ``tripleconvK.conv1.weight`` is ``(widths[K-1], ·, 1, 3, 3)`` for K = 1..N, ``one_by_one_conv.weight`` is
    ``(out_channels, widths[0], 1, 1, 1)``.

    Raises:
        KeyError: if ``first_conv.weight`` or ``tripleconv1.conv1.weight`` is missing or not 5-D.
    """
    first = state_dict.get("first_conv.weight")
    if not isinstance(first, Tensor) or first.dim() != 5:
        raise KeyError("first_conv.weight")
    widths: list[int] = []
    while (
        isinstance(w := state_dict.get(f"tripleconv{len(widths) + 1}.conv1.weight"), Tensor) and w.dim() == 5
    ):
        widths.append(int(w.shape[0]))
    if not widths:
        raise KeyError("tripleconv1.conv1.weight")
    last = state_dict.get("one_by_one_conv.weight")
    out_channels = int(last.shape[0]) if isinstance(last, Tensor) and last.dim() == 5 else 1
    return {"in_channels": int(first.shape[1]), "out_channels": out_channels, "widths": tuple(widths)}


def load_generator(
    path: str | os.PathLike[str],
    *,
    direction: str = "AB",
    widths: Sequence[int] | None = None,
    map_location: str | torch.device = "cpu",
) -> AnisotropicUNet3D:
    """Load an ExEM generator from a Lightning checkpoint, an exported generator or an original ExEM ``.pth``.

    Args:
        path: an ``exem-train`` checkpoint (``.ckpt``), an export folder or its ``generator.safetensors``, or
            an original ExEM ``G_AB_<iter>.pth`` state dict (optionally with the ``module.`` prefix).
        direction: ``"AB"`` (ExM → EM) or ``"BA"`` (EM → ExM): which generator of a Lightning checkpoint to
            take. An exported generator must have been exported for this direction. A bare ``.pth`` holds one
            generator, which is taken as the one asked for.
        widths: expected channel widths (e.g. from a config); None to accept whatever the weights have.
        map_location: device the returned model is put on.

    Returns:
        the generator in eval mode, with extra attributes ``voxel_size_nm`` (``(z, y, x)`` nm of the LM data it
        was trained on, or None when unknown, e.g. for published ``.pth`` files), ``lm_normalization`` (how the
        LM input was normalised in training, or None), ``direction``, ``checkpoint_kind`` (``"lightning"``,
        ``"exported"``, ``"state_dict"``) and ``source`` (the path loaded).

    Raises:
        CheckpointError: one-line message naming the path, for a missing, unreadable or foreign file, a pickle
            that needs more than plain tensors and containers, weights that do not fit the network, or widths
            other than ``widths``.
    """
    if direction not in DIRECTIONS:
        raise CheckpointError(f"direction must be 'AB' or 'BA', got {direction!r}")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        if not (path / SAFETENSORS_NAME).is_file():
            raise CheckpointError(
                f"{path} is a directory without {SAFETENSORS_NAME}; pass a checkpoint file or an export folder"
            )
        path = path / SAFETENSORS_NAME

    meta: dict[str, Any] = {}
    if _is_safetensors(path):
        state_dict, meta = _read_exported(path)
        kind = "exported"
        if meta.get("direction") not in (None, direction):
            raise CheckpointError(
                f"{path} holds the {meta['direction']} generator, but direction={direction} was asked for"
            )
    else:
        state_dict, meta, kind = _pick_generator(_torch_load(path), direction, path)

    try:
        config = infer_generator_config(state_dict)
    except KeyError:
        raise CheckpointError(
            f"{path} holds no exem/ExEM generator (found keys like {_keys_like(state_dict)})"
        ) from None
    if len(config["widths"]) < 2:
        raise CheckpointError(
            f"{path} holds no exem/ExEM generator (one U-Net level only; found keys like {_keys_like(state_dict)})"
        )
    for key in ("widths", "in_channels", "out_channels"):
        stated = meta.get(key)
        if stated is not None and _as_tuple(stated) != _as_tuple(config[key]):
            raise CheckpointError(
                f"{path}: its config says {key} {_as_tuple(stated)} but the weights have {_as_tuple(config[key])}"
            )
    if widths is not None:
        asked = _as_tuple(widths)
        if asked != config["widths"]:
            raise CheckpointError(
                f"{path}: widths mismatch: checkpoint has {config['widths']}, config asks for {asked}"
            )

    try:
        model = AnisotropicUNet3D(**config)
    except ValueError as exc:
        raise CheckpointError(f"{path} holds no usable exem/ExEM generator: {exc}") from None
    _check_fit(model, state_dict, path)
    model.load_state_dict(state_dict, strict=True)
    model.eval().to(map_location)

    model.voxel_size_nm = _voxel_size(meta.get("voxel_size_nm"), path)
    model.lm_normalization = meta.get("lm_normalization")
    model.direction = meta.get("direction") or direction
    model.checkpoint_kind = kind
    model.source = str(path)
    log.info(
        "loaded the %s generator %s (widths %s, %s) from %s",
        model.direction,
        type(model).__name__,
        config["widths"],
        kind,
        path,
    )
    return model


def trained_normalization(
    generator: nn.Module,
    intensity_range: Sequence[float] | None = None,
    percentiles: Sequence[float] | None = None,
) -> tuple[Sequence[float] | None, Sequence[float] | None]:
    """The ``(intensity_range, percentiles)`` to open ExM input for ``generator`` with.

    What the caller gives wins; when both are None, the normalisation the generator's training data had
    (``generator.lm_normalization``, set by :func:`load_generator` from an ``exem-train`` checkpoint or export),
    else ``(None, None)``: the input's dtype range.
    """
    if intensity_range is not None or percentiles is not None:
        return intensity_range, percentiles
    trained = getattr(generator, "lm_normalization", None) or {}
    return trained.get("intensity_range"), trained.get("percentiles")


def check_resume_checkpoint(path: str | os.PathLike[str], model: nn.Module) -> None:
    """Check, before training resumes from ``path``, that it is an ``exem-train`` checkpoint that fits ``model``.

    The file is read with ``weights_only=True`` and its tensors memory-mapped (not read). Lightning loads it
    again to resume; this check turns what would be a traceback deep inside Lightning into one line.

    Args:
        path: the ``ckpt_path`` to resume from.
        model: the freshly configured :class:`~exem.module.ExEMModule` (its state-dict shapes are compared).

    Raises:
        CheckpointError: missing, empty, truncated or unsafe file; not an ``exem-train`` checkpoint (e.g. an
            exported generator or a published ``.pth``); generator widths or other shapes that differ from the
            configured model.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    obj = _torch_load(path, mmap=True)
    state = obj.get("state_dict") if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or "optimizer_states" not in obj or "loops" not in obj:
        raise CheckpointError(
            f"{path} is not an exem-train checkpoint (found keys like {_keys_like(obj)}); resume from the "
            "last.ckpt or step*.ckpt of a training run"
        )
    hparams = obj.get("hyper_parameters")
    gen_cfg = hparams.get("generator") if isinstance(hparams, Mapping) else None
    stated = _as_tuple(gen_cfg.get("widths")) if isinstance(gen_cfg, Mapping) else None
    wanted = _as_tuple(getattr(getattr(model, "G_AB", None), "widths", None))
    if stated is not None and wanted is not None and stated != wanted:
        raise CheckpointError(
            f"{path}: widths mismatch: checkpoint has generator widths {stated}, config asks for {wanted} "
            "(model.generator.widths)"
        )
    problems = _fit_problems(model, state, skip_empty=True)  # (empty buffers: replay pools, filled later)
    if problems:
        raise CheckpointError(
            f"{path} does not fit the configured model: {problems} (check model.* against the run that wrote it)"
        )


def _as_tuple(value: Any) -> Any:
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):  # lists, tuples, ListConfig
        return tuple(int(v) if isinstance(v, (int, float)) and float(v).is_integer() else v for v in value)
    return value


def _keys_like(state: Mapping[str, Any] | Any, n: int = 3) -> str:
    if not isinstance(state, Mapping):
        return f"none: a {type(state).__name__}"
    keys = [str(k) for k in state]
    if not keys:
        return "none: it is empty"
    more = f", … ({len(keys)} keys)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _voxel_size(value: Any, path: Path) -> tuple[float, float, float] | None:
    if value is None:
        return None
    try:
        vs = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        vs = ()
    if len(vs) != 3 or not all(v > 0 for v in vs):
        raise CheckpointError(f"{path}: voxel_size_nm must be [z, y, x] positive nm or null, got {value!r}")
    return vs  # type: ignore[return-value]


def _is_safetensors(path: Path) -> bool:
    """``*.safetensors``, or a file that starts like one (8-byte little-endian header size, then ``{``)."""
    if path.suffix == ".safetensors":
        return True
    try:
        with path.open("rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    size = int.from_bytes(head[:8], "little")
    return 2 <= size <= 100_000_000 and size + 8 <= path.stat().st_size


def _read_exported(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors of ``generator.safetensors`` and its config (``generator.json`` beside it, else the header)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            state_dict = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
            header = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({_first_line(exc)})") from None

    json_path = path.parent / JSON_NAME
    meta: dict[str, Any] = {}
    if json_path.is_file():
        try:
            meta = json.loads(json_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{json_path} is not valid JSON ({_first_line(exc)})") from None
        where = json_path
    elif "exem_config" in header:
        try:
            meta = json.loads(header["exem_config"])
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: its exem_config header is not valid JSON ({exc})") from None
        where = path
    else:
        return state_dict, {}  # a bare safetensors state dict: everything is inferred from the shapes
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(
            f"{where} is not an exem generator config (format {found!r}, not {FORMAT_NAME!r})"
        )
    version = meta.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where} has format version {version!r}; this exem reads {FORMAT_NAME} version <= {FORMAT_VERSION}"
        )
    return state_dict, meta


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "…") if len(text) > 200 else text or type(exc).__name__


def _torch_load(path: Path, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors (``mmap``: map, not read, zip-format tensors)."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is not a readable checkpoint (empty file)")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path} cannot be read (permission denied)")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            mmap = bool(mmap) and zipfile.is_zipfile(path)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many kinds for bad files
        names = _unsafe_globals(path, exc)
        if names is not None:
            what = ", ".join(names[:3]) if names else "objects other than tensors"
            raise CheckpointError(
                f"{path}: exem refuses to unpickle {what}: not a plain weights file "
                "(only tensors and plain containers are loaded, weights_only=True)"
            ) from None
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or not a torch file)"
        ) from None


_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([\w.]+)|safe_globals\(\[([\w.]+)")
# Globals torch writes into ordinary weights files; they are not worth naming in the refusal.
_PLAIN_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set")


def _unsafe_globals(path: Path, exc: BaseException) -> list[str] | None:
    """If ``exc`` is weights_only refusing a well-formed pickle, the globals it would have imported, else None.

    The pickle is only parsed (:mod:`pickletools`), never executed.
    """
    if not isinstance(exc, Exception) or "Weights only load failed" not in str(exc):
        return None
    named = list(dict.fromkeys(a or b for a, b in _GLOBAL_IN_MESSAGE.findall(str(exc))))
    if named:
        return named
    data = _pickle_bytes(path)
    if data is None:
        return None
    found: list[str] = []
    strings: list[str] = []
    try:
        for opcode, arg, _pos in pickletools.genops(io.BytesIO(data)):
            if opcode.name in ("GLOBAL", "INST") and isinstance(arg, str):
                found.append(arg.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # noqa: BLE001 - not a well-formed pickle: unreadable, not unsafe
        return None
    return [g for g in dict.fromkeys(found) if not g.startswith(_PLAIN_GLOBAL_PREFIXES)]


def _pickle_bytes(path: Path, limit: int = 64 << 20) -> bytes | None:
    """The pickle stream of a torch file: ``*/data.pkl`` of a zip checkpoint, else the file's first bytes."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                return zf.read(name)[:limit] if name else None
        with path.open("rb") as fh:
            return fh.read(limit)
    except (OSError, zipfile.BadZipFile, KeyError):
        return None


def _all_tensors(obj: Mapping[Any, Any]) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _pick_generator(obj: Any, direction: str, path: Path) -> tuple[dict[str, Tensor], dict[str, Any], str]:
    """The state dict of the asked-for generator in a loaded torch object, its known config and the kind."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds no exem/ExEM generator (found {_keys_like(obj)})")
    prefix = f"G_{direction}."
    state = obj.get("state_dict")
    if isinstance(state, Mapping):  # Lightning checkpoint
        sub = {k[len(prefix) :]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}
        if not sub:
            raise CheckpointError(
                f"{path} holds no exem/ExEM generator G_{direction} (found keys like {_keys_like(state)})"
            )
        hparams = obj.get("hyper_parameters")
        gen_cfg = hparams.get("generator") if isinstance(hparams, Mapping) else None
        meta = dict(gen_cfg) if isinstance(gen_cfg, Mapping) else {}
        meta = {k: meta[k] for k in ("widths", "in_channels", "out_channels") if k in meta}
        meta["voxel_size_nm"] = obj.get("exem_voxel_size_nm")
        meta["lm_normalization"] = obj.get("exem_lm_normalization")
        meta["direction"] = direction
        return sub, meta, "lightning"
    if not _all_tensors(obj):
        raise CheckpointError(f"{path} holds no exem/ExEM generator (found keys like {_keys_like(obj)})")
    keys = list(obj)
    if all(k.startswith(_DATA_PARALLEL_PREFIX) for k in keys):
        obj = {k[len(_DATA_PARALLEL_PREFIX) :]: v for k, v in obj.items()}
    if any(k.startswith(("G_AB.", "G_BA.")) for k in obj):  # an ExEMModule state dict saved on its own
        sub = {k[len(prefix) :]: v for k, v in obj.items() if k.startswith(prefix)}
        if not sub:
            raise CheckpointError(
                f"{path} holds no exem/ExEM generator G_{direction} (found keys like {_keys_like(obj)})"
            )
        return sub, {"direction": direction}, "state_dict"
    return dict(obj), {}, "state_dict"


def _fit_problems(model: nn.Module, state_dict: Mapping[str, Tensor], skip_empty: bool = False) -> str:
    """The first missing / unexpected / misshapen keys of ``state_dict`` against ``model``, as one line ("" if it
    fits). ``skip_empty``: the shapes of empty tensors in the model are not compared."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshapen = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and (v.numel() or not skip_empty) and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    parts = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", misshapen),
    ):
        if items:
            more = f", … ({len(items)} in all)" if len(items) > 3 else ""
            parts.append(f"{label} {', '.join(items[:3])}{more}")
    return "; ".join(parts)


def _check_fit(model: nn.Module, state_dict: Mapping[str, Tensor], path: Path) -> None:
    """Raise a one-line CheckpointError listing the first missing / unexpected / misshapen keys, if any."""
    problems = _fit_problems(model, state_dict)
    if problems:
        m = model
        raise CheckpointError(
            f"{path}: weights do not fit AnisotropicUNet3D(in_channels={m.in_channels}, "
            f"out_channels={m.out_channels}, widths={m.widths}): {problems}"
        )


# ---------------------------------------------------------------------------------------------------- export
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
) -> ExportedFiles:
    """Export a generator as safetensors + JSON (``exem``), TorchScript and/or ONNX, each checked before kept.

    The TorchScript module (``torch.jit.trace``) and the ONNX model take any batch size B, depth Z and Y, X
    that are multiples of ``2 ** (len(widths) - 1)``; they do not check their input (the eager model does).
    Both are compared with the eager model on a random ``example_shape`` input and on a second input of
    another B, Z, Y and X: TorchScript must agree within 1e-5, ONNX (onnxruntime, CPU) within ``onnx_atol``.

    Args:
        generator_or_path: an :class:`AnisotropicUNet3D` (or an ``ExEMModule``, whose ``G_<direction>`` is
            taken), or any checkpoint :func:`load_generator` reads.
        out_dir: folder to write into; created if needed.
        formats: some of ``"exem"`` (``generator.safetensors`` + ``generator.json``), ``"torchscript"``
            (``generator.ts``), ``"onnx"`` (``generator.onnx``, input ``"input"``, output ``"output"``).
        example_shape: ``(B, C, Z, Y, X)`` of the tracing / check input; C = the generator's in_channels.
        overwrite: replace the export files in a folder that already holds files; False refuses.
        direction: ``"AB"`` | ``"BA"``; which generator to take from a checkpoint or ExEMModule (default AB).
        onnx_opset: ONNX opset version (>= 17).
        onnx_atol: largest max |onnxruntime − PyTorch| accepted.
        onnx_exporter: ``"torchscript"`` (torch's TorchScript-based exporter: fast, all of B, Z, Y, X dynamic),
            ``"dynamo"`` (``torch.export``-based; slower, needs onnxscript) or ``"auto"`` (the TorchScript-based
            one while this torch still has it, else dynamo).

    Returns:
        :class:`ExportedFiles`: ``{"safetensors", "json", "torchscript", "onnx"}`` → path (those asked for),
        with the check results as attributes.

    Raises:
        CheckpointError: unreadable checkpoint, output folder not empty without ``overwrite``, or an export that
            does not reproduce the eager model.
        ValueError: unknown format or an example shape the generator cannot take.
    """
    wanted = _formats(formats)
    model, source, dirn = _resolve_generator(generator_or_path, direction)
    shape = _example_shape(example_shape, model)
    if onnx_exporter not in ("auto", "torchscript", "dynamo"):
        raise ValueError(f"onnx_exporter must be auto, torchscript or dynamo, got {onnx_exporter!r}")
    if int(onnx_opset) < 17:
        raise ValueError(f"onnx_opset must be >= 17, got {onnx_opset}")
    out = _prepare_out_dir(Path(out_dir), overwrite)

    result = ExportedFiles()
    inputs: list[Tensor] = []
    references: list[Tensor] = []
    if "torchscript" in wanted or "onnx" in wanted:
        gen = torch.Generator().manual_seed(0)
        inputs = [torch.rand(s, generator=gen) for s in (shape, _second_shape(shape, model.divisor))]
        with torch.no_grad():
            references = [model(x) for x in inputs]
        result.checked_shapes = [tuple(x.shape) for x in inputs]
    config = _export_config(model, source, dirn)
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
    if "exem" in wanted:
        document = {
            **config,
            "files": {"weights": SAFETENSORS_NAME, **{k: v["file"] for k, v in record.items()}},
        }
        document.update(record)
        document["torch_version"] = torch.__version__
        result["json"] = _atomic_write_text(out / JSON_NAME, _json_text(document))
    for name, path in result.items():
        log.info("wrote %s %s", name, path)
    return result


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


def _resolve_generator(obj: Any, direction: str | None) -> tuple[AnisotropicUNet3D, str, str]:
    """A CPU float32 eval copy of the generator, where it came from, and its direction."""
    if isinstance(obj, nn.Module):
        dirn = direction or "AB"
        if not isinstance(obj, AnisotropicUNet3D):
            inner = getattr(obj, f"G_{dirn}", None)
            if not isinstance(inner, AnisotropicUNet3D):
                raise ValueError(
                    f"expected an AnisotropicUNet3D or an ExEMModule, got a {type(obj).__name__}"
                )
            voxel = getattr(obj, "voxel_size_nm", None)
            norm = getattr(obj, "lm_normalization", None)
            obj = inner
        else:
            dirn = direction or getattr(obj, "direction", None) or "AB"
            voxel = getattr(obj, "voxel_size_nm", None)
            norm = getattr(obj, "lm_normalization", None)
        model = copy.deepcopy(obj).to("cpu", torch.float32).eval()
        model.voxel_size_nm = tuple(float(v) for v in voxel) if voxel else None
        model.lm_normalization = norm
        return model, str(getattr(obj, "source", "in-memory module")), dirn
    dirn = direction or "AB"
    model = load_generator(obj, direction=dirn)
    model.float()
    return model, str(Path(obj).resolve()), dirn


def _example_shape(example_shape: Sequence[int], model: AnisotropicUNet3D) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in example_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 5 or min(shape) < 1:
        raise ValueError(f"example_shape must be 5 positive ints (B, C, Z, Y, X), got {example_shape!r}")
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


def _export_config(model: AnisotropicUNet3D, source: str, direction: str) -> dict[str, Any]:
    voxel = getattr(model, "voxel_size_nm", None)
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "in_channels": model.in_channels,
        "out_channels": model.out_channels,
        "widths": list(model.widths),
        "divisor": model.divisor,
        "voxel_size_nm": [float(v) for v in voxel] if voxel else None,
        "lm_normalization": getattr(model, "lm_normalization", None),
        "direction": direction,
        "source": source,
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
    log.info("TorchScript check: max |ts - torch| = %.3g on %s", diff, [tuple(x.shape) for x in inputs])
    return final, diff


def _onnx_export(model: AnisotropicUNet3D, example: Tensor, target: Path, opset: int, exporter: str) -> None:
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
                _onnx_export(model, inputs[0], tmp, opset, "torchscript")
            except Exception as exc:  # noqa: BLE001 - e.g. a torch without the TorchScript-based exporter
                log.warning(
                    "TorchScript-based ONNX export failed (%s); trying the dynamo exporter", _first_line(exc)
                )
                used = "dynamo"
                _onnx_export(model, inputs[0], tmp, opset, "dynamo")
        else:
            _onnx_export(model, inputs[0], tmp, opset, exporter)
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
    log.info("ONNX check (onnxruntime CPU, %s exporter): max |onnx - torch| = %.3g on %s", used, diff, shapes)
    return final, diff, used
