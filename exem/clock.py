"""How long this process has been running: for start-up figures such as "first batch N s after the command started"."""

from __future__ import annotations

import os

__all__ = ["process_age_s"]


def process_age_s() -> float | None:
    """Seconds since this process started (the interpreter's start included), from Linux's ``/proc`` (10 ms
    resolution); None where ``/proc`` is not available (macOS, Windows)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            stat = f.read()
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        # fields after the command name (which may hold spaces and parentheses): field 3 (state) first, so field 22,
        # the start time in clock ticks after boot, is the 20th
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None
