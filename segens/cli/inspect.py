"""``ens inspect``: what a checkpoint holds and what a member spec for it must say."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml

from segens.cli._app import app, output


@app.command("inspect")
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint file (.pt/.pth, TorchScript) or an smp save_pretrained folder.")],
    spec: Annotated[Path | None, typer.Option(help="Member spec: load the checkpoint exactly as `ens predict-member` would.")] = None,
    trust_pickle: Annotated[bool, typer.Option(help="Allow checkpoints that are whole pickled models (runs code from the file).")] = False,
    trust_code: Annotated[bool, typer.Option(help="Allow importing the model factory a spec names (runs that code).")] = False,
) -> None:
    """Load a checkpoint and print what it holds: format, architecture and encoder if known, class names and their
    mapping to the competition's classes, the recorded input contract, parameter count and the output on a dummy
    input; then what a member spec for it must say. Nothing is written, and code a spec names (a model factory) is
only imported with --trust-code.

    Example: `ens inspect runs/fold0/model.pt --trust-pickle`   or   `ens inspect fold0.pth --spec members/mine.yaml`
    """
    from segens.members.inspect_checkpoint import inspect_checkpoint

    report = inspect_checkpoint(checkpoint, spec, trust_pickle=trust_pickle, trust_code=trust_code)
    rows = [("checkpoint", str(report.path)), ("format", report.format), ("kind", report.kind),
            ("architecture", report.architecture), ("encoder", report.encoder),
            ("parameters", f"{report.parameters:,}" if report.parameters is not None else None),
            ("dummy input", str(report.input_shape) if report.input_shape else None), ("output", report.output),
            ("recorded input", _flow(report.recorded_input) if report.recorded_input else "none recorded"),
            ("input used", _flow(report.input_used) if report.input_used else None)]
    for label, value in rows:
        if value is not None:
            output.print(f"{label:>15}: {value}", markup=False, highlight=False, soft_wrap=True)
    if report.mapping is not None:
        moved = [(channel, name, index) for channel, name, index in report.mapping if channel != index]
        summary = "same order as the competition" if not moved else f"{len(moved)} of 29 channels reordered by name"
        output.print(f"{'classes':>15}: {summary}", markup=False, highlight=False, soft_wrap=True)
        for channel, name, index in moved:
            output.print(f"{'':>17}model channel {channel:>2} -> {index:>2} {name}", markup=False, highlight=False, soft_wrap=True)
    else:
        output.print(f"{'classes':>15}: no class names in the checkpoint", markup=False, highlight=False, soft_wrap=True)
    for note in report.notes:
        output.print(f"{'note':>15}: {note}", markup=False, highlight=False, soft_wrap=True)
    output.print("the spec, as segens reads it:" if spec is not None else "a member spec for it needs:",
                 markup=False, highlight=False, soft_wrap=True)
    output.print(yaml.safe_dump(report.spec, sort_keys=False, default_flow_style=None).rstrip(), markup=False, highlight=False, soft_wrap=True)


def _flow(document: dict) -> str:
    return yaml.safe_dump(document, default_flow_style=True, sort_keys=False, width=10_000).strip()
