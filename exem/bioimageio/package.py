"""Open a bioimage.io model package (a folder with ``rdf.yaml``, or its ``.zip``) as exem runs it.

The description is read with ``bioimageio.spec`` (format 0.4 and 0.5, converted to the latest 0.5 on load) and
reduced to what exem's blockwise engine needs: :class:`PackageModel` (the axes as exem maps them onto a
``(Z, Y, X)`` volume, the valid patch sizes, the halo, the processing steps, the weights file, the test
tensors). Every problem is a one-line :class:`PackageError`. Local files only: nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exem.errors import exception_line

__all__ = [
    "RDF_NAMES",
    "WEIGHT_FORMATS",
    "AxisSize",
    "PackageError",
    "PackageModel",
    "is_package",
    "open_package",
]

log = logging.getLogger(__name__)

# The description file's names, in the order they are looked for.
RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
# Weight formats exem runs, in the order it prefers them.
WEIGHT_FORMATS = ("torchscript", "onnx", "pytorch_state_dict")
# Format versions exem reads (``bioimageio.spec`` converts 0.4 to 0.5).
SPEC_VERSIONS = ("0.4", "0.5")
# Space axes exem maps onto a volume: 3D models take (z, y, x); 2D models (y, x) run slice by slice.
SPACE_3D = ("z", "y", "x")
SPACE_2D = ("y", "x")
_HASH_CHUNK = 1 << 20


class PackageError(ValueError):
    """A bioimage.io package exem cannot run (one line, naming the package)."""


@dataclass(frozen=True)
class AxisSize:
    """The sizes a model accepts along one space axis: ``min + k·step`` (k ≥ 0), ``step == 0``: only ``min``."""

    min: int
    step: int

    def valid(self, n: int) -> bool:
        return n == self.min if self.step == 0 else n >= self.min and (n - self.min) % self.step == 0

    def largest(self, limit: int) -> int | None:
        """The largest valid size ≤ ``limit``, or None."""
        if limit < self.min:
            return None
        return self.min if self.step == 0 else self.min + (limit - self.min) // self.step * self.step

    def describe(self) -> str:
        return str(self.min) if self.step == 0 else f"{self.min} + {self.step}·k"


@dataclass(frozen=True)
class PackageModel:
    """A bioimage.io model package reduced to what exem needs (spec 0.5 names).

    Attributes:
        source: the path the user gave (folder, ``rdf.yaml`` or ``.zip``).
        root: the unpacked folder the files are read from.
        name: the model's name.
        format_version: the package's own format version (before conversion).
        input_axes: the input tensor's axis ids in order, e.g. ``("batch", "channel", "z", "y", "x")``.
        output_axes: the output tensor's axis ids in order.
        space: ``("z", "y", "x")`` (a 3D model) or ``("y", "x")`` (2D, applied to each Z slice).
        sizes: per space axis of ``space``, the input sizes the model accepts.
        halo: per space axis of ``space``, output voxels to disregard at each side of a patch (the output axis'
            ``halo`` plus half of a negative size offset, where the model's output is smaller than its input).
        crop: per space axis, output voxels the model itself cut from each side (half of the size offset).
        channel_names: the output channels' names (``channel0``, … when the package names none).
        preprocessing, postprocessing: the processing steps as ``(id, kwargs)``, ``ensure_dtype`` left out.
        weights_format: the format exem runs (:data:`WEIGHT_FORMATS`); weights: its file.
        architecture: for ``pytorch_state_dict``, ``(import_from, callable, kwargs)``; else None.
        test_input, test_output: the test tensors (``.npy`` files) or None.
        tolerance: ``(relative, absolute, mismatched elements per million)`` of the test.
        fingerprint: SHA-1 of the description and the weights file.
    """

    source: str
    root: Path
    name: str
    format_version: str
    input_axes: tuple[str, ...]
    output_axes: tuple[str, ...]
    space: tuple[str, ...]
    sizes: tuple[AxisSize, ...]
    halo: tuple[int, ...]
    crop: tuple[int, ...]
    channel_names: tuple[str, ...]
    preprocessing: tuple[tuple[str, dict[str, Any]], ...]
    postprocessing: tuple[tuple[str, dict[str, Any]], ...]
    weights_format: str
    weights: Path
    architecture: tuple[str, str, dict[str, Any]] | None = None
    test_input: Path | None = None
    test_output: Path | None = None
    tolerance: tuple[float, float, float] = (1e-3, 1e-3, 100.0)
    fingerprint: str = field(default="", compare=False)

    @property
    def is_2d(self) -> bool:
        return len(self.space) == 2

    @property
    def halo3(self) -> tuple[int, int, int]:
        """The halo as (z, y, x) voxels of exem's patches (0 along Z for a 2D model)."""
        return (0, *self.halo) if self.is_2d else self.halo  # type: ignore[return-value]

    def _axis_sizes(self) -> tuple[AxisSize, AxisSize, AxisSize]:
        """Valid patch sizes along (z, y, x); a 2D model takes any number of Z slices."""
        return (AxisSize(1, 1), *self.sizes) if self.is_2d else self.sizes  # type: ignore[return-value]

    def default_patch(self, extent: Sequence[int], target: Sequence[int]) -> tuple[int, int, int]:
        """The largest valid patch ≤ ``target`` (z, y, x) and ≤ the region ``extent`` (voxels)."""
        patch = []
        for name, size, t, n in zip("zyx", self._axis_sizes(), target, extent, strict=True):
            best = size.largest(min(int(t), int(n))) or size.largest(int(n))
            if best is None:
                raise PackageError(
                    f"model {self.source}: the volume has {n} voxels along {name}; the model needs at least {size.min}"
                )
            patch.append(best)
        return tuple(patch)  # type: ignore[return-value]

    def check_patch(self, patch: Sequence[int]) -> tuple[int, int, int]:
        """``patch`` (z, y, x) if the model accepts it, else a one-line :class:`PackageError`."""
        for name, size, n in zip("zyx", self._axis_sizes(), patch, strict=True):
            if not size.valid(int(n)):
                raise PackageError(
                    f"model {self.source}: patch {list(patch)} has {n} voxels along {name}; the model takes"
                    f" {size.describe()}"
                )
        return tuple(int(n) for n in patch)  # type: ignore[return-value]

    def default_overlap(self, patch: Sequence[int], overlap: Sequence[int]) -> tuple[int, int, int]:
        """``overlap`` (exem's default for the patch) raised to twice the halo; 0 along Z for a 2D model."""
        out = [max(int(o), 2 * h) for o, h in zip(overlap, self.halo3, strict=True)]
        if self.is_2d:
            out[0] = 0
        return tuple(min(o, int(p) - 1) for o, p in zip(out, patch, strict=True))  # type: ignore[return-value]

    def channel_index(self, channel: int | str) -> int:
        """The output channel ``channel`` (an index, or one of :attr:`channel_names`) as an index."""
        names = ", ".join(f"{i}: {n}" for i, n in enumerate(self.channel_names))
        if isinstance(channel, str) and not channel.lstrip("-").isdigit():
            if channel not in self.channel_names:
                raise PackageError(
                    f"model {self.source}: no output channel {channel!r}; channels are {names}"
                )
            return self.channel_names.index(channel)
        index = int(channel)
        if not 0 <= index < len(self.channel_names):
            raise PackageError(f"model {self.source}: no output channel {index}; channels are {names}")
        return index


def is_package(path: str | Path) -> bool:
    """Whether ``path`` names a bioimage.io package: a folder, an ``rdf.yaml``/``bioimageio.yaml`` or a ``.zip``."""
    p = Path(path)
    return (
        p.is_dir() or p.suffix.lower() == ".zip" or p.name in RDF_NAMES or p.name.endswith(".bioimageio.yaml")
    )


def _sha1(paths: Sequence[Path]) -> str:
    h = hashlib.sha1()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda f=f: f.read(_HASH_CHUNK), b""):
                h.update(chunk)
    return h.hexdigest()


def _unpacked(zip_path: Path) -> Path:
    """The folder a ``.zip`` package is unpacked into (once; keyed by its content, in the temp folder)."""
    target = Path(tempfile.gettempdir()) / "exem-bioimageio" / _sha1([zip_path])
    if (target / ".complete").is_file():
        return target
    try:
        with zipfile.ZipFile(zip_path) as archive:
            for name in archive.namelist():
                if name.startswith("/") or ".." in Path(name).parts:
                    raise PackageError(f"model {zip_path}: unsafe file name {name!r} in the archive")
            partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
            archive.extractall(partial)
    except zipfile.BadZipFile as exc:
        raise PackageError(
            f"model {zip_path}: not a zip archive ({exception_line(exc, limit=120)})"
        ) from None
    if not target.exists():
        partial.rename(target)
    (target / ".complete").touch()
    return target


def _find_rdf(folder: Path, source: str) -> Path:
    for name in RDF_NAMES:
        if (folder / name).is_file():
            return folder / name
    named = sorted(folder.glob("*.bioimageio.yaml"))
    if named:
        return named[0]
    raise PackageError(
        f"model {source}: not a bioimage.io package: no {' or '.join(RDF_NAMES)} in it"
        " (give the package folder, its .zip, a TorchScript .pt or an ONNX .onnx)"
    )


def _urls(node: Any, where: str) -> Iterator[tuple[str, str]]:
    """``(field, url)`` for every http(s) string under ``node``."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _urls(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _urls(value, f"{where}[{i}]")
    elif isinstance(node, str) and node.lower().startswith(("http://", "https://")):
        yield where, node


def _check_raw(raw: Any, source: str) -> str:
    """The format version of a raw description; refuses unknown versions and remote files exem would need."""
    if not isinstance(raw, Mapping):
        raise PackageError(f"model {source}: the description is not a YAML mapping")
    if raw.get("type", "model") != "model":
        raise PackageError(f"model {source}: a bioimage.io {raw.get('type')!r}, not a model")
    version = str(raw.get("format_version", ""))
    if not any(version == v or version.startswith(v + ".") for v in SPEC_VERSIONS):
        raise PackageError(
            f"model {source}: bioimage.io format_version {version or '(none)'!r} is not one exem reads"
            f" ({', '.join(v + '.x' for v in SPEC_VERSIONS)})"
        )
    needed = {k: raw.get(k) for k in ("weights", "inputs", "outputs", "test_inputs", "test_outputs")}
    for where, url in _urls(needed, ""):
        raise PackageError(
            f"model {source}: {where} is a URL ({url}); exem reads local packages only: download the package"
            " first (e.g. `bioimageio package <id-or-url> model.zip`) and give its folder or .zip"
        )
    return version


def _load_description(rdf: Path, source: str) -> Any:
    os.environ.setdefault("BIOIMAGEIO_HTTP_TIMEOUT", "5")
    from bioimageio.spec import load_model_description
    from bioimageio.spec.model import v0_5

    try:
        descr = load_model_description(rdf, format_version="latest", perform_io_checks=False)
    except Exception as exc:  # noqa: BLE001 - the spec library raises many types for broken packages
        raise PackageError(
            f"model {source}: invalid bioimage.io package ({exception_line(exc, limit=200)})"
        ) from None
    if not isinstance(descr, v0_5.ModelDescr):
        summary = getattr(descr, "validation_summary", None)
        errors = getattr(summary, "errors", None) or []
        first = f"{errors[0].loc}: {errors[0].msg}" if errors else type(descr).__name__
        raise PackageError(
            f"model {source}: invalid bioimage.io package ({' '.join(str(first).split())[:200]})"
        )
    return descr


def _local(root: Path, file_source: Any, what: str, source: str) -> Path:
    text = str(file_source)
    if text.lower().startswith(("http://", "https://")):
        raise PackageError(f"model {source}: {what} is a URL ({text}); download the package first")
    path = root / text
    if not path.is_file():
        raise PackageError(f"model {source}: {what} {text} is missing from the package")
    return path


def _axis_kind(axis: Any) -> str:
    return str(getattr(axis, "type", ""))


def _space_of(axes: Sequence[Any], what: str, source: str) -> tuple[str, ...]:
    ids = tuple(str(a.id) for a in axes)
    kinds = tuple(_axis_kind(a) for a in axes)
    space = tuple(i for i, k in zip(ids, kinds, strict=True) if k == "space")
    other = [f"{i} ({k})" for i, k in zip(ids, kinds, strict=True) if k not in ("space", "batch", "channel")]
    if other or tuple(sorted(space)) not in (tuple(sorted(SPACE_3D)), tuple(sorted(SPACE_2D))):
        raise PackageError(
            f"model {source}: {what} axes {','.join(ids)} cannot be mapped onto a 3D volume; exem maps batch,"
            " channel and the space axes z, y, x (a 3D model) or y, x (a 2D model, run slice by slice)"
        )
    order = SPACE_3D if len(space) == 3 else SPACE_2D
    return order


def _sizes(axes: Sequence[Any], space: Sequence[str], source: str) -> tuple[AxisSize, ...]:
    by_id = {str(a.id): a for a in axes}
    out = []
    for name in space:
        size = by_id[name].size
        if isinstance(size, int):
            out.append(AxisSize(int(size), 0))
        elif hasattr(size, "min") and hasattr(size, "step"):
            out.append(AxisSize(int(size.min), int(size.step)))
        else:
            raise PackageError(
                f"model {source}: the size of input axis {name} refers to another tensor ({size}); exem feeds"
                " one input with fixed or min + step sizes"
            )
    return tuple(out)


def _output_geometry(
    descr: Any, space: Sequence[str], input_id: str, source: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(halo, crop)`` per space axis of the first output."""
    in_axes = {str(a.id): a for a in descr.inputs[0].axes}
    by_id = {str(a.id): a for a in descr.outputs[0].axes}
    halo, crop = [], []
    for name in space:
        axis = by_id.get(name)
        if axis is None or _axis_kind(axis) != "space":
            raise PackageError(f"model {source}: the output has no space axis {name} like the input")
        if float(getattr(axis, "scale", 1.0)) != float(getattr(in_axes[name], "scale", 1.0)):
            raise PackageError(
                f"model {source}: output axis {name} has another scale than the input; exem needs outputs on the"
                " input's voxel grid"
            )
        size = axis.size
        offset = 0
        if hasattr(size, "tensor_id"):
            if str(size.tensor_id) != input_id or str(size.axis_id) != name:
                raise PackageError(
                    f"model {source}: output axis {name} takes its size from {size.tensor_id}.{size.axis_id};"
                    " exem needs it from the same input axis"
                )
            offset = int(size.offset)
        elif size != in_axes[name].size:
            raise PackageError(
                f"model {source}: output axis {name} ({size}) does not follow the input's size; exem needs outputs"
                " of the input's shape (or smaller by a fixed offset)"
            )
        if offset > 0 or offset % 2:
            raise PackageError(
                f"model {source}: output axis {name} has size offset {offset}; exem handles outputs cropped"
                " evenly on both sides (offset ≤ 0, even)"
            )
        crop.append(-offset // 2)
        halo.append(int(getattr(axis, "halo", 0) or 0) + crop[-1])
    return tuple(halo), tuple(crop)


def _steps(steps: Sequence[Any]) -> tuple[tuple[str, dict[str, Any]], ...]:
    out = []
    for step in steps:
        if step.id == "ensure_dtype":
            continue
        kwargs = getattr(step, "kwargs", None)
        dumped = kwargs.model_dump(mode="json") if hasattr(kwargs, "model_dump") else dict(kwargs or {})
        out.append((str(step.id), dumped))
    return tuple(out)


def _weights(descr: Any, root: Path, source: str) -> tuple[str, Path, tuple[str, str, dict[str, Any]] | None]:
    weights = descr.weights
    found = [
        f
        for f in (
            "keras_hdf5",
            "keras_v3",
            "onnx",
            "pytorch_state_dict",
            "tensorflow_js",
            "tensorflow_saved_model_bundle",
            "torchscript",
        )
        if getattr(weights, f, None) is not None
    ]
    for fmt in WEIGHT_FORMATS:
        entry = getattr(weights, fmt, None)
        if entry is None:
            continue
        architecture = None
        if fmt == "pytorch_state_dict":
            arch = entry.architecture
            if not hasattr(arch, "import_from"):
                continue  # an architecture in a file of the package: not run (it would execute package code)
            architecture = (str(arch.import_from), str(arch.callable), dict(arch.kwargs or {}))
        return fmt, _local(root, entry.source, f"weights.{fmt}.source", source), architecture
    raise PackageError(
        f"model {source}: weights in {', '.join(found) or 'no format'}; exem runs torchscript, onnx, or"
        " pytorch_state_dict with an architecture importable from an installed library (convert the weights with"
        " bioimageio.core, e.g. to TorchScript)"
    )


def _tolerance(descr: Any, weights_format: str) -> tuple[float, float, float]:
    from bioimageio.spec.model.v0_5 import ReproducibilityTolerance

    chosen = ReproducibilityTolerance()
    for tol in getattr(descr.config.bioimageio, "reproducibility_tolerance", ()) or ():
        if not tol.weights_formats or weights_format in tol.weights_formats:
            chosen = tol
            break
    return (
        float(chosen.relative_tolerance),
        float(chosen.absolute_tolerance),
        float(chosen.mismatched_elements_per_million),
    )


def open_package(path: str | Path) -> PackageModel:
    """Read a local bioimage.io model package without running it.

    Args:
        path: the package folder, its ``rdf.yaml`` (or ``bioimageio.yaml``), or the ``.zip`` (unpacked once into
            the temp folder).

    Returns:
        a :class:`PackageModel`.

    Raises:
        FileNotFoundError: no such path. PackageError: no description, an unknown format version, a URL where a
        file is needed, an invalid description, axes or sizes exem cannot map, weights exem cannot run.
    """
    import yaml

    p = Path(path).expanduser()
    source = str(path)
    if not p.exists():
        raise FileNotFoundError(f"model {p} does not exist")
    if p.is_file() and p.suffix.lower() == ".zip":
        p = _unpacked(p)
    rdf = _find_rdf(p, source) if p.is_dir() else p
    root = rdf.parent
    try:
        raw = yaml.safe_load(rdf.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PackageError(
            f"model {source}: cannot read {rdf.name} ({exception_line(exc, limit=160)})"
        ) from None
    version = _check_raw(raw, source)
    descr = _load_description(rdf, source)
    if len(descr.inputs) != 1:
        raise PackageError(
            f"model {source}: {len(descr.inputs)} input tensors; exem feeds one (the EM volume)"
        )
    if len(descr.outputs) > 1:
        log.info(
            "model %s: %d outputs; exem uses the first, %s", source, len(descr.outputs), descr.outputs[0].id
        )
    inp, out = descr.inputs[0], descr.outputs[0]
    space = _space_of(inp.axes, "input", source)
    out_space = _space_of(out.axes, "output", source)
    if out_space != space:
        raise PackageError(f"model {source}: input space axes {space} but output space axes {out_space}")
    channels_in = [a for a in inp.axes if _axis_kind(a) == "channel"]
    if channels_in and len(channels_in[0].channel_names) != 1:
        raise PackageError(
            f"model {source}: the input has {len(channels_in[0].channel_names)} channels; exem feeds one"
            " (the EM volume)"
        )
    halo, crop = _output_geometry(descr, space, str(inp.id), source)
    out_channels = [a for a in out.axes if _axis_kind(a) == "channel"]
    names = tuple(str(n) for n in out_channels[0].channel_names) if out_channels else ("channel0",)
    fmt, weights, architecture = _weights(descr, root, source)
    tests = [
        _local(root, t.test_tensor.source, f"{what} test tensor", source)
        if t.test_tensor is not None
        else None
        for t, what in ((inp, "input"), (out, "output"))
    ]
    return PackageModel(
        source=source,
        root=root,
        name=str(descr.name),
        format_version=version,
        input_axes=tuple(str(a.id) for a in inp.axes),
        output_axes=tuple(str(a.id) for a in out.axes),
        space=space,
        sizes=_sizes(inp.axes, space, source),
        halo=halo,
        crop=crop,
        channel_names=names,
        preprocessing=_steps(inp.preprocessing),
        postprocessing=_steps(out.postprocessing),
        weights_format=fmt,
        weights=weights,
        architecture=architecture,
        test_input=tests[0],
        test_output=tests[1],
        tolerance=_tolerance(descr, fmt),
        fingerprint=_sha1([rdf, weights]),
    )
