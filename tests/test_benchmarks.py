"""The benchmark scripts run (tiny sizes) and end with the JSON line ratios.py reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_engine_ceiling_reports_mvox_and_every_stage(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/engine_ceiling.py",
            "--shape",
            "8",
            "64",
            "64",
            "--patch",
            "4",
            "32",
            "32",
            "--repeats",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bench"] == "engine_ceiling" and result["mvox_per_s"] > 0
    assert set(result["stages_s"]) == {
        "read",
        "host_to_device",
        "blend",
        "cast",
        "device_to_host",
        "write_level0",
        "write_level1",
    }
    log = tmp_path / "engine_ceiling.log"
    log.write_text(proc.stdout)
    ratios = subprocess.run(
        [sys.executable, "benchmarks/ratios.py", str(log)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert ratios.returncode == 0 and "speedup_vs_d716e53" in ratios.stdout and "(≥ 5.0: " in ratios.stdout


def test_ratios_judge_each_goal_for_its_device_and_size(tmp_path: Path) -> None:
    """make bench-gpu's last lines: each GPU goal of issue 13 met or not; a broken log does not hide the others."""
    logs = {
        "train": {
            "bench": "train",
            "device": "cuda",
            "size": "published",
            "exem_ms": 139.0,
            "exem_peak_gib": 12.5,
        },
        "train_cpu": {
            "bench": "train",
            "device": "cpu",
            "size": "tiny",
            "exem_ms": 900.0,
            "lightning_ratio": 1.2,
        },
        "broken": None,
        "large": {
            "bench": "translate_cli",
            "device": "cuda",
            "size": "large",
            "cli_mvox_s": 15.4,
            "cli_first_batch_s": None,
            "cli_args": ["batch_size=32"],
        },
        "ceiling": {
            "bench": "engine_ceiling",
            "device": "cuda",
            "size": "128x2048x2048",
            "mvox_per_s": 151.0,
        },
    }
    paths = []
    for name, result in logs.items():
        path = tmp_path / f"{name}.log"
        path.write_text("a figure\n" + ("Traceback: boom" if result is None else json.dumps(result)) + "\n")
        paths.append(str(path))
    proc = subprocess.run(
        [sys.executable, "benchmarks/ratios.py", *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1 and "broken.log: the last line is not" in proc.stderr
    lines = {
        line.split("[")[0].strip() + "/" + line.split("[")[1].split(",")[0]: line
        for line in proc.stdout.splitlines()
    }
    assert "exem_ms 139.0 (≤ 150.0: met)" in lines["train/cuda"]
    assert "exem_peak_gib 12.5 (≤ 12.0: NOT met)" in lines["train/cuda"]
    assert (
        "exem_ms" not in lines["train/cpu"] and "lightning_ratio 1.2 (≤ 1.1: NOT met)" in lines["train/cpu"]
    )
    assert "cli_mvox_s 15.4 (≥ 60.0: NOT met)" in lines["translate_cli/cuda"]
    assert "cli_first_batch_s None (≤ 5.0: not measured)" in lines["translate_cli/cuda"]
    assert "batch_size=32" in lines["translate_cli/cuda"]
    assert "mvox_per_s 151.0 (≥ 150.0: met)" in lines["engine_ceiling/cuda"]


def test_bench_train_measures_exem_default_first() -> None:
    """The GPU goal is for what exem-train does by default (conf/): bf16 + torch.compile, no channels_last."""
    import torch

    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.bench_train import default_variants, parse_variant
    finally:
        sys.path.remove(str(ROOT))
    cuda = default_variants(torch.device("cuda"))
    assert cuda[0] == "bf16-compile" and len(set(cuda)) == len(cuda) and "bf16" in cuda
    assert default_variants(torch.device("cpu")) == ["fp32"]
    assert all(parse_variant(v) for v in cuda)


def test_a_gpu_other_than_the_first_is_refused_in_one_line() -> None:
    """engine_ceiling's and bench_translate's trainers take the first visible GPU, whatever --device cuda:1 said."""
    import torch

    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks._common import pick_device
    finally:
        sys.path.remove(str(ROOT))
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("cuda:0") == torch.device("cuda", 0) and pick_device("cuda") == torch.device("cuda")
    with pytest.raises(SystemExit, match="CUDA_VISIBLE_DEVICES=1 and --device cuda"):
        pick_device("cuda:1")


def test_makefile_passes_torch_spec_to_pip_as_arguments(tmp_path: Path) -> None:
    """README: `make demo TORCH_SPEC="torch==2.13.0 --index-url …"` for a CUDA build (one quoted word broke pip)."""
    import shlex
    import shutil

    if shutil.which("make") is None:
        pytest.skip("no make")
    spec = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"
    proc = subprocess.run(
        ["make", "-n", "install", f"VENV={tmp_path / 'venv'}", f"TORCH_SPEC={spec}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    (line,) = [line for line in proc.stdout.splitlines() if "torch==" in line]
    words = shlex.split(line)
    assert words[words.index("install") :] == [
        "install",
        "-q",
        "torch==2.13.0",
        "--index-url",
        spec.split()[-1],
    ]
