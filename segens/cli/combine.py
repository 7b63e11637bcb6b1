"""``ens combine``: members' probability stores -> the competition CSV."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from segens.cli._app import app, console, output
from segens.cli.options import Backend, Jobs, Scheduler, StorageOptions


@app.command()
def combine(
    stores: Annotated[list[str], typer.Argument(help="Probability stores of the members (same split), e.g. stores/*.test.zarr (paths or URLs such as s3://bucket/vgg.test.zarr).")],
    out: Annotated[Path, typer.Option(help="Submission CSV to write (atomically).")],
    strategy: Annotated[str | None, typer.Option(help="soft | weighted | hard (see below); default: the recipe's, else soft.")] = None,
    recipe: Annotated[Path | None, typer.Option(help="recipe.json from `ens search-weights`: per-class weights, thresholds, post-processing.")] = None,
    weights: Annotated[str | None, typer.Option(help="Global member weights, e.g. vgg=2,hrnet=1,yolo=1 (normalised per class).")] = None,
    threshold: Annotated[float | None, typer.Option(help="One threshold for every class (default 0.5, or the recipe's): keep p > threshold.")] = None,
    min_votes: Annotated[float | None, typer.Option(help="hard: keep a pixel when its vote total >= this (default: more than half the weight).")] = None,
    allow_missing: Annotated[bool, typer.Option(help="Drop a member for the images its store lacks (weights renormalised), with a count.")] = False,
    force: Annotated[bool, typer.Option(help="Combine even if the recipe's members or checkpoints differ from the stores'.")] = False,
    masks_out: Annotated[str | None, typer.Option(help="Also write the binary masks as a store (for `ens show`, `ens evaluate`).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out or --masks-out (never one of the inputs).")] = False,
    jobs: Jobs = 1,
    backend: Backend = "local",
    scheduler: Scheduler = None,
    storage_options: StorageOptions = None,
) -> None:
    """Combine members' probability stores into the competition CSV, one image at a time.

    **soft**: mean probability > threshold. **weighted**: sum of w * p > threshold, weights normalised per class.
    **hard**: each member votes where its p > its own threshold (0.5 by default); a vote counts the member's
    weight (1 by default). With `--min-votes N` a pixel is kept when its votes >= N. Without it, when the votes
    are MORE than half of the total weight: a tie at exactly half is dropped, so 2 members must both agree,
    3 members need 2, 4 need 3.

    Stores must agree on classes, images and sizes before anything is written. The CSV is in the competition's
    order (sorted IDxxx/name, then class), image_name is the file name, empty masks are empty fields.

    Example: `ens combine stores/*.test.zarr --strategy weighted --recipe recipe.json --out submission.csv`

    On a cluster (workers read the stores, this process writes the same CSV): `ens combine s3://bucket/vgg.test.zarr s3://bucket/hrnet.test.zarr --out submission.csv --backend dask --scheduler tcp://10.0.0.5:8786`
    """
    from segens.ensemble.combine import combine as run
    from segens.ensemble.combine import parse_weights
    from segens.infra.backend import parse_storage_options

    summary = run(stores, out, strategy=strategy, recipe_path=recipe, weights=parse_weights(weights),
                  threshold=threshold, min_votes=min_votes, allow_missing=allow_missing, force=force,
                  masks_out=masks_out, jobs=jobs, backend=backend, scheduler=scheduler,
                  storage_options=parse_storage_options(storage_options), overwrite=overwrite)
    for member, count in summary.missing.items():
        console.print(f"[yellow]warning:[/] member {escape(member)} was missing for {count} image(s) and was dropped "
                      "there")
    for member, classes in summary.shifted.items():
        console.print(f"[yellow]warning:[/] {escape(member)}'s maps here are not like the OOF maps the recipe was "
                      f"fitted on, in {len(classes)} class(es): {escape('; '.join(classes))}. Thresholds fitted on "
                      "sharper (or softer) maps may not transfer; see the README (OOF and test maps)", soft_wrap=True)
    output.print(f"{summary.out}: {summary.rows} rows for {summary.images} images, {summary.seconds:.1f} s",
                 markup=False, highlight=False)
