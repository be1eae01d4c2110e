"""Helpers shared by the benchmark scripts: device choice, timers, peak-memory probes, test volumes."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zarr

RSS_POLL_S = 0.002  # RSS sampling period of the CPU peak-memory probe
CHUNKS = (16, 128, 128)  # chunks of the benchmark input volumes
GIB = 2**30


def pick_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU. ``cuda:N`` with N > 0 is refused in one line: the Lightning
    trainers of the benchmarks (and ``translate_volume`` without one) take the first visible GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index not in (None, 0):
        raise SystemExit(
            f"--device {name}: the benchmarks run on the first visible GPU; choose it with"
            f" CUDA_VISIBLE_DEVICES={device.index} and --device cuda"
        )
    return device


def machine(device: torch.device) -> str:
    """A short description of the machine and the torch build."""
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{os.cpu_count()}-core {platform.machine()} CPU, {torch.get_num_threads()} torch threads"
    return f"{what}, torch {torch.__version__}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    """Collect garbage and hand freed memory back (CUDA caching allocator, glibc heap) before a measurement."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of the code in a ``with`` block, in bytes, over what was in use when the block began.

    :attr:`rss_peak`: the largest resident set size of the process seen by a sampling thread (every
    ``RSS_POLL_S`` s; no tracemalloc, which would slow the code down). :attr:`peak`: on CUDA,
    ``torch.cuda.max_memory_allocated`` after a reset; on the CPU, :attr:`rss_peak`.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self.rss_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> PeakMemory:
        release_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_base = torch.cuda.memory_allocated(self.device)
        self._rss_base = self._rss_max = _rss_bytes()
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._rss_max = max(self._rss_max, _rss_bytes())
            time.sleep(RSS_POLL_S)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.rss_peak = max(self._rss_max, _rss_bytes()) - self._rss_base
        self.peak = self.rss_peak
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._cuda_base


def time_calls(fn: Callable[[int], object], n: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of ``n`` calls ``fn(i)`` after ``warmup`` calls; CUDA events on a GPU."""
    for i in range(warmup):
        fn(i)
    sync(device)
    times = []
    for i in range(warmup, warmup + n):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - t0)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def textured_volume(shape: tuple[int, int, int], dtype: np.dtype, seed: int = 0) -> np.ndarray:
    """A compressible test volume: blobs of 8×8 voxels in-plane with mild noise, over the dtype's range."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    coarse = rng.random((z, -(-y // 8), -(-x // 8)), dtype=np.float32)
    field = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)[:, :y, :x]
    field += 0.05 * rng.standard_normal(field.shape, dtype=np.float32)
    top = float(np.iinfo(dtype).max)
    return np.clip(field * top, 0, top).astype(dtype)


def write_zarr(path: Path, volume: np.ndarray) -> Path:
    """Write ``volume`` as a Zarr v3 array with :data:`CHUNKS` chunks (zarr's default compression) at ``path``."""
    chunks = tuple(min(c, s) for c, s in zip(CHUNKS, volume.shape, strict=True))
    arr = zarr.create_array(str(path), shape=volume.shape, chunks=chunks, dtype=volume.dtype, overwrite=True)
    arr[...] = volume
    return path
