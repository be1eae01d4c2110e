"""The training progress bar: Lightning's rich bar, with the epoch count of a run limited by optimizer steps.

exem trains for ``trainer.max_steps`` optimizer steps with ``max_epochs: -1``, and Lightning's
``RichProgressBar`` then titles each epoch "Epoch 3/-2" (``max_epochs - 1``). :class:`TrainingProgressBar` writes
"Epoch 3/41": the last epoch the step limit reaches, from the optimizer steps per batch (three: G, D_A, D_B)
and the batches per epoch (``data.samples_per_epoch`` / batch size).
"""

from __future__ import annotations

import math

from lightning.pytorch.callbacks import RichProgressBar

__all__ = ["TrainingProgressBar", "last_epoch"]


def last_epoch(
    max_epochs: int | None, max_steps: int | None, steps_per_batch: int, batches_per_epoch: float
) -> int | None:
    """The index of the last epoch of a run (0-based), or None when nothing limits it.

    Args:
        max_epochs: the Trainer's; None or negative = no limit.
        max_steps: the Trainer's, in optimizer steps; None or negative = no limit.
        steps_per_batch: optimizer steps per training batch (manual optimization: one per optimizer).
        batches_per_epoch: training batches per epoch (``inf`` when unknown).
    """
    limits = []
    if max_epochs is not None and max_epochs > 0:
        limits.append(max_epochs - 1)
    if max_steps is not None and max_steps > 0 and 0 < batches_per_epoch < math.inf:
        batches = math.ceil(max_steps / max(1, steps_per_batch))
        limits.append(math.ceil(batches / batches_per_epoch) - 1)
    return min(limits) if limits else None


class TrainingProgressBar(RichProgressBar):
    """``RichProgressBar`` whose epoch title counts to the last epoch of the step limit (:func:`last_epoch`)."""

    def _get_train_description(self, current_epoch: int) -> str:  # Lightning's hook for the title
        trainer = self.trainer
        last = last_epoch(
            trainer.max_epochs, trainer.max_steps, len(trainer.optimizers), trainer.num_training_batches
        )
        text = f"Epoch {current_epoch}" if last is None else f"Epoch {current_epoch}/{last}"
        return f"{text:{len(self.validation_description)}}"  # as wide as "Validation": no flicker
