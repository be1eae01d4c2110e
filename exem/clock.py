"""How long this process has been running: for start-up figures such as "first batch N s after the command started"."""

from __future__ import annotations

import os
import time

__all__ = ["process_age_s"]


def process_age_s() -> float | None:
    """Seconds since this process started (the interpreter's start included), on Linux: its start time in
    ``/proc/self/stat`` (clock ticks after boot, 10 ms) against the kernel's boot-time clock (``CLOCK_BOOTTIME``,
    which containers do not virtualise the way some do ``/proc/uptime``). None elsewhere (macOS, Windows)."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is None:
        return None
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            stat = f.read()
        # fields after the command name (which may hold spaces and parentheses): field 3 (state) first, so field 22,
        # the start time in clock ticks after boot, is the 20th
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        return max(0.0, time.clock_gettime(boottime) - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None
