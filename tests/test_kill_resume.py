"""Kill and resume: atomic checkpoints, exact training resumes, translation reruns after SIGKILL at random points.

Fast tests: atomic checkpoint writes (a failed or killed save never replaces ``last.ckpt``), the sampler's resume
position, done-markers never created before their block's data. Slow tests (``make test-slow``): SIGKILL
``exem-train`` / ``exem-translate`` (and ``exem-segment`` when installed) and rerun; the result must equal an
uninterrupted run.
"""

from __future__ import annotations

import csv
import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr

from exem.callbacks import AtomicCheckpointIO, rng_state, set_rng_state, temp_files
from exem.data.datamodule import EpochSampler
from tests.conftest import BIN, cli_env, run_cli, sigkill_when

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ atomic checkpoints


def test_failed_save_never_replaces_last_ckpt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = AtomicCheckpointIO()
    last = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 3, "w": torch.arange(10)}, last)
    before = sha(last)
    assert oct(last.stat().st_mode & 0o777) != oct(0o600)  # the usual file mode, not mkstemp's

    real_save = torch.save

    def half_then_disk_full(obj, fh, *args, **kwargs):
        import io as _io

        buf = _io.BytesIO()
        real_save(obj, buf)
        fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # a partially written temp file …
        raise OSError(28, "No space left on device")  # … then the disk fills up

    monkeypatch.setattr(torch, "save", half_then_disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 6, "w": torch.arange(1000)}, last)
    monkeypatch.undo()
    assert sha(last) == before  # the partial file never replaced last.ckpt
    assert temp_files(last) == []  # and it was removed
    assert torch.load(last, weights_only=True)["global_step"] == 3


KILL_DURING_SAVE = textwrap.dedent(
    """
    import io, sys, time
    import torch
    from exem.callbacks import AtomicCheckpointIO

    real_save = torch.save

    def slow_save(obj, fh, *args, **kwargs):  # write the bytes in small pieces, slowly
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        for i in range(0, len(data), 4096):
            fh.write(data[i : i + 4096])
            fh.flush()
            time.sleep(0.01)

    path = sys.argv[1]
    AtomicCheckpointIO().save_checkpoint({"global_step": 3, "w": torch.zeros(10)}, path)
    print("first saved", flush=True)
    torch.save = slow_save
    AtomicCheckpointIO().save_checkpoint({"global_step": 6, "w": torch.ones(300_000)}, path)
    print("second saved", flush=True)
    """
)


def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    """SIGKILL while a checkpoint is being written: last.ckpt is still the previous, complete checkpoint."""
    script = tmp_path / "save.py"
    script.write_text(KILL_DURING_SAVE)
    last = tmp_path / "ckpt" / "last.ckpt"
    proc = subprocess.Popen([sys.executable, str(script), str(last)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "first saved"
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size > 100_000 for p in temp_files(last)):  # well into the second save
            assert proc.poll() is None and time.monotonic() < deadline, "the save ended before it was killed"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    (partial,) = temp_files(last)
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 3 and torch.equal(state["w"], torch.zeros(10))
    with pytest.raises(Exception):  # noqa: B017 - the temp file is truncated: not loadable
        torch.load(partial, weights_only=True)
    AtomicCheckpointIO().save_checkpoint({"global_step": 9}, last)  # the next save clears the leftover
    assert temp_files(last) == [] and torch.load(last, weights_only=True)["global_step"] == 9


def test_training_trainer_uses_the_atomic_checkpoint_io() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from exem.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"])
    plugins = [instantiate(p) for p in cfg.trainer.plugins]
    assert [type(p) for p in plugins] == [AtomicCheckpointIO]
    import lightning as L

    trainer = L.Trainer(
        accelerator="cpu", devices=1, plugins=plugins, logger=False, enable_progress_bar=False
    )
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_rng_state_round_trip_is_weights_only_safe(tmp_path: Path) -> None:
    import random as pyrandom

    torch.manual_seed(1)
    np.random.seed(2)
    pyrandom.seed(3)
    torch.save({"rng": rng_state()}, tmp_path / "r.pt")
    expected = (torch.rand(3), np.random.rand(3), pyrandom.random())
    torch.manual_seed(7)
    np.random.seed(7)
    pyrandom.seed(7)
    set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), pyrandom.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


# -------------------------------------------------------------------------------------------- sampler position


def test_epoch_sampler_shards_and_resumes() -> None:
    shards = [list(EpochSampler(10, rank=r, world_size=3, batch_size=2)) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]  # the same count on every rank
    assert len(set(sum(shards, []))) == 9 and set(sum(shards, [])) <= set(range(10))  # no id twice
    s = EpochSampler(8, rank=1, world_size=2, batch_size=2)
    s.set_epoch(3)
    assert list(s) == [25, 27, 29, 31] and s.batches_per_epoch == 2
    s.resume_at(3, 1)  # one batch of epoch 3 done: the next iteration skips it
    assert list(s) == [29, 31] and s.position == (3, 1)
    s.resume_at(3, 2)  # the epoch was finished: the next one starts from its beginning
    assert list(s) == [33, 35, 37, 39] and s.position == (4, 0)
    assert list(s) == [25, 27, 29, 31]  # resume_at acts once; then set_epoch rules again
    with pytest.raises(ValueError, match="at least the number of processes"):
        EpochSampler(1, world_size=2, rank=1)


def test_datamodule_state_round_trip(tmp_path: Path) -> None:
    from exem.data import ExEMDataModule

    arr = zarr.create_array(str(tmp_path / "v.zarr"), shape=(8, 32, 32), chunks=(8, 32, 32), dtype="uint8")
    arr[...] = np.random.default_rng(0).integers(0, 255, (8, 32, 32), dtype=np.uint8)
    kw = {
        "lm": {"path": str(tmp_path / "v.zarr")},
        "em": {"path": str(tmp_path / "v.zarr")},
        "patch_size": (4, 16, 16),
        "batch_size": 2,
        "samples_per_epoch": 6,
        "num_workers": 0,
    }
    dm = ExEMDataModule(**kw)
    assert dm.state_dict() == {}
    dm.trainer = SimpleNamespace(current_epoch=2, training=True, world_size=1, global_rank=0)
    it = iter(dm.train_dataloader())
    for _ in range(2):
        dm.on_before_batch_transfer(next(it), 0)
    state = dm.state_dict()
    assert state == {"epoch": 2, "batches": 2, "samples_per_epoch": 6, "batch_size": 2, "world_size": 1}
    dm2 = ExEMDataModule(**kw)
    dm2.trainer = SimpleNamespace(current_epoch=0, training=True, world_size=1, global_rank=0)
    dm2.load_state_dict(state)
    assert list(dm2.train_dataloader().sampler) == [16, 17]  # the rest of epoch 2
    dm3 = ExEMDataModule(**{**kw, "batch_size": 3})
    dm3.trainer = dm2.trainer
    dm3.load_state_dict(state)  # other settings: a warning, and no skipping
    assert list(dm3.train_dataloader().sampler) == list(range(6))


# ------------------------------------------------------------------------------------------- training: SIGKILL

# Tiny, deterministic CPU training: 3 batches per epoch, a checkpoint every 2 batches (mid-epoch and at an epoch
# end), a replay buffer and a cosine LR schedule (random draws and scheduler state that must be restored).
TRAIN = [
    "experiment=demo",
    "synthetic.shape=[16,128,128]",
    "data.samples_per_epoch=6",
    "data.num_workers=0",
    "data.persistent_workers=false",
    "data.val_patches=2",
    "data.patch_size=[4,32,32]",
    "model.generator.widths=[4,8,16]",
    "model.discriminator.base_filters=4",
    "model.replay_buffer_size=2",
    "model.loss.content_decay_steps=100",  # a decay that shows within 8 batches
    "model.scheduler={_target_:torch.optim.lr_scheduler.CosineAnnealingWarmRestarts,T_0:4,T_mult:1,eta_min:1.0e-4}",
    "model.image_every_n_steps=0",
    "trainer.max_steps=24",  # 8 batches
    "trainer.log_every_n_steps=1",
    "trainer.deterministic=true",
    "callbacks.model_checkpoint.every_n_train_steps=6",  # every 2 batches
    "callbacks.progress_bar=null",
]


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def train_rows(run_dir: Path) -> dict[int, dict[str, str]]:
    """Training rows of a run's metrics CSV by logger step (batches), only the non-empty train/* values."""
    rows: dict[int, dict[str, str]] = {}
    with (run_dir / "csv" / "metrics.csv").open() as fh:
        for row in csv.DictReader(fh):
            values = {k: v for k, v in row.items() if k.startswith(("train/", "val/")) and v != ""}
            if values:
                rows.setdefault(int(row["step"]), {}).update(values)
    return rows


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] and a["exem_batch_step"] == b["exem_batch_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for oa, ob in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        assert oa["state"].keys() == ob["state"].keys()
        for i, s in oa["state"].items():
            for name, t in s.items():
                assert torch.equal(torch.as_tensor(t), torch.as_tensor(ob["state"][i][name])), (i, name)
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert torch.equal(a["exem_rng_state"]["torch"], b["exem_rng_state"]["torch"])
    assert a["ExEMDataModule"] == b["ExEMDataModule"]


@pytest.mark.slow
def test_training_killed_and_resumed_equals_uninterrupted(synthetic_dir: Path, tmp_path: Path) -> None:
    data = [f"paths.data_dir={synthetic_dir}"]
    ref_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    _ok(run_cli("exem-train", *TRAIN, *data, f"hydra.run.dir={ref_dir}", cwd=tmp_path))
    reference = train_rows(ref_dir)
    assert sorted(reference) == list(range(8))
    ref_state = torch.load(ref_dir / "checkpoints" / "last.ckpt", weights_only=True)

    # the same run, SIGKILLed as soon as its first checkpoint is there
    last = killed_dir / "checkpoints" / "last.ckpt"
    sigkill_when(
        [str(BIN / "exem-train"), *TRAIN, *data, f"hydra.run.dir={killed_dir}"],
        last.exists,
        tmp_path / "killed.log",
        timeout_s=300,
        cwd=tmp_path,
        env=cli_env(),
    )
    state = torch.load(last, weights_only=True)  # never a truncated file
    done = state["exem_batch_step"]
    assert 2 <= done < 8 and state["global_step"] == 3 * done
    assert state["ExEMDataModule"]["batches"] == done - 3 * state["ExEMDataModule"]["epoch"]

    # resume the killed run, and an uninterrupted run from its end-of-epoch checkpoint (batch 6 of 3-batch epochs)
    end_of_epoch = ref_dir / "checkpoints" / "step00000018.ckpt"
    for name, ckpt, first in (("resumed", last, done), ("from_epoch_end", end_of_epoch, 6)):
        run_dir = tmp_path / name
        proc = run_cli(
            "exem-train", *TRAIN, *data, f"ckpt_path={ckpt}", f"hydra.run.dir={run_dir}", cwd=tmp_path
        )
        _ok(proc)
        assert "not resumable" not in proc.stderr
        rows = train_rows(run_dir)
        assert sorted(rows) == list(range(first, 8)), name  # the global step continues
        for step, values in rows.items():  # losses, content weight, lr, validation: bit for bit
            assert values == reference[step], (name, step)
        weight = float(rows[first]["train/content_weight"])  # the content-loss decay continues
        assert weight == pytest.approx(50.0 * 2.0 ** (-first / 100), rel=1e-6)
        # weights, Adam moments, schedulers, RNG and sampler position: as if never interrupted
        assert_same_training_state(
            torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True), ref_state
        )


# ---------------------------------------------------------------------------------------- translation: SIGKILL

TRANSLATE_SHAPE = (48, 64, 64)


@pytest.fixture(scope="module")
def translate_setup(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    from exem.models import AnisotropicUNet3D

    tmp = tmp_path_factory.mktemp("kill_translate")
    torch.manual_seed(0)
    ckpt = tmp / "G_AB_1.pth"
    torch.save(AnisotropicUNet3D(widths=(4, 8, 16)).state_dict(), ckpt)
    data = np.random.default_rng(0).integers(0, 256, TRANSLATE_SHAPE, dtype=np.uint8)
    arr = zarr.create_array(str(tmp / "exm.zarr"), shape=data.shape, dtype=data.dtype, chunks=(8, 64, 64))
    arr[...] = data
    return SimpleNamespace(tmp=tmp, ckpt=ckpt, input=tmp / "exm.zarr")


def translate_args(s: SimpleNamespace, out: Path) -> list[str]:
    # 6 blocks of 8×64×64 (Z chunks of 2·patch_z), batch 1: many network calls, so kills land anywhere
    return [
        f"checkpoint={s.ckpt}", f"input={s.input}", f"output={out}", "patch=[4,32,32]", "batch_size=1",
        "block_shape=[8,64,64]", "trainer=cpu",
    ]  # fmt: skip


def levels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return group["0"][...], group["1"][...]


def done_markers(out: Path, level: int) -> set[str]:
    from exem.inference.blockio import DONE_DIR

    d = out / DONE_DIR / str(level)
    return {n for n in os.listdir(d) if not n.startswith(".")} if d.is_dir() else set()


def block_box(block_id: str) -> tuple[slice, slice, slice]:
    """``z0-8_y0-64_x0-64`` → slices."""
    parts = [p[1:].split("-") for p in block_id.split("_")]
    return tuple(slice(int(a), int(b)) for a, b in parts)  # type: ignore[return-value]


def assert_markers_have_their_data(out: Path, ref: tuple[np.ndarray, np.ndarray]) -> int:
    """Every block marked done (per level) holds exactly the uninterrupted run's data. Returns the count."""
    got = levels(out)
    n = 0
    for lvl in (0, 1):
        for block_id in done_markers(out, lvl):
            z, y, x = block_box(block_id)
            f = 2**lvl
            box = (z, slice(y.start // f, -(-y.stop // f)), slice(x.start // f, -(-x.stop // f)))
            np.testing.assert_array_equal(got[lvl][box], ref[lvl][box], err_msg=f"level {lvl} {block_id}")
            n += 1
    return n


def level0_markers(out: Path) -> int:
    """Level-0 done-markers anywhere under ``out`` (translation: ``out/.exem_done/0``, segmentation: below)."""
    from exem.inference.blockio import DONE_DIR

    return sum(1 for d in out.rglob(f"{DONE_DIR}/0") for n in os.listdir(d) if not n.startswith("."))


def kill_at_random_point(prog: str, args: list[str], out: Path, seed: int, total: int) -> int:
    """Start ``prog``, SIGKILL it after a random number (< ``total``) of done-markers plus a random delay.

    Returns the number of markers waited for.
    """
    rng = random.Random(seed)
    wait_markers = rng.randrange(0, total)
    delay = rng.uniform(0.0, 0.2)
    proc = subprocess.Popen(
        [str(BIN / prog), *args], env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not out.exists() or level0_markers(out) < wait_markers:
        if proc.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return wait_markers


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_translate_killed_at_random_points_then_rerun(translate_setup, seed: int) -> None:
    s = translate_setup
    ref_out = s.tmp / "reference.ome.zarr"
    if not ref_out.exists():
        _ok(run_cli("exem-translate", *translate_args(s, ref_out), cwd=s.tmp))
    ref = levels(ref_out)
    total = len(done_markers(ref_out, 0))
    assert total == 6
    out = s.tmp / f"killed{seed}.ome.zarr"
    kill_at_random_point("exem-translate", translate_args(s, out), out, seed, total)
    if out.exists():  # right after the kill: every block marked done holds its final data
        assert_markers_have_their_data(out, ref)
    _ok(run_cli("exem-translate", *translate_args(s, out), cwd=s.tmp))  # rerun: resumes
    got = levels(out)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    assert zarr.open_group(str(out), mode="r").attrs["exem"]["complete"] is True


def test_done_markers_are_created_only_after_their_data(tmp_path: Path, monkeypatch) -> None:
    """The writer's order, observed: when a block's marker is created, its data are already complete."""
    from exem.inference import blockio
    from exem.inference.translate import translate_volume
    from exem.models import AnisotropicUNet3D

    torch.manual_seed(0)
    net = AnisotropicUNet3D(widths=(4, 8, 16)).eval()
    data = np.random.default_rng(1).integers(0, 256, (16, 64, 64), dtype=np.uint8)
    kw = {"patch": [4, 32, 32], "block_shape": [8, 64, 64], "chunks": [8, 32, 32], "num_workers": 0}
    ref_out = tmp_path / "ref.zarr"
    translate_volume(net, data, ref_out, progress=False, **kw)
    ref = levels(ref_out)

    out = tmp_path / "out.zarr"
    seen: list[str] = []
    real_touch = blockio.touch_atomic

    def checking_touch(path: Path) -> None:
        level = int(path.parent.name)
        z, y, x = block_box(path.name)
        f = 2**level
        box = (z, slice(y.start // f, -(-y.stop // f)), slice(x.start // f, -(-x.stop // f)))
        arr = zarr.open_group(str(out), mode="r")[str(level)][...]
        np.testing.assert_array_equal(arr[box], ref[level][box])  # data first …
        real_touch(path)  # … marker second
        seen.append(f"{level}/{path.name}")

    monkeypatch.setattr(blockio, "touch_atomic", checking_touch)
    translate_volume(net, data, out, progress=False, **kw)
    assert len(seen) == 2 * 2  # 2 blocks × 2 levels, each checked at the moment its marker was made


# --------------------------------------------------------------------------------------- segmentation: SIGKILL

HAS_SEGMENT = (BIN / "exem-segment").exists()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SEGMENT, reason="exem-segment is not installed")
@pytest.mark.parametrize("seed", [0, 1])
def test_segment_killed_at_random_points_then_rerun(translate_setup, seed: int) -> None:
    s = translate_setup
    model = s.tmp / "seg.ts"
    if not model.exists():
        from exem.models import AnisotropicUNet3D

        torch.manual_seed(1)
        net = torch.nn.Sequential(AnisotropicUNet3D(widths=(4, 8, 16)), torch.nn.Sigmoid()).eval()
        torch.jit.save(torch.jit.trace(net, torch.rand(1, 1, 4, 32, 32)), str(model))

    def args(out: Path) -> list[str]:
        return [
            f"model={model}", f"input={s.input}", f"output={out}", "kind=foreground", "patch=[4,32,32]",
            "batch_size=1", "block_shape=[8,64,64]", "trainer=cpu",
        ]  # fmt: skip

    ref_out = s.tmp / "seg_reference.ome.zarr"
    if not ref_out.exists():
        _ok(run_cli("exem-segment", *args(ref_out), cwd=s.tmp))
    out = s.tmp / f"seg_killed{seed}.ome.zarr"
    kill_at_random_point("exem-segment", args(out), out, seed, level0_markers(ref_out))
    _ok(run_cli("exem-segment", *args(out), cwd=s.tmp))
    for key in ("probabilities/0", "labels/0"):
        ref = zarr.open_array(str(ref_out), path=key, mode="r")[...]
        got = zarr.open_array(str(out), path=key, mode="r")[...]
        np.testing.assert_array_equal(got, ref, err_msg=key)
