"""Ranks that fail together: under DDP a rank that fails tells the others, so that none waits for it.

Started by ``srun`` or by hand (no launcher watches the processes), a rank that raised used to leave the others
computing their shares and then waiting in the next barrier until the process group's timeout (30 min), to end
in a collective-timeout traceback that did not say what went wrong. Now:

- Each of the engine's meeting points is a :func:`together` section. A rank that raises inside one flags its
  failure in the output (:func:`~exem.inference.markers.write_failure`: its error on one line) and goes to the
  section's end, where every rank takes part in one collective (who failed). The failed rank re-raises its own
  error; the others raise :class:`~exem.errors.OtherRankError`, which names the rank and its error.
- While blocks are computed, each rank looks for flags before every block (:func:`raise_if_peers_failed`, one
  directory check), so the others stop within a block instead of first finishing their shares.

A single process takes no part in any of this: no collective, no flag. Left as it was: a rank that dies without
raising (killed, out of host memory), or that fails in Lightning's own code between two meeting points (the move
of the network to the device is one: ``BlockPredictor.setup``), still leaves the others waiting until the timeout.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from exem.errors import OtherRankError, exception_line, user_error, user_error_line
from exem.gloo_exit import destroy_gloo_at_exit
from exem.inference.markers import failures, write_failure

__all__ = ["error_line", "peer_error", "raise_if_peers_failed", "together"]

log = logging.getLogger(__name__)

# characters of a rank's error kept in its flag
FLAG_CHARS = 400
# what each rank reports at a meeting
OK, PASSED_ON, FAILED = 0.0, 1.0, 2.0


def error_line(err: BaseException) -> str:
    """What the failed rank's flag says: the one line the command-line tools would print (else type: message),
    at most :data:`FLAG_CHARS` characters."""
    found = user_error(err)
    line = user_error_line(found) if found is not None else exception_line(err, with_type=True)
    return line if len(line) <= FLAG_CHARS else line[:FLAG_CHARS] + "…"


def peer_error(lines: dict[int, str], world: int, where: str) -> OtherRankError:
    """What a rank raises when ``lines`` (rank → its error line; "" when unknown) failed ``where``."""
    ranks = sorted(lines)
    said = f": {lines[ranks[0]]}" if lines[ranks[0]] else " (its own output says why)"
    who = "rank" if len(ranks) == 1 else "ranks"
    return OtherRankError(
        f"{who} {', '.join(map(str, ranks))} of {world} failed {where}{said}; this rank stopped"
    )


def raise_if_peers_failed(root: str | Path, rank: int, world: int) -> None:
    """Before each block under DDP: stop if another rank flagged a failure in the output ``root``.

    Raises:
        OtherRankError: naming the flagged rank(s) and the first one's error.
    """
    flagged = {r: line for r, line in failures(root).items() if r != rank}
    if flagged:
        raise peer_error(flagged, world, "while computing its blocks")


@contextlib.contextmanager
def together(trainer: Any, where: str, root: str | Path | None = None) -> Iterator[None]:
    """A section that every rank enters and leaves at the same point; its end is a collective (a barrier too).

    With one process it only runs the body. Under DDP a rank that raises in the body flags its failure in the
    output ``root`` (when given and it exists; not for :class:`~exem.errors.OtherRankError`, which only passes a
    failure on), and at the end every rank learns who failed.

    Args:
        trainer: the run's Lightning Trainer (``world_size``, ``global_rank``, ``strategy``).
        where: what the section does, for the other ranks' message (``"while creating the output"``).
        root: the output, where failure flags go; None: no flag.

    Raises:
        this rank's own error, when it raised one; else :class:`~exem.errors.OtherRankError` when another rank did.
    """
    world = int(getattr(trainer, "world_size", 1))
    error: Exception | None = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised below, once the other ranks know
        if world <= 1:
            raise
        error = exc
        # only into an existing output: a flag must not leave a folder where rank 0 failed to create the output
        if root is not None and not isinstance(exc, OtherRankError) and Path(root).is_dir():
            try:
                write_failure(root, int(trainer.global_rank), error_line(exc))
            except OSError as flag_error:  # a rank that cannot write to the output cannot flag it either
                log.debug(
                    "rank %d could not flag its failure in %s: %s", trainer.global_rank, root, flag_error
                )
    if world <= 1:
        return
    destroy_gloo_at_exit()  # a rank exiting right after this collective must not abort (exem.gloo_exit)
    rank = int(trainer.global_rank)
    said = torch.zeros(world, dtype=torch.float32, device=trainer.strategy.root_device)
    said[rank] = OK if error is None else PASSED_ON if isinstance(error, OtherRankError) else FAILED
    try:
        said_by = trainer.strategy.reduce(said, reduce_op="sum").tolist()
    except Exception as lost:  # noqa: BLE001 - a rank left without meeting (killed; gloo raises, NCCL hangs)
        if error is not None:  # this rank's own error says more than the broken collective
            log.warning(
                "rank %d: the other ranks could not be told (%s)", rank, exception_line(lost, limit=200)
            )
            raise error from None
        flagged = failures(root) if root is not None else {}
        if flagged:
            raise peer_error(flagged, world, where) from lost
        raise OtherRankError(
            f"a rank of {world} left {where} without saying why (killed?): {exception_line(lost, limit=200)}"
        ) from lost
    if error is not None:
        raise error
    failed = [r for r, s in enumerate(said_by) if s == FAILED] or [
        r for r, s in enumerate(said_by) if s != OK
    ]
    if failed:
        lines = failures(root) if root is not None else {}
        raise peer_error({r: lines.get(r, "") for r in failed}, world, where)
