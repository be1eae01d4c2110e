"""Reliable training checkpoints: atomic checkpoint files and the random state needed for exact resumes.

- :class:`AtomicCheckpointIO` is a Lightning ``CheckpointIO`` plugin (wired in ``conf/trainer/default.yaml``)
  that writes every checkpoint to a temporary file in the checkpoint's own folder, flushes it to disk and only
  then renames it over the target (``os.replace``, atomic on POSIX). A run killed while saving leaves the previous
  ``last.ckpt`` intact and at most a stray ``.last.ckpt.*.tmp`` file, which the next save of that name removes.
  Lightning's own ``TorchCheckpointIO`` writes to the system temp folder and *moves* the file, which is a copy
  (not atomic) whenever that folder is on another file system than the checkpoints.
- :func:`rng_state` / :func:`set_rng_state` capture and restore the global random generators (torch CPU and
  CUDA, numpy, Python) as plain tensors, ints and floats, so checkpoints still load with
  ``torch.load(weights_only=True)``. :class:`exem.module.ExEMModule` stores them in every checkpoint
  (``exem_rng_state``) and restores them when training resumes.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

__all__ = ["TMP_SUFFIX", "AtomicCheckpointIO", "rng_state", "set_rng_state", "temp_files"]

log = logging.getLogger(__name__)

# Suffix of the temporary file a checkpoint is written to before it is renamed onto its final name.
TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_files(final: str | os.PathLike[str]) -> list[Path]:
    """Leftover temporary files of ``final`` (from a save that was killed), e.g. ``.last.ckpt.k3j9_x.tmp``."""
    final = Path(final)
    return sorted(final.parent.glob(f".{final.name}.*{TMP_SUFFIX}"))


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic: a checkpoint file is either the old one or the new one, whole.

    The checkpoint is serialised with ``torch.save`` into ``.<name>.<random>.tmp`` beside the target, fsynced,
    renamed onto the target with ``os.replace`` and the folder is fsynced. Remote paths (``s3://`` …) fall back to
    Lightning's own implementation (an fsspec transaction). Only one process writes a given checkpoint path
    (Lightning saves on global rank 0).
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` atomically (see the class docstring)."""
        text = str(path)
        if "://" in text and not text.startswith("file://"):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        final = Path(text.removeprefix("file://"))
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in temp_files(final):  # left by a save that was killed
            stale.unlink(missing_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=TMP_SUFFIX)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; checkpoints get the usual file mode
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)
        log.debug("saved checkpoint %s atomically", final)


# ----------------------------------------------------------------------------------------------------------
# random state


def rng_state() -> dict[str, Any]:
    """The global random state of torch (CPU and CUDA), numpy and Python, as tensors / ints / floats / None.

    Safe for ``torch.load(weights_only=True)`` (no numpy arrays, no tuples of arbitrary objects).
    """
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": gauss,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (parts that are missing are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.to("cpu", torch.uint8) for s in cuda])
    npy = state.get("numpy")
    if npy:
        keys = np.asarray(npy["keys"].numpy(), dtype=np.uint32)
        np.random.set_state(
            ("MT19937", keys, int(npy["pos"]), int(npy["has_gauss"]), float(npy["cached_gaussian"]))
        )
    py = state.get("python")
    if py:
        random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
