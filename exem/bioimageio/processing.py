"""A bioimage.io package as a network exem's engine runs: preprocessing with per-dataset statistics, the weights,
pointwise postprocessing, axes mapped to and from exem's ``(B, C, Z, Y, X)``.

bioimage.io's own tiled prediction normalises each sample (each block) with its own statistics, which makes
seams when a volume is split. :class:`PackageNet` instead fits the statistics its preprocessing needs once, on a
bounded sample of the whole volume (:meth:`PackageNet.fit_volume`), and then applies the same affine map to
every patch. The package's test (:func:`reproduce_test`) fits them on the test input, as the package's author did.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from exem.bioimageio.package import PackageError, PackageModel
from exem.errors import exception_line

__all__ = [
    "PREPROCESSING",
    "POSTPROCESSING",
    "PackageNet",
    "ProcessingSteps",
    "load_package_net",
    "reproduce_test",
    "to_exem_layout",
]

log = logging.getLogger(__name__)

# Steps exem implements. Pre: statistics of the input are fitted once per volume (or on the test input).
PREPROCESSING = (
    "zero_mean_unit_variance",
    "fixed_zero_mean_unit_variance",
    "scale_range",
    "scale_linear",
    "clip",
    "binarize",
    "sigmoid",
)
# Post: pointwise steps only (a step with output statistics would need the whole output first).
POSTPROCESSING = ("fixed_zero_mean_unit_variance", "scale_linear", "clip", "binarize", "sigmoid", "softmax")


def _along(value: Any) -> Tensor | float:
    """A scalar, or a per-channel list as a tensor broadcasting over ``(B, C, Z, Y, X)``."""
    if isinstance(value, (list, tuple)):
        return torch.tensor([float(v) for v in value], dtype=torch.float32).reshape(-1, 1, 1, 1)
    return float(value)


class ProcessingSteps(nn.Module):
    """Processing steps on ``(B, C, Z, Y, X)`` float32 tensors, statistics fitted by :meth:`fit`."""

    def __init__(
        self, steps: Sequence[tuple[str, dict[str, Any]]], known: Sequence[str], what: str, source: str
    ):
        super().__init__()
        for step_id, kwargs in steps:
            if step_id not in known:
                raise PackageError(
                    f"model {source}: {what} step {step_id!r} is not one exem applies (it applies"
                    f" {', '.join(known)})"
                )
            axis = kwargs.get("axis")
            if axis not in (None, "channel"):
                raise PackageError(
                    f"model {source}: {what} step {step_id} along axis {axis!r}; exem supports 'channel'"
                )
            if step_id == "clip" and _percentile_clip(kwargs) and what == "postprocessing":
                raise PackageError(
                    f"model {source}: postprocessing clip with percentiles needs the whole output"
                )
        self.steps = [(s, dict(k)) for s, k in steps]
        self.stats: list[dict[str, float]] = [{} for _ in self.steps]

    def fit(self, sample: np.ndarray) -> list[dict[str, float]]:
        """Fit the statistics of every step on ``sample`` (raw values, any shape), each on the output of the steps
        before it; returns them."""
        x = torch.as_tensor(np.asarray(sample, dtype=np.float32)).reshape(1, 1, -1, 1, 1)
        for i, (step_id, kwargs) in enumerate(self.steps):
            values = x.double().flatten()
            if step_id == "zero_mean_unit_variance":
                self.stats[i] = {"mean": float(values.mean()), "std": float(values.std(unbiased=False))}
            elif step_id == "scale_range" or (step_id == "clip" and _percentile_clip(kwargs)):
                lo_p = kwargs.get("min_percentile") or 0.0
                hi_p = kwargs.get("max_percentile") or 100.0
                lo, hi = np.percentile(values.numpy(), [float(lo_p), float(hi_p)])
                self.stats[i] = {"lo": float(lo), "hi": float(hi)}
            x = self._run_step(i, x)
        return [dict(s) for s in self.stats]

    def _run_step(self, i: int, x: Tensor) -> Tensor:
        step_id, kw = self.steps[i]
        st = self.stats[i]
        if step_id == "zero_mean_unit_variance":
            return (x - st["mean"]) / (st["std"] + float(kw.get("eps", 1e-6)))
        if step_id == "fixed_zero_mean_unit_variance":
            mean, std = _along(kw["mean"]), _along(kw["std"])
            return (x - _dev(mean, x)) / (_dev(std, x) + float(kw.get("eps", 1e-6)))
        if step_id == "scale_range":
            return (x - st["lo"]) / (st["hi"] - st["lo"] + float(kw.get("eps", 1e-6)))
        if step_id == "scale_linear":
            return x * _dev(_along(kw.get("gain", 1.0)), x) + _dev(_along(kw.get("offset", 0.0)), x)
        if step_id == "clip":
            lo = st["lo"] if kw.get("min_percentile") is not None else kw.get("min")
            hi = st["hi"] if kw.get("max_percentile") is not None else kw.get("max")
            return x.clamp(min=lo, max=hi)
        if step_id == "binarize":
            return (x > _dev(_along(kw["threshold"]), x)).to(x.dtype)
        if step_id == "sigmoid":
            return torch.sigmoid(x)
        if step_id == "softmax":
            return torch.softmax(x, dim=1)
        raise AssertionError(step_id)

    def forward(self, x: Tensor) -> Tensor:
        for i in range(len(self.steps)):
            x = self._run_step(i, x)
        return x


def _percentile_clip(kwargs: dict[str, Any]) -> bool:
    return kwargs.get("min_percentile") is not None or kwargs.get("max_percentile") is not None


def _dev(value: Tensor | float, like: Tensor) -> Tensor | float:
    return value.to(like.device) if isinstance(value, Tensor) else value


def _load_weights(pm: PackageModel) -> nn.Module:
    source = pm.source
    if pm.weights_format == "torchscript":
        try:
            return torch.jit.load(str(pm.weights), map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - torch raises many types for foreign files
            raise PackageError(
                f"model {source}: cannot load its TorchScript weights ({exception_line(exc, limit=160)})"
            ) from None
    if pm.weights_format == "onnx":
        from exem.analysis.em_models import OnnxModule

        return OnnxModule(pm.weights)
    assert pm.architecture is not None
    module_name, name, kwargs = pm.architecture
    try:
        factory = getattr(importlib.import_module(module_name), name)
        net = factory(**kwargs)
        net.load_state_dict(torch.load(str(pm.weights), map_location="cpu", weights_only=True))
    except Exception as exc:  # noqa: BLE001 - foreign code
        raise PackageError(
            f"model {source}: cannot build {module_name}.{name} with its state dict ({exception_line(exc, limit=160)});"
            " install the library it comes from, or use TorchScript / ONNX weights"
        ) from None
    return net


def to_exem_layout(array: np.ndarray, axes: Sequence[str], space: Sequence[str]) -> np.ndarray:
    """A package tensor (``axes``, e.g. ``("batch", "y", "x", "channel")``) as ``(B, C, Z, Y, X)`` (Z = 1 for 2D)."""
    arr = np.asarray(array)
    names = list(axes)
    for axis in ("batch", "channel"):
        if axis not in names:
            arr = arr[np.newaxis]
            names.insert(0, axis)
    if "z" not in names:
        arr = arr[np.newaxis]
        names.insert(0, "z")
    return np.transpose(arr, [names.index(a) for a in ("batch", "channel", "z", "y", "x")])


class PackageNet(nn.Module):
    """A bioimage.io model as exem's engine calls a network: ``(B, 1, Z, Y, X)`` in [0, 1] → ``(B, C, Z, Y, X)``.

    The input is mapped back to raw values with the volume's intensity range (``raw = lo + x·(hi − lo)``), then
    the package's preprocessing (statistics fitted once, :meth:`fit_volume`), the package's axis order (a 2D
    model gets every Z slice as a sample), the weights, exem's order again (an output cropped by the model is
    padded back with zeros: the halo gives it no weight), and the pointwise postprocessing.
    """

    def __init__(self, package: PackageModel, net: nn.Module) -> None:
        super().__init__()
        self.package = package
        self.net = net
        self.pre = ProcessingSteps(package.preprocessing, PREPROCESSING, "preprocessing", package.source)
        self.post = ProcessingSteps(package.postprocessing, POSTPROCESSING, "postprocessing", package.source)
        self.lo, self.span = 0.0, 1.0

    def fit(self, sample: np.ndarray, intensity_range: Sequence[float] = (0.0, 1.0)) -> dict[str, Any]:
        """Fit the preprocessing on raw ``sample`` values; inputs in [0, 1] stand for ``intensity_range``.

        Returns the statistics (for the output's record)."""
        lo, hi = (float(v) for v in intensity_range)
        self.lo, self.span = lo, hi - lo
        stats = self.pre.fit(sample)
        return {"intensity_range": [lo, hi], "preprocessing": stats}

    def fit_volume(self, volume: Any) -> tuple[tuple[float, float], dict[str, Any]]:
        """:meth:`fit` on one bounded random sample of ``volume`` (a :class:`~exem.data.volume.Volume`), with the
        raw range the engine should map onto [0, 1] (:func:`full_range`); returns ``(that range, the statistics)``.
        Open the volume with that range to run it."""
        from exem.data.volume import sample_voxels

        sample = sample_voxels(volume.array)
        raw_range = full_range(volume.dtype, sample)
        return raw_range, self.fit(sample, raw_range)

    def _to_package(self, x: Tensor) -> tuple[Tensor, int]:
        b, _, z = x.shape[:3]
        if self.package.is_2d:
            x = x.permute(0, 2, 1, 3, 4).reshape(b * z, 1, *x.shape[3:])  # (B·Z, 1, Y, X)
            names = ["batch", "channel", "y", "x"]
        else:
            names = ["batch", "channel", "z", "y", "x"]
        target = self.package.input_axes
        if "channel" not in target:
            x, names = x.squeeze(1), [n for n in names if n != "channel"]
        if "batch" not in target:
            if x.shape[0] != 1:
                raise PackageError(
                    f"model {self.package.source}: its input has no batch axis; use batch_size=1"
                    + (" and a patch of one Z slice" if self.package.is_2d else "")
                )
            x, names = x.squeeze(0), names[1:]
        return x.permute(*[names.index(a) for a in target]), z

    def _from_package(self, y: Tensor, b: int, z: int) -> Tensor:
        names = list(self.package.output_axes)
        if "batch" not in names:
            y, names = y.unsqueeze(0), ["batch", *names]
        if "channel" not in names:
            y, names = y.unsqueeze(1), [names[0], "channel", *names[1:]]
        order = ["batch", "channel", *self.package.space]
        y = y.permute(*[names.index(a) for a in order])
        if self.package.is_2d:
            y = y.reshape(b, z, y.shape[1], *y.shape[2:]).permute(0, 2, 1, 3, 4)
        crop = self.package.crop if not self.package.is_2d else (0, *self.package.crop)
        if any(crop):
            pad: list[int] = []
            for c in reversed(crop):
                pad += [c, c]
            y = nn.functional.pad(y, pad)
        return y

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        raw = x * self.span + self.lo if (self.span, self.lo) != (1.0, 0.0) else x
        t, z = self._to_package(self.pre(raw.float()))
        y = self.net(t)
        if isinstance(y, (tuple, list)):
            y = y[0]
        return self.post(self._from_package(y.float(), b, z))


def load_package_net(package: PackageModel) -> PackageNet:
    """The package's weights wrapped as a :class:`PackageNet` (eval mode; statistics not fitted yet)."""
    return PackageNet(package, _load_weights(package)).eval()


def reproduce_test(net: PackageNet) -> dict[str, Any]:
    """Run the package's test input through ``net`` as exem runs it and compare with its test output.

    The preprocessing statistics are fitted on the test input itself (as the package's author computed them);
    ``net``'s fitted state is restored afterwards.

    Returns:
        ``{"passed", "max_abs_error", "mismatched_ppm", "tolerance"}``; ``passed`` when at most the package's
        mismatched elements per million differ by more than ``absolute + relative·|expected|``.

    Raises:
        PackageError: the package has no test tensors, or they do not fit its axes.
    """
    pm = net.package
    if pm.test_input is None or pm.test_output is None:
        raise PackageError(f"model {pm.source}: the package has no test input/output to check")
    x = to_exem_layout(np.load(pm.test_input), pm.input_axes, pm.space).astype(np.float32)
    expected = to_exem_layout(np.load(pm.test_output), pm.output_axes, pm.space).astype(np.float64)
    saved = (net.lo, net.span, [dict(s) for s in net.pre.stats])
    try:
        net.fit(x)
        with torch.no_grad():
            got = net(torch.from_numpy(np.ascontiguousarray(x))).double().numpy()
    finally:
        net.lo, net.span, net.pre.stats = saved[0], saved[1], saved[2]
    crop = pm.crop if not pm.is_2d else (0, *pm.crop)
    got = got[(slice(None), slice(None), *(slice(c, got.shape[2 + i] - c) for i, c in enumerate(crop)))]
    if got.shape != expected.shape:
        raise PackageError(
            f"model {pm.source}: exem's output for the test input has shape {got.shape},"
            f" the test output {expected.shape}"
        )
    rel, atol, ppm_allowed = pm.tolerance
    diff = np.abs(got - expected)
    mismatched = int((diff > atol + rel * np.abs(expected)).sum())
    ppm = 1e6 * mismatched / max(expected.size, 1)
    return {
        "passed": ppm <= ppm_allowed,
        "max_abs_error": float(diff.max()) if diff.size else 0.0,
        "mismatched_ppm": ppm,
        "tolerance": {"relative": rel, "absolute": atol, "mismatched_ppm": ppm_allowed},
    }


def reproduce_or_fail(net: PackageNet) -> dict[str, Any]:
    """:func:`reproduce_test`, raising a one-line :class:`PackageError` when exem does not reproduce it."""
    result = reproduce_test(net)
    log.info("model %s: test output reproduced: %s", net.package.source, result)
    if not result["passed"]:
        tol = result["tolerance"]
        raise PackageError(
            f"model {net.package.source}: exem does not reproduce the package's test output:"
            f" {result['mismatched_ppm']:.3g} ppm of the values differ by more than {tol['absolute']:g} +"
            f" {tol['relative']:g}·|expected| (allowed {tol['mismatched_ppm']:g} ppm; max |Δ|"
            f" {result['max_abs_error']:.3g}); nothing was written"
        )
    return result


# Float volumes: the sample's range widened by this many spans on each side, so that raw values the sample missed
# are rarely clipped by the engine's [0, 1] normalisation before the package's own preprocessing.
FLOAT_RANGE_MARGIN = 1.0


def full_range(dtype: Any, sample: np.ndarray) -> tuple[float, float]:
    """The raw range the engine maps onto [0, 1] before a package's preprocessing: ``dtype``'s range for integer
    volumes (nothing is clipped), the ``sample``'s range widened by :data:`FLOAT_RANGE_MARGIN` for floats."""
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    lo, hi = float(sample.min()), float(sample.max())
    span = max(hi - lo, 1e-6)
    return lo - FLOAT_RANGE_MARGIN * span, hi + FLOAT_RANGE_MARGIN * span
