"""How well marker-positive calls of segmented objects match a phantom's truth (the demo's last step).

The synthetic held-out phantom carries an antibody channel that marks a known subset of its mitochondria
(:func:`exem.data.render.antibody_positive_ids`, recorded in ``antibody_test``'s attributes). After
``exem-segment`` (on virtual EM) and ``exem-measure`` (``positive_threshold``), :func:`positive_call_report` matches
every segmented object to the true mitochondrion it overlaps most and scores its call. In memory: meant for
phantoms and small test volumes, not for whole datasets.

    python -m exem.analysis.positives --objects DIR/objects.csv --labels SEG.zarr --truth mito_test.zarr \\
        --antibody antibody_test.zarr
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from exem.data.volume import open_volume
from exem.errors import one_line_errors

__all__ = ["PositiveReport", "match_objects", "positive_call_report", "main"]


@dataclass(frozen=True)
class PositiveReport:
    """Marker-positive calls of segmented objects against the truth.

    Attributes:
        objects: segmented objects scored; matched: those overlapping a true mitochondrion most.
        measured_fraction: share of the segmented objects called positive.
        true_fraction: share of the true mitochondria that carry the marker.
        accuracy: share of segmented objects whose call equals the truth of the mitochondrion they match (an
            object on no mitochondrion is truly negative).
        matched_accuracy: the same over the objects on a true mitochondrion only (false objects left out, so a
            segmenter's false positives cannot flatter the calls).
        true_mitochondria: true mitochondria in the volume; found: those some object lies mostly on.
    """

    objects: int
    matched: int
    measured_fraction: float
    true_fraction: float
    accuracy: float
    matched_accuracy: float = float("nan")
    true_mitochondria: int = 0
    found: int = 0

    def summary(self, name: str = "antibody") -> str:
        return (
            f"{name}-positive mitochondria: truth {100 * self.true_fraction:.0f} % of {self.true_mitochondria};"
            f" segmented {self.objects} objects, {self.matched} on a true mitochondrion ({self.found} of"
            f" {self.true_mitochondria} found), called positive {100 * self.measured_fraction:.0f} %; calls agree"
            f" with the truth for {100 * self.matched_accuracy:.0f} % of the objects on a mitochondrion"
            f" ({100 * self.accuracy:.0f} % of all objects)"
        )


def match_objects(labels: np.ndarray, truth: np.ndarray) -> dict[int, int]:
    """Each object id of ``labels`` → the ``truth`` id it overlaps most (0: mostly outside every true object)."""
    mask = labels > 0
    pairs, counts = np.unique(np.stack([labels[mask], truth[mask]]), axis=1, return_counts=True)
    best: dict[int, tuple[int, int]] = {}
    for (obj, tid), n in zip(pairs.T.tolist(), counts.tolist(), strict=True):
        if obj not in best or n > best[obj][1]:
            best[obj] = (tid, n)
    return {obj: tid for obj, (tid, _) in best.items()}


def positive_call_report(
    calls: dict[int, bool], labels: Any, truth: Any, positive_ids: Any
) -> PositiveReport:
    """Score ``calls`` (object id → called positive) of the objects in ``labels`` against ``truth``.

    Args:
        calls: segmented object id → positive call (``exem-measure``'s ``<name>_positive``).
        labels, truth: the segmented instance labels and the true mitochondria (same ``(Z, Y, X)`` grid; paths,
            or arrays).
        positive_ids: the true mitochondrion ids that carry the marker.
    """
    lab = _array(labels)
    tru = _array(truth)
    if lab.shape != tru.shape:
        raise ValueError(f"labels {lab.shape} and truth {tru.shape} differ in shape")
    matched = match_objects(lab, tru)
    positive = {int(i) for i in positive_ids}
    true_ids = np.unique(tru[tru > 0])
    scored = [obj for obj in calls if obj in matched]
    on_mito = [obj for obj in scored if matched[obj] > 0]
    agree = {obj: bool(calls[obj]) == (matched[obj] in positive) for obj in scored}
    return PositiveReport(
        objects=len(scored),
        matched=len(on_mito),
        measured_fraction=float(np.mean([calls[o] for o in scored])) if scored else float("nan"),
        true_fraction=len(positive & set(true_ids.tolist())) / max(true_ids.size, 1),
        accuracy=float(np.mean(list(agree.values()))) if scored else float("nan"),
        matched_accuracy=float(np.mean([agree[o] for o in on_mito])) if on_mito else float("nan"),
        true_mitochondria=int(true_ids.size),
        found=len({matched[o] for o in on_mito}),
    )


def _array(source: Any) -> np.ndarray:
    if isinstance(source, np.ndarray):
        return source
    from exem.analysis.measure import (
        labels_source,
    )  # an exem-segment folder → its labels, as exem-measure reads it

    volume = open_volume(labels_source(source), intensity_range=(0, 1))
    return np.asarray(volume.read((slice(None),) * 3))


def _calls(objects_csv: Path, name: str) -> dict[int, bool]:
    with open(objects_csv, newline="") as f:
        return {
            int(r["label"]): r[f"{name}_positive"].strip().lower() in ("true", "1") for r in csv.DictReader(f)
        }


@one_line_errors("exem.analysis.positives")
def main(argv: list[str] | None = None) -> None:
    """``python -m exem.analysis.positives``: print the report line of an ``exem-measure`` table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", required=True, type=Path, help="exem-measure's objects.csv")
    parser.add_argument("--labels", required=True, help="the segmented labels (exem-segment output)")
    parser.add_argument("--truth", required=True, help="the true mitochondria (mito_test.zarr)")
    parser.add_argument(
        "--antibody", required=True, help="antibody_test.zarr (its attributes hold the truth)"
    )
    parser.add_argument("--name", default="antibody", help="the image's name in the table")
    args = parser.parse_args(argv)
    meta = dict(zarr.open_group(str(args.antibody), mode="r").attrs).get("exem_synthetic", {})
    report = positive_call_report(
        _calls(args.objects, args.name), args.labels, args.truth, meta.get("antibody_positive_mito_ids", [])
    )
    print(report.summary(args.name))  # noqa: T201 - a command-line summary


if __name__ == "__main__":
    main()
