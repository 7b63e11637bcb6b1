"""``ens demo``: the whole workflow in one command, on a synthetic data set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from segens.cli._app import app, console, output


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

    result = run_demo(out, quick=quick, device=device, progress=_Printed())
    output.print(demo_table(result))
    output.print(result.verdict)
    for name, path in result.files.items():
        output.print(f"{name}: {path}")


class _Printed:
    """The demo's progress on stderr: a rule per step, its time, notes."""

    def step(self, number: int, total: int, name: str) -> None:
        console.rule(f"[bold]{number}/{total} {escape(name)}")

    def done(self, name: str, seconds: float) -> None:
        console.print(f"{name}: {seconds:.1f} s", markup=False, highlight=False)

    def note(self, text: str) -> None:
        console.print(text, markup=False, highlight=False)


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
