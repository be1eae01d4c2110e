"""A gloo process group is destroyed before the interpreter finalizes (exem.gloo_exit).

The abort it prevents (a gloo worker thread dropping a finished collective's tensors while the interpreter
finalizes) is a race seen in about one run in ten of
``tests/test_translate.py::test_ddp_rank_0_failing_to_create_the_output_stops_the_others``; these tests check the
mechanism and where exem sets it up, deterministically.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import exem.gloo_exit
import exem.inference.ranks
import exem.module
from exem.inference.ranks import together
from exem.module import ExEMModule

EXIT_SCRIPT = textwrap.dedent(
    """
    import atexit, sys
    import torch.distributed as dist
    from exem.gloo_exit import destroy_gloo_at_exit

    dist.init_process_group("gloo", init_method=sys.argv[1], rank=0, world_size=1)
    # registered first, so it runs last: after exem's handler, still before the interpreter finalizes
    atexit.register(lambda: print(f"initialized at exit: {dist.is_initialized()}", flush=True))
    destroy_gloo_at_exit()
    destroy_gloo_at_exit()  # once per process
    sys.exit(1)  # as a rank that failed at a meeting point exits
    """
)


def test_the_gloo_group_is_gone_before_the_interpreter_finalizes(tmp_path: Path) -> None:
    script = tmp_path / "exit.py"
    script.write_text(EXIT_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), f"file://{tmp_path / 'store'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stdout.strip() == "initialized at exit: False", proc.stdout + proc.stderr[-2000:]


def test_without_a_process_group_nothing_is_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    registered: list[object] = []
    monkeypatch.setattr(exem.gloo_exit.atexit, "register", registered.append)
    monkeypatch.setattr(exem.gloo_exit, "_registered", False)
    assert not torch.distributed.is_initialized()
    exem.gloo_exit.destroy_gloo_at_exit()
    assert registered == []


def test_a_meeting_under_ddp_sets_it_up_and_one_process_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[None] = []
    monkeypatch.setattr(exem.inference.ranks, "destroy_gloo_at_exit", lambda: calls.append(None))
    one = SimpleNamespace(world_size=1, global_rank=0, strategy=None)
    with together(one, "while testing"):
        pass
    assert calls == []
    strategy = SimpleNamespace(root_device=torch.device("cpu"), reduce=lambda t, reduce_op: t)
    two = SimpleNamespace(world_size=2, global_rank=0, strategy=strategy)
    with together(two, "while testing"):
        pass
    assert calls == [None]


def test_training_sets_it_up_at_fit_start(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[None] = []
    monkeypatch.setattr(exem.module, "destroy_gloo_at_exit", lambda: calls.append(None))
    module = ExEMModule(
        generator={"widths": [4, 8]},
        discriminator={"num_scales": 1, "base_filters": 4},
        loss={"content": {"auto": False}},
    )
    module._trainer = SimpleNamespace(  # type: ignore[assignment]
        datamodule=None, is_global_zero=True, world_size=2, strategy=None
    )
    module.on_fit_start()
    assert calls == [None]
