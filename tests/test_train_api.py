"""`exem.train` through Hydra's compose API (in-process): the returned sweep metric, mixed precision."""

from __future__ import annotations

from pathlib import Path

import pytest

import exem
from exem.config import compose_config
from exem.train import ConfigError, train
from tests.conftest import DEMO_FAST


def _cfg(tmp_path: Path, data_dir: Path, *overrides: str):
    return compose_config([*DEMO_FAST, f"paths.data_dir={data_dir}", *overrides], output_dir=tmp_path / "run")


def test_import_exem_default_generator_size() -> None:
    g = exem.AnisotropicUNet3D()
    assert sum(p.numel() for p in g.parameters()) == 27_517_441


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_train_returns_optimized_metric(
    tmp_path: Path,
    synthetic_dir: Path,
    precision: str,
    recwarn: pytest.WarningsRecorder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    import exem.allocator as allocator

    monkeypatch.setattr(allocator, "_done", False)
    cfg = _cfg(tmp_path, synthetic_dir, f"trainer.precision={precision}", "logger=csv")
    result = train(cfg)
    # a CPU run keeps freed memory for reuse (exem/allocator.py)
    assert allocator._done is sys.platform.startswith("linux")
    # Lightning-internal warnings a user cannot act on stay out of notebooks and scripts (exem.quiet)
    noise = [
        str(w.message)
        for w in recwarn
        if "LeafSpec" in str(w.message) or "pre-optimization" in str(w.message)
    ]
    assert noise == []
    assert result.metric is not None and -1.0 <= result.metric <= 1.0  # val/paired_ssim
    assert result.metric == result.metrics[cfg.optimized_metric]
    assert result.batch_step == 2 and result.global_step == 6
    assert result.last_checkpoint is not None and result.last_checkpoint.is_file()
    assert result.metrics_csv is not None and result.panels


def test_missing_mandatory_values_are_named(tmp_path: Path, synthetic_dir: Path) -> None:
    cfg = _cfg(
        tmp_path,
        synthetic_dir,
        "synthetic=null",
        "data.em_paired=null",
        "data.lm.path=???",
        "data.em.path=???",
    )
    with pytest.raises(ConfigError, match=r"data\.em\.path, data\.lm\.path"):
        train(cfg)


def test_a_run_too_short_to_validate_says_why(
    tmp_path: Path, synthetic_dir: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture
) -> None:
    cfg = _cfg(
        tmp_path,
        synthetic_dir,
        "data.samples_per_epoch=40",  # an epoch of 20 batches of 2
        "trainer.max_steps=3",  # one batch
        "trainer.log_every_n_steps=20",  # once per epoch: none in a run of one batch
        "logger=csv",
    )
    with caplog.at_level("WARNING", logger="exem.train"):
        result = train(cfg)
    assert result.batch_step == 1 and result.metric is None
    assert "no validation ran in this run's 1 batch (an epoch is 20 batches;" in caplog.text
    assert result.metrics_csv is None
    lines = result.summary().splitlines()
    assert lines[0] == "exem-train: done: 1 batch (3 optimizer steps)"
    assert "  metrics CSV  none written (no metrics were logged)" in lines
    # callbacks.progress_bar=null (DEMO_FAST) means no bar, not Lightning's own ("Epoch 0/-2")
    assert "Epoch" not in "".join(capfd.readouterr())
