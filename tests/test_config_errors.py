"""Configuration errors as one line: an unknown key names the keys spelt alike (exem.errors.unknown_key_line)."""

from __future__ import annotations

from pathlib import Path

import pytest

from exem.config import compose_config, config_groups
from exem.errors import config_error_line


def _line(tmp_path: Path, config_name: str, *overrides: str, groups: bool = True) -> str:
    with pytest.raises(Exception) as info:  # noqa: PT011 - Hydra's composition error, whatever its class
        compose_config(list(overrides), output_dir=tmp_path, config_name=config_name)
    return config_error_line(info.value, config_groups(config_name) if groups else ())


def test_config_groups_are_the_defaults_lists_groups() -> None:
    assert config_groups("translate") == ["trainer", "paths"]
    assert {"experiment", "hparams_search", "trainer", "model"} <= set(config_groups("train"))
    assert config_groups("measure") == []


def test_a_misspelt_key_names_the_key_meant(tmp_path: Path) -> None:
    assert _line(tmp_path, "translate", "inptu=x.zarr") == "unknown option 'inptu'; did you mean 'input'?"
    assert (
        _line(tmp_path, "evaluate", "exm_chanel=1")
        == "unknown option 'exm_chanel'; did you mean 'exm_channel'?"
    )
    nested = _line(tmp_path, "train", "model.generator.width=[4,8]")
    assert nested == "unknown option 'model.generator.width'; did you mean 'model.generator.widths'?"


def test_a_misspelt_group_is_suggested_only_where_the_command_has_it(tmp_path: Path) -> None:
    assert "did you mean 'experiment'?" in _line(tmp_path, "train", "experimnt=demo")
    assert "experiment" not in _line(tmp_path, "train", "experimnt=demo", groups=False)
    assert "experiment" not in _line(tmp_path, "translate", "experimnt=demo")


def test_an_unknown_key_lists_the_known_ones_and_plumbing_is_not_offered(tmp_path: Path) -> None:
    line = _line(tmp_path, "segment", "segmenter=mito.pt")
    assert line.startswith("unknown option 'segmenter'; known options: batch_size, ")
    assert "'segment'" not in line and " segment," not in line  # the instantiate node behind the command
    assert "model_file" in line and line.endswith(", …")  # more than MAX_KNOWN_SHOWN
    assert "+" not in line  # a new top-level key would do nothing


def test_plus_is_suggested_only_for_arguments_of_a_target(tmp_path: Path) -> None:
    line = _line(tmp_path, "train", "trainer.zzzq=1")
    assert line.startswith("unknown option 'trainer.zzzq'; known under 'trainer': accelerator, ")
    assert line.endswith("(a new argument of Trainer: +trainer.zzzq=…)")
    close = _line(tmp_path, "train", "trainer.max_stepz=3")
    assert "did you mean 'trainer.max_steps'" in close and "+" not in close


def test_other_config_errors_keep_hydras_message(tmp_path: Path) -> None:
    line = _line(tmp_path, "translate", "trainer=gpux")
    assert "Could not find 'trainer/gpux'" in line and "cpu ddp default gpu" in line and "\n" not in line


def test_a_group_of_another_command_is_refused_without_suggesting_plus(tmp_path: Path) -> None:
    # experiment= is exem-train's; Hydra suggested "+experiment=demo", which would merge a training experiment in
    line = _line(tmp_path, "translate", "experiment=demo")
    assert line == "this command has no experiment= option (its config groups: trainer, paths)"


def test_out_of_device_memory_is_one_line_without_the_allocators_advice() -> None:
    import torch

    from exem.errors import OOM_HINT, user_error, user_error_line

    message = (
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 GiB of which 1.06 GiB"
        " is free. Process 4242 has 78.04 GiB memory in use. Of the allocated memory 76.50 GiB is allocated by"
        " PyTorch, and 1.02 GiB is reserved by PyTorch but unallocated. If reserved but unallocated memory is large"
        " try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation"
        " for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
    )
    try:
        try:
            raise torch.OutOfMemoryError(message)
        except torch.OutOfMemoryError as oom:
            raise RuntimeError("compiled step failed") from oom  # found down the cause chain too
    except RuntimeError as exc:
        err = user_error(exc)
    assert isinstance(err, torch.OutOfMemoryError)
    assert user_error_line(err) == (
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 GiB of which 1.06 GiB"
        f" is free. Process 4242 has 78.04 GiB memory in use: {OOM_HINT}"
    )
