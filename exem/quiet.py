"""Output that says nothing a user can act on, silenced in one place.

Lightning's warnings are silenced around ``Trainer.fit`` (``exem.train``), ``Trainer.predict`` (the blockwise engine)
and process-wide by the CLIs; its announcements while an inference Trainer is built
(:func:`exem.inference.engine.default_trainer`). A library call's closing summary record (:func:`summary_of`) is
dropped from the console of the command that prints the same summary itself (:func:`drop_summaries_of`).
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


# A library call's last log record, its one-line summary, carries this attribute naming the command that prints the
# same summary itself; that command drops the record so a run ends with one summary line, not two near-copies.
SUMMARY_ATTR = "exem_summary_of"


def summary_of(prog: str) -> dict[str, str]:
    """``extra=`` for the summary record of a call whose result ``prog`` (e.g. ``"exem-translate"``) prints."""
    return {SUMMARY_ATTR: prog}


class _DropSummaryOf(logging.Filter):
    def __init__(self, prog: str) -> None:
        super().__init__()
        self.prog = prog

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, SUMMARY_ATTR, None) != self.prog


def drop_summaries_of(prog: str) -> None:
    """Drop records marked :func:`summary_of` ``(prog)`` at every handler of the root logger (the console a CLI's
    Hydra logging set up); other records, and other commands' summaries (a step of ``prog``), still show."""
    for handler in logging.getLogger().handlers:  # once each, however often a multirun asks
        if not any(isinstance(f, _DropSummaryOf) and f.prog == prog for f in handler.filters):
            handler.addFilter(_DropSummaryOf(prog))
