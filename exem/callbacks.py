"""Lightning callbacks used by exem's configs."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)


class SaveLastCheckpoint(L.Callback):
    """Write ``<dirpath>/last.ckpt`` when training ends, whatever the checkpoint interval.

    ``trainer.save_checkpoint`` is collective: every rank calls it and only global rank 0 writes.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last.ckpt") -> None:
        self.path = Path(dirpath) / filename

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.path)
        if trainer.is_global_zero:
            log.info("saved %s", self.path)
