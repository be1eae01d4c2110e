"""translate_volume: OME-Zarr output, resume after SIGKILL, 2-process DDP, user errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from exem.clock import process_age_s
from exem.data.ome import downsample_inplane, read_multiscales, write_ome_zarr
from exem.data.volume import open_volume
from exem.inference.blockio import DONE_DIR
from exem.inference.plan import default_overlap, plan_blocks
from exem.inference.translate import TranslateResult, translate_volume
from exem.models.unet import AnisotropicUNet3D
from exem.trained import TrainedGenerator
from tests.conftest import sigkill_when

SHAPE = (20, 96, 80)
VOXEL = (40.0, 10.0, 10.0)
# 5 × 2 × 2 = 20 blocks of ≤ 4×64×64 voxels (level-1 chunks of 32 make Y/X blocks multiples of 64).
KW = {
    "patch": [8, 32, 32],
    "overlap": [4, 16, 16],
    "batch_size": 4,
    "chunks": [4, 32, 32],
    "block_shape": [4, 64, 64],
    "num_workers": 0,
    "progress": False,
}


def n_blocks() -> int:
    return len(plan_blocks(SHAPE, KW["patch"], KW["overlap"], **_plan_kw()).blocks)


def _plan_kw() -> dict:
    return {"block_shape": KW["block_shape"], "chunks": KW["chunks"], "levels": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("translate")


@pytest.fixture(scope="module")
def state_path(data_dir: Path) -> Path:
    torch.manual_seed(0)
    path = data_dir / "g.pt"
    torch.save(AnisotropicUNet3D(widths=(4, 8, 16)).state_dict(), path)
    return path


def load_generator(state_path: Path) -> AnisotropicUNet3D:
    g = AnisotropicUNet3D(widths=(4, 8, 16))
    g.load_state_dict(torch.load(state_path, weights_only=True))
    return g.eval()


@pytest.fixture()
def generator(state_path: Path) -> AnisotropicUNet3D:
    return load_generator(state_path)


@pytest.fixture(scope="module")
def exm(data_dir: Path) -> Path:
    raw = np.random.default_rng(0).integers(0, 256, SHAPE, dtype=np.uint8)
    return write_ome_zarr(data_dir / "exm.ome.zarr", raw, VOXEL, chunks=(8, 32, 32), levels=1)


@pytest.fixture(scope="module")
def reference(data_dir: Path, state_path: Path, exm: Path) -> tuple[TranslateResult, Path]:
    """An uninterrupted single-process translation with the settings KW."""
    out = data_dir / "reference.ome.zarr"
    return translate_volume(load_generator(state_path), exm, out, **KW), out


def levels_of(path: Path) -> tuple[np.ndarray, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return group["0"][...], group["1"][...]


def test_output_is_an_ome_zarr_pyramid(reference) -> None:
    result, out = reference
    assert result.output == out and result.shape == SHAPE
    assert (result.blocks_done, result.blocks_skipped) == (n_blocks(), 0)
    assert result.voxels == int(np.prod(SHAPE)) and result.mvox_per_s > 0
    level0, level1 = levels_of(out)
    assert level0.dtype == np.uint8 and level0.shape == SHAPE
    assert level1.shape == (20, 48, 40)
    np.testing.assert_array_equal(level1, downsample_inplane(level0))
    group = zarr.open_group(str(out), mode="r")
    attrs = dict(group.attrs)
    ms = read_multiscales(group)
    assert (
        attrs["ome"]["version"] == "0.5" and ms["name"] == "virtual_em"
    )  # OME-Zarr 0.5 (Zarr v3) by default
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales == [list(VOXEL), [40.0, 20.0, 20.0]]
    meta = attrs["exem"]
    assert meta["complete"] is True
    assert meta["patch"] == KW["patch"] and meta["overlap"] == KW["overlap"] and meta["sigma"] == 0.5
    assert meta["generator"]["widths"] == [4, 8, 16] and len(meta["generator"]["fingerprint"]) == 40
    assert meta["input"] == str(Path(result.output).parent / "exm.ome.zarr")
    assert open_volume(out).voxel_size_nm == VOXEL
    assert open_volume(out, level=1).voxel_size_nm == (40.0, 20.0, 20.0)
    # start-up: seconds from this process's start to the first network call, in the summary (issue 13's goal)
    assert result.first_batch_s is not None and 0 < result.first_batch_s <= process_age_s()
    assert f"first batch {result.first_batch_s:.1f} s after start" in result.summary(first_batch=True)
    assert "first batch" not in result.summary()  # a napari or notebook session's age means nothing
    assert "1 block computed, 0 resumed" in replace(result, blocks_done=1, blocks_skipped=0).summary()
    assert "2 blocks computed, 1 resumed" in replace(result, blocks_done=2, blocks_skipped=1).summary()


def test_default_overlap() -> None:
    assert default_overlap((16, 256, 256)) == (4, 64, 64)
    assert default_overlap((1, 256, 256)) == (0, 64, 64)
    assert default_overlap((8, 32, 32)) == (2, 8, 8)


def test_roi_output_is_placed_in_the_input(generator, exm, tmp_path) -> None:
    out = tmp_path / "roi.zarr"
    result = translate_volume(generator, exm, out, roi=(4, 20, 32, 96, 0, 64), **KW)
    assert result.shape == (16, 64, 64)
    ms = read_multiscales(zarr.open_group(str(out), mode="r"))
    assert ms["datasets"][0]["coordinateTransformations"][1] == {
        "type": "translation",
        "translation": [160.0, 320.0, 0.0],
    }


def test_user_errors(generator, exm, reference, tmp_path) -> None:
    _, out = reference
    with pytest.raises(ValueError, match="ROI x 100:5000 is outside the volume \\(x size 80\\)"):
        translate_volume(generator, exm, tmp_path / "a.zarr", roi=(0, 20, 0, 96, 100, 5000), **KW)
    with pytest.raises(ValueError, match="ROI y 90:10 is empty or reversed"):
        translate_volume(generator, exm, tmp_path / "a.zarr", roi=(0, 20, 90, 10, 0, 80), **KW)
    with pytest.raises(ValueError, match="not divisible by 4"):
        translate_volume(generator, exm, tmp_path / "a.zarr", **{**KW, "patch": [8, 30, 32]})
    with pytest.raises(ValueError, match="larger than the volume"):
        translate_volume(generator, exm, tmp_path / "a.zarr", **{**KW, "patch": [32, 32, 32]})
    with pytest.raises(FileExistsError, match="exists \\(complete\\); use overwrite=true"):
        translate_volume(generator, exm, out, **KW)
    assert not (tmp_path / "a.zarr").exists()  # nothing was created by the failed calls


def test_overwrite_and_resume_with_other_settings(generator, exm, reference, tmp_path) -> None:
    out = tmp_path / "o.zarr"
    translate_volume(generator, exm, out, **KW)
    result = translate_volume(generator, exm, out, overwrite=True, **KW)  # redone from scratch
    assert (result.blocks_done, result.blocks_skipped) == (n_blocks(), 0)
    np.testing.assert_array_equal(levels_of(out)[0], levels_of(reference[1])[0])
    group = zarr.open_group(str(out), mode="r+")
    group.attrs["exem"] = {**group.attrs["exem"], "complete": False}  # as if interrupted
    with pytest.raises(FileExistsError, match="incomplete\\) with other settings: sigma 0.5 \\(now 0.4\\)"):
        translate_volume(generator, exm, out, sigma=0.4, **KW)
    other = AnisotropicUNet3D(widths=(4, 8, 16))
    with pytest.raises(FileExistsError, match="generator fingerprint"):
        translate_volume(other, exm, out, **KW)
    # same settings: resumed, nothing left to do
    result = translate_volume(generator, exm, out, **KW)
    assert (result.blocks_done, result.blocks_skipped) == (0, n_blocks())
    assert result.first_batch_s is None and "first batch" not in result.summary(
        first_batch=True
    )  # no batch ran
    assert zarr.open_group(str(out), mode="r").attrs["exem"]["complete"] is True


def test_read_only_location(generator, exm, tmp_path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes")
        with pytest.raises(PermissionError, match="not writable"):
            translate_volume(generator, exm, locked / "sub" / "out.zarr", **KW)
    finally:
        locked.chmod(0o755)


def test_unwritable_location_is_refused_before_compute(generator, exm, tmp_path, monkeypatch) -> None:
    """The same check when chmod cannot be used (root): os.access says no."""
    import exem.inference.output as output

    real = os.access
    monkeypatch.setattr(output.os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    with pytest.raises(PermissionError, match=f"cannot create it, {tmp_path} is not writable"):
        translate_volume(generator, exm, tmp_path / "out.zarr", **KW)
    assert not (tmp_path / "out.zarr").exists()


# ------------------------------------------------------------------------------------ subprocesses

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    from exem.errors import one_line_errors
    from exem.models.unet import AnisotropicUNet3D
    from exem.inference.translate import translate_volume


    class SlowUNet(AnisotropicUNet3D):
        delay = 0.0
        moves = []

        def forward(self, x):
            time.sleep(self.delay)
            y = super().forward(x)
            if os.environ.get("EXEM_TEST_NAN_RANK", "-") == os.environ.get("RANK"):
                return y * float("nan")  # this rank's network fails
            return y

        def _apply(self, fn, *args, **kwargs):  # the first move to the device fails on this rank
            if os.environ.get("EXEM_TEST_MOVE_RANK", "-") == os.environ.get("RANK") and not self.moves:
                self.moves.append(fn)
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
            return super()._apply(fn, *args, **kwargs)


    @one_line_errors("run_translate")
    def main():
        state, src, dst, delay, devices, kw = sys.argv[1:7]
        if os.environ.get("EXEM_TEST_DISK_FULL"):  # creating the output fails (rank 0 creates it)
            import errno, exem.inference.translate

            def full(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device", dst)

            exem.inference.translate.create_image = full
        if os.environ.get("EXEM_TEST_BLIND_RANK", "-") == os.environ.get("LOCAL_RANK", "0"):
            # this rank's listings of the done-markers lag (another node's, on a shared file system)
            import exem.inference.blockio, exem.inference.engine
            exem.inference.blockio.done_blocks = exem.inference.engine.done_blocks = lambda *a, **k: set()
        g = SlowUNet(widths=(4, 8, 16))
        g.load_state_dict(torch.load(state, weights_only=True))
        g.eval()
        g.delay = float(delay)
        trainer = None
        if int(devices) > 1:
            import lightning as L

            trainer = L.Trainer(
                strategy="ddp", accelerator="cpu", devices=int(devices), logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            )
        result = translate_volume(g, src, dst, trainer=trainer, **json.loads(kw))
        if trainer is not None:  # which blocks this rank computed (a file: ranks share stdout)
            with open(f"{dst}.rank{trainer.global_rank}.json", "w") as f:
                json.dump(trainer.datamodule.shard, f)


    if __name__ == "__main__":
        main()
    """
)


def script_cmd(tmp_path: Path, state: Path, src: Path, dst: Path, delay: float, devices: int) -> list[str]:
    script = tmp_path / "run_translate.py"
    script.write_text(SCRIPT)
    return [
        sys.executable,
        str(script),
        str(state),
        str(src),
        str(dst),
        str(delay),
        str(devices),
        json.dumps(KW),
    ]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONWARNINGS"] = "ignore"
    e["OMP_NUM_THREADS"] = "1"  # like this process (one_thread), so results are comparable bit for bit
    return e


def markers(out: Path, level: int) -> set[str]:
    d = out / DONE_DIR / str(level)
    return {n for n in os.listdir(d) if not n.startswith(".")} if d.is_dir() else set()


def test_resume_after_sigkill(state_path, exm, reference, tmp_path) -> None:
    out = tmp_path / "killed.zarr"
    sigkill_when(
        script_cmd(tmp_path, state_path, exm, out, 0.1, 1),
        lambda: len(markers(out, 1)) >= 3,
        tmp_path / "log.txt",
        timeout_s=60,
        env=env(),
    )
    # right after the kill: every marker has its data
    done0, done1 = markers(out, 0), markers(out, 1)
    assert 3 <= len(done1) < n_blocks() and done1 <= done0
    ref0, ref1 = levels_of(reference[1])
    got0, got1 = levels_of(out)
    plan = plan_blocks(SHAPE, KW["patch"], KW["overlap"], **_plan_kw())
    for b in plan.blocks:
        z, y, x = b.slices()
        half = (z, slice(y.start // 2, -(-y.stop // 2)), slice(x.start // 2, -(-x.stop // 2)))
        if b.id in done0:
            np.testing.assert_array_equal(got0[z, y, x], ref0[z, y, x], err_msg=b.id)
        if b.id in done1:
            np.testing.assert_array_equal(got1[half], ref1[half], err_msg=b.id)
    assert zarr.open_group(str(out), mode="r").attrs["exem"]["complete"] is False
    # rerun in this process: only the missing blocks are computed, and the result is the uninterrupted one
    result = translate_volume(load_generator(state_path), exm, out, **KW)
    assert result.blocks_skipped == len(done1) and result.blocks_done == n_blocks() - len(done1)
    got0, got1 = levels_of(out)
    np.testing.assert_array_equal(got0, ref0)
    np.testing.assert_array_equal(got1, ref1)


def test_ddp_two_processes_bit_identical(state_path, exm, reference, tmp_path) -> None:
    """… and only rank 0's listings of the done-markers count: rank 1 here sees none (a lagging shared file
    system), which used to end its run with "blocks were not written"."""
    out = tmp_path / "ddp.zarr"
    proc = subprocess.run(
        script_cmd(tmp_path, state_path, exm, out, 0.0, 2),
        capture_output=True,
        text=True,
        timeout=300,
        env={**env(), "EXEM_TEST_BLIND_RANK": "1"},
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shards = {r: json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)}
    assert all(shards.values())  # both ranks computed blocks …
    assert sorted(shards[0] + shards[1]) == list(range(n_blocks()))  # … each block exactly once
    ref0, ref1 = levels_of(reference[1])
    got0, got1 = levels_of(out)
    assert np.array_equal(got0, ref0) and np.array_equal(got1, ref1)
    assert zarr.open_group(str(out), mode="r").attrs["exem"]["complete"] is True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def srun_like(
    tmp_path: Path, state_path: Path, exm: Path, out: Path, delay: float, **extra: str
) -> list[str]:
    """Two ranks started as srun or torchrun start them (each process on its own, no launcher watching them);
    the last line of each one's stderr, once both ended with exit code 1."""
    base = {**env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    base.update(LOCAL_WORLD_SIZE="2", GROUP_RANK="0", TORCHELASTIC_RUN_ID="exem-test", **extra)
    procs = [
        subprocess.Popen(
            script_cmd(tmp_path, state_path, exm, out, delay, 2),
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        logs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    codes = [p.returncode for p in procs]
    assert codes == [1, 1], f"{codes}\n" + "\n".join(o[-2000:] + e[-3000:] for o, e in logs)
    assert not any("Traceback" in e for _, e in logs), logs
    return [e.strip().splitlines()[-1] for _, e in logs]


def test_ddp_rank_failure_stops_every_rank(state_path, exm, reference, tmp_path) -> None:
    """Rank 1's network fails at its first block. Rank 0 stops within a block instead of finishing its share and
    then waiting for rank 1 until the process group's timeout; both end with one line; a rerun resumes to the
    uninterrupted result."""
    out = tmp_path / "failed.zarr"
    lines = srun_like(tmp_path, state_path, exm, out, 0.3, EXEM_TEST_NAN_RANK="1")
    assert lines[1].startswith("run_translate: error: ") and "non-finite" in lines[1], lines[1]
    assert lines[0].startswith("run_translate: error: rank 1 of 2 failed while computing its blocks: "), (
        lines[0]
    )
    assert "non-finite" in lines[0]
    done = markers(out, 1)
    assert len(done) < n_blocks() // 2  # rank 0 stopped before it had computed its 10 blocks
    # the flag is cleared and the run resumes: the result is the uninterrupted one
    result = translate_volume(load_generator(state_path), exm, out, **KW)
    assert result.blocks_skipped == len(done)
    assert not (out / DONE_DIR / "failed").exists()
    ref0, ref1 = levels_of(reference[1])
    got0, got1 = levels_of(out)
    assert np.array_equal(got0, ref0) and np.array_equal(got1, ref1)


def test_ddp_rank_0_failing_to_create_the_output_stops_the_others(state_path, exm, tmp_path) -> None:
    """Rank 0 alone creates the output; rank 1 used to wait for it in a barrier. No folder is left behind."""
    out = tmp_path / "full.zarr"
    lines = srun_like(tmp_path, state_path, exm, out, 0.0, EXEM_TEST_DISK_FULL="1")
    assert lines[0] == f"run_translate: error: No space left on device: {out}"
    assert lines[1] == (
        "run_translate: error: rank 0 of 2 failed while creating the output (its own output says why);"
        " this rank stopped"
    )
    assert not out.exists()


def test_ddp_rank_failing_to_move_its_network_stops_the_others(state_path, exm, reference, tmp_path) -> None:
    """Rank 1 runs out of device memory while its network moves to the device. Both ranks used to hang: rank 1
    at the meeting point, rank 0 in Lightning's next barrier. A rerun resumes to the uninterrupted result."""
    out = tmp_path / "moved.zarr"
    lines = srun_like(tmp_path, state_path, exm, out, 0.0, EXEM_TEST_MOVE_RANK="1")
    oom = "CUDA out of memory. Tried to allocate 20.00 MiB: use a smaller batch or patch, or a device with more free"
    oom += " memory"
    assert lines[1] == f"run_translate: error: {oom}"
    assert lines[0] == (
        f"run_translate: error: rank 1 of 2 failed while moving the network to its device: {oom}; this rank stopped"
    )
    assert markers(out, 0) == set()  # no block was computed
    translate_volume(load_generator(state_path), exm, out, **KW)  # the flag is cleared, the run resumes
    ref0, ref1 = levels_of(reference[1])
    got0, got1 = levels_of(out)
    assert np.array_equal(got0, ref0) and np.array_equal(got1, ref1)


def test_default_reader_processes_follow_the_device() -> None:
    import lightning as L

    from exem.inference.blockio import DEFAULT_NUM_WORKERS
    from exem.inference.engine import default_num_workers

    cpu = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    assert default_num_workers(cpu) == 0  # on the CPU readers only compete with torch for the cores
    assert default_num_workers(None) == (DEFAULT_NUM_WORKERS if torch.cuda.is_available() else 0)


def test_the_generators_training_normalisation_is_the_default(generator, exm, tmp_path) -> None:
    """A generator loaded from an exem checkpoint knows how its ExM input was normalised; the Python API uses it."""
    record = TrainedGenerator(
        generator, lm_normalization={"intensity_range": [20.0, 180.0], "percentiles": None}
    )
    kw = {**KW, "roi": [0, 8, 0, 64, 0, 64]}
    trained = translate_volume(record, exm, tmp_path / "trained.ome.zarr", **kw)
    given = translate_volume(generator, exm, tmp_path / "given.ome.zarr", intensity_range=[20, 180], **kw)
    assert np.array_equal(levels_of(trained.output)[0], levels_of(given.output)[0])
    dtype = translate_volume(generator, exm, tmp_path / "dtype.ome.zarr", intensity_range=[0, 255], **kw)
    assert not np.array_equal(levels_of(trained.output)[0], levels_of(dtype.output)[0])


def test_the_training_patch_is_the_default_patch(generator, exm, tmp_path) -> None:
    """Without ``patch``, a generator whose checkpoint records its training patch is applied with that patch; a
    plain module (an original .pth) gets the published 16×256×256, here too large for the volume."""
    kw = {k: v for k, v in KW.items() if k not in ("patch", "overlap")}
    record = TrainedGenerator(generator, training_patch=(4, 32, 32))
    res = translate_volume(record, exm, tmp_path / "p.ome.zarr", **kw)
    assert zarr.open_group(str(res.output), mode="r").attrs["exem"]["patch"] == [4, 32, 32]
    with pytest.raises(ValueError, match="patch 16×256×256 is larger than the volume"):
        translate_volume(generator, exm, tmp_path / "q.ome.zarr", **kw)


@pytest.mark.slow  # torch.compile on the CPU: ~30 s of compilation
def test_compiled_generator_gives_the_same_output(generator, exm, tmp_path, caplog) -> None:
    from torch._dynamo.utils import counters

    kw = {**KW, "roi": [0, 8, 0, 64, 0, 64], "dtype": "float32"}
    plain = translate_volume(generator, exm, tmp_path / "plain.ome.zarr", **kw)
    compiled_net = load_generator_copy(generator)
    graphs = counters["stats"]["unique_graphs"]
    with caplog.at_level("WARNING", logger="exem.perf"):
        compiled = translate_volume(compiled_net, exm, tmp_path / "compiled.ome.zarr", compile=True, **kw)
    # it did run compiled (a graph was made, no fallback), and the caller's network is given back uncompiled
    assert counters["stats"]["unique_graphs"] > graphs and "torch.compile failed" not in caplog.text
    assert compiled_net._compiled_call_impl is None
    a, b = levels_of(plain.output)[0], levels_of(compiled.output)[0]
    assert float(np.abs(a - b).max()) <= 1e-5


def load_generator_copy(net: AnisotropicUNet3D) -> AnisotropicUNet3D:
    copy = AnisotropicUNet3D(widths=net.widths)
    copy.load_state_dict(net.state_dict())
    return copy.eval()


class _Recording(AnisotropicUNet3D):
    """A generator that records the mode and device changes made to it."""

    def __init__(self) -> None:
        super().__init__(widths=(4, 8, 16))
        self.register_buffer("gain", torch.ones(()))
        self.calls: list[tuple[str, object]] = []

    def train(self, mode: bool = True):  # type: ignore[override]
        self.calls.append(("train", mode))
        return super().train(mode)

    def _apply(self, fn, recurse=True):  # .to(), .cpu(), .cuda(), .double() all come through here
        self.calls.append(("apply", getattr(fn, "__name__", "fn")))
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.gain


def test_translate_leaves_the_callers_module_as_it_was(exm, tmp_path, monkeypatch) -> None:
    """Lightning's predict puts its module in eval mode and, at the end, moves it to the CPU; the caller's generator
    (e.g. one still training on a GPU) comes back on its devices, in its dtype and mode, with the same parameters.

    There is no GPU here, so the end-of-run move is made visible as a dtype change: the strategy's teardown first
    turns the module to float64 (on a GPU it is ``.cpu()``, the same ``_apply`` path)."""
    from lightning.pytorch.strategies import Strategy

    real_teardown = Strategy.teardown

    def teardown(self) -> None:
        if self.lightning_module is not None:
            self.lightning_module.double()
        real_teardown(self)

    monkeypatch.setattr(Strategy, "teardown", teardown)
    net = _Recording().train()
    params = list(net.parameters())
    net.calls.clear()
    translate_volume(net, exm, tmp_path / "out.ome.zarr", **{**KW, "roi": [0, 8, 0, 64, 0, 64]})
    assert ("train", False) in net.calls and any(c[0] == "apply" for c in net.calls)  # Lightning did both
    assert net.training and all(m.training for m in net.modules())
    assert all(p is q for p, q in zip(params, net.parameters(), strict=True))
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in net.parameters())
    assert net.gain.dtype == torch.float32


def test_module_state_kept_restores_dtype_buffers_and_modes() -> None:
    from exem.inference.engine import module_state_kept

    net = _Recording().train()
    net.blocks_eval = torch.nn.Dropout().eval()  # a submodule in its own mode
    weight = next(net.parameters())
    with module_state_kept(net):
        net.double().eval()
        assert weight.dtype == torch.float64 and net.gain.dtype == torch.float64
    assert weight.dtype == torch.float32 and next(net.parameters()) is weight
    assert net.gain.dtype == torch.float32
    assert net.training and not net.blocks_eval.training


def test_compile_true_compiles_the_callers_network_for_the_run_only() -> None:
    """translate_volume(compile=true) on a generator still being trained must not leave it compiled (later
    training shapes would recompile, and past the recompile limit silently run eagerly)."""
    from exem.inference.engine import module_state_kept
    from exem.perf import compile_or_eager

    net = _Recording()
    with module_state_kept(net):
        compile_or_eager(net, backend="eager")  # what BlockPredictor.configure_model does
        assert net._compiled_call_impl is not None
    assert net._compiled_call_impl is None
    compile_or_eager(net, backend="eager")  # compiled by its owner: stays so
    own = net._compiled_call_impl
    with module_state_kept(net):
        net._compiled_call_impl = None  # e.g. a compile failure's fallback during the run
    assert net._compiled_call_impl is own


def test_compile_auto_means_large_volumes_on_a_gpu() -> None:
    import lightning as L

    from exem.inference.translate import COMPILE_AUTO_VOXELS, compile_wanted

    cpu = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    assert compile_wanted(True, 10, cpu) is True and compile_wanted(False, 2**40, None) is False
    assert compile_wanted("auto", 2**40, cpu) is False  # never on the CPU
    assert compile_wanted("auto", COMPILE_AUTO_VOXELS, None) is torch.cuda.is_available()
    assert compile_wanted("auto", COMPILE_AUTO_VOXELS - 1, None) is False
    with pytest.raises(ValueError, match="compile \\(true, false or auto\\) must be one of auto, got 'yes'"):
        compile_wanted("yes", 10, None)


class _AutocastProbe(torch.nn.Module):
    """Identity that notes, per call, whether autocast is on for the CPU and with which dtype."""

    divisor = 1

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return x


def test_the_network_runs_under_the_trainers_mixed_precision(exm, tmp_path) -> None:
    """exem-translate trainer=gpu means bf16-mixed: the network must run under bf16 autocast. The engine's own
    autocast context (disabled when no dtype was given) used to switch off the one Lightning wraps around
    predict_step, so a GPU trainer ran the generator in float32. Shown here with a CPU trainer in bf16-mixed."""
    import lightning as L

    kw = {**KW, "roi": [0, 8, 0, 64, 0, 64], "dtype": "float32"}

    def trainer(precision: str) -> L.Trainer:
        return L.Trainer(
            accelerator="cpu", devices=1, precision=precision, logger=False, enable_progress_bar=False
        )

    for precision, given, expected in (
        ("bf16-mixed", None, "bfloat16"),
        ("32-true", None, None),
        ("32-true", "float16", "float16"),  # an explicit dtype wins
    ):
        net = _AutocastProbe()
        out = tmp_path / f"{precision}_{given}.ome.zarr"
        translate_volume(net, exm, out, trainer=trainer(precision), autocast_dtype=given, **kw)
        want = (True, getattr(torch, expected)) if expected else (False,)
        assert net.seen and all(seen[: len(want)] == want for seen in net.seen), (precision, net.seen[:1])
        assert zarr.open_group(str(out), mode="r").attrs["exem"]["autocast_dtype"] == expected
    with pytest.raises(
        ValueError, match=r"^trainer.precision=bf16-true cannot run inference .*32-true, bf16-mixed"
    ):
        translate_volume(
            _AutocastProbe(), exm, tmp_path / "true.ome.zarr", trainer=trainer("bf16-true"), **kw
        )


def test_default_blocks_give_every_rank_work_and_resume_keeps_the_started_shape(
    generator, exm, tmp_path
) -> None:
    """Under DDP the default block budget is at most a 2·world_size-th of the region (a 128×2048×2048 volume was
    one GPU block: on 8 GPUs 7 waited); and since the default now depends on the ranks (and the device), an
    unfinished output resumes with the block shape it was started with."""
    from types import SimpleNamespace

    from exem.data.volume import open_volume
    from exem.inference.engine import default_block_voxels
    from exem.inference.job import plan_job
    from exem.inference.plan import DEFAULT_BLOCK_VOXELS, plan_volume

    def gpus(n: int) -> SimpleNamespace:
        return SimpleNamespace(world_size=n, strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))

    large = 128 * 2048 * 2048
    assert default_block_voxels(gpus(1), large) == DEFAULT_BLOCK_VOXELS
    assert default_block_voxels(gpus(8), large) == large // 16
    blocks = plan_volume((128, 2048, 2048), (16, 256, 256), block_voxels=default_block_voxels(gpus(8), large))
    assert len(blocks.blocks) >= 8 and len(plan_volume((128, 2048, 2048), (16, 256, 256)).blocks) == 1

    out = tmp_path / "started.ome.zarr"
    translate_volume(generator, exm, out, **KW)  # started with block_shape 4×64×64 (its record says so)
    volume = open_volume(exm)
    kw = {"patch": KW["patch"], "overlap": KW["overlap"], "chunks": KW["chunks"]}
    assert plan_job(generator, volume, exm, **kw, output=out).plan.block_shape == tuple(KW["block_shape"])
    assert plan_job(generator, volume, exm, **kw).plan.block_shape != tuple(KW["block_shape"])  # the default
