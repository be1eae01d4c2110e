"""EM-trained segmentation models as exem runs them: TorchScript or ONNX files with optional sidecar options, or
bioimage.io model packages (:mod:`exem.bioimageio`).

- :func:`load_segmenter`: a file or package → a :class:`Segmenter` (``(B, 1, Z, Y, X)`` in [0, 1] → one channel
  of the model's output) and its options (:func:`read_sidecar`: ``<model>.yaml`` next to the file).
- :class:`OnnxModule`: an ONNX graph run by onnxruntime as a torch module.
- :func:`as_segmenter`: a path, a :class:`Segmenter` or any module, as a :class:`Segmenter` with options.

Options (:data:`OPTION_KEYS`) come from, in order of precedence: the arguments / command line, the model's
sidecar file, :data:`DEFAULT_OPTIONS` (:func:`resolve_options`).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from exem.checks import one_of, triple
from exem.errors import exception_line
from exem.inference.translate import weights_fingerprint

__all__ = [
    "DEFAULT_OPTIONS",
    "KINDS",
    "OPTION_KEYS",
    "OnnxModule",
    "Segmenter",
    "as_segmenter",
    "check_options",
    "find_sidecar",
    "load_segmenter",
    "package_options",
    "read_sidecar",
    "resolve_options",
]

log = logging.getLogger(__name__)

TORCHSCRIPT_SUFFIXES = (".pt", ".ts")
ONNX_SUFFIXES = (".onnx",)
SIDECAR_SUFFIXES = (".yaml", ".yml", ".json")
KINDS = ("foreground", "boundary")
# Defaults of the options a sidecar may set (patch None = DEFAULT_PATCH capped by the volume; overlap None =
# 25 % of the patch, as for translation).
DEFAULT_OPTIONS: dict[str, Any] = {
    "kind": "foreground",
    "threshold": 0.5,
    "patch": None,
    "overlap": None,
    "sigma": 0.5,
    "batch_size": 4,
    "seed_erosion": 1,  # binary erosions of the watershed seed mask (kind=boundary)
    "min_size": 0,  # objects (foreground) or seeds (boundary) with fewer voxels are dropped
    "channel": 0,  # the model's output channel used: an index, or a name for bioimage.io packages
}
OPTION_KEYS = (*DEFAULT_OPTIONS, "normalize", "percentiles")
# onnxruntime log level: errors only.
_ORT_LOG_ERRORS = 3
_HASH_CHUNK = 1 << 20


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

    def _session(self, device: torch.device | str) -> Any:
        """The onnxruntime session for ``device``: on a CUDA device (with onnxruntime-gpu) the CUDA provider on
        that very GPU (each DDP rank its own), else the CPU; one session per device, made on first use."""
        import onnxruntime as ort

        device = torch.device(device)
        cuda = device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
        index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
        key = f"cuda:{index}" if cuda else "cpu"
        if key not in self._sessions:
            options = ort.SessionOptions()
            options.log_severity_level = _ORT_LOG_ERRORS
            options.intra_op_num_threads = torch.get_num_threads()
            options.inter_op_num_threads = 1
            providers: list[Any] = ["CPUExecutionProvider"]
            if cuda:  # onnxruntime's CUDA provider uses GPU 0 unless told otherwise
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
            try:
                self._sessions[key] = ort.InferenceSession(
                    self.path, sess_options=options, providers=providers
                )
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
                raise ValueError(
                    f"model {self.path}: onnxruntime cannot load it ({exception_line(exc, limit=200)})"
                ) from exc
        return self._sessions[key]

    def forward(self, x: Tensor) -> Tensor:
        session = self._session(x.device)
        try:
            out = session.run(None, {self.input_name: x.detach().float().cpu().numpy()})[0]
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ValueError(
                f"model {self.path} failed on an input of shape {tuple(x.shape)}: {exception_line(exc, limit=200)}"
            ) from exc
        return torch.from_numpy(np.asarray(out)).to(x.device)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_sessions"] = {}
        return state


class Segmenter(nn.Module):
    """A segmentation network: ``(B, 1, Z, Y, X)`` float32 in [0, 1] → ``(B, 1, Z, Y, X)``, one channel of its output.

    Args:
        net: the network (TorchScript module, :class:`OnnxModule`, or any module) returning ``(B, C, Z, Y, X)``.
        source: where it came from (a path, or the class name), for messages.
        model_format: ``torchscript`` | ``onnx`` | ``module``.
        fingerprint: identifies the weights (SHA-1 of the model file, or of the module's state).
        channel: the output channel returned.
        package: the :class:`~exem.bioimageio.package.PackageModel` of a bioimage.io package (``net`` is then its
            :class:`~exem.bioimageio.processing.PackageNet`), else None.

    Raises (in forward):
        ValueError: the network fails on the input, or returns another shape than ``(B, C, Z, Y, X)``.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        source: str,
        model_format: str,
        fingerprint: str,
        channel: int = 0,
        package: Any = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.source = source
        self.model_format = model_format
        self.fingerprint = fingerprint
        self.channel = int(channel)
        self.package = package

    def with_channel(self, channel: int | str) -> Segmenter:
        """The same network returning output channel ``channel`` (an index; a name for a package)."""
        if self.package is not None:
            index = self.package.channel_index(channel)
        elif isinstance(channel, str) and not channel.lstrip("-").isdigit():
            raise ValueError(
                f"model {self.source}: channel {channel!r}: names need a bioimage.io package; give an index"
            )
        else:
            index = int(channel)
        if index < 0:
            raise ValueError(f"model {self.source}: channel must be ≥ 0, got {index}")
        return Segmenter(
            self.net,
            source=self.source,
            model_format=self.model_format,
            fingerprint=self.fingerprint,
            channel=index,
            package=self.package,
        ).train(self.training)

    def forward(self, x: Tensor) -> Tensor:
        try:
            y = self.net(x)
        except RuntimeError as exc:
            raise ValueError(
                f"segmenter {self.source} failed on an input of shape {tuple(x.shape)}:"
                f" {exception_line(exc, limit=200)}"
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
        if self.channel >= y.shape[1]:
            raise ValueError(
                f"segmenter {self.source}: channel {self.channel} asked, the model returns {y.shape[1]} channel(s)"
            )
        return y[:, self.channel : self.channel + 1].float()


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


def check_options(options: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Validate option values (None = not set); returns them with plain Python types."""
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTION_KEYS)}")
    out: dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            continue
        if key == "kind":
            out[key] = one_of(str(value), KINDS, f"{where}: kind")
        elif key in ("normalize", "percentiles"):
            out[key] = _pair(value, key, where)
        elif key in ("patch", "overlap"):
            try:
                out[key] = list(triple(value, key))
            except (TypeError, ValueError):
                raise ValueError(f"{where}: {key} must be 3 integers [z, y, x], got {value!r}") from None
        elif key == "channel":
            out[key] = value if isinstance(value, str) and not value.lstrip("-").isdigit() else int(value)
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
        raise ValueError(f"sidecar {path}: cannot read it ({exception_line(exc, limit=200)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"sidecar {path}: expected a mapping of options, got {type(data).__name__}")
    options = check_options(data, f"sidecar {path}")
    log.info("model options from %s: %s", path, options)
    return options


def load_segmenter(path: str | Path) -> tuple[Segmenter, dict[str, Any]]:
    """Load a segmentation model and its sidecar options.

    Args:
        path: a TorchScript file (``.pt``, ``.ts``; loaded with ``torch.jit.load`` on the CPU), an ONNX file
            (``.onnx``; run by onnxruntime), or a bioimage.io model package (folder, ``rdf.yaml`` or ``.zip``;
            :func:`exem.bioimageio.package.open_package`).

    Returns:
        ``(segmenter, options)``: the model as a :class:`Segmenter` in eval mode (fingerprint = SHA-1 of the file,
        or of a package's description and weights), and the validated options of its sidecar (``{}`` without
        one); a package whose chosen channel is named like a boundary suggests ``kind: boundary``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown model type (suffix), a file the loader rejects, or a bad sidecar.
        PackageError: a package exem cannot run (:mod:`exem.bioimageio.package`).
    """
    from exem.bioimageio.package import is_package

    p = Path(path).expanduser()
    if is_package(p) and p.exists():
        return _load_package(p)
    if not p.is_file():
        raise FileNotFoundError(f"model {p} does not exist" if not p.exists() else f"model {p} is not a file")
    suffix = p.suffix.lower()
    if suffix in TORCHSCRIPT_SUFFIXES:
        try:
            net = torch.jit.load(str(p), map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - torch raises various types for foreign files
            raise ValueError(
                f"model {p}: not a TorchScript file ({exception_line(exc, limit=200)}); save models with torch.jit.save"
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


def _load_package(path: Path) -> tuple[Segmenter, dict[str, Any]]:
    from exem.bioimageio.package import open_package
    from exem.bioimageio.processing import load_package_net

    package = open_package(path)
    net = load_package_net(package)
    segmenter = Segmenter(
        net,
        source=str(path),
        model_format=f"bioimageio/{package.weights_format}",
        fingerprint=package.fingerprint,
        package=package,
    ).eval()
    log.info(
        "bioimage.io model %r (format %s, %s weights, %s, output channels %s, halo %s)",
        package.name,
        package.format_version,
        package.weights_format,
        "2D, slice by slice" if package.is_2d else "3D",
        ", ".join(package.channel_names),
        list(package.halo3),
    )
    return segmenter, read_sidecar(path)


def package_options(segmenter: Segmenter, channel: int | str) -> dict[str, Any]:
    """Options a package suggests for ``channel``: ``kind: boundary`` for a channel named like a boundary."""
    if segmenter.package is None:
        return {}
    name = segmenter.package.channel_names[segmenter.package.channel_index(channel)]
    return {"kind": "boundary"} if "bound" in name.lower() or "membrane" in name.lower() else {}


def resolve_options(explicit: Mapping[str, Any], sidecar: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments win over the sidecar, the sidecar over :data:`DEFAULT_OPTIONS`; normalisation as one unit."""
    given = check_options(explicit, "option")
    merged = {**DEFAULT_OPTIONS, **{k: v for k, v in sidecar.items() if k in DEFAULT_OPTIONS}}
    merged.update({k: v for k, v in given.items() if k in DEFAULT_OPTIONS})
    source = given if ("normalize" in given or "percentiles" in given) else sidecar
    merged["normalize"] = source.get("normalize")
    merged["percentiles"] = source.get("percentiles")
    return merged


def as_segmenter(model: str | Path | nn.Module) -> tuple[Segmenter, dict[str, Any]]:
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
