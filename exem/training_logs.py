"""What :class:`~exem.module.ExEMModule` reports while it trains: loss values, validation metrics, image panels."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from exem.analysis.metrics import image_quality
from exem.losses import cycle_loss

__all__ = ["ValidationMeans", "counted_metrics", "cycle_metrics", "log_image", "logging_due", "train_logs"]


def logging_due(trainer: Any) -> bool:
    """True when ``trainer`` writes step metrics after this batch (every ``log_every_n_steps`` batches)."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


def train_logs(losses: Mapping[str, Tensor], content_weight: float, lr: float) -> dict[str, Tensor]:
    """The training losses as ``train/*`` CPU tensors: one device→host copy for all of them.

    CPU tensors, so that Lightning's per-batch progress-bar update (which turns the last logged values into
    numbers at every batch) does not wait for the device either. Generator terms are ``train/G_<term>``, the
    discriminator losses ``train/D_A`` and ``train/D_B``; ``train/content_weight`` and ``train/lr`` are added.
    """
    names = list(losses)
    values = torch.stack([losses[k].float() for k in names]).cpu()
    logs = {
        (f"train/{k}" if k in ("D_A", "D_B") else f"train/G_{k}"): v
        for k, v in zip(names, values, strict=True)
    }
    logs["train/content_weight"] = torch.tensor(float(content_weight))
    logs["train/lr"] = torch.tensor(float(lr))
    return logs


def cycle_metrics(
    real_lm: Tensor,
    rec_lm: Tensor,
    real_em: Tensor,
    rec_em: Tensor,
    fake_em: Tensor,
    paired_em: Tensor | None,
) -> dict[str, Tensor]:
    """Validation metrics: ``val/cycle_psnr``, ``val/cycle_ssim`` (means of the two domains) and ``val/cycle_l1``
    of the recovered volumes; ``val/paired_psnr`` / ``val/paired_ssim`` of the virtual EM against ``paired_em``
    (the EM at the LM patch's place) when there is one. Volumes ``(B, 1, Z, Y, X)`` in [0, 1]."""
    q_lm = image_quality(rec_lm.clamp(0, 1), real_lm)
    q_em = image_quality(rec_em.clamp(0, 1), real_em)
    metrics = {
        "val/cycle_psnr": (q_lm["psnr"] + q_em["psnr"]) / 2,
        "val/cycle_ssim": (q_lm["ssim"] + q_em["ssim"]) / 2,
        "val/cycle_l1": cycle_loss(rec_lm, real_lm) + cycle_loss(rec_em, real_em),
    }
    if paired_em is not None:
        q = image_quality(fake_em.clamp(0, 1), paired_em)
        metrics["val/paired_psnr"] = q["psnr"]
        metrics["val/paired_ssim"] = q["ssim"]
    return metrics


def counted_metrics(
    batch: Mapping[str, Tensor], rec_lm: Tensor, rec_em: Tensor, fake_em: Tensor
) -> tuple[dict[str, Tensor], int]:
    """:func:`cycle_metrics` of a validation batch's counted patches, and how many there are.

    ``batch`` holds ``"lm"``, ``"em"`` (``(B, 1, Z, Y, X)``), optionally ``"em_paired"`` and ``"counted"`` ``(B,)``
    (0 marks the padding :class:`~exem.data.sampling.ValidationSampler` adds under DDP; absent: all count). A
    batch of padding only gives zeros for 0 patches (it adds nothing to the weighted means).
    """
    tensors = [batch["lm"], rec_lm, batch["em"], rec_em, fake_em, batch.get("em_paired")]
    counted = batch.get("counted")
    n = total = batch["lm"].shape[0]
    if counted is not None:
        keep = counted > 0
        n = int(keep.sum())
        if 0 < n < total:
            tensors = [None if t is None else t[keep] for t in tensors]
    metrics = cycle_metrics(*tensors)  # type: ignore[arg-type]
    return (metrics if n else {k: torch.zeros_like(v) for k, v in metrics.items()}), n


class ValidationMeans:
    """Means of the validation metrics over the counted patches of all ranks.

    :meth:`add` takes each batch's metrics and its patch count n; :meth:`means` sums ``value · n`` and n over the
    ranks (one all-reduce) and divides. Lightning's own ``sync_dist`` mean of unequal batch sizes cannot serve: it
    averages the ranks' integer patch counts in integer arithmetic (2 and 1 patches give 1, not 1.5).
    """

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.sums: Tensor | None = None  # (len(keys) + 1,): Σ value·n per key, then Σ n

    def add(self, metrics: Mapping[str, Tensor], n: int) -> None:
        keys = sorted(metrics)
        count = metrics[keys[0]].new_tensor(float(n), dtype=torch.float32)
        values = torch.stack([metrics[k].detach().float() * n for k in keys] + [count])
        if self.sums is None:
            self.keys, self.sums = keys, values
        else:
            self.sums += values

    def means(self, reduce_sum: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
        """``{key: mean}`` over every rank (``reduce_sum``: the strategy's sum over ranks; all ranks call it);
        empty when no batch was added."""
        if self.sums is None:
            return {}
        total = reduce_sum(self.sums.clone())
        return {k: total[i] / total[-1] for i, k in enumerate(self.keys)}


def log_image(loggers: Iterable[Any], key: str, panel: np.ndarray, batch_step: int, global_step: int) -> None:
    """Give an ``(H, W, 3)`` panel to the loggers that take images (TensorBoard at ``batch_step``, wandb and
    friends at ``global_step``)."""
    for logger in loggers:
        exp = getattr(logger, "experiment", None)
        if hasattr(exp, "add_image"):  # TensorBoard
            exp.add_image(key, panel, batch_step, dataformats="HWC")
        elif hasattr(logger, "log_image"):  # wandb and friends
            logger.log_image(key=key, images=[panel], step=global_step)
