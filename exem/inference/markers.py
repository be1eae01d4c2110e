"""The output's bookkeeping folder ``<output>/.exem_done``: what is done, and which rank failed.

- Done-markers ``.exem_done/<level>/<block-id>``: empty files, created atomically once a block's level is written
  (:class:`~exem.inference.blockio.BlockWriter`); a rerun skips blocks whose markers all exist
  (:func:`done_blocks`).
- Failure flags ``.exem_done/failed/<rank>``: under DDP, a rank that failed writes its error on one line here,
  so that the other ranks stop (:mod:`exem.inference.ranks`). Rank 0 clears them when a run starts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from exem.inference.plan import Block, BlockPlan

__all__ = [
    "DONE_DIR",
    "FAILED_DIR",
    "clear_failures",
    "done_blocks",
    "failures",
    "marker_path",
    "touch_atomic",
    "write_atomic",
    "write_failure",
]

DONE_DIR = ".exem_done"
FAILED_DIR = "failed"  # under DONE_DIR


def marker_path(root: str | Path, level: int, block: Block) -> Path:
    """The done-marker of ``block`` at pyramid ``level``."""
    return Path(root) / DONE_DIR / str(level) / block.id


def done_blocks(root: str | Path, plan: BlockPlan, levels: int) -> set[int]:
    """Indices of the plan's blocks whose done-markers exist for every level (one directory listing per level)."""
    root = Path(root)
    names: list[set[str]] = []
    for lvl in range(levels):
        d = root / DONE_DIR / str(lvl)
        names.append(set(os.listdir(d)) if d.is_dir() else set())
    return {b.index for b in plan.blocks if all(b.id in n for n in names)}


def write_atomic(path: Path, text: str = "") -> None:
    """Write ``text`` to the file ``path`` atomically (a temporary file in the same folder, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def touch_atomic(path: Path) -> None:
    """Create the empty file ``path`` atomically."""
    write_atomic(path)


def _failed_dir(root: str | Path) -> Path:
    return Path(root) / DONE_DIR / FAILED_DIR


def write_failure(root: str | Path, rank: int, line: str) -> None:
    """Flag that ``rank`` failed, with its error ``line``."""
    write_atomic(_failed_dir(root) / str(int(rank)), line)


def failures(root: str | Path) -> dict[int, str]:
    """``{rank: error line}`` of the failure flags in ``root`` (one directory check when there are none)."""
    folder = _failed_dir(root)
    if not folder.is_dir():
        return {}
    found: dict[int, str] = {}
    for name in os.listdir(folder):
        if name.isdigit():
            with contextlib.suppress(OSError):  # cleared meanwhile
                found[int(name)] = (folder / name).read_text().strip()
    return found


def clear_failures(root: str | Path) -> None:
    """Remove the failure flags an earlier run left in ``root``."""
    shutil.rmtree(_failed_dir(root), ignore_errors=True)
