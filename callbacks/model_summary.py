"""The model summary printed at the start of a fit, without Lightning's FLOPs column.

pytorch-lightning 2.6's summary has a ``FLOPs`` column and a ``Total FLOPs`` line, measured on
the module's ``example_input_array``. beamvq's module has none (a forward on a made-up input
would run the code bank's k-means initialisation on it and move the random streams), so every
row read ``0``: a wrong figure. ``ParameterSummary`` prints the same Rich table and totals
without it; the CLI adds it unless the configuration names a summary callback or sets
``trainer.enable_model_summary: false``. FLOPs per forecast are measured by
``benchmarks/backbones.py``.
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.callbacks import RichModelSummary
from pytorch_lightning.utilities.model_summary.model_summary import (
    get_formatted_model_size,
    get_human_readable_count,
)

from beamvq.callbacks.checks import at_least

__all__ = ["ParameterSummary", "summary_columns"]

DROPPED = ("FLOPs",)


def summary_columns(summary_data: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    """Lightning's summary columns without the dropped ones."""
    return [(name, values) for name, values in summary_data if name not in DROPPED]


class ParameterSummary(RichModelSummary):
    """``RichModelSummary`` without the FLOPs column and total (see the module docstring).

    Args:
        max_depth: the depth of submodules listed (-1: all, 0: none), as Lightning's.
    """

    def __init__(self, max_depth: int = 1, **summarize_kwargs: Any) -> None:
        at_least("ParameterSummary", -1, max_depth=max_depth)
        super().__init__(max_depth, **summarize_kwargs)

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int = 0,
        **summarize_kwargs: Any,
    ) -> None:
        from rich import get_console
        from rich.table import Table

        columns = summary_columns(summary_data)
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            right = name in ("Params", "Params per Device", "In sizes", "Out sizes")
            table.add_column(name, justify="right" if right else "left", no_wrap=name == "Name")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        grid = Table.grid(expand=True)
        grid.add_column()
        frozen = total_parameters - trainable_parameters
        grid.add_row(
            f"[bold]Trainable params[/]: {get_human_readable_count(int(trainable_parameters))}"
        )
        grid.add_row(f"[bold]Non-trainable params[/]: {get_human_readable_count(int(frozen))}")
        grid.add_row(f"[bold]Total params[/]: {get_human_readable_count(int(total_parameters))}")
        grid.add_row(
            f"[bold]Total estimated model params size (MB)[/]: {get_formatted_model_size(model_size)}"
        )
        grid.add_row(f"[bold]Modules in train mode[/]: {total_training_modes['train']}")
        grid.add_row(f"[bold]Modules in eval mode[/]: {total_training_modes['eval']}")
        console.print(grid)
