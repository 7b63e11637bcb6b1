"""``ens train-member``: a member's checkpoint per fold, written into its spec."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from segens.cli._app import app, output


@app.command("train-member")
def train_member(
    spec: Annotated[Path, typer.Argument(help="Member spec YAML (name, kind, model, train); checkpoints are written into it.")],
    data: Annotated[Path, typer.Option(help="Data root (train/DCM, train/outputs_json).")],
    folds: Annotated[Path, typer.Option(help="folds.json from `ens folds make`.")],
    fold: Annotated[str, typer.Option(help="'all', one fold (2) or a list (0,3).")] = "all",
    jobs: Annotated[int, typer.Option(min=1, help="Folds trained side by side (each holds its own model in memory).")] = 1,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 or auto.")] = "cpu",
    checkpoints: Annotated[Path | None, typer.Option(help="Folder for checkpoints (default: a folder named after the member, beside the spec).")] = None,
    trust_pickle: Annotated[bool, typer.Option(help="Allow resuming from pickled state (YOLO's last.pt, an older segens' last.pt): runs code from the file.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace spec entries that name checkpoints train-member did not write.")] = False,
    pseudo: Annotated[Path | None, typer.Option(help="A folder from `ens pseudo-label`: its images join every fold's training images (never validation), their ignored pixels left out of the loss (default: the spec's train.pseudo).")] = None,
) -> None:
    """Train a member's checkpoint for each requested fold on the other folds, validating on the held-out one.

    The best checkpoint by validation Dice (computed as the competition does, at each label's own size) is kept
    with a history.json; an interrupted fold resumes from its last epoch. The spec's `checkpoints` are updated
    after each fold (only each fold's entry: comments and order stay), so `ens predict-member` needs no editing by
    hand; an entry naming a checkpoint you put there is replaced only with --overwrite. With --pseudo (smp members;
    YOLO's loss cannot leave pixels out) each checkpoint records the pseudo folder and its recipe's sha256; scale
    train.steps by (real + pseudo images) / real images per fold, or the pseudo images crowd the real ones out (README).

    Example: `ens train-member members/unetpp-vgg19.yaml --data data/ --folds folds.json --fold all`
    """
    from segens.members.train import train_member as run

    summaries = run(spec, data, folds, fold=fold, device=device, jobs=jobs, checkpoints_dir=checkpoints,
                    trust_pickle=trust_pickle, overwrite=overwrite, pseudo=pseudo)
    table = Table(title=escape(f"{spec}: trained folds"))
    for column in ("fold", "train images", "val images", "epochs", "best val Dice", "checkpoint"):
        table.add_column(column, justify="left" if column == "checkpoint" else "right")
    for summary in summaries:
        dice = "-" if summary.val_dice is None else f"{summary.val_dice:.4f}"
        table.add_row(str(summary.fold), str(summary.train_images), str(summary.val_images), str(summary.epochs),
                      dice, escape(str(summary.checkpoint)))
    output.print(table)
