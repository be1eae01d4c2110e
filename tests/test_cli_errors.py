"""`exem-train` turns bad input into one clear line on stderr and a non-zero exit (real entry point)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.conftest import run_cli

TINY = [
    "experiment=mouse_cortex",
    "trainer=cpu",
    "trainer.max_steps=2",
    "model.generator.widths=[4,8,16,32,64]",
    "model.discriminator.base_filters=4",
    "data.patch_size=[8,64,64]",
    "data.persistent_workers=false",
    "callbacks.progress_bar=null",
]


def _store(path: Path, data: np.ndarray) -> Path:
    arr = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=data.shape or (1,))
    arr[...] = data
    return path


def _good(tmp: Path, name: str = "good.zarr") -> Path:
    if (tmp / name).exists():
        return tmp / name
    return _store(tmp / name, np.random.default_rng(0).integers(0, 255, (16, 128, 128), dtype=np.uint8))


def _missing(tmp: Path) -> Path:
    return tmp / "nope.zarr"


def _corrupt(tmp: Path) -> Path:
    p = _good(tmp, "corrupt.zarr")
    (p / "zarr.json").write_text("{ this is not json")
    return p


def _two_d(tmp: Path) -> Path:
    return _store(tmp / "flat.zarr", np.zeros((128, 128), dtype=np.uint8))


def _complex(tmp: Path) -> Path:
    return _store(tmp / "complex.zarr", np.zeros((16, 128, 128), dtype=np.complex64))


def _small(tmp: Path) -> Path:
    return _store(tmp / "small.zarr", np.zeros((4, 128, 128), dtype=np.uint8))


def _nan(tmp: Path) -> Path:
    data = np.random.default_rng(0).random((16, 128, 128), dtype=np.float32)
    data[:, 40:60, 40:60] = np.nan
    return _store(tmp / "nan.zarr", data)


CASES = {
    "missing store": (_missing, [], "no such file"),
    "corrupt metadata": (_corrupt, [], "corrupt"),
    "not 3D": (_two_d, [], "3D"),
    "unsupported dtype": (_complex, [], "complex"),
    "patch larger than volume": (_small, [], "larger than"),
    "NaN in data": (_nan, ["data.num_workers=1"], "NaN"),
    "XY not divisible": (_good, ["data.patch_size=[8,72,72]"], "divisible by 16"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_lm_input_is_one_line(case: str, tmp_path: Path) -> None:
    make, extra, needle = CASES[case]
    lm = make(tmp_path)
    em = _good(tmp_path)
    proc = run_cli(
        "exem-train", *TINY, f"data.lm.path={lm}", f"data.em.path={em}", *extra,
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("exem-train: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert needle.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in proc.stderr
