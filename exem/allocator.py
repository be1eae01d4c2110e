"""CPU runs reuse freed memory instead of asking the kernel for fresh pages on every large tensor.

PyTorch allocates CPU tensors with ``malloc``; glibc serves large requests (> 128 KiB to 32 MiB, adapting) with
``mmap`` and gives them back with ``munmap`` when freed, so every large intermediate tensor (network activations,
blend sums) costs page faults and zeroing in the kernel. Measured on 2 cores (benchmarks/RESULTS.md, "engine
ceiling"): translating 32×1024×1024 with a 2-level U-Net of 2/4 channels spent more system time than user time
(31 s vs 28 s, 1.15 Mvox/s); with large blocks kept in the heap, 9 s of system time and 1.97 Mvox/s. Peak RSS rises
(2.26 → 2.91 GB there): freed memory stays with the process for the next tensor.

:func:`keep_freed_memory` sets glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` once per process (the
inference engine and ``exem.train.train`` call it for CPU runs; training a tiny U-Net: 282 → 259 ms per step).
``EXEM_CPU_MALLOC=0`` leaves the allocator alone; other C libraries (musl, macOS) are left alone too. Users who
preload jemalloc or tcmalloc get the same effect their way.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

__all__ = ["ALLOCATOR_ENV", "keep_freed_memory"]

log = logging.getLogger(__name__)

ALLOCATOR_ENV = "EXEM_CPU_MALLOC"
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Requests up to this size come from the heap, and the heap keeps up to this much free memory.
_THRESHOLD = 1 << 30
_done = False


def keep_freed_memory() -> bool:
    """Make glibc keep large freed blocks for reuse (once per process). Returns whether it is in effect."""
    global _done
    if _done:
        return True
    if os.environ.get(ALLOCATOR_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = (
            libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, _THRESHOLD) == 1
        )
    except (OSError, AttributeError):
        return False
    if ok:
        log.debug(
            "glibc malloc keeps freed blocks up to %d bytes for reuse (%s=0 to leave it alone)",
            _THRESHOLD,
            ALLOCATOR_ENV,
        )
    _done = ok
    return ok
