"""The command-line tools' start-up (exem.startup.preload): imports with the collector paused, one freeze."""

from __future__ import annotations

import gc
import importlib
import importlib.metadata
import sys
import weakref
from pathlib import Path

import pytest

import exem.cli as cli
from exem import startup
from exem.startup import preload

PROBE = "exem_startup_probe"


@pytest.fixture
def probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module that records whether the collector ran while it was imported; the process not frozen yet."""
    (tmp_path / f"{PROBE}.py").write_text(
        "import gc\nENABLED_DURING_IMPORT = gc.isenabled()\n\nclass Probe:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, PROBE, raising=False)
    monkeypatch.setattr(startup, "_frozen", False)
    gc.unfreeze()
    return PROBE


def _tracked(obj: object) -> bool:
    """Whether the collector's generations (not its permanent one) hold ``obj``."""
    return any(o is obj for o in gc.get_objects())


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_preload_imports_with_the_collector_paused_then_freezes(probe: str) -> None:
    assert gc.isenabled()
    preload([probe])
    module = sys.modules[probe]
    assert module.ENABLED_DURING_IMPORT is False
    assert gc.isenabled()  # restored
    assert gc.get_freeze_count() > 0
    assert not _tracked(module.Probe)  # frozen: no collection visits it


def test_only_the_first_preload_freezes(probe: str) -> None:
    early = _Cycle()
    early_ref = weakref.ref(early)
    del early  # garbage in a cycle, not collected yet
    preload([])
    gc.collect()
    assert early_ref() is not None  # frozen with everything else alive (the price of the first preload)

    late = _Cycle()
    late_ref = weakref.ref(late)
    del late
    preload([probe])  # e.g. the next job of a Hydra multirun: imports only
    assert gc.isenabled()
    assert _tracked(sys.modules[probe].Probe)
    gc.collect()
    assert late_ref() is None  # the earlier job's garbage is still collected


def test_preload_restores_a_disabled_collector_and_propagates_import_errors(probe: str) -> None:
    gc.disable()
    try:
        preload([probe])
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(ModuleNotFoundError):
        preload(["exem_no_such_module_anywhere"])
    assert gc.isenabled()


def test_every_command_preloads_modules_that_import() -> None:
    scripts = [
        ep
        for ep in importlib.metadata.entry_points(group="console_scripts")
        if ep.value.startswith("exem.cli:")
    ]
    commands = [obj for obj in vars(cli).values() if callable(obj) and hasattr(obj, "preloads")]
    assert len(commands) == len(scripts)  # one `command` per entry point (segment_main wraps _segment)
    for command in commands:
        assert command.preloads, command.__name__
        for name in command.preloads:
            importlib.import_module(name)
