"""The built-in EM segmenter: a small 3D U-Net trained only on EM-like phantoms, exported to TorchScript.

It stands in for "an EM-trained model from the EM community": it never sees ExM, so how well it segments
virtual EM (and how badly raw ExM) measures what the translation is worth. One
:class:`~exem.models.AnisotropicUNet3D` with two output channels (mitochondria, membranes) is trained on EM
renderings (:func:`~exem.data.synthetic.render_em`) of phantoms whose seeds differ from the synthetic dataset's
(:data:`~exem.data.synthetic.DEFAULT_SEEDS`), so the held-out test phantom is never seen. Targets come from
:attr:`~exem.data.synthetic.Phantom.semantic` (1 membrane, 2 mitochondrion); the loss is BCE + soft Dice.

It is exported twice as TorchScript, each file with a sidecar ``<name>.yaml`` read by ``exem-segment``:

- ``em_mito.pt``: channel 0 = mitochondrion (foreground) probability, ``kind: foreground``;
- ``em_membrane.pt``: channel 0 = membrane (boundary) probability, ``kind: boundary``.

Both take ``(B, 1, Z, Y, X)`` float32 in [0, 1] (EM uint8 / 255: sidecar ``normalize: [0, 255]``), any B and
Z >= 1, Y and X multiples of ``2 ** (len(widths) - 1)``, and return ``(B, 2, Z, Y, X)`` sigmoid probabilities.
The demo's pair ships in ``exem/assets/segmenters`` (:func:`builtin_segmenter`); ``exem-train-segmenter``
(config ``conf/segmenter.yaml``) makes new ones.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from torch import Tensor, nn

from exem.analysis.metrics import dice
from exem.checks import positive_ints
from exem.data.synthetic import DEFAULT_SEEDS, make_phantom, render_em
from exem.models import AnisotropicUNet3D
from exem.progress import step_bar
from exem.quiet import summary_of

log = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_SEGMENTERS",
    "CLASSES",
    "AugmentParams",
    "SegmenterFiles",
    "builtin_segmenter",
    "predict_probabilities",
    "train_segmenter",
]

CLASSES: dict[str, dict[str, Any]] = {
    "mito": {"semantic": 2, "kind": "foreground", "file": "em_mito"},
    "membrane": {"semantic": 1, "kind": "boundary", "file": "em_membrane"},
}
"""Network output channels in order: name → class in ``Phantom.semantic``, sidecar ``kind``, file stem."""

BUILTIN_SEGMENTERS: dict[str, str] = {name: f"{c['file']}.pt" for name, c in CLASSES.items()}
"""Names accepted by :func:`builtin_segmenter` → file in ``exem/assets/segmenters``."""

EM_RANGE: tuple[int, int] = (0, 255)
"""Raw EM (uint8) values mapped to [0, 1]: the sidecars' ``normalize``."""

_ASSETS_PACKAGE = "exem.assets.segmenters"
_TORCHSCRIPT_ATOL = 1e-5  # traced vs eager module, max abs difference of probabilities


@dataclass(frozen=True)
class AugmentParams:
    """Random changes of the training patches, so the segmenter does not learn the phantoms' exact greys.

    Real EM segmenters are trained with such blur / contrast / noise augmentation (EM varies between microscopes,
    stains and focus); a model that has only seen sharp renderings reads any softer image, virtual EM included, as
    foreign. The blur reaches 2.5 voxels so that cristae may be unresolved.

    Every patch is flipped along Z, Y, X and rotated by 90° in-plane (square patches) at random; then with
    probability ``p`` each: contrast ×U(contrast), brightness +U(±brightness), gamma U(gamma) (log-uniform),
    an in-plane Gaussian blur of sigma U(blur_sigma) voxels, Gaussian noise of std U(0, noise_std).
    Intensities are in [0, 1] and clipped back to it.
    """

    p: float = 0.7
    contrast: tuple[float, float] = (0.75, 1.3)
    brightness: float = 0.1
    gamma: tuple[float, float] = (0.75, 1.35)
    blur_sigma: tuple[float, float] = (0.3, 2.5)
    noise_std: float = 0.08


class SegmenterFiles(dict):
    """``{"mito": Path, "membrane": Path}`` of the written TorchScript files (sidecar: ``path.with_suffix(".yaml")``).

    Attributes:
        train_dice: class → Dice (at the sidecar thresholds) on the training phantoms (whole volumes, at the end).
        val_dice: class → Dice on the validation phantom.
        seconds: training wall time (data generation and export excluded).
        steps: optimizer steps done.
        final_loss: mean training loss of the last logged steps.
        parameters: trainable parameters of the network.
    """

    train_dice: dict[str, float]
    val_dice: dict[str, float]
    seconds: float
    steps: int
    final_loss: float
    parameters: int

    def summary(self) -> str:
        """Files, training time and Dice per split, as ``exem-train-segmenter`` prints them."""
        lines = [f"{name:9s} {path}  (+ {path.with_suffix('.yaml').name})" for name, path in self.items()]
        lines.append(f"trained {self.steps} steps in {self.seconds:.0f} s ({self.parameters} parameters)")
        for split, scores in (("train", self.train_dice), ("val", self.val_dice)):
            lines.append(f"  {split:5s} Dice  " + "  ".join(f"{k}={v:.3f}" for k, v in scores.items()))
        return "\n".join(lines)


@dataclass
class _Data:
    images: list[np.ndarray] = field(default_factory=list)  # (Z, Y, X) float32 in [0, 1]
    targets: list[np.ndarray] = field(default_factory=list)  # (C, Z, Y, X) float32 0/1
    mito: list[np.ndarray] = field(default_factory=list)  # flat indices of the mitochondrion voxels


class _Probabilities(nn.Module):
    """Sigmoid of the network's logits with the channels in ``order``: ``(B, 1, Z, Y, X) -> (B, C, Z, Y, X)``."""

    def __init__(self, net: nn.Module, order: Sequence[int]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("order", torch.tensor(list(order), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.net(x)).index_select(1, self.order)


# -------------------------------------------------------------------------------------------------------
# public API
# -------------------------------------------------------------------------------------------------------


def builtin_segmenter(name: str) -> Path:
    """Path of a shipped TorchScript segmenter (its sidecar ``.yaml`` lies beside it).

    Args:
        name: ``"mito"`` (foreground probability of mitochondria) or ``"membrane"`` (boundary probability).

    Raises:
        ValueError: unknown name. FileNotFoundError: the asset is missing from this installation.
    """
    if name not in BUILTIN_SEGMENTERS:
        raise ValueError(f"unknown built-in segmenter {name!r}; expected one of {sorted(BUILTIN_SEGMENTERS)}")
    path = Path(str(resources.files(_ASSETS_PACKAGE).joinpath(BUILTIN_SEGMENTERS[name])))
    if not path.is_file():
        raise FileNotFoundError(f"built-in segmenter {path} is missing; make it with exem-train-segmenter")
    return path


@torch.no_grad()
def predict_probabilities(model: nn.Module, volume: np.ndarray | Tensor) -> np.ndarray:
    """Apply a segmenter to a whole (small) volume in one forward pass; no sliding window.

    Y and X are reflect-padded up to a multiple of the model's ``divisor`` (16 if it has none) and cropped back.

    Args:
        model: a module ``(B, 1, Z, Y, X) -> (B, C, Z, Y, X)`` (e.g. a loaded TorchScript segmenter).
        volume: ``(Z, Y, X)`` float in the model's input range ([0, 1] for the built-in ones).

    Returns:
        ``(C, Z, Y, X)`` float32 outputs.
    """
    x = torch.as_tensor(np.asarray(volume, dtype=np.float32) if not isinstance(volume, Tensor) else volume)
    if x.dim() != 3:
        raise ValueError(f"predict_probabilities expects a (Z, Y, X) volume, got shape {tuple(x.shape)}")
    divisor = int(getattr(model, "divisor", 16))
    y, xx = x.shape[-2:]
    pad_y, pad_x = -y % divisor, -xx % divisor
    x = x.float()[None, None]
    if pad_y or pad_x:
        mode = "reflect" if pad_y < y and pad_x < xx else "replicate"
        x = F.pad(x, (0, pad_x, 0, pad_y), mode=mode)
    out = model(x)[0, :, :, :y, :xx]
    return out.float().cpu().numpy()


def train_segmenter(
    out_dir: str | os.PathLike[str],
    *,
    widths: Sequence[int] = (4, 8, 16, 32),
    steps: int = 600,
    lr: float = 3e-3,
    batch: int = 4,
    patch: Sequence[int] = (8, 64, 64),
    seeds: Sequence[int] = (101, 102, 103, 104),
    val_seed: int = 201,
    phantom_shape: Sequence[int] = (32, 192, 192),
    voxel_size_nm: Sequence[float] = (40.0, 10.0, 10.0),
    seed: int = 0,
    dice_weight: float = 1.0,
    mito_patches: float = 0.5,
    augment: AugmentParams | Mapping[str, Any] | None = None,
    thresholds: Mapping[str, float] | None = None,
    export_patch: Sequence[int] = (16, 128, 128),
    export_overlap: Sequence[int] = (4, 32, 32),
    log_every: int = 25,
    progress: bool = False,
    overwrite: bool = False,
) -> SegmenterFiles:
    """Train the EM segmenter on EM phantoms and export ``em_mito.pt`` / ``em_membrane.pt`` with sidecars.

    Args:
        out_dir: folder written (created if needed): ``em_mito.pt``, ``em_mito.yaml``, ``em_membrane.pt``,
            ``em_membrane.yaml``.
        widths: U-Net channels per level (``len(widths) - 1`` in-plane poolings).
        steps: optimizer steps (Adam).
        lr: learning rate (cosine-annealed to 0 over ``steps``).
        batch: patches per step.
        patch: training patch ``(Z, Y, X)`` voxels; Y and X multiples of ``2 ** (len(widths) - 1)``.
        seeds: phantom seeds of the training volumes; must not contain the held-out test seed
            ``DEFAULT_SEEDS["test"]``.
        val_seed: phantom seed of the validation volume (not a training or test seed).
        phantom_shape: ``(Z, Y, X)`` voxels of each phantom.
        voxel_size_nm: ``(z, y, x)`` voxel size of the phantoms in nm.
        seed: seed of the weights' initialisation, the patch sampling and the augmentations.
        dice_weight: weight of the soft Dice loss next to the BCE (0 = BCE only).
        mito_patches: fraction of the training patches centred on a mitochondrion voxel (the rest: anywhere).
        augment: :class:`AugmentParams` (or a mapping of its fields); None = defaults.
        thresholds: class → probability threshold written to the sidecar (default 0.5 each).
        export_patch: sliding-window patch ``(Z, Y, X)`` written to the sidecars (for ``exem-segment``).
        export_overlap: sliding-window overlap ``(Z, Y, X)`` written to the sidecars.
        log_every: log the loss every this many steps.
        progress: show a rich progress bar on stderr.
        overwrite: replace existing output files; False raises FileExistsError if one exists.

    Returns:
        :class:`SegmenterFiles`: ``{"mito": path, "membrane": path}`` with the Dice figures as attributes.
    """
    widths = tuple(int(w) for w in widths)
    torch.manual_seed(int(seed))
    net = AnisotropicUNet3D(in_channels=1, out_channels=len(CLASSES), widths=widths)
    patch3 = positive_ints(patch, 3, "patch", "z, y, x")
    shape3 = positive_ints(phantom_shape, 3, "phantom_shape", "z, y, x")
    export_patch3 = positive_ints(export_patch, 3, "export_patch", "z, y, x")
    export_overlap3 = tuple(int(v) for v in export_overlap)
    net.check_input_shape(patch3)
    net.check_input_shape(export_patch3)
    if len(export_overlap3) != 3 or any(
        o < 0 or o >= p for o, p in zip(export_overlap3, export_patch3, strict=True)
    ):
        raise ValueError(f"export_overlap must be 3 ints in [0, export_patch), got {list(export_overlap)}")
    if any(p > s for p, s in zip(patch3, shape3, strict=True)):
        raise ValueError(f"patch {list(patch3)} is larger than phantom_shape {list(shape3)}")
    train_seeds, val = _check_seeds(seeds, val_seed)
    if not 0 <= float(mito_patches) <= 1:
        raise ValueError(f"mito_patches must be a fraction in [0, 1], got {mito_patches}")
    if int(steps) < 1 or int(batch) < 1 or not float(lr) > 0 or int(log_every) < 1:
        raise ValueError(
            f"steps, batch, log_every must be >= 1 and lr > 0; got {steps}, {batch}, {log_every}, {lr}"
        )
    aug = _augment_params(augment)
    thr = {name: 0.5 for name in CLASSES} | {k: float(v) for k, v in dict(thresholds or {}).items()}
    if set(thr) != set(CLASSES) or not all(0 < v < 1 for v in thr.values()):
        raise ValueError(
            f"thresholds must map {sorted(CLASSES)} to values in (0, 1), got {dict(thresholds or {})}"
        )
    out = Path(out_dir)
    targets = {name: out / BUILTIN_SEGMENTERS[name] for name in CLASSES}
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a directory")
    existing = [p for t in targets.values() for p in (t, t.with_suffix(".yaml")) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists; pass overwrite=true to replace it")

    train = _phantom_data(train_seeds, shape3, voxel_size_nm)
    valid = _phantom_data([val], shape3, voxel_size_nm)
    n_params = sum(p.numel() for p in net.parameters())
    log.info(
        "training the EM segmenter: widths %s (%d parameters), %d steps of %d patches %s, phantoms %s seeds %s",
        list(widths),
        n_params,
        steps,
        batch,
        list(patch3),
        list(shape3),
        list(train_seeds),
    )
    start = time.perf_counter()
    final_loss = _fit(
        net,
        train,
        patch3,
        int(steps),
        float(lr),
        int(batch),
        float(dice_weight),
        aug,
        float(mito_patches),
        int(seed),
        int(log_every),
        progress,
    )
    seconds = time.perf_counter() - start
    net.eval()
    train_dice = _dice_per_class(net, train, thr)
    val_dice = _dice_per_class(net, valid, thr)
    log.info(
        "EM segmenter trained in %.0f s; Dice train %s, validation %s",
        seconds,
        train_dice,
        val_dice,
        extra=summary_of("exem-train-segmenter"),
    )

    out.mkdir(parents=True, exist_ok=True)
    names = list(CLASSES)
    files = SegmenterFiles()
    for i, name in enumerate(names):
        order = [i, *[j for j in range(len(names)) if j != i]]
        module = _Probabilities(net, order).eval()
        files[name] = _export_torchscript(module, targets[name], net.divisor, patch3)
        header = _sidecar_header(name, names, order, widths, train_seeds, val, val_dice, steps, seconds)
        _write_sidecar(
            targets[name].with_suffix(".yaml"),
            header,
            {
                "kind": CLASSES[name]["kind"],
                "threshold": thr[name],
                "normalize": list(EM_RANGE),
                "patch": list(export_patch3),
                "overlap": list(export_overlap3),
            },
        )
        log.info(
            "wrote %s (+ %s)",
            files[name],
            files[name].with_suffix(".yaml").name,
            extra=summary_of("exem-train-segmenter"),
        )
    files.train_dice, files.val_dice = train_dice, val_dice
    files.seconds, files.steps, files.final_loss, files.parameters = seconds, int(steps), final_loss, n_params
    return files


# -------------------------------------------------------------------------------------------------------
# data
# -------------------------------------------------------------------------------------------------------


def _augment_params(augment: AugmentParams | Mapping[str, Any] | None) -> AugmentParams:
    if isinstance(augment, AugmentParams):
        return augment
    d = dict(augment or {})
    try:  # lists from a YAML config → tuples (AugmentParams is frozen)
        return AugmentParams(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in d.items()})
    except TypeError as exc:
        raise ValueError(f"bad augment settings {d}: {exc}") from None


def _check_seeds(seeds: Sequence[int], val_seed: int) -> tuple[tuple[int, ...], int]:
    train = tuple(int(s) for s in seeds)
    if not train:
        raise ValueError("seeds: at least one training phantom seed is needed")
    test = DEFAULT_SEEDS["test"]
    if test in train or int(val_seed) == test:
        raise ValueError(
            f"seed {test} is the synthetic dataset's held-out test phantom; train and validate on other seeds"
        )
    if int(val_seed) in train:
        raise ValueError(f"val_seed {val_seed} is also a training seed; validate on another phantom")
    return train, int(val_seed)


def _phantom_data(seeds: Sequence[int], shape: Sequence[int], voxel_size_nm: Sequence[float]) -> _Data:
    """EM renderings ``(Z, Y, X)`` in [0, 1] and one-hot targets ``(C, Z, Y, X)`` of the phantoms of ``seeds``."""
    data = _Data()
    for s in seeds:
        phantom = make_phantom(shape, seed=int(s), voxel_size_nm=voxel_size_nm)
        data.images.append(render_em(phantom, seed=int(s)).astype(np.float32) / np.float32(EM_RANGE[1]))
        data.targets.append(
            np.stack([phantom.semantic == c["semantic"] for c in CLASSES.values()]).astype(np.float32)
        )
        data.mito.append(np.flatnonzero(phantom.semantic == CLASSES["mito"]["semantic"]))
    return data


def _augment(
    x: np.ndarray, y: np.ndarray, rng: np.random.Generator, a: AugmentParams
) -> tuple[np.ndarray, ...]:
    """Geometric (both) and intensity (image only) augmentation of one patch ``x (Z, Y, X)``, ``y (C, Z, Y, X)``."""
    for axis in range(3):
        if rng.random() < 0.5:
            x, y = np.flip(x, axis), np.flip(y, axis + 1)
    if x.shape[1] == x.shape[2]:
        k = int(rng.integers(4))
        x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k, axes=(2, 3))
    x = np.ascontiguousarray(x)
    if rng.random() < a.p:
        x = x * rng.uniform(*a.contrast) + (1 - rng.uniform(*a.contrast)) * float(x.mean())
    if rng.random() < a.p:
        x = x + rng.uniform(-a.brightness, a.brightness)
    if rng.random() < a.p:
        x = np.clip(x, 0, 1) ** math.exp(rng.uniform(math.log(a.gamma[0]), math.log(a.gamma[1])))
    if rng.random() < a.p:
        x = ndi.gaussian_filter(x, (0, *(2 * [rng.uniform(*a.blur_sigma)])))
    if rng.random() < a.p:
        x = x + rng.normal(0.0, rng.uniform(0, a.noise_std), x.shape)
    return np.clip(x, 0, 1).astype(np.float32), np.ascontiguousarray(y)


def _sample(
    data: _Data,
    patch: Sequence[int],
    batch: int,
    rng: np.random.Generator,
    aug: AugmentParams,
    mito_patches: float,
) -> tuple[Tensor, Tensor]:
    """A batch of random patches: images ``(B, 1, Z, Y, X)`` and targets ``(B, C, Z, Y, X)``.

    A fraction ``mito_patches`` of them (on average) is centred on a random mitochondrion voxel (mitochondria
    are a few % of the voxels), the others lie anywhere.
    """
    xs, ys = [], []
    for _ in range(batch):
        i = int(rng.integers(len(data.images)))
        img = data.images[i]
        if data.mito[i].size and rng.random() < mito_patches:
            centre = np.unravel_index(int(rng.choice(data.mito[i])), img.shape)
            corner = [
                min(max(int(c) - p // 2, 0), s - p) for c, s, p in zip(centre, img.shape, patch, strict=True)
            ]
        else:
            corner = [int(rng.integers(s - p + 1)) for s, p in zip(img.shape, patch, strict=True)]
        sl = tuple(slice(c, c + p) for c, p in zip(corner, patch, strict=True))
        x, y = _augment(img[sl], data.targets[i][(slice(None), *sl)], rng, aug)
        xs.append(x)
        ys.append(y)
    return torch.from_numpy(np.stack(xs))[:, None], torch.from_numpy(np.stack(ys))


# -------------------------------------------------------------------------------------------------------
# training
# -------------------------------------------------------------------------------------------------------


def _soft_dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """1 − soft Dice per channel over the batch, averaged over channels; ``(B, C, Z, Y, X)`` inputs."""
    p = torch.sigmoid(logits)
    dims = (0, 2, 3, 4)
    inter = (p * target).sum(dims)
    return (1 - (2 * inter + eps) / (p.sum(dims) + target.sum(dims) + eps)).mean()


def _fit(
    net: AnisotropicUNet3D,
    data: _Data,
    patch: Sequence[int],
    steps: int,
    lr: float,
    batch: int,
    dice_weight: float,
    aug: AugmentParams,
    mito_patches: float,
    seed: int,
    log_every: int,
    progress: bool,
) -> float:
    """Adam + cosine schedule on BCE + ``dice_weight`` · soft Dice; returns the mean loss of the last window."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    net.train()
    window: list[float] = []
    last = float("nan")
    with step_bar(progress, "EM segmenter", steps) as advance:
        for step in range(1, steps + 1):
            x, y = _sample(data, patch, batch, rng, aug, mito_patches)
            logits = net(x)
            loss = F.binary_cross_entropy_with_logits(logits, y)
            if dice_weight:
                loss = loss + dice_weight * _soft_dice_loss(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            window.append(float(loss.detach()))
            advance(f"loss {window[-1]:.3f}")
            if step % log_every == 0 or step == steps:
                last = float(np.mean(window))
                log.info("segmenter step %d/%d  loss %.4f", step, steps, last)
                window = []
    return last


def _dice_per_class(net: nn.Module, data: _Data, thresholds: Mapping[str, float]) -> dict[str, float]:
    """Dice of ``sigmoid(logits) > threshold`` per class over all volumes of ``data`` (whole volumes)."""
    logits = [predict_probabilities(net, img) for img in data.images]  # each (C, Z, Y, X)
    out: dict[str, float] = {}
    for c, name in enumerate(CLASSES):
        # sigmoid(l) > t  <=>  l > logit(t)
        cut = math.log(thresholds[name] / (1 - thresholds[name]))
        pred = np.concatenate([lg[c] > cut for lg in logits])
        out[name] = dice(pred, np.concatenate([t[c] > 0 for t in data.targets]))
    return out


# -------------------------------------------------------------------------------------------------------
# export
# -------------------------------------------------------------------------------------------------------


def _export_torchscript(module: nn.Module, final: Path, divisor: int, patch: Sequence[int]) -> Path:
    """Trace ``module`` (float32, eval) on a ``(1, 1, *patch)`` input, save it, and check the saved file on two
    shapes (the second differs in B, Z, Y and X) against the eager module."""
    module = module.float().eval()
    gen = torch.Generator().manual_seed(0)
    z, y, x = (int(v) for v in patch)
    shapes = [(1, 1, z, y, x), (2, 1, z + 1, y + divisor, x + 2 * divisor)]
    inputs = [torch.rand(s, generator=gen) for s in shapes]
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(module, inputs[0], check_trace=False)
            torch.jit.save(traced, str(tmp))
            loaded = torch.jit.load(str(tmp), map_location="cpu").eval()
            diff = max(float((loaded(t) - module(t)).abs().max()) for t in inputs)
        if not diff <= _TORCHSCRIPT_ATOL:
            raise RuntimeError(f"{final}: the traced module differs from the eager one by {diff:.3g}")
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _sidecar_header(
    name: str,
    names: Sequence[str],
    order: Sequence[int],
    widths: Sequence[int],
    seeds: Sequence[int],
    val_seed: int,
    val_dice: Mapping[str, float],
    steps: int,
    seconds: float,
) -> list[str]:
    channels = ", ".join(f"{i} = {names[j]}" for i, j in enumerate(order))
    return [
        f"exem built-in EM segmenter ({name}), made by exem.analysis.segmenter.train_segmenter",
        f"input (B, 1, Z, Y, X) float32 = EM uint8 / 255; output (B, {len(names)}, Z, Y, X) probabilities: {channels}",
        f"AnisotropicUNet3D widths {list(widths)}: Y, X multiples of {2 ** (len(widths) - 1)}",
        f"trained {steps} steps ({seconds:.0f} s) on EM phantoms seeds {list(seeds)}; validation seed {val_seed}: "
        + ", ".join(f"Dice {k} {v:.3f}" for k, v in val_dice.items()),
    ]


def _write_sidecar(path: Path, header: Sequence[str], options: Mapping[str, Any]) -> Path:
    """``options`` as YAML (flow-style lists) under ``# ``-comment ``header`` lines; atomic."""
    import yaml

    body = yaml.safe_dump(dict(options), default_flow_style=None, sort_keys=False)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(f"# {line}\n" for line in header) + body)
    os.replace(tmp, path)
    return path
