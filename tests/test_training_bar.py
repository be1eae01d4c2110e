"""The training bar's epoch title: the last epoch of a step-limited run, not Lightning's "max_epochs - 1"."""

from __future__ import annotations

import math
from types import SimpleNamespace

from lightning.pytorch.callbacks import RichProgressBar

from exem.training_bar import TrainingProgressBar, last_epoch


def test_last_epoch_from_the_step_limit() -> None:
    # 300000 optimizer steps, 3 per batch = 100000 batches; 64 batches per epoch → epochs 0 … 1562
    assert last_epoch(-1, 300_000, 3, 64) == 1562
    assert last_epoch(-1, 18, 3, 2) == 2  # 6 batches in epochs of 2: 0, 1, 2
    assert last_epoch(-1, 19, 3, 2) == 3  # a 7th, partial batch opens epoch 3
    assert last_epoch(5, 300_000, 3, 64) == 4  # the tighter limit wins
    assert last_epoch(-1, -1, 3, 64) is None and last_epoch(None, None, 3, 64) is None
    assert last_epoch(-1, 300, 3, math.inf) is None  # batches per epoch unknown
    assert last_epoch(-1, 300, 0, 10) == 29  # no optimizers yet: one step per batch


def test_the_bar_titles_epochs_with_the_last_one() -> None:
    assert hasattr(RichProgressBar, "_get_train_description")  # the Lightning hook the bar overrides
    bar = TrainingProgressBar()
    bar._trainer = SimpleNamespace(  # noqa: SLF001 - a Trainer stand-in for the bar's property
        max_epochs=-1, max_steps=18, optimizers=[0, 1, 2], num_training_batches=2
    )
    assert bar._get_train_description(1).strip() == "Epoch 1/2"  # noqa: SLF001
    assert len(bar._get_train_description(1)) >= len(bar.validation_description)  # noqa: SLF001
    bar._trainer.max_steps = -1  # noqa: SLF001
    assert bar._get_train_description(7).strip() == "Epoch 7"  # noqa: SLF001
