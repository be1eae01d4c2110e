"""Synthetic neuropil phantoms, their EM-like / ExM-like renderings and the OME-Zarr dataset writer."""

from __future__ import annotations

import inspect
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy import ndimage as ndi

from exem.config import compose_config
from exem.data.ome import level_scale, read_multiscales
from exem.data.synthetic import (
    SEMANTIC_CLASSES,
    EMRenderParams,
    ExMRenderParams,
    Phantom,
    PhantomParams,
    make_phantom,
    render_em,
    render_exm,
    write_synthetic_dataset,
)
from tests.conftest import run_cli

SMALL = (16, 64, 64)
VOXEL = (40.0, 10.0, 10.0)
ARRAYS = ("cells", "membrane", "mito", "cristae", "vesicles", "semantic")


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    """A phantom large enough to hold every class."""
    return make_phantom((32, 128, 128), seed=0, voxel_size_nm=VOXEL)


@pytest.fixture(scope="module")
def em(phantom: Phantom) -> np.ndarray:
    return render_em(phantom, seed=0)


@pytest.fixture(scope="module")
def exm(phantom: Phantom) -> np.ndarray:
    return render_exm(phantom, seed=0)


def gradient_power(a: np.ndarray, b: np.ndarray) -> float:
    """Mean product of the in-plane gradients of two renderings of one phantom / their 1-99 % range squared.

    With independent noise in ``a`` and ``b`` the noise averages out: this measures the signal's sharpness.
    """
    a, b = a.astype(np.float64), b.astype(np.float64)
    ga, gb = np.gradient(a, axis=(1, 2)), np.gradient(b, axis=(1, 2))
    lo, hi = np.percentile((a + b) / 2, [1, 99])
    return float((ga[0] * gb[0] + ga[1] * gb[1]).mean() / (hi - lo) ** 2)


# --- the phantom ---------------------------------------------------------------------------------------


def test_phantom_dtypes_and_shapes() -> None:
    ph = make_phantom(SMALL, seed=0, voxel_size_nm=VOXEL)
    assert ph.shape == SMALL
    assert ph.voxel_size_nm == VOXEL
    expected = {
        "cells": np.uint32,
        "membrane": np.bool_,
        "mito": np.uint32,
        "cristae": np.bool_,
        "vesicles": np.bool_,
        "semantic": np.uint8,
    }
    for name, dtype in expected.items():
        arr = getattr(ph, name)
        assert arr.shape == SMALL, name
        assert arr.dtype == dtype, name
    assert ph.cells.min() >= 1  # every voxel belongs to a cell
    ids = np.unique(ph.cells)
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))  # consecutive ids


def test_phantom_deterministic_and_seed_dependent() -> None:
    a = make_phantom(SMALL, seed=5)
    b = make_phantom(SMALL, seed=5)
    c = make_phantom(SMALL, seed=6)
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert not np.array_equal(a.cells, c.cells)
    assert not np.array_equal(a.semantic, c.semantic)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_all_semantic_classes_present(seed: int) -> None:
    ph = make_phantom((32, 128, 128), seed=seed, voxel_size_nm=VOXEL)
    counts = np.bincount(ph.semantic.ravel(), minlength=len(SEMANTIC_CLASSES))
    assert len(counts) == len(SEMANTIC_CLASSES)
    assert (counts > 0).all(), counts
    assert counts[0] > counts[2] > 0 and counts[1] > counts[3] > 0  # cytoplasm dominates, vesicles are rare
    assert ph.mito.max() >= 2
    assert ph.cristae.any()
    assert len(np.unique(ph.cells)) >= 5


def test_semantic_matches_masks(phantom: Phantom) -> None:
    sem = phantom.semantic
    np.testing.assert_array_equal(sem == 1, phantom.membrane)
    np.testing.assert_array_equal(sem == 2, phantom.mito > 0)
    np.testing.assert_array_equal(sem == 3, phantom.vesicles)
    assert not (phantom.cristae & (phantom.mito == 0)).any()  # cristae only inside mitochondria
    assert phantom.cristae.sum() < 0.6 * (phantom.mito > 0).sum()  # stripes, not solid


def test_mitochondria_inside_one_cell_off_membranes(phantom: Phantom) -> None:
    mito = phantom.mito
    assert not (mito > 0)[phantom.membrane].any()
    ids = np.unique(mito[mito > 0])
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
    for i in ids:
        hosts = np.unique(phantom.cells[mito == i])
        assert len(hosts) == 1, f"mitochondrion {i} spans cells {hosts}"


def test_mitochondria_are_elongated(phantom: Phantom) -> None:
    """Physical extent: longest principal axis clearly longer than the shortest one for most mitochondria."""
    vs = np.asarray(phantom.voxel_size_nm)
    ratios = []
    for sl, i in zip(ndi.find_objects(phantom.mito), range(1, phantom.mito.max() + 1), strict=True):
        pts = np.argwhere(phantom.mito[sl] == i) * vs
        if len(pts) < 50:
            continue
        ev = np.linalg.eigvalsh(np.cov(pts.T))
        ratios.append(np.sqrt(ev[-1] / max(ev[0], 1e-9)))
    assert len(ratios) >= 3
    assert np.median(ratios) > 1.5


def test_vesicles_are_clustered_and_off_membranes(phantom: Phantom) -> None:
    ves = phantom.vesicles
    assert not (ves & phantom.membrane).any()
    assert not (ves & (phantom.mito > 0)).any()
    # clustered: most vesicle voxels have another vesicle within ~100 nm (10 px) in their slice
    near = ndi.uniform_filter(ves.astype(np.float32), (1, 21, 21)) * 21 * 21
    assert np.mean(near[ves] > 30) > 0.8


def test_geometry_is_physical() -> None:
    """The same physical region at other voxel sizes has about the same cells and mitochondria."""
    aniso = make_phantom((32, 128, 128), seed=4, voxel_size_nm=(40.0, 10.0, 10.0))
    iso = make_phantom((64, 64, 64), seed=4, voxel_size_nm=(20.0, 20.0, 20.0))
    assert aniso.cells.max() == iso.cells.max()  # curves are sampled in nm: same count
    frac_a = (aniso.mito > 0).mean()
    frac_i = (iso.mito > 0).mean()
    assert 0.4 < frac_a / frac_i < 2.5


def test_params_are_used() -> None:
    few = make_phantom(SMALL, seed=0, params=PhantomParams(cell_diameter_nm=600.0))
    many = make_phantom(SMALL, seed=0, params=PhantomParams(cell_diameter_nm=200.0))
    assert many.cells.max() > few.cells.max()
    thick = make_phantom(SMALL, seed=0, params=PhantomParams(membrane_thickness_nm=60.0))
    thin = make_phantom(SMALL, seed=0, params=PhantomParams(membrane_thickness_nm=20.0))
    assert thick.membrane.mean() > 1.3 * thin.membrane.mean()


@pytest.mark.parametrize(
    "kwargs",
    [{"shape": (16, 64)}, {"shape": (0, 64, 64)}, {"voxel_size_nm": (40, 0, 10)}, {"seed": -1}],
)
def test_bad_arguments(kwargs: dict) -> None:
    args = {"shape": SMALL, "seed": 0, "voxel_size_nm": VOXEL, **kwargs}
    with pytest.raises(ValueError):
        make_phantom(**args)


def test_tiny_volume_works() -> None:
    ph = make_phantom((2, 8, 8), seed=3)
    assert render_em(ph).shape == (2, 8, 8)
    assert render_exm(ph).shape == (2, 8, 8)


# --- renderings ----------------------------------------------------------------------------------------


def test_render_dtypes_shapes_deterministic(phantom: Phantom, em: np.ndarray, exm: np.ndarray) -> None:
    assert em.dtype == np.uint8 and em.shape == phantom.shape
    assert exm.dtype == np.uint16 and exm.shape == phantom.shape
    np.testing.assert_array_equal(em, render_em(phantom, seed=0))
    np.testing.assert_array_equal(exm, render_exm(phantom, seed=0))
    assert not np.array_equal(em, render_em(phantom, seed=1))
    assert not np.array_equal(exm, render_exm(phantom, seed=1))


def test_em_contrast(phantom: Phantom, em: np.ndarray) -> None:
    sem = phantom.semantic
    cyto = em[sem == 0].mean()
    assert 140 < cyto < 180
    assert em[sem == 1].mean() < cyto - 60  # dark membranes
    assert em[sem == 2].mean() < cyto - 25  # darker mitochondria
    assert (
        em[phantom.cristae].mean() < em[(phantom.mito > 0) & ~phantom.cristae].mean() - 10
    )  # darker cristae
    assert em[sem == 3].mean() < cyto - 10  # dark-rimmed vesicles
    # slight per-slice brightness variation
    per_slice = np.array([em[z][sem[z] == 0].mean() for z in range(em.shape[0])])
    assert 0.3 < per_slice.std() < 10


def test_exm_contrast_and_range(phantom: Phantom, exm: np.ndarray) -> None:
    sem = phantom.semantic
    cyto = exm[sem == 0].mean()
    assert exm[sem == 1].mean() > 1.5 * cyto  # bright membranes
    assert exm[sem == 2].mean() > 1.5 * cyto  # bright mitochondria
    assert exm[sem == 3].mean() > 1.1 * cyto  # bright-ish vesicle clusters
    lo, hi = np.percentile(exm, [0.1, 99.9])
    assert 50 <= lo < 400 and 1500 < hi < 6000  # a realistic part of the uint16 range


def test_exm_is_noisy_with_shot_noise(phantom: Phantom, exm: np.ndarray) -> None:
    other = render_exm(phantom, seed=1).astype(np.float64)
    diff = other - exm
    p = ExMRenderParams()
    # Poisson: var(counts) ≈ gain · (mean − offset) (+ read noise), per render; the difference has twice that
    mean = (other + exm) / 2
    bright = mean > np.percentile(mean, 90)
    expected = 2 * (p.gain * (mean[bright] - p.offset)).mean()
    assert 0.5 < diff[bright].var() / expected < 2.0
    quiet = render_exm(
        phantom, seed=1, params=ExMRenderParams(photons=1e5, background_photons=1e3, gain=0.02)
    )
    assert np.abs(np.diff(quiet.astype(float), axis=2)).mean() < np.abs(np.diff(other, axis=2)).mean()


def test_exm_blurrier_than_em(phantom: Phantom, em: np.ndarray, exm: np.ndarray) -> None:
    em_power = gradient_power(em, render_em(phantom, seed=1))
    exm_power = gradient_power(exm, render_exm(phantom, seed=1))
    assert exm_power < 0.4 * em_power
    # also without any noise
    clean = render_exm(phantom, params=ExMRenderParams(photons=1e5, read_noise=0.0, gain=0.04))
    sharp = render_em(phantom, params=EMRenderParams(noise_std=0.0))
    assert gradient_power(clean, clean) < 0.4 * gradient_power(sharp, sharp)


def test_em_params_are_used(phantom: Phantom) -> None:
    dark = render_em(phantom, params=EMRenderParams(membrane=20.0, noise_std=0.0))
    light = render_em(phantom, params=EMRenderParams(membrane=100.0, noise_std=0.0))
    assert dark[phantom.membrane].mean() < light[phantom.membrane].mean() - 50


@pytest.mark.timeout(120)
def test_full_size_timing() -> None:
    """128×256×256 labels and both renderings in well under 30 s (about 5 s on 2 cores)."""
    t0 = time.perf_counter()
    ph = make_phantom((128, 256, 256), seed=0)
    em = render_em(ph)
    exm = render_exm(ph)
    elapsed = time.perf_counter() - t0
    assert em.shape == exm.shape == (128, 256, 256)
    assert elapsed < 30, f"{elapsed:.1f} s"


# --- the dataset on disk -------------------------------------------------------------------------------

NAMES = {
    "exm_train", "em_train", "em_train_paired", "exm_test", "em_test", "labels_test", "mito_test", "antibody_test",
    "exm_antibody_test",
}  # fmt: skip


def _mtimes(paths: dict[str, Path]) -> dict[str, int]:
    return {k: (p / "0" / "zarr.json").stat().st_mtime_ns for k, p in paths.items()}


def test_write_synthetic_dataset(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "syn"
    paths = write_synthetic_dataset(
        out, shape=SMALL, seeds={"lm": 11, "em": 12, "test": 13}, voxel_size_nm=VOXEL
    )
    assert set(paths) == NAMES
    dtypes = {"exm": np.uint16, "em": np.uint8, "labels": None}
    seeds = {"exm_train": 11, "em_train": 12, "em_train_paired": 11}
    for name, path in paths.items():
        assert path == out / f"{name}.zarr" and path.is_dir()
        group = zarr.open_group(str(path), mode="r")
        assert "0" in group and "1" in group
        ms = read_multiscales(group)
        assert ms is not None
        assert level_scale(ms, 0) == ("0", VOXEL)
        assert level_scale(ms, 1) == ("1", (40.0, 20.0, 20.0))
        lead = (2,) if name == "exm_antibody_test" else ()  # the two-channel sample
        assert group["0"].shape == lead + SMALL and group["1"].shape == lead + (16, 32, 32)
        meta = group.attrs["exem_synthetic"]
        assert meta["seed"] == seeds.get(name, 13)
        assert meta["shape"] == list(SMALL)
        assert meta["kind"] in dtypes
        if dtypes[meta["kind"]] is not None:
            assert group["0"].dtype == dtypes[meta["kind"]]
    assert zarr.open_array(str(paths["labels_test"] / "0"), mode="r").dtype == np.uint8
    assert zarr.open_array(str(paths["mito_test"] / "0"), mode="r").dtype == np.uint32
    assert not list(out.glob(".*tmp*"))  # no temporary leftovers

    # the antibody marks 40 % of the held-out mitochondria, brighter inside them; the sample holds both channels
    from exem.data.volume import open_volume

    mito = zarr.open_group(str(paths["mito_test"]), mode="r")["0"][:]
    antibody = zarr.open_group(str(paths["antibody_test"]), mode="r")["0"][:].astype(np.float64)
    positive = zarr.open_group(str(paths["antibody_test"]), mode="r").attrs["exem_synthetic"][
        "antibody_positive_mito_ids"
    ]
    ids = np.unique(mito[mito > 0])
    assert len(positive) == max(1, round(0.4 * ids.size)) and set(positive) <= set(ids.tolist())
    inside = np.isin(mito, positive)
    assert antibody[inside].mean() > 2 * antibody[~inside].mean()
    sample = open_volume(paths["exm_antibody_test"], channel="antibody")
    assert sample.channel_names == ("nhs_ester", "antibody")
    assert np.array_equal(sample.read((slice(None),) * 3), antibody.astype(np.uint16))

    # the test pair is one phantom rendered twice; its labels match make_phantom's
    ph = make_phantom(SMALL, seed=13, voxel_size_nm=VOXEL)
    labels = zarr.open_array(str(paths["labels_test"] / "0"), mode="r")[...]
    np.testing.assert_array_equal(labels, ph.semantic)
    np.testing.assert_array_equal(zarr.open_array(str(paths["mito_test"] / "0"), mode="r")[...], ph.mito)
    # label pyramids are subsampled, never averaged
    coarse = zarr.open_array(str(paths["labels_test"] / "1"), mode="r")[...]
    np.testing.assert_array_equal(coarse, ph.semantic[:, ::2, ::2])
    em_test = zarr.open_array(str(paths["em_test"] / "0"), mode="r")[...]
    exm_test = zarr.open_array(str(paths["exm_test"] / "0"), mode="r")[...]
    assert em_test[labels == 1].mean() < em_test[labels == 0].mean() - 50
    assert exm_test[labels == 1].mean() > 1.3 * exm_test[labels == 0].mean()
    # training domains are unpaired: different phantoms
    em_train = zarr.open_array(str(paths["em_train"] / "0"), mode="r")[...]
    paired = zarr.open_array(str(paths["em_train_paired"] / "0"), mode="r")[...]
    assert not np.array_equal(em_train, paired)

    # reuse: nothing is rewritten and the log says so
    before = _mtimes(paths)
    with caplog.at_level(logging.INFO, logger="exem.data.synthetic"):
        again = write_synthetic_dataset(
            out, shape=SMALL, seeds={"lm": 11, "em": 12, "test": 13}, voxel_size_nm=VOXEL
        )
    assert again == paths
    assert _mtimes(paths) == before
    assert any("reusing" in r.getMessage() for r in caplog.records)

    # partial: only the missing output is written again
    shutil.rmtree(paths["em_test"])
    write_synthetic_dataset(out, shape=SMALL, seeds={"lm": 11, "em": 12, "test": 13}, voxel_size_nm=VOXEL)
    after = _mtimes(paths)
    assert {k for k in paths if after[k] != before[k]} == {"em_test"}
    np.testing.assert_array_equal(zarr.open_array(str(paths["em_test"] / "0"), mode="r")[...], em_test)

    # other settings without overwrite: a clear error; with overwrite: regenerated
    with pytest.raises(
        FileExistsError, match=r"overwrite=true replaces it \(exem-train: synthetic\.overwrite=true\)"
    ):
        write_synthetic_dataset(out, shape=SMALL, seeds={"lm": 21, "em": 12, "test": 13}, voxel_size_nm=VOXEL)
    # ... and the key that message names exists in the training config that writes phantoms
    demo = compose_config(["experiment=demo", "synthetic.overwrite=true"], output_dir=tmp_path / "run")
    assert demo.synthetic.overwrite is True
    assert set(demo.synthetic) <= set(inspect.signature(write_synthetic_dataset).parameters)
    write_synthetic_dataset(
        out, shape=SMALL, seeds={"lm": 21, "em": 12, "test": 13}, voxel_size_nm=VOXEL, overwrite=True
    )
    assert zarr.open_group(str(paths["exm_train"]), mode="r").attrs["exem_synthetic"]["seed"] == 21


def test_synth_cli_lists_each_file_once_in_one_column(tmp_path: Path) -> None:
    proc = run_cli(
        "exem-synth", f"out_dir={tmp_path / 'syn'}", f"shape=[{','.join(map(str, SMALL))}]", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = [ln for ln in proc.stdout.splitlines() if ln.split()[0] in NAMES]
    assert sorted(ln.split()[0] for ln in listed) == sorted(NAMES)
    assert len({ln.index(str(tmp_path)) for ln in listed}) == 1  # the paths start in one column
    assert "wrote " not in proc.stdout  # the library's record of each file: the list says it once


def test_write_synthetic_dataset_defaults_and_validation(tmp_path: Path) -> None:
    paths = write_synthetic_dataset(tmp_path, shape=(8, 32, 32))
    seeds = {n: zarr.open_group(str(p), mode="r").attrs["exem_synthetic"]["seed"] for n, p in paths.items()}
    assert seeds["exm_train"] == 1 and seeds["em_train"] == 2 and seeds["em_test"] == 3
    with pytest.raises(ValueError, match="unknown seed"):
        write_synthetic_dataset(tmp_path / "x", shape=(8, 32, 32), seeds={"train": 1})
