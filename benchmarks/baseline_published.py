"""The published ExEM training step and stitching, re-implemented on their own: the yardstick of the benchmarks.

Not part of the library. It reuses exem's network classes (:class:`~exem.models.AnisotropicUNet3D`,
:class:`~exem.models.MultiScaleDiscriminator3D`), so both sides can run the very same weights, and nothing else
from exem: the losses, the step, the image pool and the stitching loop are written here again, the way the
published code does them.

Training (:class:`PublishedCycleGAN`): strict fp32 (no TF32, no cudnn.benchmark on a GPU), autograd anomaly
detection on, plain single-tensor ``torch.optim.Adam`` for G (both generators), D_A and D_B, separate losses:

- G step (D_A, D_B frozen): LSGAN adversarial terms of both directions + λ_cyc · L1 cycle terms + λ_content ·
  2^(−step / decay) · intensity-group content loss;
- D_A step, then D_B step: ½ (LSGAN(D(real), 1) + LSGAN(D(replayed fake), 0)), each D with its own image pool.

Stitching (:func:`published_stitch`): the whole volume normalised to float32 in RAM, a patch grid with 50 %
overlap, batches of 8 patches through the generator in fp32, and CPU numpy accumulation of the Gaussian-bump
weighted outputs and of the bumps; the result is their quotient.

All volumes are ``(B, 1, Z, Y, X)`` float32 tensors with intensities normalised to [0, 1]; A = ExM (LM),
B = EM.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Published training constants (intensities normalised to [0, 1]).
LAMBDA_GAN = 1.0
LAMBDA_CYCLE = 10.0
LAMBDA_CONTENT = 50.0
CONTENT_DECAY_STEPS = 1000.0
LM_THRESHOLD = 110 / 255
EM_THRESHOLDS = (120 / 255, 160 / 255)
SIGMOID_SLOPE = 100.0
LR = 3e-4
BETAS = (0.5, 0.999)

# Published stitching constants.
STITCH_OVERLAP_FRACTION = 0.5
STITCH_BATCH = 8
BUMP_SIGMA = 0.5
BUMP_FLOOR = 1e-4


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """No TF32 and no cudnn autotuning inside the block (the published code ran plain fp32); restored after."""
    saved = (
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.benchmark,
    )
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        (
            torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.benchmark,
        ) = saved


class ImagePool:
    """CycleGAN's image pool: once full, each new fake replaces a random stored one with probability ½.

    The published pool draws with Python's ``random``; this one draws with torch's CPU generator (one
    ``torch.rand(())`` per image once full, and ``torch.randint`` for the slot), so that a run seeded with
    ``torch.manual_seed`` replays exactly, and exem and this baseline can be compared draw for draw.
    """

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self.images: list[Tensor] = []

    def query(self, fakes: Tensor) -> Tensor:
        """``(B, 1, Z, Y, X)`` fakes → a batch of the same shape, partly replayed from the pool."""
        if self.size == 0:
            return fakes
        out = []
        for image in fakes.detach():
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif torch.rand(()) < 0.5:
                slot = int(torch.randint(self.size, ()))
                out.append(self.images[slot].clone())
                self.images[slot] = image.clone()
            else:
                out.append(image)
        return torch.stack(out)


def lsgan(scores: Sequence[Tensor], real: bool) -> Tensor:
    """Least-squares GAN loss summed over the discriminator's scales: Σ_s MSE(scores_s, 1 or 0)."""
    target = 1.0 if real else 0.0
    return sum(F.mse_loss(s, torch.full_like(s, target)) for s in scores)  # type: ignore[return-value]


def _step_up(x: Tensor, threshold: float) -> Tensor:
    """s(x, t) = sigmoid(k · (x − t))."""
    return torch.sigmoid(SIGMOID_SLOPE * (x - threshold))


def _step_down(x: Tensor, threshold: float) -> Tensor:
    """s(t, x) = sigmoid(k · (t − x)) = 1 − s(x, t)."""
    return torch.sigmoid(SIGMOID_SLOPE * (threshold - x))


def content_loss(real_a: Tensor, fake_b: Tensor, real_b: Tensor, fake_a: Tensor) -> Tensor:
    """Published intensity-group content loss.

    ``2/5 · [L1(a1, fb1·a1) + L1(a2, (fb2+fb3)·a2) + L1(b1, fa1·b1) + L1(b2, fa2·b2) + L1(b3, fa2·b3)]`` with LM
    groups a1 = s(A, tA), a2 = s(tA, A) and EM groups b1 = s(B, tB1) − s(B, tB2), b2 = 1 − s(B, tB1),
    b3 = s(B, tB2); the same for the fakes.
    """
    t_a = LM_THRESHOLD
    t_b1, t_b2 = EM_THRESHOLDS

    def lm_groups(x: Tensor) -> tuple[Tensor, Tensor]:
        return _step_up(x, t_a), _step_down(x, t_a)

    def em_groups(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        up1, up2 = _step_up(x, t_b1), _step_up(x, t_b2)
        return up1 - up2, 1.0 - up1, up2

    a1, a2 = lm_groups(real_a)
    fa1, fa2 = lm_groups(fake_a)
    b1, b2, b3 = em_groups(real_b)
    fb1, fb2, fb3 = em_groups(fake_b)
    total = (
        F.l1_loss(a1, fb1 * a1)
        + F.l1_loss(a2, (fb2 + fb3) * a2)
        + F.l1_loss(b1, fa1 * b1)
        + F.l1_loss(b2, fa2 * b2)
        + F.l1_loss(b3, fa2 * b3)
    )
    return 2.0 / 5.0 * total


def _set_requires_grad(nets: Sequence[nn.Module], flag: bool) -> None:
    for net in nets:
        for p in net.parameters():
            p.requires_grad = flag


class PublishedCycleGAN:
    """The published training step on given networks (their weights are trained in place).

    Args:
        G_AB, G_BA: generators (ExM → EM, EM → ExM).
        D_A, D_B: discriminators of ExM and EM.
        lr, betas: Adam settings of all three optimizers (the published code multiplied lr by the batch size;
            at its batch size 1 that is lr itself).
        pool_size: image pool per discriminator (0 = off).
        content_decay_steps: the content weight halves every this many batches.
        anomaly_detection: autograd anomaly detection during the step (on in the published code).
    """

    def __init__(
        self,
        G_AB: nn.Module,
        G_BA: nn.Module,
        D_A: nn.Module,
        D_B: nn.Module,
        *,
        lr: float = LR,
        betas: tuple[float, float] = BETAS,
        pool_size: int = 0,
        content_decay_steps: float = CONTENT_DECAY_STEPS,
        anomaly_detection: bool = True,
    ) -> None:
        self.G_AB, self.G_BA, self.D_A, self.D_B = G_AB, G_BA, D_A, D_B
        adam = {"lr": lr, "betas": betas, "foreach": False}
        self.opt_G = torch.optim.Adam(itertools.chain(G_AB.parameters(), G_BA.parameters()), **adam)
        self.opt_D_A = torch.optim.Adam(D_A.parameters(), **adam)
        self.opt_D_B = torch.optim.Adam(D_B.parameters(), **adam)
        self.pool_A = ImagePool(pool_size)
        self.pool_B = ImagePool(pool_size)
        self.content_decay_steps = float(content_decay_steps)
        self.anomaly_detection = bool(anomaly_detection)
        self.step = 0

    def train_step(self, real_a: Tensor, real_b: Tensor) -> dict[str, Tensor]:
        """One batch: G step, D_A step, D_B step. Returns the detached losses (``adv_AB``, ``adv_BA``, ``cycle``,
        ``content``, ``total`` of G, ``D_A``, ``D_B``), scalars."""
        with strict_fp32(), torch.autograd.set_detect_anomaly(self.anomaly_detection):
            # generators
            _set_requires_grad([self.D_A, self.D_B], False)
            self.opt_G.zero_grad(set_to_none=False)
            fake_b = self.G_AB(real_a)
            rec_a = self.G_BA(fake_b)
            fake_a = self.G_BA(real_b)
            rec_b = self.G_AB(fake_a)
            adv_ab = lsgan(self.D_B(fake_b), True)
            adv_ba = lsgan(self.D_A(fake_a), True)
            cycle = F.l1_loss(rec_a, real_a) + F.l1_loss(rec_b, real_b)
            content = content_loss(real_a, fake_b, real_b, fake_a)
            weight = LAMBDA_CONTENT * 2.0 ** (-self.step / self.content_decay_steps)
            total = LAMBDA_GAN * (adv_ab + adv_ba) + LAMBDA_CYCLE * cycle + weight * content
            total.backward()
            self.opt_G.step()
            _set_requires_grad([self.D_A, self.D_B], True)

            # discriminator A (ExM), then B (EM), on real data and replayed fakes
            self.opt_D_A.zero_grad(set_to_none=False)
            replay_a = self.pool_A.query(fake_a)
            loss_da = 0.5 * (lsgan(self.D_A(real_a), True) + lsgan(self.D_A(replay_a.detach()), False))
            loss_da.backward()
            self.opt_D_A.step()

            self.opt_D_B.zero_grad(set_to_none=False)
            replay_b = self.pool_B.query(fake_b)
            loss_db = 0.5 * (lsgan(self.D_B(real_b), True) + lsgan(self.D_B(replay_b.detach()), False))
            loss_db.backward()
            self.opt_D_B.step()
        self.step += 1
        losses = {
            "adv_AB": adv_ab,
            "adv_BA": adv_ba,
            "cycle": cycle,
            "content": content,
            "total": total,
            "D_A": loss_da,
            "D_B": loss_db,
        }
        return {k: v.detach() for k, v in losses.items()}


# ------------------------------------------------------------------------------------------ stitching


def _starts(size: int, patch: int, step: int) -> list[int]:
    """Patch starts along one axis: every ``step`` voxels, the last one moved back to end at the edge."""
    if patch >= size:
        return [0]
    starts = list(range(0, size - patch + 1, step))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def gaussian_bump(patch: Sequence[int], sigma: float = BUMP_SIGMA) -> np.ndarray:
    """``exp(−(z² + y² + x²) / (2σ²))`` on [−1, 1]³ (``[0]`` for an axis of size 1), ≥ 1e-4, float32."""
    axes = [np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1) for n in patch]
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    bump = np.exp(-(zz**2 + yy**2 + xx**2) / (2.0 * sigma**2))
    return np.maximum(bump, BUMP_FLOOR).astype(np.float32)


@torch.no_grad()
def published_stitch(
    generator: nn.Module,
    volume: np.ndarray,
    patch: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = STITCH_BATCH,
    overlap_fraction: float = STITCH_OVERLAP_FRACTION,
) -> np.ndarray:
    """Translate a whole ``(Z, Y, X)`` uint8/uint16 volume the published way; returns float32 ``(Z, Y, X)``.

    The volume is normalised by its dtype's maximum into one float32 array in RAM, cut into patches with
    ``overlap_fraction`` overlap, sent to ``device`` in batches of ``batch_size`` (the last batch may be
    smaller), and each fp32 output is accumulated on the CPU: ``out += bump · pred``, ``weight += bump``;
    the result is ``out / weight``.
    """
    patch = tuple(int(p) for p in patch)
    scale = float(np.iinfo(volume.dtype).max) if np.issubdtype(volume.dtype, np.integer) else 1.0
    image = volume.astype(np.float32) / np.float32(scale)
    steps = [max(1, int(round(p * (1.0 - overlap_fraction)))) for p in patch]
    grid = list(
        itertools.product(*(_starts(n, p, s) for n, p, s in zip(image.shape, patch, steps, strict=True)))
    )
    bump = gaussian_bump(patch)
    out = np.zeros(image.shape, dtype=np.float32)
    weight = np.zeros(image.shape, dtype=np.float32)
    generator.eval()
    with strict_fp32():
        for i in range(0, len(grid), batch_size):
            starts = grid[i : i + batch_size]
            boxes = [tuple(slice(s, s + p) for s, p in zip(st, patch, strict=True)) for st in starts]
            batch = torch.from_numpy(np.stack([image[b] for b in boxes])[:, None]).to(device)
            pred = generator(batch)[:, 0].float().cpu().numpy()
            for box, p in zip(boxes, pred, strict=True):
                out[box] += p * bump
                weight[box] += bump
    return out / weight
