"""Rich progress bars with rates, shared by every long job (training, prediction, combining, search)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``3.2 img/s``."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:.2f} {self.unit}/s", style="progress.data.speed")


def progress_bar(unit: str = "img", disable: bool = False, extra: tuple[ProgressColumn, ...] = (),
                 transient: bool = False) -> Progress:
    """A bar: description, bar, done/total, rate, extra columns, elapsed and remaining time, on stderr."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit), *extra,
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=disable, transient=transient)
