"""``ens show``: an X-ray with ground-truth and predicted outlines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from segens.cli._app import app, output


@app.command()
def show(
    image: Annotated[str, typer.Argument(metavar="IMAGE", help="Image key (ID001/image1661130828152) or file name (image1661130828152.png); train is searched, then test.")],
    data: Annotated[Path, typer.Option(help="Data root holding the image (and its labels, if any).")],
    pred: Annotated[list[str] | None, typer.Option(help="A submission CSV or probability store; repeat it for one panel per PRED.")] = None,
    out: Annotated[Path, typer.Option(help="PNG to write.")] = Path("overlay.png"),
    classes: Annotated[str | None, typer.Option(help="Comma-separated classes, one panel each, cropped to the class, e.g. Capitate,Hamate.")] = None,
    error: Annotated[str | None, typer.Option(help="One class: each PRED's false positives, false negatives and (faint) true positives, Dice in the title.")] = None,
    threshold: Annotated[float, typer.Option(help="Stores: keep a pixel where p > threshold.")] = 0.5,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Draw one X-ray with ground-truth outlines (solid) and predicted outlines (dashed), a colour per class.

    Without options: the whole image, one panel per PRED, each titled with its Dice on this image.
    `--classes`: a grid of class crops (columns) by PRED (rows). `--error CLASS`: where each PRED is wrong.

    Example: `ens show ID001/image1661130828152 --data data/ --pred submission.csv --error Capitate --out capitate.png`
    """
    from segens.ensemble.overlay import draw_overlay
    from segens.infra.outputs import Output, check_outputs

    check_outputs([Output(out)], inputs=[*(pred or []), data], overwrite=overwrite)
    names = classes.split(",") if classes else None
    written = draw_overlay(image, data, pred or [], out, classes=names, error=error, threshold=threshold)
    output.print(f"wrote {written}", markup=False, highlight=False)
