"""The notebooks run top to bottom (nbclient), on CPU, with a short training run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
ORDER = [  # 02 and 03 reuse 01's translator
    "01_quickstart.ipynb",
    "02_segment_virtual_em.ipynb",
    "03_antibodies_per_mitochondrion.ipynb",
]


def test_notebooks_list_is_complete() -> None:
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(ORDER)


@pytest.mark.slow  # ~3-4 min on 2 cores: `make test-slow`
@pytest.mark.timeout(900)
def test_notebooks_run_top_to_bottom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXEM_NOTEBOOK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("EXEM_NOTEBOOK_STEPS", os.environ.get("EXEM_NOTEBOOK_STEPS", "30"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ORDER:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        for cell in nb.cells:  # the stored outputs must not count: only what this run shows
            if cell.cell_type == "code":
                cell.outputs = []
        client = nbclient.NotebookClient(
            nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        )
        client.execute()  # raises CellExecutionError with the failing cell's traceback
        errors = [
            o
            for c in nb.cells
            if c.cell_type == "code"
            for o in c.get("outputs", [])
            if o.output_type == "error"
        ]
        assert not errors, f"{name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
        images = [
            o
            for c in nb.cells
            if c.cell_type == "code"
            for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})
        ]
        assert images, f"{name} showed no picture"
    work = tmp_path / "work"
    assert (work / "virtual_em_test.ome.zarr").is_dir() and (
        work / "virtual_em_test_uncertainty.ome.zarr"
    ).is_dir()
    assert (work / "evaluation" / "evaluation.csv").is_file()
    assert (work / "antibody_per_mito" / "objects.parquet").is_file()
