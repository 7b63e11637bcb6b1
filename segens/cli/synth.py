"""``ens synth``: a synthetic data set in the competition's layout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from segens.cli._app import app, output


@app.command()
def synth(
    root: Annotated[Path, typer.Argument(help="Folder to write the data root into (created).")],
    train_patients: Annotated[int, typer.Option(help="Patients (two hands each) in train.")] = 20,
    test_patients: Annotated[int, typer.Option(help="Patients in test.")] = 5,
    size: Annotated[int, typer.Option(help="Image side in pixels (the real data is 2048).")] = 2048,
    seed: Annotated[int, typer.Option(help="Same seed, byte-identical data set.")] = 0,
    preview: Annotated[Path | None, typer.Option(help="Also write an overlay PNG of a few images.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace train/, test/ and meta_data.xlsx if ROOT has them.")] = False,
) -> None:
    """Write a synthetic hand X-ray data set in the competition's exact layout.

    train/DCM, train/outputs_json, test/DCM, test/outputs_json (test labels, for scoring only) and
    meta_data.xlsx; two hands per patient folder; deterministic for a seed.

    Example: `ens synth data/ --train-patients 24 --test-patients 6 --size 512 --preview synth.png`
    """
    from segens.synth import generate
    from segens.synth import preview as make_preview

    summary = generate(root, n_train_patients=train_patients, n_test_patients=test_patients, size=size,
                       seed=seed, progress=True, overwrite=overwrite)
    output.print(f"wrote {summary}", markup=False, highlight=False)
    if preview is not None:
        output.print(f"preview: {make_preview(root, preview)}", markup=False, highlight=False)
