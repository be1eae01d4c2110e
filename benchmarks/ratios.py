"""Print the ratios of benchmark runs, and each figure that has a target: the last line of each log is the run's JSON.

    python benchmarks/ratios.py outputs/bench/*.log

One line per log: the benchmark's name, then every figure whose key holds ``ratio`` or ``speedup`` and every figure
with a target for the run's device and size, each with its target and whether it is met. Exit status 1 when a log
is missing or has no JSON last line (after the other logs' lines).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Target:
    """A bound on one figure of one benchmark, for runs on ``device`` (None: any) of ``size`` (None: any)."""

    bench: str
    key: str
    op: str  # "≤" or "≥"
    bound: float
    device: str | None = None
    size: str | None = None

    def applies(self, result: dict[str, Any]) -> bool:
        return (
            result.get("bench") == self.bench
            and self.key in result
            and self.device in (None, result.get("device"))
            and self.size in (None, result.get("size"))
        )

    def verdict(self, value: Any) -> str:
        if not isinstance(value, (int, float)):
            return f"({self.op} {self.bound}: not measured)"
        met = value <= self.bound if self.op == "≤" else value >= self.bound
        return f"({self.op} {self.bound}: " + ("met)" if met else "NOT met)")


TARGETS = (
    # Issue 5 (CPU, point 6): Lightning ≤ 1.10 × the plain loop; translate ≤ 1.15 × generator-only; no visible seam
    # (benchmarks/seams.py) with a trained generator at the default overlap.
    Target("train", "lightning_ratio", "≤", 1.10),
    Target("translate_overhead", "ratio", "≤", 1.15),
    Target("seams", "seam_ratio_trained_overlap0.25", "≤", 1.10),
    # Issue 13, CPU: the engine ceiling (identity network) ≥ 5 × what commit d716e53 gave on the same machine.
    Target("engine_ceiling", "speedup_vs_d716e53", "≥", 5.0),
    # Issue 13, GPU (`make bench-gpu`): the default training step of the published generator at 16×256×256 ≤ 150 ms
    # and ≤ 12 GiB; exem-translate on 128×2048×2048 ≥ 60 Mvox/s with its first batch ≤ 5 s after the command
    # started; the engine ceiling ≥ 150 Mvox/s (on a 16-core host).
    Target("train", "exem_ms", "≤", 150.0, device="cuda", size="published"),
    Target("train", "exem_peak_gib", "≤", 12.0, device="cuda", size="published"),
    Target("translate_cli", "cli_mvox_s", "≥", 60.0, device="cuda", size="large"),
    Target("translate_cli", "cli_first_batch_s", "≤", 5.0, device="cuda", size="large"),
    Target("engine_ceiling", "mvox_per_s", "≥", 150.0, device="cuda"),
)


def summary(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise ValueError(f"{log}: the last line is not a benchmark's JSON object") from None
    if not isinstance(result, dict):
        raise ValueError(f"{log}: the last line is not a benchmark's JSON object")
    result.setdefault("bench", log.stem)
    targets = {t.key: t for t in TARGETS if t.applies(result)}
    parts = []
    for key, value in result.items():
        target = targets.get(key)
        if target is not None:
            parts.append(f"{key} {value} {target.verdict(value)}")
        elif "ratio" in key or "speedup" in key:
            parts.append(f"{key} {value}")
    extra = f", {result['cli_args']}" if result.get("cli_args") else ""
    return (
        f"{result['bench']:>20} [{result.get('device', '?')}, {result.get('size', '?')}{extra}]: "
        + "; ".join(parts)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+", type=Path)
    args = ap.parse_args()
    failed = False
    for log in args.logs:  # every log, so that one failed benchmark does not hide the others' figures
        try:
            print(summary(log))
        except (OSError, ValueError) as exc:
            print(f"ratios: error: {exc}", file=sys.stderr)
            failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
