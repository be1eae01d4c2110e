"""Print the ratios of benchmark runs: the last line of each log is the run's JSON object.

    python benchmarks/ratios.py outputs/bench/*.log

One line per log: the benchmark's name, then every figure whose key holds ``ratio`` or ``speedup``, with the
target issue 5 sets where there is one. Exit status 1 when a log has no JSON last line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Targets of issue 5 (CPU, point 6): Lightning ≤ 1.10 × the plain loop; translate ≤ 1.15 × generator-only;
# and no visible seam (benchmarks/seams.py) with a trained generator at the default overlap. Issue 13: the engine
# ceiling (identity network) ≥ 5 × what commit d716e53 gave on the same machine.
TARGETS = {
    ("train", "lightning_ratio"): ("≤", 1.10),
    ("translate_overhead", "ratio"): ("≤", 1.15),
    ("seams", "seam_ratio_trained_overlap0.25"): ("≤", 1.10),
    ("engine_ceiling", "speedup_vs_d716e53"): ("≥", 5.0),
}


def summary(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise ValueError(f"{log}: the last line is not a benchmark's JSON object") from None
    bench = result.get("bench", log.stem)
    parts = []
    for key, value in result.items():
        if "ratio" in key or "speedup" in key:
            target = TARGETS.get((bench, key))
            verdict = ""
            if target is not None:
                op, bound = target
                met = value <= bound if op == "≤" else value >= bound
                verdict = f" ({op} {bound}: " + ("met)" if met else "NOT met)")
            parts.append(f"{key} {value}{verdict}")
    return f"{bench:>20} [{result.get('device', '?')}, {result.get('size', '?')}]: " + "; ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+", type=Path)
    args = ap.parse_args()
    try:
        for log in args.logs:
            print(summary(log))
    except ValueError as exc:
        print(f"ratios: error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
