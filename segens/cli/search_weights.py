"""``ens search-weights``: per-class weights, thresholds and post-processing fitted on OOF stores."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from segens.cli._app import app, output
from segens.cli.options import Backend, Scheduler, StorageOptions


@app.command("search-weights")
def search_weights(
    stores: Annotated[list[str], typer.Argument(help="OOF probability stores of the members (`ens predict-member --split oof`).")],
    data: Annotated[Path, typer.Option(help="Data root with the training labels (a local path; with --backend dask on a shared file system).")],
    out: Annotated[Path, typer.Option(help="recipe.json to write (read by `ens combine --recipe`).")] = Path("recipe.json"),
    folds: Annotated[Path | None, typer.Option(help="folds.json the OOF predictions came from (needed for --cv).")] = None,
    strategy: Annotated[str, typer.Option(help="weighted: weights + threshold per class; soft: threshold only; hard: member thresholds + vote count; auto: search every strategy and keep the one that wins on held-out images.")] = "weighted",
    step: Annotated[float, typer.Option(help="Weight grid step on the simplex, refined locally to step/4.")] = 0.1,
    method: Annotated[str, typer.Option(help="grid, or caruana (greedy selection with replacement, for many members).")] = "grid",
    cv: Annotated[bool, typer.Option(help="Repeat the search with each fold held out: an honest estimate of the gain.")] = False,
    calibrate: Annotated[str, typer.Option(help="none, isotonic or platt: fit each member's calibration per class on OOF (training folds only, with --cv) and try mean votes on the calibrated maps as one more level.")] = "none",
    postprocess: Annotated[bool, typer.Option(help="Try largest-component and hole filling per class; keep what helps.")] = True,
    fallback: Annotated[bool, typer.Option(help="With --cv: per class, keep a searched setting only where the held-out folds show it beats the simpler one by more than a standard error; else the equal weights at a searched threshold, or the plain rule.")] = True,
    jobs: Annotated[int, typer.Option(min=1, help="Images, then classes, processed in parallel.")] = 1,
    report_csv: Annotated[Path | None, typer.Option(help="Write the per-class table as CSV.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG: weights heatmap and Dice gain per class.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out, --report-csv or --plot.")] = False,
    backend: Backend = "local",
    scheduler: Scheduler = None,
    storage_options: StorageOptions = None,
) -> None:
    """Fit per-class weights, thresholds and post-processing on out-of-fold predictions, exactly and fast.

    Each class is searched on its own on the competition's Dice at original resolution. Candidates always
    include equal weights and each single member, so the recipe is never worse on OOF than either; thresholds
    are swept over all 255 quantization midpoints. Pixels that no candidate can change are counted once, so
    scores equal a brute-force evaluation. OOF scores of a fitted recipe flatter it: `--cv` says honestly
    whether it beats the plain mean on held-out folds, and with it each class falls back to a simpler setting
    where searching does not pay. The OOF evidence (each store and label read once) and finished classes are
    kept beside the recipe until it is written: a killed search, run again with the same inputs, resumes.

    Example: `ens search-weights stores/*.oof.zarr --data data/ --folds folds.json --cv --out recipe.json --plot report.png`

    On a cluster (classes spread over the workers; --data on a shared file system): `ens search-weights s3://bucket/vgg.oof.zarr s3://bucket/hrnet.oof.zarr --data /shared/data --out recipe.json --backend dask --scheduler tcp://10.0.0.5:8786`
    """
    from rich.table import Table

    from segens.infra.backend import parse_storage_options
    from segens.infra.outputs import Output
    from segens.search.report import report_rows, write_report_csv
    from segens.search.run import search_weights as run

    report = run(stores, data, folds, out, strategy=strategy, step=step, method=method, cv=cv, jobs=jobs,
                 calibrate=calibrate,
                 postprocess=postprocess, fallback=fallback, backend=backend, scheduler=scheduler,
                 storage_options=parse_storage_options(storage_options), overwrite=overwrite,
                 also_written=[Output(report_csv, option="--report-csv"), Output(plot, option="--plot")])
    rows = report_rows(report)
    table = Table(title=escape(f"OOF Dice per class ({strategy}); recipe written to {out}"))
    for column in rows[0]:
        table.add_column(column, justify="left" if column in ("class", "weights", "thresholds", "postprocess") else "right")
    for row in rows:
        table.add_row(*(escape(str(value)) for value in row.values()))
    output.print(table)
    summary = report.summary()
    output.print("mean over classes: " + ", ".join(f"{name} {value:.4f}" for name, value in summary.items()))
    output.print(f"[bold]{escape(report.verdict())}[/]")
    if report_csv is not None:
        output.print(f"report: {write_report_csv(rows, report_csv)}", markup=False, highlight=False)
    if plot is not None:
        from segens.ensemble.plots import plot_search_report

        output.print(f"plot: {plot_search_report(report, plot)}", markup=False, highlight=False)
