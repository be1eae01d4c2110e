"""Apply an EM-trained segmentation network (TorchScript or ONNX) to a whole (virtual) EM volume.

The network runs through the same blockwise engine as translation (:func:`exem.inference.engine.run_blockwise`:
one global patch grid, Gaussian blending, done-markers for resuming, DDP through a Lightning Trainer), then its
probability map is post-processed into instance labels (:mod:`exem.analysis.instances`).

Output (one local folder, zarr format 2, NGFF 0.4)::

    <output>/                 zarr group; attribute "exem": the settings, "complete", "num_objects"
    <output>/probabilities/   OME-Zarr image, levels "0" and "1" (Y, X halved by 2×2 mean), float16: channel 0
                              of the model's output (foreground or boundary probability), blended
    <output>/labels/          OME-Zarr label image ("image-label" metadata), levels "0" and "1" (nearest
                              neighbour), uint32 instance ids (0 = background), the input's voxel size

``napari <output>/labels`` (with napari-ome-zarr) opens the labels as a labels layer.

Models take ``(B, 1, Z, Y, X)`` float32 in the model's own normalisation: ``normalize=[lo, hi]`` maps that raw
input range to [0, 1] (``percentiles=[lo %, hi %]`` of a sample instead; default: the volume's dtype range), and
return ``(B, C, Z, Y, X)`` whose channel 0 is the probability. Options (:data:`OPTION_KEYS`) come from, in order of
precedence: the arguments / command line, the model's sidecar file (:func:`find_sidecar`), the defaults here.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import zarr
from torch import Tensor, nn

from exem.analysis.instances import CONNECTIVITY, check_watershed_size, label_components, seeded_watershed
from exem.checkpoints import _first_line
from exem.checks import triple
from exem.data.volume import Volume
from exem.inference.engine import (
    _alignment,
    _round_up,
    level_chunks,
    resolve_region,
    run_blockwise,
)
from exem.inference.translate import (
    LEVELS,
    _check_patch,
    _input_id,
    _jsonable,
    _nearest_existing,
    _open_input,
    _prepare_output,
    default_num_workers,
    default_overlap,
    plan_output,
    weights_fingerprint,
)

__all__ = [
    "DEFAULT_OPTIONS",
    "KINDS",
    "OPTION_KEYS",
    "OnnxModule",
    "SegmentResult",
    "Segmenter",
    "find_sidecar",
    "load_segmenter",
    "read_sidecar",
    "segment_volume",
]

log = logging.getLogger(__name__)

TORCHSCRIPT_SUFFIXES = (".pt", ".ts")
ONNX_SUFFIXES = (".onnx",)
SIDECAR_SUFFIXES = (".yaml", ".yml", ".json")
KINDS = ("foreground", "boundary")
PROBABILITY_DTYPES = ("float16", "float32")
PROBABILITIES = "probabilities"
LABELS = "labels"
TASK = "segment"
# Defaults of the options a sidecar may set (patch None = DEFAULT_PATCH capped by the volume; overlap None =
# 25 % of the patch, as for translation).
DEFAULT_PATCH = (16, 256, 256)
DEFAULT_OPTIONS: dict[str, Any] = {
    "kind": "foreground",
    "threshold": 0.5,
    "patch": None,
    "overlap": None,
    "sigma": 0.5,
    "batch_size": 4,
    "seed_erosion": 1,  # binary erosions of the watershed seed mask (kind=boundary)
    "min_size": 0,  # objects (foreground) or seeds (boundary) with fewer voxels are dropped
}
OPTION_KEYS = (*DEFAULT_OPTIONS, "normalize", "percentiles")
# Post-processing blocks (z, y, x) of the blockwise connected components; rounded up to whole output chunks.
DEFAULT_LABEL_BLOCK = (32, 512, 512)
# The boundary watershed runs in memory: at most this many voxels (~4 GiB of RAM) unless raised.
DEFAULT_MAX_WATERSHED_VOXELS = 2**27
# onnxruntime log level: errors only.
_ORT_LOG_ERRORS = 3
_HASH_CHUNK = 1 << 20

# Settings recorded in the output's "exem" attribute; a resume must match all of them.
_SETTINGS = (
    "input",
    "input_level",
    "roi",
    "shape",
    "patch",
    "overlap",
    "sigma",
    "dtype",
    "autocast_dtype",
    "intensity_range",
    "model",
    "block_shape",
    "chunks",
    "levels",
    "kind",
    "threshold",
    "seed_erosion",
    "min_size",
    "label_block",
    "connectivity",
)


# ----------------------------------------------------------------------------------------------------------
# models


class OnnxModule(nn.Module):
    """An ONNX model run by onnxruntime, as a torch module: ``(B, 1, Z, Y, X)`` float32 → its first output.

    CPU execution provider; the CUDA provider when the input is on a CUDA device and onnxruntime has it.
    Sessions use ``torch.get_num_threads()`` threads and are created lazily (not pickled).

    Raises:
        ValueError: the file is not a model onnxruntime can load, or it has more than one input.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = str(path)
        self._sessions: dict[str, Any] = {}
        inputs = self._session("cpu").get_inputs()
        if len(inputs) != 1:
            raise ValueError(
                f"model {path}: the ONNX graph has {len(inputs)} inputs; a segmenter takes one (B, 1, Z, Y, X)"
            )
        self.input_name = inputs[0].name

    def _session(self, device_type: str) -> Any:
        import onnxruntime as ort

        cuda = device_type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
        key = "cuda" if cuda else "cpu"
        if key not in self._sessions:
            options = ort.SessionOptions()
            options.log_severity_level = _ORT_LOG_ERRORS
            options.intra_op_num_threads = torch.get_num_threads()
            options.inter_op_num_threads = 1
            providers = (
                ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
            )
            try:
                self._sessions[key] = ort.InferenceSession(
                    self.path, sess_options=options, providers=providers
                )
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
                raise ValueError(
                    f"model {self.path}: onnxruntime cannot load it ({_first_line(exc)})"
                ) from exc
        return self._sessions[key]

    def forward(self, x: Tensor) -> Tensor:
        session = self._session(x.device.type)
        try:
            out = session.run(None, {self.input_name: x.detach().float().cpu().numpy()})[0]
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ValueError(
                f"model {self.path} failed on an input of shape {tuple(x.shape)}: {_first_line(exc)}"
            ) from exc
        return torch.from_numpy(np.asarray(out)).to(x.device)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_sessions"] = {}
        return state


class Segmenter(nn.Module):
    """A segmentation network: ``(B, 1, Z, Y, X)`` float32 in [0, 1] → ``(B, 1, Z, Y, X)``, channel 0 of its output.

    Args:
        net: the network (TorchScript module, :class:`OnnxModule`, or any module) returning ``(B, C, Z, Y, X)``.
        source: where it came from (a path, or the class name), for messages.
        model_format: ``torchscript`` | ``onnx`` | ``module``.
        fingerprint: identifies the weights (SHA-1 of the model file, or of the module's state).

    Raises (in forward):
        ValueError: the network fails on the input, or returns another shape than ``(B, C, Z, Y, X)``.
    """

    def __init__(self, net: nn.Module, *, source: str, model_format: str, fingerprint: str) -> None:
        super().__init__()
        self.net = net
        self.source = source
        self.model_format = model_format
        self.fingerprint = fingerprint

    def forward(self, x: Tensor) -> Tensor:
        try:
            y = self.net(x)
        except RuntimeError as exc:
            raise ValueError(
                f"segmenter {self.source} failed on an input of shape {tuple(x.shape)}: {_first_line(exc)}"
            ) from exc
        if isinstance(y, (tuple, list)):
            y = y[0]
        ok = isinstance(y, Tensor) and y.ndim == 5 and y.shape[1] >= 1
        if not ok or y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
            got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(
                f"segmenter {self.source} returned {got} for an input of shape {tuple(x.shape)};"
                " expected (B, C, Z, Y, X) with the input's B, Z, Y and X"
            )
        return y[:, :1].float()


def _file_sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def find_sidecar(model: str | Path) -> Path | None:
    """The model's option file, if any: ``<model>.yaml`` (e.g. ``seg.onnx.yaml``), then ``<stem>.yaml``
    (``seg.yaml``); ``.yml`` and ``.json`` are accepted too."""
    path = Path(model)
    candidates = [path.with_name(path.name + s) for s in SIDECAR_SUFFIXES]
    candidates += [path.with_suffix(s) for s in SIDECAR_SUFFIXES if path.suffix]
    return next((c for c in candidates if c.is_file()), None)


def _pair(value: Any, key: str, where: str) -> list[float]:
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {key} must be two numbers [lo, hi], got {value!r}") from None
    if len(out) != 2 or not out[1] > out[0]:
        raise ValueError(f"{where}: {key} must be two numbers [lo, hi] with hi > lo, got {value!r}")
    return out


def _check_options(options: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Validate option values (None = not set); returns them with plain Python types."""
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTION_KEYS)}")
    out: dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            continue
        if key == "kind":
            if value not in KINDS:
                raise ValueError(f"{where}: kind must be one of {', '.join(KINDS)}, got {value!r}")
            out[key] = str(value)
        elif key in ("normalize", "percentiles"):
            out[key] = _pair(value, key, where)
        elif key in ("patch", "overlap"):
            try:
                out[key] = list(triple(value, key))
            except (TypeError, ValueError):
                raise ValueError(f"{where}: {key} must be 3 integers [z, y, x], got {value!r}") from None
        elif key in ("threshold", "sigma"):
            out[key] = float(value)
            if not math.isfinite(out[key]):
                raise ValueError(f"{where}: {key} must be a finite number, got {value!r}")
        else:  # batch_size, seed_erosion, min_size
            out[key] = int(value)
            low = 1 if key == "batch_size" else 0
            if out[key] < low:
                raise ValueError(f"{where}: {key} must be ≥ {low}, got {value!r}")
    return out


def read_sidecar(model: str | Path) -> dict[str, Any]:
    """The options in the model's sidecar file (:func:`find_sidecar`), validated; ``{}`` when there is none.

    Raises:
        ValueError: unreadable YAML/JSON, not a mapping, unknown keys or bad values.
    """
    import yaml

    path = find_sidecar(model)
    if path is None:
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"sidecar {path}: cannot read it ({_first_line(exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"sidecar {path}: expected a mapping of options, got {type(data).__name__}")
    options = _check_options(data, f"sidecar {path}")
    log.info("model options from %s: %s", path, options)
    return options


def load_segmenter(path: str | Path) -> tuple[Segmenter, dict[str, Any]]:
    """Load a segmentation model and its sidecar options.

    Args:
        path: a TorchScript file (``.pt``, ``.ts``; loaded with ``torch.jit.load`` on the CPU) or an ONNX file
            (``.onnx``; run by onnxruntime).

    Returns:
        ``(segmenter, options)``: the model as a :class:`Segmenter` in eval mode (fingerprint = SHA-1 of the file),
        and the validated options of its sidecar (``{}`` without one).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown model type (suffix), a file the loader rejects, or a bad sidecar.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"model {p} does not exist" if not p.exists() else f"model {p} is not a file")
    suffix = p.suffix.lower()
    if suffix in TORCHSCRIPT_SUFFIXES:
        try:
            net = torch.jit.load(str(p), map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - torch raises various types for foreign files
            raise ValueError(
                f"model {p}: not a TorchScript file ({_first_line(exc)}); save models with torch.jit.save"
            ) from exc
        model_format = "torchscript"
    elif suffix in ONNX_SUFFIXES:
        net = OnnxModule(p)
        model_format = "onnx"
    else:
        known = ", ".join((*TORCHSCRIPT_SUFFIXES, *ONNX_SUFFIXES))
        raise ValueError(
            f"model {p}: unknown model type {suffix or '(no suffix)'!r}; expected TorchScript or ONNX ({known})"
        )
    segmenter = Segmenter(net, source=str(p), model_format=model_format, fingerprint=_file_sha1(p)).eval()
    return segmenter, read_sidecar(p)


# ----------------------------------------------------------------------------------------------------------
# output


@dataclass(frozen=True)
class SegmentResult:
    """What :func:`segment_volume` did.

    Attributes:
        output: the output group.
        probabilities: its probability image (OME-Zarr, levels "0", "1").
        labels: its label image (OME-Zarr, uint32).
        shape: (Z, Y, X) voxels (the ROI's, or the input's).
        seconds: wall time of the call.
        num_objects: instances in the labels (None on ranks other than 0).
        kind, threshold: the post-processing used.
        blocks_done, blocks_skipped: engine blocks computed by this call / found done (resume).
        already_complete: the output was complete with these settings; nothing was computed.
    """

    output: Path
    probabilities: Path
    labels: Path
    shape: tuple[int, int, int]
    seconds: float
    num_objects: int | None
    kind: str
    threshold: float
    blocks_done: int
    blocks_skipped: int
    already_complete: bool = False


def _read_exem_attrs(path: Path) -> dict | None:
    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:  # noqa: BLE001 - anything unreadable is "not an exem output"
        return None
    meta = attrs.get("exem")
    return meta if isinstance(meta, dict) else None


def _inspect_output(out: Path, settings: dict, overwrite: bool) -> str:
    """``create`` | ``overwrite`` | ``resume`` | ``done`` (complete with these settings), or raise (read-only)."""
    exists = out.exists() and not (out.is_dir() and not any(out.iterdir()))
    if not exists:
        anchor = _nearest_existing(out.parent)
        if not os.access(anchor, os.W_OK | os.X_OK):
            raise PermissionError(f"output {out}: cannot create it, {anchor} is not writable")
        return "create"
    if overwrite:
        for p in (out.parent, out):
            if not os.access(p, os.W_OK | os.X_OK):
                raise PermissionError(f"output {out}: cannot replace it, {p} is not writable")
        return "overwrite"
    stored = _read_exem_attrs(out)
    if stored is None or stored.get("task") != TASK:
        raise FileExistsError(
            f"output {out} exists and is not an exem segmentation; use overwrite=true or another output"
        )
    diffs = [
        f"{k} {stored.get(k)} (now {settings.get(k)})" for k in _SETTINGS if stored.get(k) != settings.get(k)
    ]
    if diffs:
        state = "complete" if stored.get("complete") else "incomplete"
        raise FileExistsError(
            f"output {out} exists ({state}) with other settings: {'; '.join(diffs)}; use overwrite=true"
        )
    if stored.get("complete"):
        return "done"
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"output {out}: cannot resume, it is not writable")
    return "resume"


def _prepare(
    root: str,
    action: str,
    attributes: dict,
    shape: tuple[int, int, int],
    dtype: str,
    voxel_size_nm: tuple[float, float, float],
    chunks: tuple[int, int, int],
    origin: tuple[int, int, int],
) -> None:
    """Create the output group and its probability image (global rank 0, inside the Lightning run)."""
    out = Path(root)
    if action == "overwrite" and (out.exists() or out.is_symlink()):
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        else:
            out.unlink()
    if action in ("create", "overwrite"):
        out.mkdir(parents=True, exist_ok=True)
        zarr.open_group(str(out), mode="w", zarr_format=2).attrs["exem"] = attributes
    if not (out / PROBABILITIES / ".zgroup").exists():  # also after a kill between the two creations
        _prepare_output(
            str(out / PROBABILITIES),
            "create",
            shape,
            dtype,
            voxel_size_nm,
            chunks,
            origin,
            {**attributes, "complete": False},
            name=PROBABILITIES,
        )


def _create_labels(
    root: Path,
    shape: tuple[int, int, int],
    voxel_size_nm: tuple[float, float, float],
    chunks: tuple[int, int, int],
    origin: tuple[int, int, int],
) -> list[zarr.Array]:
    """(Re)create the NGFF label image ``<root>/labels``; returns its level arrays."""
    path = root / LABELS
    if path.exists():
        shutil.rmtree(path)
    _prepare_output(
        str(path), "create", shape, "uint32", voxel_size_nm, chunks, origin, {"task": "labels"}, name=LABELS
    )
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["image-label"] = {"version": "0.4", "source": {"image": f"../{PROBABILITIES}"}}
    return [group[str(lvl)] for lvl in range(LEVELS)]  # type: ignore[misc]


def _label_block(
    shape: tuple[int, int, int], chunks: tuple[int, int, int], requested: Sequence[int]
) -> tuple[int, int, int]:
    """Post-processing block: ``requested`` rounded up to whole chunks of every level, capped by the shape."""
    align = _alignment(level_chunks(shape, chunks, LEVELS))
    req = triple(requested, "label_block")
    if min(req) < 1:
        raise ValueError(f"label_block must be positive, got {list(req)}")
    return tuple(min(s, _round_up(b, a)) for s, b, a in zip(shape, req, align, strict=True))  # type: ignore[return-value]


def _resolve_options(explicit: Mapping[str, Any], sidecar: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments win over the sidecar, the sidecar over :data:`DEFAULT_OPTIONS`; normalisation as one unit."""
    given = _check_options(explicit, "option")
    merged = {**DEFAULT_OPTIONS, **{k: v for k, v in sidecar.items() if k in DEFAULT_OPTIONS}}
    merged.update({k: v for k, v in given.items() if k in DEFAULT_OPTIONS})
    source = given if ("normalize" in given or "percentiles" in given) else sidecar
    merged["normalize"] = source.get("normalize")
    merged["percentiles"] = source.get("percentiles")
    return merged


def _as_segmenter(model: str | Path | nn.Module) -> tuple[Segmenter, dict[str, Any]]:
    if isinstance(model, (str, Path)):
        return load_segmenter(model)
    if isinstance(model, Segmenter):
        return model, {}
    if isinstance(model, nn.Module):
        name = type(model).__name__
        return Segmenter(
            model, source=name, model_format="module", fingerprint=weights_fingerprint(model)
        ), {}
    raise ValueError(f"model must be a path or a torch module, got {type(model).__name__}")


# ----------------------------------------------------------------------------------------------------------
# the API


def segment_volume(
    model: str | Path | nn.Module,
    input: str | Path | Volume | Any,  # noqa: A002 - the natural name, mirrors the config key
    output: str | Path,
    *,
    kind: str | None = None,
    threshold: float | None = None,
    normalize: Sequence[float] | None = None,
    percentiles: Sequence[float] | None = None,
    patch: Sequence[int] | None = None,
    overlap: Sequence[int] | None = None,
    sigma: float | None = None,
    batch_size: int | None = None,
    seed_erosion: int | None = None,
    min_size: int | None = None,
    options: Mapping[str, Any] | None = None,
    dtype: str = "float16",
    overwrite: bool = False,
    roi: Sequence[int] | None = None,
    input_level: int = 0,
    block_shape: Sequence[int] | None = None,
    label_block: Sequence[int] = DEFAULT_LABEL_BLOCK,
    max_watershed_voxels: int = DEFAULT_MAX_WATERSHED_VOXELS,
    num_workers: int | None = None,
    chunks: Sequence[int] | None = None,
    trainer: L.Trainer | None = None,
    autocast_dtype: str | None = None,
    progress: bool = True,
) -> SegmentResult:
    """Segment a whole (virtual) EM volume (or an ROI) with an EM-trained network; write probabilities and labels.

    Args:
        model: a TorchScript (``.pt``/``.ts``) or ONNX (``.onnx``) file (its sidecar options apply), a
            :class:`Segmenter` from :func:`load_segmenter`, or any module ``(B, 1, Z, Y, X)`` → ``(B, C, Z, Y, X)``.
        input: a Zarr / OME-Zarr / TIFF path, a :class:`~exem.data.volume.Volume` or a numpy array.
        output: local folder written (layout in the module docstring). A complete output with the same settings is
            left as it is (nothing is computed); an incomplete one is resumed; other settings or a foreign folder
            need ``overwrite=True``.
        kind: ``foreground`` (threshold + connected components) or ``boundary`` (seeded watershed).
        threshold: foreground is ``p > threshold``; watershed seeds grow from ``boundary < threshold``.
        normalize: raw ``[lo, hi]`` mapped to the model's [0, 1]; or ``percentiles`` ``[lo %, hi %]`` of a sample.
            If either is given, the sidecar's normalisation is ignored; if none is set, the dtype range is used.
        patch, overlap, sigma, batch_size: the engine's patch grid (voxels), Gaussian window, patches per call.
        seed_erosion: erosions of the watershed seed mask (kind=boundary).
        min_size: objects (foreground) or seeds (boundary) with fewer voxels are dropped.
        options: sidecar-level options (:data:`OPTION_KEYS`) for a module ``model``, or over a file's sidecar.
            ``None`` arguments take the sidecar's value, else :data:`DEFAULT_OPTIONS` (patch: (16, 256, 256)
            capped by the volume).
        dtype: probability storage, ``float16`` or ``float32``.
        overwrite: delete an existing output first.
        roi: (z0, z1, y0, y1, x0, x1) voxels of the input level; None → the whole volume.
        input_level: OME-Zarr level of the input.
        block_shape: engine block (voxels); None → default.
        label_block: (z, y, x) blocks of the connected-components pass (rounded up to whole chunks).
        max_watershed_voxels: the in-memory watershed refuses larger volumes.
        num_workers: reader processes; None → 0 on the CPU, 2 on a GPU.
        chunks: output chunks (z, y, x); None → ``(2·patch_z, 256, 256)`` capped by the shape.
        trainer: a Lightning Trainer (e.g. DDP); None → one device, chosen automatically.
        autocast_dtype: ``bfloat16``/``float16`` autocast for the network (GPU); None → float32.
        progress: rich progress bars on stderr.

    Returns:
        a :class:`SegmentResult` (every rank; post-processing runs on global rank 0).

    Raises:
        FileNotFoundError: missing model. ValueError: unknown model type, bad options, model failure, watershed
        over the voxel limit. VolumeError: bad input. FileExistsError / PermissionError: output problems.
    """
    t0 = time.perf_counter()
    if "://" in str(output):
        raise ValueError(f"output {output}: only local paths are supported (done-markers are files)")
    if dtype not in PROBABILITY_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(PROBABILITY_DTYPES)}, got {dtype!r}")
    segmenter, sidecar = _as_segmenter(model)
    if options:
        sidecar = {**sidecar, **_check_options(options, "options")}
    explicit = {
        "kind": kind,
        "threshold": threshold,
        "normalize": normalize,
        "percentiles": percentiles,
        "patch": patch,
        "overlap": overlap,
        "sigma": sigma,
        "batch_size": batch_size,
        "seed_erosion": seed_erosion,
        "min_size": min_size,
    }
    opts = _resolve_options(explicit, sidecar)
    volume = _open_input(input, input_level, opts["normalize"], opts["percentiles"])
    if opts["patch"] is None:
        region = resolve_region(volume.shape, roi, (1, 1, 1))
        extent = (region[1] - region[0], region[3] - region[2], region[5] - region[4])
        patch3 = tuple(min(p, s) for p, s in zip(DEFAULT_PATCH, extent, strict=True))
    else:
        patch3 = triple(opts["patch"], "patch")
    _check_patch(segmenter, patch3)  # type: ignore[arg-type]
    overlap3 = default_overlap(patch3) if opts["overlap"] is None else triple(opts["overlap"], "overlap")
    plan, chunks3, voxel = plan_output(volume, patch3, overlap3, roi, chunks, block_shape, trainer)
    shape = plan.shape
    lblock = _label_block(shape, chunks3, label_block)  # type: ignore[arg-type]

    if opts["kind"] == "boundary":
        check_watershed_size(shape, int(max_watershed_voxels))  # before any compute
    from exem import __version__

    settings = _jsonable(
        {
            "input": _input_id(volume, input),
            "input_level": volume.level,
            "roi": list(plan.region),
            "shape": list(shape),
            "patch": list(patch3),
            "overlap": list(overlap3),
            "sigma": float(opts["sigma"]),
            "dtype": dtype,
            "autocast_dtype": None if autocast_dtype is None else str(autocast_dtype),
            "intensity_range": list(volume.intensity_range),
            "model": {"format": segmenter.model_format, "fingerprint": segmenter.fingerprint},
            "block_shape": list(plan.block_shape),
            "chunks": list(chunks3),
            "levels": LEVELS,
            "kind": opts["kind"],
            "threshold": float(opts["threshold"]),
            "seed_erosion": int(opts["seed_erosion"]),
            "min_size": int(opts["min_size"]),
            "label_block": list(lblock),
            "connectivity": CONNECTIVITY,
        }
    )
    out = Path(output).expanduser().absolute()
    action = _inspect_output(out, settings, bool(overwrite))

    def result(num: int | None, done: int, skipped: int, complete: bool) -> SegmentResult:
        return SegmentResult(
            output=out,
            probabilities=out / PROBABILITIES,
            labels=out / LABELS,
            shape=shape,  # type: ignore[arg-type]
            seconds=time.perf_counter() - t0,
            num_objects=num,
            kind=opts["kind"],
            threshold=float(opts["threshold"]),
            blocks_done=done,
            blocks_skipped=skipped,
            already_complete=complete,
        )

    if action == "done":
        stored = _read_exem_attrs(out) or {}
        log.info("%s is complete with these settings; nothing to do", out)
        return result(stored.get("num_objects"), 0, len(plan.blocks), True)

    attributes = {**settings, "task": TASK, "model_source": segmenter.source, "complete": False}
    attributes["version"] = __version__
    prob_meta = _read_exem_attrs(out / PROBABILITIES) if action == "resume" else None
    if prob_meta is not None and prob_meta.get("complete"):
        log.info("%s: probabilities complete; post-processing only", out)
        done, skipped = 0, len(plan.blocks)
        rank = 0 if trainer is None else int(trainer.global_rank)
    else:
        prepare = functools.partial(
            _prepare, str(out), action, attributes, shape, dtype, voxel, chunks3, plan.origin
        )
        run = run_blockwise(
            segmenter,
            volume,
            out / PROBABILITIES,
            patch=patch3,
            overlap=overlap3,
            sigma=float(opts["sigma"]),
            batch_size=int(opts["batch_size"]),
            out_dtype=dtype,
            roi=plan.region,
            block_shape=plan.block_shape,
            num_workers=default_num_workers(trainer) if num_workers is None else int(num_workers),
            trainer=trainer,
            autocast_dtype=autocast_dtype,
            chunks=chunks3,
            levels=LEVELS,
            prepare=prepare,
            progress=progress,
        )
        done, skipped, rank = run.blocks_done, run.blocks_skipped, run.global_rank
    if rank != 0:
        return result(None, done, skipped, False)

    levels = _create_labels(out, shape, voxel, chunks3, plan.origin)  # type: ignore[arg-type]
    prob = zarr.open_group(str(out / PROBABILITIES), mode="r")["0"]
    if opts["kind"] == "foreground":
        num = label_components(
            prob,
            levels,
            threshold=float(opts["threshold"]),
            block_shape=lblock,
            min_size=int(opts["min_size"]),
            progress=progress,
        )
    else:
        num = seeded_watershed(
            prob,
            levels,
            threshold=float(opts["threshold"]),
            seed_erosion=int(opts["seed_erosion"]),
            min_size=int(opts["min_size"]),
            max_voxels=int(max_watershed_voxels),
        )
    group = zarr.open_group(str(out), mode="r+")
    group.attrs["exem"] = {**_jsonable(dict(group.attrs["exem"])), "complete": True, "num_objects": int(num)}
    res = result(num, done, skipped, False)
    log.info(
        "segmented %s (%s voxels, %s) in %.1f s: %d objects → %s",
        volume.path,
        "×".join(map(str, shape)),
        opts["kind"],
        res.seconds,
        num,
        out,
    )
    return res
