"""The model table ``exem-train`` shows before training: each top-level module, its type and its parameters.

Lightning's own summary adds a FLOPs column and a "Total FLOPs" line that read 0 unless the LightningModule has an
``example_input_array`` (whose forward pass, at published widths, would cost seconds at every start), a "Mode"
column that is ``train`` for every module during fit, and module counts per mode. :class:`ModelTable` shows the
names, types and parameters (and FLOPs or sizes only when Lightning measured them), then one line of totals.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count

__all__ = ["ModelTable", "totals_line"]

# Lightning's columns that say nothing during fit (every module is in train mode).
_HIDDEN = ("Mode",)
_RIGHT = ("Params", "Params per Device", "FLOPs", "In sizes", "Out sizes")


def _count(n: int) -> str:
    return get_human_readable_count(int(n)).strip()  # (Lightning's pads counts below 1000)


def totals_line(total: int, trainable: int, size_mb: float, flops: int = 0) -> str:
    """``"1.4 M parameters (all trainable), 5.5 MB"``; frozen parameters and FLOPs (when measured) are named."""
    frozen = total - trainable
    which = "all trainable" if frozen == 0 else f"{_count(frozen)} frozen"
    line = f"{_count(total)} parameters ({which}), {size_mb:.1f} MB"
    return line + (f", {_count(flops)} FLOPs per forward pass" if flops else "")


class ModelTable(ModelSummary):
    """Lightning's ``ModelSummary`` callback with exem's table (module name, type, parameters) and one totals line.

    ``max_depth`` as Lightning's: 1 = the top-level modules (generators, discriminators, losses); 0 = no table.
    """

    @staticmethod
    def summarize(
        summary_data: Sequence[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from rich import get_console
        from rich.table import Table

        columns = [
            (name, values)
            for name, values in summary_data
            if name not in _HIDDEN and (name != "FLOPs" or total_flops > 0)
        ]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold"))
        for name, _ in columns:
            table.add_column(name, justify="right" if name in _RIGHT else "left", no_wrap=name == "Name")
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        console.print(totals_line(total_parameters, trainable_parameters, model_size, total_flops))
