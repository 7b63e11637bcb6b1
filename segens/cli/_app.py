"""The typer app and consoles that every command module registers with."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from segens.errors import SegensError

app = typer.Typer(
    name="ens",
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
        console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
