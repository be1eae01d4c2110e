"""Shared fixtures: environment for CLI subprocesses, tiny data."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

BIN = Path(sys.executable).parent
# Qt without a screen for the napari plugin's tests (napari's pytest plugin imports Qt for every test).
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

# Small-but-real settings for `exem-train experiment=demo` in tests: 2 batches per epoch so validation runs.
DEMO_FAST = [
    "experiment=demo",
    "synthetic.shape=[16,128,128]",
    "data.samples_per_epoch=4",
    "data.num_workers=0",
    "data.persistent_workers=false",
    "data.val_patches=2",
    "trainer.max_steps=6",
    "trainer.log_every_n_steps=1",
    "model.image_every_n_steps=1",
    "callbacks.progress_bar=null",
]


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_under_basetemp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """What exem puts in the system's temporary folder (napari outputs of in-memory layers, unpacked model
    packages) goes under pytest's base folder, which pytest prunes, in this process and the CLIs it starts."""
    folder = tmp_path_factory.mktemp("tempdir")
    before, before_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = str(folder), str(folder)
    yield
    tempfile.tempdir = before
    if before_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before_env


@pytest.fixture(autouse=True)
def _thaw_frozen_objects() -> Iterator[None]:
    """A command called in-process freezes every object alive (exem.startup.preload): hand them back to the
    collector, so that what earlier tests left behind is still collected."""
    yield
    if gc.get_freeze_count():
        gc.unfreeze()


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    )
    env.pop("WANDB_API_KEY", None)
    return env


def torchrun_ranks(script: Path, *args: str, out: Path, timeout: float = 240) -> list[dict]:
    """Run ``script`` in 2 processes under torchrun (gloo on the CPU, one thread each) and return what each rank
    wrote to ``out/rank<r>.json``; fails with the processes' output when the run fails."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [*cmd, *args], cwd=out.parent, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def run_cli(prog: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run an installed exem console script; returns the completed process (stdout/stderr as text)."""
    return subprocess.run(
        [str(BIN / prog), *args], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )


def sigkill_when(
    cmd: list[str], ready: Callable[[], bool], log_path: Path, timeout_s: float, **popen
) -> None:
    """Start ``cmd`` (output to ``log_path``), SIGKILL it as soon as ``ready()`` holds; fail the test if the
    process ends first or ``timeout_s`` passes."""
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, **popen)
        deadline = time.monotonic() + timeout_s
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(
                    f"{Path(cmd[0]).name} ended before it could be killed:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder shared by the CLI tests so the demo phantoms are generated once per session."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module: tiny networks gain nothing from more, and lose a lot on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def net() -> nn.Module:
    """A small seeded U-Net (widths 4, 8, 16) in eval mode: the network of the engine's tests."""
    from exem.models.unet import AnisotropicUNet3D

    torch.manual_seed(0)
    return AnisotropicUNet3D(widths=(4, 8, 16)).eval()
