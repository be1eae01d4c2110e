"""exem.progress: the one progress-bar style of every long job (on stderr, never stdout)."""

from __future__ import annotations

import pytest

from exem.progress import progress_bar, step_bar


def test_step_bar_counts_steps_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    with step_bar(True, "measure", 3) as advance:
        for i in range(3):
            advance(f"block {i}")
    out, err = capsys.readouterr()
    assert out == ""
    assert "measure" in err and "3/3" in err and "block 2" in err


def test_disabled_step_bar_is_silent(capsys: pytest.CaptureFixture[str]) -> None:
    with step_bar(False, "measure", 3) as advance:
        advance()
        advance("status")
    assert capsys.readouterr() == ("", "")


def test_progress_bar_columns(capsys: pytest.CaptureFixture[str]) -> None:
    bar = progress_bar("blocks", "{task.fields[rate]}", remaining=True)
    task = bar.add_task("out.ome.zarr", total=2, rate="")
    bar.start()
    bar.update(task, advance=2, rate="12.50 Mvox/s")
    bar.stop()
    err = capsys.readouterr().err
    assert "out.ome.zarr" in err and "2/2" in err and "blocks" in err and "12.50 Mvox/s" in err
