"""exem's translator (ExM → virtual EM) as a bioimage.io model package (spec 0.5), tested before it is kept.

:func:`write_package` writes ``<out>/bioimageio/`` (``rdf.yaml``, TorchScript and ONNX weights, a test input and
output, a cover image, a README) and ``<out>/<name>.zip``, then runs ``bioimageio.core``'s model test on it
(offline: the package refers to no file by URL) and refuses a package that does not pass.

How the package describes the generator:

- axes ``batch, channel, z, y, x``: Z any size ≥ :data:`MIN_Z`; Y, X ``4·d + k·d`` with ``d = 2^(levels−1)``
  (the U-Net's pooling divisor).
- halo: ``d`` voxels in Y and X (one pixel of the coarsest level; 2·halo is the 12.5 % overlap of a
  256-voxel patch of the published generator, where exem measured no seam) and 1 in Z. GroupNorm statistics
  depend on the whole patch, so no halo makes tiles exact; this one keeps the patch borders out of the blend.
- preprocessing: the training's LM normalisation (``scale_linear`` for an intensity range, ``scale_range`` for
  percentiles — per sample in bioimage.io, per volume in exem — or the data type's range), then ``clip`` to [0, 1].
- output: virtual EM in [0, 1] (dark membranes, like EM), ``clip`` [0, 1].
"""

from __future__ import annotations

import getpass
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exem.bioimageio.package import PackageError
from exem.trained import TrainedGenerator

__all__ = ["DEFAULT_CITE", "PackageFiles", "package_preprocessing", "write_package"]

log = logging.getLogger(__name__)

FOLDER = "bioimageio"
MIN_Z = 4  # > 2 × the Z halo
# Cite entries need a DOI or a URL (bioimage.io); entries without one go to the README only, with a warning.
DEFAULT_CITE: tuple[dict[str, Any], ...] = (
    {
        "text": "exem: expansion microscopy to virtual electron microscopy (the tool that trained and exported"
        " this model)",
        "url": "https://pypi.org/project/exem/",
    },
    {
        "text": "ExEM: the unpaired 3D CycleGAN with intensity-group content loss that exem re-implements"
        " (add its DOI with cite=...)",
        "doi": None,
    },
)


@dataclass(frozen=True)
class PackageFiles:
    """What :func:`write_package` wrote and how its test went.

    Attributes:
        folder: the unpacked package (``rdf.yaml`` and its files); zip: the same as one archive.
        test_status: ``bioimageio.core``'s test result (``passed``).
        test_max_abs_error: exem's own reproduction of the test output through its package reader.
    """

    folder: Path
    zip: Path
    test_status: str
    test_max_abs_error: float

    def summary(self) -> str:
        return (
            f"bioimageio package: {self.zip} (unpacked: {self.folder}/rdf.yaml); bioimageio.core test"
            f" {self.test_status}, exem's reader reproduces its test output to {self.test_max_abs_error:.3g}"
        )


def package_preprocessing(
    normalization: Mapping[str, Any] | None, dtype: np.dtype | str
) -> list[dict[str, Any]]:
    """The generator's input normalisation as bioimage.io steps: raw LM → [0, 1] as in training."""
    norm = dict(normalization or {})
    if norm.get("intensity_range") is not None:
        lo, hi = (float(v) for v in norm["intensity_range"])
    elif norm.get("percentiles") is not None:
        plo, phi = (float(v) for v in norm["percentiles"])
        return [
            {
                "id": "scale_range",
                "kwargs": {"min_percentile": plo, "max_percentile": phi, "axes": ["z", "y", "x"]},
            },
            {"id": "clip", "kwargs": {"min": 0.0, "max": 1.0}},
        ]
    elif np.dtype(dtype).kind in "ui":
        info = np.iinfo(np.dtype(dtype))
        lo, hi = float(info.min), float(info.max)
    else:
        lo, hi = 0.0, 1.0
    steps: list[dict[str, Any]] = []
    if (lo, hi) != (0.0, 1.0):
        steps.append({"id": "scale_linear", "kwargs": {"gain": 1.0 / (hi - lo), "offset": -lo / (hi - lo)}})
    steps.append({"id": "clip", "kwargs": {"min": 0.0, "max": 1.0}})
    return steps


def _test_input(trained: TrainedGenerator, test_volume: Any, patch: Sequence[int], seed: int) -> np.ndarray:
    """A raw ``(Z, Y, X)`` ExM patch: the centre of ``test_volume``, or a synthetic ExM phantom."""
    if test_volume is not None:
        from exem.data.volume import Volume, open_volume
        from exem.trained import trained_normalization

        # opened as the generator's training data were (only raw values are read here, but the open's dark-data
        # check would otherwise judge the volume by its dtype's range, not by the normalisation the package uses)
        if isinstance(test_volume, Volume):
            volume = test_volume
        else:
            intensity_range, percentiles = trained_normalization(trained)
            volume = open_volume(test_volume, intensity_range=intensity_range, percentiles=percentiles)
        starts = [max(0, (s - p) // 2) for s, p in zip(volume.shape, patch, strict=True)]
        box = tuple(slice(a, a + min(p, s)) for a, p, s in zip(starts, patch, volume.shape, strict=True))
        return np.asarray(volume.read(box))  # type: ignore[arg-type]
    from exem.data.phantom import make_phantom
    from exem.data.render import render_exm

    voxel = trained.voxel_size_nm or (40.0, 10.0, 10.0)
    return render_exm(make_phantom(tuple(patch), seed=seed, voxel_size_nm=voxel), seed=seed)


def _fit_patch(raw: np.ndarray, divisor: int) -> np.ndarray:
    """Crop Y and X to multiples of ``divisor`` (≥ 4·divisor when the patch allows)."""
    y, x = (max(divisor, s // divisor * divisor) for s in raw.shape[1:])
    if min(raw.shape[1:]) < 4 * divisor:
        raise PackageError(
            f"the test patch {raw.shape} is too small: Y and X need at least {4 * divisor} voxels for this generator"
        )
    return raw[:, :y, :x]


def _cover(raw01: np.ndarray, output: np.ndarray, path: Path) -> None:
    """ExM | virtual EM of the middle Z slice, side by side (PNG, 2:1)."""
    from PIL import Image

    z = raw01.shape[0] // 2
    pair = np.concatenate([raw01[z], output[z]], axis=1)
    img = Image.fromarray((np.clip(pair, 0, 1) * 255).round().astype(np.uint8))
    scale = max(1, 512 // img.width)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def _readme(trained: TrainedGenerator, steps: list[dict[str, Any]], cite: Sequence[Mapping[str, Any]]) -> str:
    widths = ", ".join(map(str, trained.widths or ()))
    lines = [
        "# exem: ExM → virtual EM translator",
        "",
        "A 3D U-Net generator (`G_AB`) trained by exem's unpaired CycleGAN to turn pan-protein (NHS-ester) expansion"
        " microscopy into virtual electron microscopy, so that EM-trained segmenters can analyse ExM volumes.",
        "Protein-dense structures (membranes, mitochondria) are bright in the input and dark in the output, as in EM.",
        "",
        "## Training",
        f"- checkpoint: `{Path(trained.source).name}` ({trained.checkpoint_kind}), direction {trained.direction}",
        f"- U-Net widths: {widths or 'unknown'}",
        f"- ExM voxel size (z, y, x): {list(trained.voxel_size_nm) if trained.voxel_size_nm else 'unknown'} nm",
        f"- training patch (z, y, x): {list(trained.training_patch) if trained.training_patch else 'unknown'} voxels",
        f"- input normalisation in training: {dict(trained.lm_normalization or {}) or 'the data type range'}",
        f"- content-loss intensity groups: {_groups_line(trained.content_groups)}",
        f"- preprocessing in this package: {', '.join(s['id'] for s in steps)}"
        + (
            " (bioimage.io computes the percentiles per tile; exem-translate computes them once per volume, as in"
            " training: prefer it for whole volumes)"
            if any(s["id"] == "scale_range" for s in steps)
            else ""
        ),
        "",
        "## Use",
        "Apply to ExM volumes of the training's voxel size. For whole volumes, tile with an overlap of at least twice"
        " the halo and blend (exem does: `exem-translate`); judge the result with your own EM labels"
        " (`exem-evaluate`).",
        "",
        "## Validation",
        "The test input / output pair of this package was computed by exem at export. The model has no ground truth:"
        " validate it on your data by segmenting the virtual EM with an EM-trained model and scoring against"
        " labelled ExM (exem-evaluate reports Dice / VOI next to the same segmenter on real EM).",
        "",
        "## Citations",
        *(
            f"- {c['text']}"
            + (f" (doi: {c['doi']})" if c.get("doi") else f" ({c['url']})" if c.get("url") else "")
            for c in cite
        ),
        "",
    ]
    return "\n".join(lines)


def _groups_line(groups: Mapping[str, Any] | None) -> str:
    """The content-loss groups in one line: thresholds and the LM → EM mapping."""
    if not groups:
        return "unknown"
    keys = ("lm_thresholds", "em_thresholds", "lm_to_em", "polarity", "stain")
    return (
        ", ".join(f"{k} {groups[k]}" for k in keys if groups.get(k) is not None) or "the published defaults"
    )


def _rdf(
    trained: TrainedGenerator,
    name: str,
    steps: list[dict[str, Any]],
    divisor: int,
    halo: tuple[int, int, int],
    weights: Mapping[str, Any],
    authors: Sequence[Mapping[str, Any]],
    cite: Sequence[Mapping[str, Any]],
    license_id: str,
) -> dict[str, Any]:
    def space(ax: str, size: Any, h: int | None) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "space", "id": ax, "size": size, "unit": "nanometer"}
        if trained.voxel_size_nm:
            entry["scale"] = float(trained.voxel_size_nm["zyx".index(ax)])
        if h:
            entry["halo"] = h
        return entry

    sizes = {"z": {"min": MIN_Z, "step": 1}, "y": {"min": 4 * divisor, "step": divisor}}
    sizes["x"] = dict(sizes["y"])  # a copy: no YAML anchors in rdf.yaml
    return {
        "format_version": "0.5.4",
        "type": "model",
        "name": name,
        "description": "ExM (pan-protein stain) to virtual EM, 3D U-Net generator of an unpaired CycleGAN (exem)",
        "authors": [dict(a) for a in authors],
        "cite": [{k: v for k, v in c.items() if v is not None} for c in cite if c.get("doi") or c.get("url")],
        "license": license_id,
        "documentation": "README.md",
        "covers": ["cover.png"],
        "tags": ["expansion-microscopy", "electron-microscopy", "image-to-image", "3d", "cyclegan", "exem"],
        "inputs": [
            {
                "id": "exm",
                "axes": [
                    {"type": "batch"},
                    {"type": "channel", "channel_names": ["exm"]},
                    *(space(a, sizes[a], None) for a in "zyx"),
                ],
                "test_tensor": {"source": "test_input.npy"},
                "data": {"type": "float32"},
                "preprocessing": steps,
            }
        ],
        "outputs": [
            {
                "id": "virtual_em",
                "axes": [
                    {"type": "batch"},
                    {"type": "channel", "channel_names": ["virtual_em"]},
                    *(
                        space(a, {"tensor_id": "exm", "axis_id": a}, h)
                        for a, h in zip("zyx", halo, strict=True)
                    ),
                ],
                "test_tensor": {"source": "test_output.npy"},
                "data": {"type": "float32", "range": [0.0, 1.0]},
                "postprocessing": [{"id": "clip", "kwargs": {"min": 0.0, "max": 1.0}}],
            }
        ],
        "weights": dict(weights),
    }


def write_package(
    trained: TrainedGenerator,
    out_dir: Path,
    *,
    torchscript: Path,
    onnx: Path | None = None,
    onnx_opset: int = 18,
    test_volume: Any = None,
    name: str = "exem ExM to virtual EM",
    authors: Sequence[Mapping[str, Any]] | None = None,
    cite: Sequence[Mapping[str, Any]] | None = None,
    license_id: str = "CC-BY-4.0",
    seed: int = 0,
) -> PackageFiles:
    """Write and test the bioimage.io package of ``trained`` (an ExM → virtual EM U-Net).

    Args:
        trained: the generator and its training facts (voxel size, normalisation, training patch, groups).
        out_dir: the export folder: ``<out_dir>/bioimageio/`` and ``<out_dir>/<name>.zip`` are (re)written.
        torchscript, onnx: checked exports of the network (``export_generator`` makes them); copied in.
        onnx_opset: the ONNX file's opset.
        test_volume: an ExM volume (path or :class:`~exem.data.volume.Volume`) to cut the test patch from (its
            centre, training-patch sized); None: a synthetic ExM phantom patch.
        name, authors, cite, license_id: the description's fields (authors default: the user's login name).
        seed: of the synthetic test patch.

    Raises:
        PackageError: a test patch too small, an invalid description, or a package that fails bioimageio.core's test.
    """
    os.environ.setdefault("BIOIMAGEIO_HTTP_TIMEOUT", "5")
    folder = Path(out_dir) / FOLDER
    zip_path = Path(out_dir) / f"{_slug(name)}.zip"
    if folder.exists():
        shutil.rmtree(folder)
    zip_path.unlink(missing_ok=True)
    folder.mkdir(parents=True)
    try:
        return _write(
            trained,
            folder,
            zip_path,
            torchscript,
            onnx,
            onnx_opset,
            test_volume,
            name,
            authors,
            cite,
            license_id,
            seed,
        )
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        zip_path.unlink(missing_ok=True)
        raise


def _write(
    trained: TrainedGenerator,
    folder: Path,
    zip_path: Path,
    torchscript: Path,
    onnx: Path | None,
    onnx_opset: int,
    test_volume: Any,
    name: str,
    authors: Sequence[Mapping[str, Any]] | None,
    cite: Sequence[Mapping[str, Any]] | None,
    license_id: str,
    seed: int,
) -> PackageFiles:
    net = trained.network
    divisor = int(getattr(net, "divisor", 1))
    patch = tuple(trained.training_patch or (16, 256, 256))
    raw = _fit_patch(_test_input(trained, test_volume, patch, seed), divisor)
    steps = package_preprocessing(trained.lm_normalization, raw.dtype)
    test_input = raw.astype(np.float32)[None, None]

    from exem.bioimageio.processing import PREPROCESSING, ProcessingSteps

    pre = ProcessingSteps(tuple((s["id"], s["kwargs"]) for s in steps), PREPROCESSING, "preprocessing", name)
    pre.fit(test_input)
    with torch.no_grad():
        x = pre(torch.from_numpy(test_input))
        test_output = net(x.to(next(net.parameters()).device)).float().cpu().clamp(0, 1).numpy()
    np.save(folder / "test_input.npy", test_input)
    np.save(folder / "test_output.npy", test_output)
    _cover(x[0, 0].numpy(), test_output[0, 0], folder / "cover.png")
    cite_list = [dict(c) for c in (cite if cite is not None else DEFAULT_CITE)]
    for entry in cite_list:
        if not (entry.get("doi") or entry.get("url")):
            log.warning("cite entry without doi or url (README only): %s", entry.get("text"))
    (folder / "README.md").write_text(_readme(trained, steps, cite_list))
    shutil.copy2(torchscript, folder / "weights.ts")
    weights: dict[str, Any] = {
        "torchscript": {"source": "weights.ts", "pytorch_version": torch.__version__.split("+")[0]}
    }
    if onnx is not None:
        shutil.copy2(onnx, folder / "weights.onnx")
        weights["onnx"] = {"source": "weights.onnx", "opset_version": int(onnx_opset)}
    author_list = [dict(a) for a in authors] if authors else [{"name": getpass.getuser()}]
    rdf = _rdf(
        trained, name, steps, divisor, (1, divisor, divisor), weights, author_list, cite_list, license_id
    )
    import yaml

    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False, allow_unicode=True))
    status = _bioimageio_test(folder / "rdf.yaml")
    from bioimageio.spec import save_bioimageio_package

    save_bioimageio_package(folder / "rdf.yaml", output_path=zip_path)
    reproduced = _reproduce(folder)
    return PackageFiles(folder=folder, zip=zip_path, test_status=status, test_max_abs_error=reproduced)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.strip()).strip("_").lower() or "model"


def _bioimageio_test(rdf: Path) -> str:
    """bioimageio.core's model test of the package (all its weight formats, CPU); refuses unless passed."""
    from bioimageio.core import test_model

    summary = test_model(rdf, devices=["cpu"])
    if summary.status != "passed":
        failed = [d for d in summary.details if d.status != "passed"]
        first = failed[0] if failed else None
        reason = f"{first.name}: {first.errors[0].msg if first.errors else ''}" if first is not None else ""
        raise PackageError(
            f"{rdf.parent}: bioimageio.core's test did not pass ({summary.status}; {reason[:200]})"
        )
    return str(summary.status)


def _reproduce(folder: Path) -> float:
    """Max |exem's package reader − the test output| on the package just written."""
    from exem.bioimageio.package import open_package
    from exem.bioimageio.processing import load_package_net, reproduce_test

    return float(reproduce_test(load_package_net(open_package(folder)))["max_abs_error"])
