"""Commands for data: ``ens synth``, ``ens selfcheck``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

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
    output.print(f"wrote {summary}")
    if preview is not None:
        output.print(f"preview: {make_preview(root, preview)}")


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
    table = Table(title=f"self-check on {result.images} test images of {result.root}")
    table.add_column("check")
    table.add_column("result", justify="right")
    table.add_row("Dice of the labels as a submission", f"{result.dice_exact:.6f}")
    table.add_row("Dice of the labels shifted by 3 px", f"{result.dice_shifted:.6f}")
    table.add_row("RLE identical to the reference encoder", "yes" if result.rle_matches_reference else "NO")
    output.print(table)
    output.print("[green]self-check passed[/]")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for everything the demo writes.")] = Path("demo"),
    quick: Annotated[bool, typer.Option(help="Tiny sizes: under 3 minutes (used by the tests).")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda (a GPU-sized configuration) or auto.")] = "cpu",
) -> None:
    """The whole workflow in one command, on a synthetic data set.

    Makes a data set (32 patients for training, 8 for test, 192 px), two patient-grouped folds, trains two UNet++
    members (MobileNetV2 and MobileNetV3 encoders) and YOLOv8n-seg on every fold, predicts OOF and test stores,
    searches each member's thresholds and the ensemble's per-class weights on OOF (with a CV estimate), combines
    with soft, weighted and hard voting and scores everything on the test labels. Ends with one table; writes the
    submission, the recipes, the Dice plot and an overlay. `--device cuda` uses larger images, inputs and step
    budgets with mixed precision.

    Example: `ens demo --out demo`   (under 15 minutes on 2 CPU cores; `--quick` under 3)
    """
    from segens.demo.run import run_demo

    result = run_demo(out, quick=quick, device=device)
    output.print(demo_table(result))
    output.print(result.verdict)
    for name, path in result.files.items():
        output.print(f"{name}: {path}")


def demo_table(result) -> Table:
    """The demo's one table: test Dice of members (at 0.5 and at their OOF-searched thresholds) and ensembles,
    the recipe's CV gains, seconds per step."""
    table = Table(title=f"ens demo ({result.config}): test Dice", show_lines=False)
    for column, justify in (("what", "left"), ("network", "left"), ("at 0.5", "right"),
                            ("searched on OOF", "right")):
        table.add_column(column, justify=justify)
    for name, dice in result.member_dice.items():
        table.add_row(f"member {name}", result.member_network.get(name, ""), f"{dice:.4f}",
                      f"{result.member_dice_searched[name]:.4f}")
    labels = {"soft": ("mean of members", True), "weighted": ("per-class weights + thresholds", False),
              "hard": ("majority of members' votes", True)}
    for strategy, dice in result.strategy_dice.items():
        how, plain = labels.get(strategy, ("", True))
        table.add_row(f"ensemble: {strategy} vote", how, f"{dice:.4f}" if plain else "", "" if plain else f"{dice:.4f}")
    for key, value in result.cv.items():
        table.add_row(f"recipe {key.replace('_', ' ')}", "OOF, held-out folds", "", f"{value:+.4f}")
    for step, seconds in result.seconds.items():
        table.add_row(f"time: {step}", "", f"{seconds:.1f} s", "")
    table.add_row("time: total", "", f"{sum(result.seconds.values()):.1f} s", "")
    return table
