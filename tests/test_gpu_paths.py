"""CUDA-only paths of the translation engine, run on the CPU with the CUDA calls they make stood in for.

No test here needs a GPU: each replaces the few ``torch.cuda`` functions a path calls with recording stand-ins, so
that the path's logic (what is measured, what is waited for, in which thread, with which device current) is checked
where the suite runs.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from exem.data.ome import create_ome_zarr
from exem.data.volume import open_volume
from exem.inference import blockrun
from exem.inference.batching import batch_for_memory, probe_batch_size
from exem.inference.engine import run_blockwise
from exem.inference.plan import plan_blocks

GIB = 2**30


class FakeMemory:
    """The CUDA caching allocator's counters, as ``torch.cuda`` reports them, driven by a fake network."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.allocated = 3 * GIB  # weights and earlier buffers, held across the probe
        self.peak = self.allocated

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_zeros = torch.zeros
        monkeypatch.setattr(torch, "zeros", lambda *a, device=None, **k: real_zeros(*a, **k))
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: self.allocated)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: self._reset())
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: self.allocated)
        monkeypatch.setattr(
            torch.cuda, "mem_get_info", lambda device=None: (self.total - self.allocated, self.total)
        )

    def _reset(self) -> None:
        self.peak = self.allocated

    def use(self, nbytes: int) -> None:
        """A transient allocation of ``nbytes`` (freed before the call returns)."""
        self.peak = max(self.peak, self.allocated + nbytes)


class ProbedNet(nn.Module):
    """Needs 1 GiB of activations per patch; its first call also tries cuDNN algorithms in a 20 GiB workspace."""

    def __init__(self, memory: FakeMemory) -> None:
        super().__init__()
        self.memory = memory
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.memory.use(GIB + (20 * GIB if self.calls == 1 else 0))
        return x


def test_the_batch_probe_measures_a_call_not_the_first_calls_one_off_allocations(monkeypatch) -> None:
    """The first call's autotuning workspaces would have made the batch 2 instead of 32 (1 GiB per patch on 80 GiB)."""
    memory = FakeMemory(total=80 * GIB)
    memory.install(monkeypatch)
    net = ProbedNet(memory)
    batch = probe_batch_size(net, (4, 8, 8), torch.device("cuda"), None)
    assert batch == batch_for_memory(GIB, 80 * GIB) == 32
    assert net.calls == 2
    assert batch_for_memory(21 * GIB, 80 * GIB) == 1  # what measuring the first call would have given


class FakeEvent:
    """``torch.cuda.Event``: records its arguments, the stream it was recorded on, and where it was waited for."""

    made: list[FakeEvent] = []

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs
        self.stream = None
        self.waits: list[tuple[str, object]] = []
        FakeEvent.made.append(self)

    def record(self, stream) -> None:  # noqa: ANN001
        self.stream = stream

    def synchronize(self) -> None:
        self.waits.append((threading.current_thread().name, CURRENT.get("device")))


CURRENT: dict[str, object] = {}


@contextmanager
def fake_device(device):  # noqa: ANN001, ANN201
    """``torch.cuda.device``: the calling thread's current device for the block."""
    before = CURRENT.get("device")
    CURRENT["device"] = device
    try:
        yield
    finally:
        CURRENT["device"] = before


def test_host_copies_wait_with_their_device_current_and_without_spinning(monkeypatch) -> None:
    """A writer thread's wait makes the copies' device current (no CUDA context on GPU 0 from rank 1's threads)
    and uses a blocking-sync event (the thread sleeps rather than spinning a core)."""
    FakeEvent.made.clear()
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", device))
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    device = torch.device("cuda", 1)
    ready = blockrun.HostCopies(device)
    (event,) = FakeEvent.made
    assert event.kwargs == {"blocking": True} and event.stream == ("stream of", device)
    thread = threading.Thread(target=ready.wait, name="exem-write-test")
    thread.start()
    thread.join()
    assert event.waits == [("exem-write-test", device)]
    assert CURRENT.get("device") is None  # restored after the wait


class LateCopies:
    """What ``to_host`` hands the writer on a GPU, simulated: the host rows are filled only when ``wait()`` runs,
    as a non-blocking device→host copy may still be in flight when the rows reach the writer."""

    waited_in: list[str] = []

    def __init__(self, hosts: list[np.ndarray], values: list[np.ndarray]) -> None:
        self.hosts, self.values = hosts, values

    def wait(self) -> None:
        LateCopies.waited_in.append(threading.current_thread().name)
        for host, value in zip(self.hosts, self.values, strict=True):
            host[...] = value


def _late_to_host(tensors):  # noqa: ANN001, ANN202
    values = [t.numpy().copy() for t in tensors]
    hosts = [np.zeros_like(v) for v in values]  # not yet copied
    return hosts, LateCopies(hosts, values)


def _run(tmp_path, name: str, shards=None, **kwargs) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    rng = np.random.default_rng(3)
    volume = rng.integers(0, 256, (16, 48, 48), dtype=np.uint8)
    src = tmp_path / "in.zarr"
    if not src.exists():
        zarr.create_array(str(src), shape=volume.shape, chunks=(8, 16, 16), dtype="uint8")[...] = volume
    vol = open_volume(src)
    plan = plan_blocks(vol.shape, (8, 32, 32), (4, 16, 16), chunks=(4, 16, 16), levels=2, shards=shards)
    out = tmp_path / name
    create_ome_zarr(
        out,
        plan.shape,
        "uint8",
        (1, 1, 1),
        chunks=(4, 16, 16),
        factors=[(1, 1, 1), (1, 2, 2)],
        shards=plan.shards,
    )
    run_blockwise(nn.Identity(), vol, plan, out, batch_size=4, out_dtype="uint8", num_workers=0, **kwargs)
    group = zarr.open_group(str(out), mode="r")
    return group["0"][...], group["1"][...]


@pytest.mark.parametrize(
    "kwargs",
    [{"write_workers": 1}, {"write_workers": 3}, {"write_workers": 1, "shards": (8, 48, 48)}],
    ids=["one-writer", "writer-threads", "sharded"],
)
def test_the_writer_reads_device_rows_only_after_waiting_for_their_copies(
    tmp_path, monkeypatch, kwargs
) -> None:
    """Every chunk row handed over with a pending copy is written with its values, waited for in a writer thread."""
    expected = _run(
        tmp_path, "plain.zarr", shards=kwargs.get("shards"), write_workers=kwargs["write_workers"]
    )
    LateCopies.waited_in.clear()
    monkeypatch.setattr(blockrun, "to_host", _late_to_host)
    got = _run(tmp_path, "late.zarr", **kwargs)
    assert LateCopies.waited_in and all(name != "MainThread" for name in LateCopies.waited_in)
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)
    assert expected[0].any()
