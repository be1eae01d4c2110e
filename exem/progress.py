"""Progress of long work: one rich progress-bar style for every job, on stderr (the library never prints).

:func:`step_bar` is a bar over a known number of steps for a ``with`` block; :func:`progress_bar` builds the same bar
for code that starts and stops it itself (the block writer, which lives across Lightning hooks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["progress_bar", "step_bar"]


def progress_bar(*columns: Any, remaining: bool = False) -> Any:
    """A rich ``Progress`` on stderr, not started: the task's description (bold), the bar, done/total, ``columns``
    (rich columns, or strings for text columns that may name ``{task.fields[...]}``), the elapsed time and, with
    ``remaining``, the estimated time left."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    extra = [TextColumn(c) if isinstance(c, str) else c for c in columns]
    tail = [TimeElapsedColumn(), *([TimeRemainingColumn()] if remaining else [])]
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra,
        *tail,
        console=Console(stderr=True),
    )


@contextlib.contextmanager
def step_bar(enabled: bool, description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """A bar over ``total`` steps while the block runs; the yielded ``advance(status="")`` moves it one step and
    shows ``status`` beside it. Not ``enabled``: ``advance`` does nothing."""
    if not enabled:
        yield lambda status="": None
        return
    with progress_bar("{task.fields[status]}") as bar:
        task = bar.add_task(description, total=total, status="")
        yield lambda status="": bar.update(task, advance=1, status=status)
