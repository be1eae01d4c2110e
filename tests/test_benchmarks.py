"""The benchmark scripts run (tiny sizes) and end with the JSON line ratios.py reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
