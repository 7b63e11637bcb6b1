"""The typer app and consoles that every command module registers with."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from segens.errors import SegensError

WORKFLOW = ("demo", "synth", "selfcheck", "folds", "train-member", "predict-member", "inspect", "search-weights",
            "combine", "evaluate", "qc", "pseudo-label", "show")
"""The commands in the order a user meets them; ``ens --help`` lists them so."""


class _WorkflowOrder(TyperGroup):
    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda name: WORKFLOW.index(name) if name in WORKFLOW else len(WORKFLOW))


app = typer.Typer(
    name="ens",
    cls=_WorkflowOrder,
    help=(
        "segens: turn k-fold segmentation checkpoints into a reproducible, searched ensemble.\n\n"
        "Hand-bone X-rays, 29 overlapping classes, Dice, RLE submissions.\n\n"
        "Example: ens synth data/ --size 512   then   ens evaluate submission.csv --data data/"
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
output = Console()


def main() -> None:
    """Console entry point: bad input is one clear line on stderr and exit status 2, never a traceback."""
    try:
        app()
    except SegensError as error:
        console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(2)
