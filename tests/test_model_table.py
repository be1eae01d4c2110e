"""exem-train's model table: names, types and parameters, one totals line; no FLOPs of 0, no Mode column."""

from __future__ import annotations

import pytest

from exem.model_table import ModelTable, totals_line

DATA = [
    (" ", ["0", "1"]),
    ("Name", ["G_AB", "content_loss"]),
    ("Type", ["AnisotropicUNet3D", "IntensityGroupContentLoss"]),
    ("Params", ["430 K", "0"]),
    ("Mode", ["train", "train"]),
    ("FLOPs", ["0", "0"]),
]


def test_totals_line() -> None:
    assert totals_line(1_381_000, 1_381_000, 5.524) == "1.4 M parameters (all trainable), 5.5 MB"
    assert totals_line(2_000, 1_500, 0.008) == "2.0 K parameters (500 frozen), 0.0 MB"
    with_flops = totals_line(10, 10, 0.0, flops=3_000_000)
    assert with_flops == "10 parameters (all trainable), 0.0 MB, 3.0 M FLOPs per forward pass"


def test_the_table_leaves_out_what_says_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    ModelTable.summarize(DATA, 1_381_000, 1_381_000, 5.524, {"train": 189, "eval": 0}, 0)
    out = capsys.readouterr().out
    assert "G_AB" in out and "IntensityGroupContentLoss" in out and "430 K" in out
    assert "FLOPs" not in out and "Mode" not in out and "train mode" not in out
    assert out.rstrip().splitlines()[-1] == "1.4 M parameters (all trainable), 5.5 MB"

    ModelTable.summarize(
        [*DATA[:5], ("FLOPs", ["1.2 G", "0"])], 10, 10, 0.0, {"train": 2, "eval": 0}, 1_200_000_000
    )
    out = capsys.readouterr().out
    assert "FLOPs" in out and "1.2 G" in out  # measured (an example input): shown
