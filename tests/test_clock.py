"""How long the process has run (start-up figures)."""

from __future__ import annotations

import sys
import time

import pytest

from exem.clock import process_age_s


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_process_age_grows_with_the_process() -> None:
    """The age covers at least the interpreter's and pytest's start (> 0) and advances with the wall clock."""
    first = process_age_s()
    assert first is not None and first > 0
    time.sleep(0.3)
    second = process_age_s()
    assert second is not None and 0.2 <= second - first <= 5.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_process_age_is_none_without_proc(monkeypatch) -> None:
    def no_proc(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise FileNotFoundError("/proc/self/stat")

    monkeypatch.setattr("builtins.open", no_proc)
    assert process_age_s() is None


def test_process_age_is_none_without_a_boot_time_clock(monkeypatch) -> None:
    monkeypatch.delattr(time, "CLOCK_BOOTTIME", raising=False)
    assert process_age_s() is None
