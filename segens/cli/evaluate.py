"""``ens evaluate``: Dice tables, JSON and bar plots of predictions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from segens.cli._app import app, console, output

if TYPE_CHECKING:
    from segens.ensemble.evaluate import Evaluation


@app.command()
def evaluate(
    preds: Annotated[list[str], typer.Argument(metavar="PRED", help="Submission CSVs (image_name,class,rle) and/or probability stores (e.g. vgg.oof.zarr).")],
    data: Annotated[Path, typer.Option(help="Data root with labels for the split.")],
    split: Annotated[str | None, typer.Option(help="train or test. Default: a store's own (oof -> train, test -> test); test for a CSV.")] = None,
    threshold: Annotated[float, typer.Option(help="Stores: keep a pixel where p > threshold (p = v / 255 in float32, as `ens combine`).")] = 0.5,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per PRED, one per line, instead of a table.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Also write a PNG of per-class Dice bars, the PREDs side by side.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --plot.")] = False,
) -> None:
    """Score predictions with the competition's Dice: per image and class at the image's own size, mean over
    images, then over classes.

    CSV rows are matched by (image_name, class) and store images by key, never by position; an image of the split
    missing from a PRED, or one it has that the split lacks, is an error. The table has one column per PRED.

    Example: `ens evaluate stores/vgg.oof.zarr stores/hrnet.oof.zarr --data data/ --plot dice.png`
    """
    from segens.ensemble.evaluate import evaluate_predictions
    from segens.infra.outputs import Output, check_outputs

    check_outputs([Output(plot, option="--plot")], inputs=[*preds, data], overwrite=overwrite)
    evaluations = evaluate_predictions(preds, data, split, threshold, progress=not as_json and console.is_terminal)
    if plot is not None:
        from segens.ensemble.plots import plot_dice_bars

        plot_dice_bars({e.label: e.table.per_class() for e in evaluations}, plot, title=f"Dice per class on {data}")
    if as_json:
        for evaluation in evaluations:
            typer.echo(json.dumps(evaluation.as_dict()))
        return
    output.print(dice_table(evaluations, data))
    if plot is not None:
        output.print(f"plot: {plot}", markup=False, highlight=False)


def dice_table(evaluations: list[Evaluation], data: Path) -> Table:
    """A rich table: one row per class and a mean row, one column per PRED."""
    shown = Table(title=f"Dice per class on {escape(str(data))}", caption="mean over images, then over classes")
    shown.add_column("class")
    for evaluation in evaluations:
        images = len(evaluation.table.scores)
        shown.add_column(escape(f"{evaluation.label}\n{evaluation.split}, {images} images"), justify="right")
    per_class = [evaluation.table.per_class() for evaluation in evaluations]
    for index, name in enumerate(evaluations[0].table.classes):
        shown.add_row(name, *(f"{scores[index]:.4f}" for scores in per_class))
    shown.add_row("[bold]mean", *(f"[bold]{evaluation.table.mean():.4f}" for evaluation in evaluations))
    return shown
