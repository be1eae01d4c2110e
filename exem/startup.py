"""The command-line tools' start-up: their heavy imports with Python's cyclic garbage collector paused, then frozen.

Importing what ``exem-translate`` needs (torch, Lightning, zarr) leaves ~680,000 objects tracked by the collector,
and one full collection over them takes ~0.3 s (2-core machine, Python 3.11). While the modules load, the
collector's full passes run again and again over the growing heap; at exit, the interpreter's final collection
scans all of them once more. :func:`preload` imports a command's modules with the collector paused, then moves
every object alive into the collector's permanent generation (:func:`gc.freeze`), which no later collection visits.
Measured with ``benchmarks/bench_translate.py --size tiny_cli --device cpu`` (benchmarks/RESULTS.md, "start-up
before translation"; 2 cores, four runs each, alternating): the first batch 4.1–4.8 s → 3.2–3.4 s after the command
started, the command's wall clock 6.3–7.0 s → 4.3–4.6 s.

The cost: the cycles the imports leave behind as garbage (~12,000 objects for ``exem-translate``) are frozen
with the rest instead of freed; objects created after :func:`preload` are collected as usual. Only the command-line
entry points call it: a library leaves its host process's collector alone.
"""

from __future__ import annotations

import gc
import importlib
from collections.abc import Iterable

__all__ = ["preload"]

_frozen = False  # whether preload has frozen this process's objects


def preload(modules: Iterable[str]) -> None:
    """Import ``modules`` with the cyclic garbage collector paused, then freeze every tracked object; only the first
    call in a process freezes (later ones, e.g. the jobs of a Hydra multirun, only import: what an earlier job left
    as garbage must stay collectable).

    The collector's state is restored afterwards (enabled unless it was disabled before), also when an import
    fails (its exception propagates).
    """
    global _frozen
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for name in modules:
            importlib.import_module(name)
    finally:
        if not _frozen:
            gc.freeze()
            _frozen = True
        if was_enabled:
            gc.enable()
