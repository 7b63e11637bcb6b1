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
    calibration: Annotated[Path | None, typer.Option(help="Stores: also write a PNG of each member's reliability curves, and give the calibration error (ECE) per class.")] = None,
    recipe: Annotated[Path | None, typer.Option(help="With --calibration: the curves and ECE after this recipe's calibration too.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --plot or --calibration.")] = False,
) -> None:
    """Score predictions with the competition's Dice: per image and class at the image's own size, mean over
    images, then over classes.

    CSV rows are matched by (image_name, class) and store images by key, never by position; an image of the split
    missing from a PRED, or one it has that the split lacks, is an error. The table has one column per PRED.

    `--calibration`: how far each store's probabilities mean what they say (segens.ensemble.reliability: the
    pixels where its map is not 0 or the bone is present), with `--recipe` also after its calibration tables.

    Example: `ens evaluate stores/vgg.oof.zarr stores/hrnet.oof.zarr --data data/ --plot dice.png`
    """
    from segens.ensemble.evaluate import evaluate_predictions
    from segens.infra.outputs import Output, check_outputs

    check_outputs([Output(plot, option="--plot"), Output(calibration, option="--calibration")],
                  inputs=[*preds, data, recipe], overwrite=overwrite)
    progress = not as_json and console.is_terminal
    evaluations = evaluate_predictions(preds, data, split, threshold, progress=progress)
    errors = None
    if calibration is not None:
        from segens.ensemble.reliability import calibration_errors

        errors = calibration_errors(evaluations, data, calibration, recipe, progress)
    if plot is not None:
        from segens.ensemble.plots import plot_dice_bars

        plot_dice_bars({e.label: e.table.per_class() for e in evaluations}, plot, title=f"Dice per class on {data}")
    if as_json:
        for evaluation in evaluations:
            typer.echo(json.dumps(evaluation.as_dict() | (errors or {}).get(evaluation.pred, {})))
        return
    output.print(dice_table(evaluations, data))
    if errors:
        output.print(ece_table(evaluations, errors))
    for label, path in (("plot", plot), ("calibration", calibration)):
        if path is not None:
            output.print(f"{label}: {path}", markup=False, highlight=False)


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


def ece_table(evaluations: list[Evaluation], errors: dict[str, dict]) -> Table:
    """A rich table of each store's calibration error per class (and after the recipe's calibration)."""
    shown = Table(title="Calibration error (ECE) per class", caption="0 = probabilities mean what they say")
    shown.add_column("class")
    columns = []
    for evaluation in evaluations:
        found = errors.get(evaluation.pred)
        if found is None:
            continue
        for key, suffix in (("ece", ""), ("ece_calibrated", "\ncalibrated")):
            if key in found:
                shown.add_column(escape(f"{evaluation.label}{suffix}"), justify="right")
                columns.append((found[key], found[f"{key}_pooled"]))
    for name in evaluations[0].table.classes:
        shown.add_row(name, *("-" if values[name] is None else f"{values[name]:.4f}" for values, _ in columns))
    shown.add_row("[bold]all pixels", *(f"[bold]{pooled:.4f}" for _, pooled in columns))
    return shown
