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

    Makes a data set (32 patients for training, 32 for test, 192 px), two patient-grouped folds, trains two UNet++
    members (MobileNetV2 and MobileNetV3 encoders) and YOLOv8n-seg on every fold, predicts OOF and test stores
    (the folds' mean, and each fold model's own), searches each member's thresholds and the ensemble's recipe on
    OOF (`--strategy auto --calibrate isotonic --cv`: the strategy and each class's level picked on held-out
    images; weighted and calibrated recipes beside it), combines the plain mean, the majority vote and the
    recipes, scores everything on the test labels, shows each member's calibration error (ECE) and names the
    most suspicious test predictions (`ens qc`). Ends with one table and the verdict; writes the submission, the
    recipes, the Dice plot, the qc plot and an overlay. `--device cuda` uses larger
    images, inputs and step budgets with mixed precision.

    Example: `ens demo --out demo`   (under 15 minutes on 2 CPU cores; `--quick` under 3)
    """
    from segens.demo.run import run_demo

    result = run_demo(out, quick=quick, device=device, progress=_Printed())
    output.print(demo_table(result))
    output.print(result.verdict, markup=False, highlight=False)
    for warning in result.warnings:
        console.print(f"warning: {warning}", markup=False, highlight=False)
    if result.qc:
        output.print(qc_lines(result.qc), markup=False, highlight=False)
    for name, path in result.files.items():
        output.print(f"{name}: {path}", markup=False, highlight=False)


class _Printed:
    """The demo's progress on stderr: a rule per step, its time, notes."""

    def step(self, number: int, total: int, name: str) -> None:
        console.rule(f"[bold]{number}/{total} {escape(name)}")

    def done(self, name: str, seconds: float) -> None:
        console.print(f"{name}: {seconds:.1f} s", markup=False, highlight=False)

    def note(self, text: str) -> None:
        console.print(text, markup=False, highlight=False)


def qc_lines(qc: dict) -> str:
    """The most suspicious test predictions and how well qc's score ranked errors, in a few lines."""
    lines = [f"The {len(qc['suspicious'])} most suspicious test predictions (ens qc; test Dice in brackets):"]
    lines += [f"  {entry['image']} {entry['class']}: score {entry['score']:.2f} (Dice {entry['dice']:.3f})"
              for entry in qc["suspicious"]]
    for split in ("oof", "test"):
        figures = qc[split]
        lines.append(f"qc against the {split.upper()} labels: Spearman {figures['spearman']:+.2f} (score vs Dice), "
                     f"recall of the worst 5% {figures['recall_at_5']:.0%} (chance {figures['chance_recall']:.0%})")
    return "\n".join(lines)


def demo_table(result) -> Table:
    """The demo's table, for an 80-column terminal: the test Dice of each member and ensemble, how each was made,
    the recipe's held-out estimate beside its gain on the test split, and the time of each step."""
    table = Table(title=f"ens demo ({result.config}): Dice on {escape('the test split')}")
    table.add_column("what", max_width=40)
    table.add_column("test Dice", justify="right")
    table.add_column("how", max_width=22)
    for row in result.rows:
        table.add_row(escape(row.what), f"{row.dice:.4f}", escape(row.how))
    table.add_section()
    table.add_row("recipe - plain mean, held out (OOF)", f"{result.held_out['gain']:+.4f}",
                  f"± {result.held_out['se']:.4f} (std. error)")
    table.add_row("recipe - plain mean, test split", f"{result.test_gain:+.4f}", "")
    if result.calibration:
        table.add_section()
        for name, (before, after) in result.calibration.items():
            table.add_row(escape(f"calibration error: {name}"), f"{before:.4f}", f"{after:.4f} calibrated on OOF")
    table.add_section()
    for step, seconds in result.seconds.items():
        table.add_row(f"time: {step}", f"{seconds:.1f} s", "")
    table.add_row("time: total", f"{sum(result.seconds.values()):.1f} s", "")
    return table
