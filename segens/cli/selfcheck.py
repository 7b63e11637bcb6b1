"""``ens selfcheck``: the conventions checked end to end on a fresh synthetic data set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from segens.cli._app import app, output


@app.command()
def selfcheck(
    out: Annotated[Path, typer.Option(help="Working folder for the small data set and CSVs.")] = Path("selfcheck"),
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 512,
    overwrite: Annotated[bool, typer.Option(help="Replace the data set and CSVs of an earlier self-check in OUT.")] = False,
) -> None:
    """Check the conventions end to end on a fresh synthetic data set.

    Writes the test labels as a submission CSV, reads it back and scores it (Dice must be exactly 1.0), scores
    the labels shifted by 3 px (must be lower), and compares every RLE string with the reference encoder.

    Example: `ens selfcheck --out selfcheck --size 512`
    """
    from segens.demo.selfcheck import run_selfcheck

    result = run_selfcheck(out, size=size, overwrite=overwrite)
    table = Table(title=escape(f"self-check on {result.images} test images of {result.root}"))
    table.add_column("check")
    table.add_column("result", justify="right")
    table.add_row("Dice of the labels as a submission", f"{result.dice_exact:.6f}")
    table.add_row("Dice of the labels shifted by 3 px", f"{result.dice_shifted:.6f}")
    table.add_row("RLE identical to the reference encoder", "yes" if result.rle_matches_reference else "NO")
    output.print(table)
    output.print("[green]self-check passed[/]")
