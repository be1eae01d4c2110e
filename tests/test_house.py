"""The house rules of exem's code, checked: small files, no reaching into other modules' private names, commands
whose configs name what they call."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "exem"
MAX_LINES = 600
CLI_MAX_LINES = 200


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if ".venv" not in p.parts)


def test_no_file_is_over_the_limit() -> None:
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in _modules()}
    too_long = {k: v for k, v in sizes.items() if v > MAX_LINES}
    assert not too_long, f"files over {MAX_LINES} lines: {too_long}"
    assert sizes["exem/cli.py"] <= CLI_MAX_LINES
    # most files hold one job: under 400 lines
    assert sum(v < 400 for v in sizes.values()) > 0.8 * len(sizes)


def _private_imports(source: str) -> list[str]:
    """``module.name`` of every private name imported from an exem module (``__dunder__`` names allowed)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "exem":
            found += [
                f"{node.module}.{a.name}"
                for a in node.names
                if a.name.startswith("_") and not a.name.startswith("__")
            ]
    return found


def test_no_module_imports_a_private_name_of_another() -> None:
    found = {p.relative_to(ROOT).as_posix(): _private_imports(p.read_text()) for p in _modules()}
    found = {k: v for k, v in found.items() if v}
    assert not found, found


def test_the_private_import_check_finds_one() -> None:
    source = "from exem.inference.plan import (\n    BlockPlan,\n    _axis_sizes,\n)\nfrom exem import __version__\n"
    assert _private_imports(source) == ["exem.inference.plan._axis_sizes"]


@pytest.mark.parametrize(
    ("config", "node", "target"),
    [
        ("translate", "translate", "exem.inference.translate.translate_volume"),
        ("translate", "generator", "exem.checkpoints.load_generator"),
        ("segment", "segment", "exem.analysis.segment.segment_volume"),
        ("evaluate", "evaluate", "exem.analysis.evaluate.evaluate"),
        ("export", "export", "exem.export.export_generator"),
        ("measure", "measure", "exem.analysis.measure.measure_objects"),
    ],
)
def test_command_configs_name_what_they_call(config: str, node: str, target: str) -> None:
    """Each command's config carries the ``_target_`` it calls, with keys the target accepts."""
    import importlib
    import inspect

    cfg = OmegaConf.load(ROOT / "conf" / f"{config}.yaml")
    assert cfg[node]["_target_"] == target
    module, name = target.rsplit(".", 1)
    fn = getattr(importlib.import_module(module), name)
    params = inspect.signature(fn).parameters
    keys = [k for k in cfg[node] if not k.startswith("_")]
    assert set(keys) <= set(params), (
        f"{config}.{node}: keys not accepted by {target}: {set(keys) - set(params)}"
    )
