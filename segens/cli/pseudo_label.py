"""``ens pseudo-label``: the ensemble's test masks as training labels, with ignore masks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from segens.cli._app import app, output

MAX_QC_SCORE, MIN_CONFIDENCE, BAND = 0.4, 0.7, 0.2
"""segens.ensemble.pseudo's defaults (and qc's BAND), written here so that `ens` starts without importing it
(tests/test_pseudo.py checks that they agree)."""


@app.command("pseudo-label")
def pseudo_label(
    stores: Annotated[list[str], typer.Argument(help="The members' test stores, e.g. stores/*.test.zarr.")],
    recipe: Annotated[Path, typer.Option(help="recipe.json from `ens search-weights`: the masks are `ens combine`'s with it.")],
    data: Annotated[Path, typer.Option(help="Data root the stores were predicted on (its test images; its training labels give qc's area ranges).")],
    out: Annotated[Path, typer.Option(help="Folder to write: train/DCM, train/outputs_json, ignore.zarr, pairs.csv, qc.csv, pseudo.json (outside any data root).")],
    max_qc_score: Annotated[float, typer.Option(help="Write a class only if its `ens qc` score is at most this (1: no filter).")] = MAX_QC_SCORE,
    min_confidence: Annotated[float, typer.Option(help="Write a class only if the mean ensemble score inside its mask is at least this (0: no filter).")] = MIN_CONFIDENCE,
    band: Annotated[float, typer.Option(help="Ignore the pixels whose ensemble score is within this of the recipe's threshold.")] = BAND,
    ignore: Annotated[bool, typer.Option(help="Write ignore masks (--no-ignore: none, every label pixel is learnt, as a plain pseudo-labelling does).")] = True,
    jobs: Annotated[int, typer.Option(min=1, help="Images labelled in parallel (joblib processes).")] = 1,
    force: Annotated[bool, typer.Option(help="Label even if the recipe's members or checkpoints differ from the stores'.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out folder.")] = False,
) -> None:
    """Label test images with the ensemble's masks, for `ens train-member --pseudo`: per image and class the mask
    `ens combine` makes with the recipe, as one polygon (its largest piece) with its confidence (the mean ensemble
    score inside the mask) and `ens qc` score. Classes over --max-qc-score or under --min-confidence get no
    annotation and are ignored whole; in written classes the pixels within --band of the threshold and those the
    polygon cannot represent (other pieces, holes) are ignored (ignore.zarr), so training never learns them.

    Example: `ens pseudo-label stores/*.test.zarr --recipe recipe.json --data data/ --out pseudo/`, then
    `ens train-member members/unetpp.yaml --data data/ --folds folds.json --pseudo pseudo/`
    """
    from segens.ensemble.pseudo import pseudo_label as run

    summary = run(stores, recipe, data, out, max_qc_score=max_qc_score, min_confidence=min_confidence, band=band,
                  ignore=ignore, jobs=jobs, force=force, progress=output.is_terminal, overwrite=overwrite)
    counts = summary.counts
    output.print(f"{out}: {counts['images_written']} of {counts['images']} images written, {counts['annotated']} of "
                 f"{counts['pairs']} (image, class) pairs annotated (not written: {counts['qc score']} by qc score, "
                 f"{counts['confidence']} by confidence, {counts['empty']} empty, {counts['no polygon']} without a "
                 f"polygon); {counts['ignored_share']:.1%} of the written images' pixels ignored, "
                 f"{summary.seconds:.1f} s", markup=False, highlight=False)
