"""DDP training all-reduces each network's gradients once per batch (exem/ddp.py), with the same weights as DDP's
own all-reduce of every bucket at every backward: 2 processes (gloo) through ``benchmarks/ddp_traffic.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exem.ddp import GradientTraffic, allreduce_trainable, register_trainable_allreduce
from tests.conftest import torchrun_ranks

REPO = Path(__file__).resolve().parents[1]


def run_ranks(out: Path, *extra: str) -> list[dict]:
    """Both ranks' figures from a 2-process run of the benchmark (torchrun, CPU, tiny networks)."""
    script = REPO / "benchmarks" / "ddp_traffic.py"
    return torchrun_ranks(script, "--batches", "3", "--out", str(out), *extra, out=out, timeout=180)


def test_each_network_is_all_reduced_once_per_batch_with_unchanged_weights(tmp_path: Path) -> None:
    hook = run_ranks(tmp_path / "hook")
    plain = run_ranks(tmp_path / "plain", "--all-buckets")
    digests = {r["weights_sha1"] for r in hook + plain}
    assert len(digests) == 1, (hook, plain)  # every rank, with and without the hook: the same weights
    assert not hook[0]["compiled"]  # exem's default on the CPU: eager
    sent, default = hook[0]["sent_mb_per_batch"], hook[0]["ddp_default_mb_per_batch"]
    # G (both generators), D_A and D_B each sent once instead of all four at each of three backwards: a third.
    assert 0.3 * default < sent < 0.4 * default, hook[0]
    assert plain[0]["sent_mb_per_batch"] is None  # no hook registered


class FakeBucket:
    def __init__(self, params: list[torch.Tensor]) -> None:
        self._params = params
        self._buffer = torch.cat([p.detach().flatten() for p in params])

    def parameters(self) -> list[torch.Tensor]:
        return self._params

    def buffer(self) -> torch.Tensor:
        return self._buffer


def test_a_bucket_of_frozen_parameters_is_handed_back_unsent() -> None:
    frozen = [torch.nn.Parameter(torch.ones(3), requires_grad=False) for _ in range(2)]
    state = GradientTraffic()
    bucket = FakeBucket(frozen)
    future = allreduce_trainable(state, bucket)  # type: ignore[arg-type]
    assert future.wait() is bucket.buffer()
    assert (state.sent_bytes, state.skipped_bytes) == (0, 6 * 4)


def test_the_hook_is_registered_only_on_a_ddp_wrapper() -> None:
    assert register_trainable_allreduce(torch.nn.Linear(2, 2)) is None
    assert register_trainable_allreduce(None) is None


def test_a_bucket_with_one_trainable_parameter_is_all_reduced(tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        params = [torch.nn.Parameter(torch.full((3,), 2.0), requires_grad=f) for f in (False, True)]
        state = GradientTraffic()
        bucket = FakeBucket(params)
        result = allreduce_trainable(state, bucket).wait()  # type: ignore[arg-type]
    finally:
        dist.destroy_process_group()
    assert (state.sent_bytes, state.skipped_bytes) == (6 * 4, 0)
    assert torch.equal(result, torch.full((6,), 2.0))  # the mean over one rank


def test_a_hook_the_user_registered_is_kept(tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ours = DistributedDataParallel(torch.nn.Linear(2, 2))
        assert isinstance(register_trainable_allreduce(ours), GradientTraffic)
        theirs = DistributedDataParallel(torch.nn.Linear(2, 2))
        theirs.register_comm_hook(None, fp16_compress_hook)
        assert register_trainable_allreduce(theirs) is None  # no "can only be called once" error either
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_compiled_networks_train_under_ddp_with_the_hook(tmp_path: Path) -> None:
    """exem's default on CUDA (compiled networks) under DDP, here with inductor on the CPU: it runs, the hook is
    registered beside Dynamo's graph splitting at bucket borders, and the ranks agree on the weights."""
    ranks = run_ranks(tmp_path / "compiled", "--variant", "fp32-compile")
    assert ranks[0]["variant"] == "fp32-compile" and ranks[0]["compiled"] and ranks[1]["compiled"]
    assert ranks[0]["weights_sha1"] == ranks[1]["weights_sha1"]
    assert ranks[0]["sent_mb_per_batch"] is not None
