"""Load the ExEM generator from any checkpoint kind, as a :class:`~exem.trained.TrainedGenerator`.

:func:`load_generator` accepts

- a Lightning checkpoint written by ``exem-train`` (``state_dict`` with ``G_AB.*`` / ``G_BA.*`` keys);
- an exported generator: a folder (or the ``generator.safetensors`` inside it) holding ``generator.safetensors``
  and ``generator.json`` (see :func:`exem.export.export_generator`);
- an original ExEM ``G_AB_<iter>.pth`` state dict, with or without the ``module.`` prefix of a
  DataParallel / DistributedDataParallel wrapper.

Loading never unpickles arbitrary objects: torch files are read with ``torch.load(..., weights_only=True)``
and safetensors files hold nothing but tensors. The network's widths and channel counts are inferred from the
weight shapes, so no config is needed to load a checkpoint. What the checkpoint knows about the training (LM voxel
size and normalisation, training patch, content groups) comes back in the record.
:func:`check_resume_checkpoint` turns a bad ``ckpt_path`` into one line before Lightning resumes from it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickletools
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from exem.errors import exception_line
from exem.models import AnisotropicUNet3D
from exem.trained import NETWORK_OF_DIRECTION, TrainedGenerator, check_direction, trained_normalization

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "JSON_NAME",
    "SAFETENSORS_NAME",
    "CheckpointError",
    "check_fit",
    "check_resume_checkpoint",
    "infer_generator_config",
    "load_generator",
    "trained_normalization",
]

log = logging.getLogger(__name__)

FORMAT_NAME = "exem-generator"
FORMAT_VERSION = 1
SAFETENSORS_NAME = "generator.safetensors"
JSON_NAME = "generator.json"
_DATA_PARALLEL_PREFIX = "module."


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or exported; the message is one line naming the path and the problem."""


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
    direction: str = "lm_to_em",
    widths: Sequence[int] | None = None,
    map_location: str | torch.device = "cpu",
) -> TrainedGenerator:
    """Load an ExEM generator from a Lightning checkpoint, an exported generator or an original ExEM ``.pth``.

    Args:
        path: an ``exem-train`` checkpoint (``.ckpt``), an export folder or its ``generator.safetensors``, or
            an original ExEM ``G_AB_<iter>.pth`` state dict (optionally with the ``module.`` prefix).
        direction: ``lm_to_em`` (ExM → EM, ``G_AB``) or ``em_to_lm`` (EM → ExM, ``G_BA``); ``AB`` / ``BA`` are
            accepted. Which generator of a Lightning checkpoint to take; an exported generator must have been
            exported for this direction; a bare ``.pth`` holds one generator, taken as the one asked for.
        widths: expected channel widths (e.g. from a config); None to accept whatever the weights have.
        map_location: device the network is put on.

    Returns:
        a :class:`~exem.trained.TrainedGenerator`: the network in eval mode, and what the file knows of its
        training (LM voxel size and normalisation, training patch, content groups; None when unknown, e.g. for
        published ``.pth`` files), the direction, the checkpoint kind (``lightning``, ``exported``,
        ``state_dict``) and the path loaded.

    Raises:
        CheckpointError: one-line message naming the path, for a missing, unreadable or foreign file, a pickle
            that needs more than plain tensors and containers, weights that do not fit the network, or widths
            other than ``widths``.
    """
    try:
        direction = check_direction(direction)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
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
        stored = meta.get("direction")
        if stored is not None and check_direction(stored) != direction:
            raise CheckpointError(
                f"{path} holds the {check_direction(stored)} generator, but direction={direction} was asked for"
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
    check_fit(model, state_dict, path)
    model.load_state_dict(state_dict, strict=True)
    model.eval().to(map_location)
    patch = meta.get("training_patch")
    content = meta.get("content_groups")
    trained = TrainedGenerator(
        network=model,
        direction=direction,
        voxel_size_nm=_voxel_size(meta.get("voxel_size_nm"), path),
        lm_normalization=meta.get("lm_normalization"),
        training_patch=tuple(int(v) for v in patch) if patch else None,  # type: ignore[arg-type]
        content_groups=dict(content)
        if isinstance(content, Mapping) and content.get("lm_thresholds")
        else None,
        source=str(path),
        checkpoint_kind=kind,
    )
    log.info("loaded the %s generator (widths %s, %s) from %s", direction, config["widths"], kind, path)
    return trained


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
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exception_line(exc, limit=200)})"
        ) from None

    json_path = path.parent / JSON_NAME
    meta: dict[str, Any] = {}
    if json_path.is_file():
        try:
            meta = json.loads(json_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(
                f"{json_path} is not valid JSON ({exception_line(exc, limit=200)})"
            ) from None
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
    network = NETWORK_OF_DIRECTION[direction]
    prefix = f"G_{network}."
    state = obj.get("state_dict")
    if isinstance(state, Mapping):  # Lightning checkpoint
        sub = {k[len(prefix) :]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}
        if not sub:
            raise CheckpointError(
                f"{path} holds no exem/ExEM generator G_{network} (found keys like {_keys_like(state)})"
            )
        hparams = obj.get("hyper_parameters")
        gen_cfg = hparams.get("generator") if isinstance(hparams, Mapping) else None
        meta = dict(gen_cfg) if isinstance(gen_cfg, Mapping) else {}
        meta = {k: meta[k] for k in ("widths", "in_channels", "out_channels") if k in meta}
        meta["voxel_size_nm"] = obj.get("exem_voxel_size_nm")
        meta["lm_normalization"] = obj.get("exem_lm_normalization")
        meta["training_patch"] = obj.get("exem_training_patch")
        loss = hparams.get("loss") if isinstance(hparams, Mapping) else None
        meta["content_groups"] = loss.get("content") if isinstance(loss, Mapping) else None
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
                f"{path} holds no exem/ExEM generator G_{network} (found keys like {_keys_like(obj)})"
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


def check_fit(model: nn.Module, state_dict: Mapping[str, Tensor], path: Path) -> None:
    """Raise a one-line CheckpointError listing the first missing / unexpected / misshapen keys, if any."""
    problems = _fit_problems(model, state_dict)
    if problems:
        m = model
        raise CheckpointError(
            f"{path}: weights do not fit AnisotropicUNet3D(in_channels={m.in_channels}, "
            f"out_channels={m.out_channels}, widths={m.widths}): {problems}"
        )
