"""Content-loss groups fitted from the data (exem.content_groups), in the module, in checkpoints and exem-calibrate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from scipy import ndimage as ndi

from exem.content_groups import (
    CalibrationError,
    ContentFitSettings,
    ContentGroups,
    content_groups_panel,
    fit_content_groups,
    fit_from_datamodule,
    group_fractions,
    otsu_thresholds,
)
from exem.data import ExEMDataModule
from exem.module import ExEMModule
from tests.conftest import run_cli

SHAPE = (16, 128, 128)


def blobs(fractions: list[float], seed: int, scale: float = 6.0) -> np.ndarray:
    """Integer classes ``(Z, Y, X)`` as smooth random blobs with the given volume fractions (class 0 first)."""
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.standard_normal(SHAPE), (0.5, scale, scale))
    cuts = np.quantile(field, np.cumsum(fractions)[:-1])
    return np.searchsorted(cuts, field)


def render(classes: np.ndarray, means: list[float], noise: float, seed: int) -> np.ndarray:
    """Each class at its mean intensity plus Gaussian noise, clipped to [0, 1]."""
    rng = np.random.default_rng(seed)
    return np.clip(np.asarray(means)[classes] + rng.normal(0.0, noise, classes.shape), 0, 1).astype(
        np.float32
    )


LM_MEANS = [0.25, 0.70]  # dark cytosol, sparse bright protein-dense structures
EM_MEANS = [0.15, 0.50, 0.85]  # sparse dark membranes, mid cytoplasm, a little bright lumen


def midpoints(means: list[float]) -> list[float]:
    return [(a + b) / 2 for a, b in zip(means[:-1], means[1:], strict=True)]


@pytest.fixture(scope="module")
def pan_protein_pair() -> tuple[np.ndarray, np.ndarray]:
    lm = render(blobs([0.75, 0.25], 1), LM_MEANS, 0.04, 1)  # 25 % bright
    em = render(blobs([0.25, 0.65, 0.10], 2), EM_MEANS, 0.04, 2)  # 25 % dark
    return lm, em


@pytest.mark.parametrize("noise", [0.03, 0.06])
def test_fit_recovers_thresholds_and_pan_protein_mapping(noise: float) -> None:
    lm = render(blobs([0.75, 0.25], 1), LM_MEANS, noise, 1)
    em = render(blobs([0.25, 0.65, 0.10], 2), EM_MEANS, noise, 2)
    fit = fit_content_groups(lm, em)
    assert np.allclose(fit.lm_thresholds, midpoints(LM_MEANS), atol=0.02), fit.lm_thresholds
    assert np.allclose(fit.em_thresholds, midpoints(EM_MEANS), atol=0.02), fit.em_thresholds
    # ExM bright (group 1) ↔ EM dark (group 0); ExM dark ↔ EM mid + bright
    assert fit.lm_to_em == ((1, 2), (0,))
    assert fit.em_to_lm == (1, 0, 0)
    assert fit.polarity == "pan_protein"
    assert fit.lm_fractions[1] == pytest.approx(0.25, abs=0.03)
    assert fit.em_fractions[0] == pytest.approx(0.25, abs=0.03)
    assert fit.score > 0.95
    assert not fit.notes


def test_fit_direct_pair_sparse_dark_in_both() -> None:
    lm = render(blobs([0.25, 0.75], 3), LM_MEANS, 0.04, 3)  # 25 % dark ExM
    em = render(blobs([0.25, 0.65, 0.10], 2), EM_MEANS, 0.04, 2)  # 25 % dark EM
    fit = fit_content_groups(lm, em)
    assert fit.lm_to_em == ((0,), (1, 2))
    assert fit.em_to_lm == (0, 1, 1)
    assert fit.polarity == "direct"


def test_the_fit_needs_no_prior_but_warns_when_the_prior_disagrees(pan_protein_pair) -> None:
    lm, em = pan_protein_pair
    fit = fit_content_groups(lm, em, stain="direct")
    assert fit.polarity == "pan_protein"  # the data win
    assert any("disagree with data.lm.stain=direct" in n for n in fit.notes)
    assert fit_content_groups(lm, em, stain="pan_protein").notes == ()


def test_stain_prior_breaks_a_tie() -> None:
    # ExM bright 30 %; EM dark 30 % and EM bright 30 %: pan-protein and direct mappings fit the fractions equally.
    lm = render(blobs([0.70, 0.30], 4), LM_MEANS, 0.03, 4)
    em = render(blobs([0.30, 0.40, 0.30], 5), EM_MEANS, 0.03, 5)
    pan = fit_content_groups(lm, em, stain="pan_protein")
    direct = fit_content_groups(lm, em, stain="direct")
    assert pan.em_to_lm == (1, 0, 0) and pan.polarity == "pan_protein"
    assert direct.em_to_lm == (0, 0, 1) and direct.polarity == "direct"
    assert not pan.notes and not direct.notes
    undecided = fit_content_groups(lm, em)  # symmetric histograms: no prior, no clear skew → a warning
    assert any("set data.lm.stain" in n for n in undecided.notes)


def test_skewed_histograms_break_a_tie_without_prior() -> None:
    # Fractions tie as above, but the ExM bright class has a long tail and EM a dark one: pan-protein.
    rng = np.random.default_rng(6)
    lm = render(blobs([0.70, 0.30], 4), LM_MEANS, 0.03, 4)
    lm = np.where(lm > 0.5, np.clip(lm + rng.exponential(0.12, lm.shape), 0, 1), lm).astype(np.float32)
    em = render(blobs([0.30, 0.40, 0.30], 5), [0.15, 0.60, 0.75], 0.03, 5)
    fit = fit_content_groups(lm, em, tie_tolerance=0.5)
    assert fit.skew[0] > 0.2 and fit.skew[1] < -0.2
    assert fit.polarity == "pan_protein"


def test_more_groups_and_group_fractions() -> None:
    x = np.repeat(np.array([0.1, 0.4, 0.6, 0.9], np.float32), 1000)
    assert group_fractions(x, [0.5]) == (0.5, 0.5)
    assert group_fractions(x, [0.2, 0.5, 0.8]) == (0.25, 0.25, 0.25, 0.25)
    ts = otsu_thresholds(x, 4)
    assert len(ts) == 3 and ts[0] < 0.4 < ts[1] < 0.6 < ts[2] < 0.9
    # an empty valley: the threshold sits in its middle, not at its first bin
    two = np.repeat(np.array([0.2, 0.8], np.float32), 1000)
    assert otsu_thresholds(two, 2)[0] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(
    ("sample", "phrase"),
    [
        (np.full((4, 16, 16), 0.3, np.float32), "constant"),
        (np.zeros((4, 16, 16), np.float32), "constant"),
        (np.repeat(np.array([0.2, 0.7], np.float32), 500).reshape(10, 10, 10), "fewer than the 3 groups"),
        (np.array([0.1, np.nan, 0.5], np.float32), "nan"),
        (np.empty(0, np.float32), "empty"),
    ],
)
def test_bad_samples_raise_one_line(sample: np.ndarray, phrase: str) -> None:
    with pytest.raises(CalibrationError) as err:
        fit_content_groups(np.linspace(0, 1, 1000, dtype=np.float32), sample)
    assert phrase in str(err.value).lower() and "\n" not in str(err.value)


def test_saturated_voxels_are_left_out_and_reported(pan_protein_pair) -> None:
    lm, em = pan_protein_pair
    padded = em.copy()
    padded[:, :, :40] = 0.0  # a black frame around an aligned EM stack
    fit = fit_content_groups(lm, padded)
    clean = fit_content_groups(lm, em)
    assert fit.saturated[1] > 0.25
    assert np.allclose(fit.em_thresholds, clean.em_thresholds, atol=0.02)
    assert fit.em_to_lm == clean.em_to_lm
    assert any("exactly 0 or 1" in n for n in fit.notes)


def test_config_round_trip_and_texts(pan_protein_pair) -> None:
    fit = fit_content_groups(*pan_protein_pair)
    cfg = fit.as_config()
    json.dumps(cfg)  # plain values
    assert ContentGroups.from_config(cfg) == fit
    assert ContentGroups.from_config({"lm_thresholds": [0.4]}) is None
    line = json.loads(fit.summary_json())
    assert set(line) == {
        "lm_thresholds",
        "em_thresholds",
        "lm_to_em",
        "em_to_lm",
        "lm_fractions",
        "em_fractions",
    }
    assert line["lm_to_em"] == [[1, 2], [0]]
    assert "auto: false" in fit.yaml_block() and "em_to_lm: [1, 0, 0]" in fit.yaml_block()
    assert "ExM bright" in fit.describe() and "EM dark" in fit.describe()
    assert "EM 0 (dark)" in fit.table()


def test_panel_colours_show_what_becomes_what(pan_protein_pair) -> None:
    lm, em = pan_protein_pair
    fit = fit_content_groups(lm, em)
    panel = content_groups_panel(fit, lm, em, lm[8], em[8])
    assert panel.ndim == 3 and panel.shape[2] == 3 and panel.dtype == np.uint8
    width = panel.shape[1]
    colours = {tuple(c) for c in panel.reshape(-1, 3)[::7]}
    # the ExM bright group and the EM dark group are drawn in the same hue (orange-ish: red > blue)
    left, right = panel[:, : width // 2], panel[:, width // 2 :]

    def orange(img: np.ndarray) -> float:
        r, g, b = (img[..., i].astype(int) for i in range(3))
        return float(((r - b) > 80).mean())

    assert orange(left) > 0.01 and orange(right) > 0.01
    assert len(colours) > 20


def test_settings_split_and_validation() -> None:
    settings, rest = ContentFitSettings.split({"auto": False, "lm_groups": 3, "slope": 50.0})
    assert settings.auto is False and settings.lm_groups == 3 and rest == {"slope": 50.0}
    for bad in ({"lm_groups": 1}, {"em_groups": 6}, {"sample_voxels": 0}, {"tie_tolerance": 1.0}):
        with pytest.raises(ValueError):
            ContentFitSettings.split(bad)


# ------------------------------------------------------------------------------------ with the data module


def _write(path: Path, data: np.ndarray) -> Path:
    arr = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=(8, 64, 64))
    arr[...] = data
    return path


@pytest.fixture(scope="module")
def pan_protein_stores(tmp_path_factory: pytest.TempPathFactory, pan_protein_pair) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("groups")
    lm, em = pan_protein_pair
    return (
        _write(root / "lm.zarr", np.round(lm * 255).astype(np.uint8)),
        _write(root / "em.zarr", np.round(em * 255).astype(np.uint8)),
    )


def _datamodule(stores: tuple[Path, Path], **lm: object) -> ExEMDataModule:
    return ExEMDataModule(
        lm={"path": str(stores[0]), **lm}, em={"path": str(stores[1])}, patch_size=(4, 32, 32), seed=3
    )


def test_fit_from_datamodule_is_seeded(pan_protein_stores) -> None:
    settings = ContentFitSettings(sample_voxels=200_000, sample_patches=16, seed=5)
    first = fit_from_datamodule(_datamodule(pan_protein_stores), settings)
    again = fit_from_datamodule(_datamodule(pan_protein_stores), settings)
    assert first.fit == again.fit
    assert np.array_equal(first.lm, again.lm)
    other = fit_from_datamodule(
        _datamodule(pan_protein_stores), ContentFitSettings(**{**settings.__dict__, "seed": 6})
    )
    assert not np.array_equal(first.lm, other.lm)
    assert first.fit.em_to_lm == (1, 0, 0)
    assert first.lm.shape == (16, 4, 32, 32) and first.lm_slice.ndim == 2


def test_datamodule_rejects_unknown_stain(pan_protein_stores) -> None:
    with pytest.raises(ValueError, match="data.lm.stain must be one of"):
        _datamodule(pan_protein_stores, stain="cytosolic")


def _module(content: dict, report_dir: Path | None = None) -> ExEMModule:
    return ExEMModule(
        generator={"widths": [4, 8]},
        discriminator={"num_scales": 1, "base_filters": 4},
        loss={"lambda_content": 1.0, "content": content},
        optimizer={"lr": 1e-3},
        report_dir=str(report_dir) if report_dir else None,
    )


class _FakeTrainer:
    """What on_fit_start reads of a Trainer."""

    def __init__(self, datamodule: ExEMDataModule) -> None:
        self.datamodule = datamodule
        self.is_global_zero = True
        self.world_size = 1
        self.strategy = None


def test_auto_false_uses_the_configured_values(pan_protein_stores, tmp_path: Path) -> None:
    content = {"auto": False, "lm_thresholds": [0.3], "em_thresholds": [0.2, 0.6], "lm_to_em": [[0, 2], [1]],
               "em_to_lm": [0, 1, 0]}  # fmt: skip
    module = _module(content, tmp_path)
    module._trainer = _FakeTrainer(_datamodule(pan_protein_stores))  # type: ignore[assignment]
    module.on_fit_start()
    assert module.content_groups is None
    assert module.content_loss.lm_thresholds == (0.3,) and module.content_loss.em_thresholds == (0.2, 0.6)
    assert module.content_loss.em_to_lm == (0, 1, 0)
    assert not (tmp_path / "content_groups.json").exists()


def test_auto_fits_once_writes_the_report_and_stores_the_fit(pan_protein_stores, tmp_path: Path) -> None:
    module = _module({"auto": True, "sample_voxels": 100_000, "sample_patches": 8}, tmp_path)
    module._trainer = _FakeTrainer(_datamodule(pan_protein_stores))  # type: ignore[assignment]
    module.on_fit_start()
    fit = module.content_groups
    assert fit is not None and fit.em_to_lm == (1, 0, 0)
    assert (
        module.content_loss.em_to_lm == fit.em_to_lm
        and module.content_loss.lm_thresholds == fit.lm_thresholds
    )
    stored = module.hparams["loss"]["content"]
    assert stored["em_to_lm"] == [1, 0, 0] and "lm_fractions" in stored and "score" in stored
    record = json.loads((tmp_path / "content_groups.json").read_text())
    assert record["lm_to_em"] == [[1, 2], [0]]
    assert Image.open(tmp_path / "content_groups.png").size[0] > 300

    # a module built from the stored hyper-parameters (load_from_checkpoint) or resumed never refits
    rebuilt = ExEMModule(**module.hparams)
    assert rebuilt.content_groups == fit
    rebuilt._trainer = _FakeTrainer(_datamodule(pan_protein_stores, path=str(tmp_path / "gone.zarr")))  # type: ignore[assignment]
    rebuilt.on_fit_start()  # would fail to open the (missing) data if it refitted
    resumed = _module({"auto": True}, tmp_path / "other")
    resumed.on_load_checkpoint({"hyper_parameters": dict(module.hparams)})
    assert resumed.content_groups == fit and resumed.content_loss.em_thresholds == fit.em_thresholds
    resumed._trainer = _FakeTrainer(_datamodule(pan_protein_stores))  # type: ignore[assignment]
    resumed.on_fit_start()
    assert resumed.content_groups == fit
    assert not (tmp_path / "other").exists()


def test_auto_without_a_datamodule_warns_and_keeps_the_configured_groups(
    caplog: pytest.LogCaptureFixture,
) -> None:
    module = _module({"auto": True, "lm_thresholds": [0.3]})
    module._trainer = _FakeTrainer(None)  # type: ignore[arg-type,assignment]
    with caplog.at_level("WARNING", logger="exem.module"):
        module.on_fit_start()
    assert module.content_groups is None and module.content_loss.lm_thresholds == (0.3,)
    assert "content groups not fitted" in caplog.text


def test_content_loss_groups_are_numbered_dark_to_bright() -> None:
    from exem.losses import intensity_groups

    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 1, 3)
    dark, mid, bright = intensity_groups(x, [0.25, 0.75], slope=1000.0)
    assert dark.flatten().tolist() == pytest.approx([1, 0, 0], abs=1e-6)
    assert mid.flatten().tolist() == pytest.approx([0, 1, 0], abs=1e-6)
    assert bright.flatten().tolist() == pytest.approx([0, 0, 1], abs=1e-6)
    groups = intensity_groups(torch.rand(2, 1, 2, 4, 4), [0.2, 0.4, 0.6, 0.8], slope=50.0)
    assert len(groups) == 5 and torch.allclose(sum(groups), torch.ones(2, 1, 2, 4, 4))


# ------------------------------------------------------------------------------------------ exem-calibrate


def test_exem_calibrate_console_script(pan_protein_stores, tmp_path: Path) -> None:
    lm, em = pan_protein_stores
    proc = run_cli(
        "exem-calibrate",
        f"data.lm.path={lm}",
        f"data.em.path={em}",
        "data.patch_size=[4,32,32]",
        "model.loss.content.sample_voxels=100000",
        "out_dir=calib",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    record = json.loads(lines[-1])
    assert record["lm_to_em"] == [[1, 2], [0]] and record["em_to_lm"] == [1, 0, 0]
    assert record["lm_thresholds"][0] == pytest.approx(np.mean(LM_MEANS), abs=0.03)
    assert "domain  group" in proc.stdout and "auto: false" in proc.stdout
    assert (tmp_path / "calib" / "content_groups.png").is_file()
    assert json.loads((tmp_path / "calib" / "content_groups.json").read_text())["em_to_lm"] == [1, 0, 0]


class _RankStrategy:
    """A DDP strategy's broadcast as rank ``r`` sees it: rank 0 gets its own object back, another rank rank 0's."""

    def __init__(self, from_rank0: object = None) -> None:
        self.from_rank0 = from_rank0
        self.sent: list[object] = []

    def broadcast(self, obj: object, src: int = 0) -> object:
        self.sent.append(obj)
        return obj if self.from_rank0 is None else self.from_rank0


def _rank_trainer(rank: int, strategy: _RankStrategy) -> _FakeTrainer:
    trainer = _FakeTrainer(None)  # type: ignore[arg-type]
    trainer.is_global_zero, trainer.world_size, trainer.strategy = rank == 0, 2, strategy
    return trainer


def test_rank_0_failing_to_fit_the_groups_tells_the_other_ranks(monkeypatch, tmp_path: Path) -> None:
    """Under DDP a rank-0 error other than CalibrationError (here the report's disk) still reaches the broadcast
    the other ranks wait in: rank 0 raises its own error, the others one line naming it (they used to wait there
    until the process group's timeout)."""
    import exem.module
    from exem.errors import OtherRankError

    def disk_full(datamodule, settings):  # noqa: ANN001, ANN202
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(exem.module, "fit_from_datamodule", disk_full)
    module = _module({"auto": True}, tmp_path)
    strategy = _RankStrategy()
    module._trainer = _rank_trainer(0, strategy)  # type: ignore[assignment]
    with pytest.raises(OSError, match="No space left"):
        module.fit_content_groups(None)
    ((fit, line, failed),) = strategy.sent
    assert fit is None and failed is True and "No space left on device" in line

    other = _module({"auto": True}, tmp_path)
    other._trainer = _rank_trainer(1, _RankStrategy(from_rank0=(fit, line, failed)))  # type: ignore[assignment]
    with pytest.raises(
        OtherRankError, match="rank 0 of 2 failed while fitting the content groups: .*No space"
    ):
        other.fit_content_groups(None)
    # a CalibrationError stays what every rank raises
    calib = _module({"auto": True}, tmp_path)
    calib._trainer = _rank_trainer(1, _RankStrategy(from_rank0=(None, "too few voxels", False)))  # type: ignore[assignment]
    with pytest.raises(CalibrationError, match="too few voxels"):
        calib.fit_content_groups(None)
