"""Lightning output that says nothing a user of exem can act on, silenced in one place.

The warnings are silenced around ``Trainer.fit`` (``exem.train``), ``Trainer.predict`` (the blockwise engine) and
process-wide by the CLIs; the announcements while an inference Trainer is built
(:func:`exem.inference.engine.default_trainer`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# Message patterns (regular expressions, as ``warnings.filterwarnings`` takes them).
LIGHTNING_NOISE: tuple[str, ...] = (
    # a deprecation inside Lightning 2.6's own batch handling
    r".*isinstance\(treespec, LeafSpec\).*",
    # exem checkpoints after all three optimizer steps of a batch on purpose; Lightning warns about that
    r".*no pre-optimization state was saved.*",
)


# Lightning announces the accelerators ("GPU available …") and advertises ("Tip: …") at INFO on this logger.
LIGHTNING_ANNOUNCER = "lightning.pytorch.utilities.rank_zero"


@contextmanager
def lightning_announcements_muted() -> Iterator[None]:
    """Below-WARNING records of :data:`LIGHTNING_ANNOUNCER` are dropped inside the block (warnings still show)."""
    announcer = logging.getLogger(LIGHTNING_ANNOUNCER)
    level = announcer.level
    announcer.setLevel(logging.WARNING)
    try:
        yield
    finally:
        announcer.setLevel(level)


def silence_lightning_noise() -> None:
    """Ignore :data:`LIGHTNING_NOISE` for the rest of the process (the CLIs)."""
    for pattern in LIGHTNING_NOISE:
        warnings.filterwarnings("ignore", message=pattern)


@contextmanager
def lightning_noise_silenced() -> Iterator[None]:
    """Ignore :data:`LIGHTNING_NOISE` inside the block only; other warnings still show."""
    with warnings.catch_warnings():
        silence_lightning_noise()
        yield
