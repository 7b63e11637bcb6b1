"""``ens qc``: where the ensemble is likely wrong, per image and class."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from segens.cli._app import app, output


@app.command()
def qc(
    stores: Annotated[list[str], typer.Argument(help="The members' probability stores (test or OOF), e.g. stores/*.test.zarr.")],
    recipe: Annotated[Path, typer.Option(help="recipe.json from `ens search-weights`: the strategy, thresholds and tables qc judges by.")],
    data: Annotated[Path, typer.Option(help="Data root: the training labels give each class's area range; OOF stores are also scored against their labels.")],
    out: Annotated[Path, typer.Option(help="qc.csv to write: image, class, score (higher: more likely wrong), then the signals.")],
    plot: Annotated[Path | None, typer.Option(help="Also write a PNG: the images ranked and a heat map of image x class scores.")] = None,
    top: Annotated[int, typer.Option(min=0, help="How many of the most suspicious (image, class) pairs to list.")] = 10,
    overlays: Annotated[tuple[int, Path] | None, typer.Option(metavar="N DIR", help="Also draw the N most suspicious (image, class) pairs as PNGs in DIR: the ensemble, each member at its recipe threshold and the truth where known.")] = None,
    jobs: Annotated[int, typer.Option(min=1, help="Images scored in parallel (joblib processes).")] = 1,
    force: Annotated[bool, typer.Option(help="Judge even if the recipe's members or checkpoints differ from the stores'.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out, --plot or --overlays folder.")] = False,
) -> None:
    """Rank every (image, class) by how likely the ensemble's mask is wrong: the members' disagreement, the
    share of the mask near the decision threshold, the predicted area against the training labels' range and
    the number of pieces (segens.ensemble.qc states the rule). On OOF stores the true Dice says how well the
    score ranks errors (Spearman correlation, recall of the worst 5%).

    Example: `ens qc stores/*.test.zarr --recipe recipe.json --data data/ --out qc.csv --plot qc.png --overlays 10 qc/`
    """
    from segens.conventions.classes import CLASSES
    from segens.ensemble.qc import quality_control

    result = quality_control(stores, recipe, data, out, plot, jobs=jobs, force=force,
                             progress=output.is_terminal, overwrite=overwrite, overlays=overlays)
    shown = Table(title=f"the {top} most suspicious predictions",
                  caption="score: the signals' mean and the strongest one relative to its class")
    for column in ("image", "class", "score", "members disagree", "near threshold", "area", "pieces", "Dice"):
        shown.add_column(column, justify="left" if column in ("image", "class") else "right")
    for row in result.ranked()[:top]:
        shown.add_row(escape(row.image), CLASSES[row.channel], f"{row.score:.2f}",
                      *(f"{row.signals[name]:.2f}" for name in ("disagreement", "uncertainty", "area")),
                      str(row.components), "" if row.dice is None else f"{row.dice:.3f}")
    if top:
        output.print(shown)
    if result.validation is not None:
        figures = result.validation
        output.print(f"against the labels ({figures['pairs']} pairs): Spearman correlation of score and Dice "
                     f"{figures['spearman']:+.3f} (negative: the score ranks errors); of the worst 5% by Dice, "
                     f"{figures['recall_at_5']:.0%} are in the top 5% by score (chance: "
                     f"{figures['chance_recall']:.0%})", markup=False, highlight=False)
    output.print(f"qc: {out}" + (f", plot: {plot}" if plot else "")
                 + (f", {min(overlays[0], len(result.rows))} overlays in {overlays[1]}" if overlays else ""),
                 markup=False, highlight=False)
