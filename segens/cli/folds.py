"""Commands for splits: ``ens folds make``, ``ens folds show``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from segens.cli._app import app, output

if TYPE_CHECKING:
    from segens.folds.file import Folds

folds_app = typer.Typer(
    name="folds",
    help=(
        "Patient-grouped k-fold splits of a data root's training images (folds.json).\n\n"
        "Example: `ens folds make data/ --k 5 --out folds.json`   then   `ens folds show folds.json --data data/`"
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(folds_app, name="folds")


@folds_app.command()
def make(
    root: Annotated[Path, typer.Argument(help="Data root holding train/DCM and train/outputs_json.")],
    k: Annotated[int, typer.Option("--k", help="Number of folds (at most the number of patients).")] = 5,
    out: Annotated[Path, typer.Option(help="Where to write folds.json.")] = Path("folds.json"),
    stratify: Annotated[
        str | None, typer.Option(help="Balance a metadata column across folds: age, sex, weight, height or bmi.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for shuffling patients; same seed, same folds.")] = 0,
    metadata: Annotated[
        Path | None, typer.Option(help="Metadata file for --stratify (default: ROOT/meta_data.xlsx).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Split the training images into k folds; both hands of a patient always share a fold.

    Without --stratify: scikit-learn's GroupKFold by patient (shuffled with --seed). With --stratify COLUMN:
    StratifiedGroupKFold on that metadata column; numbers are binned (quantiles; BMI in WHO classes) and
    patients without a usable value get an 'unknown' bin, which the notes list.

    Example: `ens folds make data/ --k 5 --out folds.json --stratify bmi --seed 0`
    """
    from segens.folds.file import save_folds
    from segens.folds.splits import make_folds
    from segens.infra.outputs import Output, check_outputs

    check_outputs([Output(out)], inputs=[root, metadata], overwrite=overwrite)
    folds, notes = make_folds(root, k=k, stratify=stratify, seed=seed, metadata=metadata)
    save_folds(folds, out)
    output.print(f"wrote {out}: {_describe(folds)}", soft_wrap=True, markup=False, highlight=False)
    output.print(fold_table(folds))
    for note in notes:
        output.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)


@folds_app.command()
def show(
    folds_file: Annotated[Path, typer.Argument(metavar="FOLDS", help="A folds.json written by `ens folds make`.")],
    data: Annotated[
        Path | None, typer.Option(help="Also check that the file covers exactly this data root's training images.")
    ] = None,
) -> None:
    """Print a table per fold: images, patients and, if stratified, patients per bin.

    Example: `ens folds show folds.json --data data/`
    """
    from segens.folds.file import load_folds

    folds = load_folds(folds_file, root=data)
    output.print(f"{folds_file}: {_describe(folds)}", soft_wrap=True, markup=False, highlight=False)
    output.print(fold_table(folds))
    if data is not None:
        output.print(f"[green]matches the training images of {escape(str(data))}[/]")


def _describe(folds: Folds) -> str:
    how = f"stratified by {folds.stratify}" if folds.stratify else "grouped by patient"
    shuffled = f"shuffled with seed {folds.seed}" if folds.shuffle else "not shuffled"
    return f"{folds.k} folds, {how}, {shuffled}, {len(folds.assignment)} images"


def fold_table(folds: Folds) -> Table:
    """One row per fold (images, patients, patients per stratification bin) and a total row."""
    distribution = folds.distribution()
    table = Table(title=f"{folds.k} folds ({folds.method})")
    table.add_column("fold", justify="right")
    table.add_column("images", justify="right")
    table.add_column("patients", justify="right")
    for label in folds.bins or []:
        table.add_column(f"{folds.stratify} {label}", justify="right")
    totals = [0, 0] + [0] * len(folds.bins or [])
    for fold in range(folds.k):
        row = [len(folds.keys_in(fold)), len(folds.patients_in(fold))]
        row += list(distribution[fold].values()) if distribution else []
        totals = [a + b for a, b in zip(totals, row)]
        table.add_row(str(fold), *map(str, row))
    table.add_row("[bold]all", *(f"[bold]{value}" for value in totals))
    return table
