"""Ranks that fail together (exem.inference.ranks): the meeting logic with a stand-in for the other rank.

The two-process run (a rank's network fails; the other stops within a block) is
``tests/test_translate.py::test_ddp_rank_failure_stops_every_rank``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from exem.errors import OtherRankError, is_user_error
from exem.inference import blockio
from exem.inference.blockio import BlockDataModule
from exem.inference.markers import DONE_DIR, FAILED_DIR, clear_failures, failures, write_failure
from exem.inference.plan import plan_blocks
from exem.inference.ranks import raise_if_peers_failed, together


def fake_trainer(
    rank: int, others_said: list[float], world: int = 2, rank0_sent: object = None
) -> SimpleNamespace:
    """This process as rank ``rank``; the collective adds what the other ranks said (0 ok, 1 passed on, 2 failed);
    a broadcast gives rank 0's ``rank0_sent`` (rank 0 gets its own object back)."""
    calls: list[list[float]] = []

    def reduce(tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        assert reduce_op == "sum"
        calls.append(tensor.tolist())
        return tensor + torch.tensor(others_said)

    def broadcast(obj: object, src: int) -> object:
        assert src == 0
        return obj if rank == 0 else rank0_sent

    strategy = SimpleNamespace(root_device=torch.device("cpu"), reduce=reduce, broadcast=broadcast)
    return SimpleNamespace(
        world_size=world, global_rank=rank, is_global_zero=rank == 0, strategy=strategy, calls=calls
    )


def test_one_process_only_runs_the_body(tmp_path: Path) -> None:
    trainer = SimpleNamespace(world_size=1, global_rank=0, strategy=None)  # no collective could run
    with together(trainer, "while testing", tmp_path):
        pass
    with pytest.raises(KeyError, match="boom"), together(trainer, "while testing", tmp_path):
        raise KeyError("boom")
    assert not (tmp_path / DONE_DIR).exists()  # no flag either


def test_a_failed_rank_flags_its_error_and_raises_it_after_the_meeting(tmp_path: Path) -> None:
    trainer = fake_trainer(1, [0.0, 0.0])
    with pytest.raises(ValueError, match="bad\n   block"), together(trainer, "while testing", tmp_path):
        raise ValueError("bad\n   block")
    assert trainer.calls == [[0.0, 2.0]]  # it took part in the meeting, as failed
    assert failures(tmp_path) == {1: "bad block"}  # its error on one line


def test_the_others_learn_who_failed_and_why(tmp_path: Path) -> None:
    write_failure(tmp_path, 1, "block z0: non-finite output")
    trainer = fake_trainer(0, [0.0, 2.0])
    with pytest.raises(OtherRankError) as info, together(trainer, "while computing its blocks", tmp_path):
        pass
    assert str(info.value) == (
        "rank 1 of 2 failed while computing its blocks: block z0: non-finite output; this rank stopped"
    )
    assert is_user_error(info.value)  # the command-line tools print it in one line
    assert trainer.calls == [[0.0, 0.0]]


def test_the_failed_rank_is_named_not_those_that_passed_it_on(tmp_path: Path) -> None:
    trainer = fake_trainer(0, [0.0, 1.0, 2.0, 0.0], world=4)
    said = r"^rank 2 of 4 failed while testing \(its own output says why\)"
    with pytest.raises(OtherRankError, match=said), together(trainer, "while testing", tmp_path):
        pass


def test_passing_a_failure_on_writes_no_flag(tmp_path: Path) -> None:
    trainer = fake_trainer(0, [0.0, 2.0])
    with pytest.raises(OtherRankError, match="rank 1"), together(trainer, "while testing", tmp_path):
        raise OtherRankError("rank 1 of 2 failed while computing its blocks; this rank stopped")
    assert trainer.calls == [[1.0, 0.0]]
    assert failures(tmp_path) == {}


def test_peers_flags_stop_a_rank_but_its_own_does_not(tmp_path: Path) -> None:
    raise_if_peers_failed(tmp_path, 0, 2)  # no flags
    write_failure(tmp_path, 0, "my own error")
    raise_if_peers_failed(tmp_path, 0, 2)
    write_failure(tmp_path, 1, "disk full")
    with pytest.raises(OtherRankError, match="^rank 1 of 2 failed while computing its blocks: disk full"):
        raise_if_peers_failed(tmp_path, 0, 2)
    clear_failures(tmp_path)
    assert not (tmp_path / DONE_DIR / FAILED_DIR).exists()
    raise_if_peers_failed(tmp_path, 0, 2)


def _datamodule(tmp_path: Path, prepare, trainer) -> BlockDataModule:
    """Four blocks of 4×32×32 (one patch each)."""
    plan = plan_blocks(
        (4, 64, 64), (4, 32, 32), (0, 0, 0), block_shape=(4, 32, 32), chunks=(4, 32, 32), levels=1
    )
    volume = SimpleNamespace(dtype=np.dtype("uint8"))
    dm = BlockDataModule(volume, plan, tmp_path / "out.zarr", levels=1, out_dtype="uint8", prepare=prepare)
    dm.trainer = trainer
    return dm


def test_rank_0_failing_to_create_the_output_stops_the_others(tmp_path: Path) -> None:
    """Rank 0 alone creates the output; the others used to wait for it in a barrier."""

    def prepare() -> None:
        raise PermissionError("cannot create it")

    rank0 = fake_trainer(0, [0.0, 0.0])
    (tmp_path / "out.zarr" / DONE_DIR / FAILED_DIR).mkdir(parents=True)
    (tmp_path / "out.zarr" / DONE_DIR / FAILED_DIR / "1").write_text("an old run's flag")
    with pytest.raises(PermissionError, match="cannot create it"):
        _datamodule(tmp_path, prepare, rank0).setup("predict")
    assert rank0.calls == [[2.0, 0.0]]
    assert failures(tmp_path / "out.zarr") == {0: "cannot create it"}  # the old flag was cleared first

    rank1 = fake_trainer(1, [2.0, 0.0])
    with pytest.raises(
        OtherRankError, match="^rank 0 of 2 failed while creating the output: cannot create it"
    ):
        _datamodule(tmp_path, prepare, rank1).setup("predict")
    assert rank1.calls == [[0.0, 0.0]]  # rank 1 does not prepare


def test_rank_0s_listing_of_the_done_markers_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a shared file system another node's listing may lag: every rank uses rank 0's."""
    monkeypatch.setattr(blockio, "open_levels", lambda root, levels: [])  # no output to check here
    rank1 = fake_trainer(1, [0.0, 0.0], rank0_sent={0, 2})  # rank 0 found blocks 0 and 2 done
    dm = _datamodule(tmp_path, None, rank1)
    dm.setup("predict")  # nothing on disk here
    assert (dm.todo, dm.shard, dm.skipped) == ([1, 3], [3], 2)
    rank0 = fake_trainer(0, [0.0, 0.0])
    marker = tmp_path / "out.zarr" / DONE_DIR / "0"
    marker.mkdir(parents=True)
    (marker / dm.plan.blocks[1].id).touch()
    dm = _datamodule(tmp_path, None, rank0)
    dm.setup("predict")
    assert (dm.todo, dm.shard, dm.skipped) == ([0, 2, 3], [0, 3], 1)


def _lost_peer(rank: int) -> SimpleNamespace:
    """A trainer whose collective fails as gloo's does when another rank's process has ended."""
    trainer = fake_trainer(rank, [0.0, 0.0])

    def reduce(tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        raise RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:46298")

    trainer.strategy.reduce = reduce
    return trainer


def test_a_rank_that_left_without_meeting(tmp_path: Path) -> None:
    """The failed rank keeps its own error; the others say that a rank left, with its flag when it wrote one."""
    with pytest.raises(ValueError, match="^bad block$"), together(_lost_peer(1), "while testing", tmp_path):
        raise ValueError("bad block")
    with (
        pytest.raises(
            OtherRankError, match="^rank 1 of 2 failed while testing: bad block; this rank stopped"
        ),
        together(_lost_peer(0), "while testing", tmp_path),
    ):
        pass
    clear_failures(tmp_path)
    said = (
        r"^a rank of 2 left while testing without saying why \(killed\?\): \[pair.cc:553\] Connection closed"
    )
    with pytest.raises(OtherRankError, match=said), together(_lost_peer(0), "while testing", tmp_path):
        pass


def test_a_flag_holds_at_most_one_short_line(tmp_path: Path) -> None:
    from exem.inference.ranks import FLAG_CHARS

    long = "x" * (3 * FLAG_CHARS)
    with pytest.raises(ValueError), together(fake_trainer(1, [0.0, 0.0]), "while testing", tmp_path):
        raise ValueError(f"{long}\nsecond line")  # a user error: its one-line form, cut
    assert failures(tmp_path)[1] == "x" * FLAG_CHARS + "…"
