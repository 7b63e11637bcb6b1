"""Commands for members: ``ens train-member`` and ``ens predict-member``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from segens.infra.backend import BACKEND_HELP, SCHEDULER_HELP, STORAGE_OPTIONS_ENV, STORAGE_OPTIONS_HELP
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
) -> None:
    """Train a member's checkpoint for each requested fold on the other folds, validating on the held-out one.

    The best checkpoint by validation Dice (computed as the competition does, at each label's own size) is kept
    with a history.json; an interrupted fold resumes from its last epoch. The spec's `checkpoints` are updated
    after each fold, so `ens predict-member` needs no editing by hand.

    Example: `ens train-member members/unetpp-vgg19.yaml --data data/ --folds folds.json --fold all`
    """
    from segens.members.train import train_member as run

    summaries = run(spec, data, folds, fold=fold, device=device, jobs=jobs, checkpoints_dir=checkpoints,
                    trust_pickle=trust_pickle)
    table = Table(title=f"{spec}: trained folds")
    for column in ("fold", "train images", "val images", "epochs", "best val Dice", "checkpoint"):
        table.add_column(column, justify="left" if column == "checkpoint" else "right")
    for summary in summaries:
        dice = "-" if summary.val_dice is None else f"{summary.val_dice:.4f}"
        table.add_row(str(summary.fold), str(summary.train_images), str(summary.val_images), str(summary.epochs),
                      dice, str(summary.checkpoint))
    output.print(table)


@app.command("predict-member")
def predict_member(
    spec: Annotated[Path, typer.Argument(help="Member spec YAML with checkpoints (from `ens train-member`).")],
    split: Annotated[str, typer.Option(help="oof: training images, each by the fold model that held it out; test: test images, folds averaged.")],
    data: Annotated[Path, typer.Option(help="Data root.")],
    out: Annotated[str, typer.Option(help="Store to write, e.g. stores/unetpp.oof.zarr (a path or fsspec URL such as s3://bucket/unetpp.oof.zarr).")],
    folds: Annotated[Path | None, typer.Option(help="folds.json; required for --split oof.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Start the store again instead of resuming it.")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 or auto (autocast on CUDA); with --backend dask resolved on each worker.")] = "cpu",
    batch_size: Annotated[int, typer.Option(min=1, help="Images predicted together (a batch is fixed by the images' order, "
                                                 "so resuming writes the same bytes); each forward pass takes at most "
                                                 "the spec's train.predict_batch_size (default 4) of them.")] = 4,
    trust_pickle: Annotated[bool, typer.Option(help="Allow checkpoints that are whole pickled models (runs code from the file).")] = False,
    jobs: Annotated[int, typer.Option(min=1, help="Local processes predicting side by side (each holds its own model copy).")] = 1,
    backend: Annotated[str, typer.Option(help=BACKEND_HELP)] = "local",
    scheduler: Annotated[str | None, typer.Option(help=SCHEDULER_HELP)] = None,
    storage_options: Annotated[str | None, typer.Option(help=STORAGE_OPTIONS_HELP, envvar=STORAGE_OPTIONS_ENV)] = None,
) -> None:
    """Write a member's per-class probability maps at original resolution into a zarr store (uint8, p = v/255).

    Completed images are skipped, so re-running resumes (a killed run loses at most the images in flight);
    `--overwrite` starts again. Checkpoint hashes are checked against the spec and recorded in the store.

    With `--jobs N` or `--backend dask` the images are split into chunks; each worker process builds the model
    once and writes its images straight into the store (same bytes as one process). On a GPU cluster run one
    worker per GPU (`CUDA_VISIBLE_DEVICES=0 dask worker ADDRESS --nworkers 1`, or dask-cuda's `dask cuda worker
    ADDRESS`) and pass `--device auto`: each worker then uses its own GPU.

    Example: `ens predict-member members/unetpp-vgg19.yaml --split oof --data data/ --folds folds.json --out stores/unetpp.oof.zarr`

    On a cluster: `ens predict-member /shared/members/unetpp-vgg19.yaml --split test --data /shared/data --out s3://bucket/unetpp.test.zarr --backend dask --scheduler tcp://10.0.0.5:8786 --device auto`
    """
    from segens.infra.backend import parse_storage_options
    from segens.members.predict import predict_member as run

    summary = run(spec, split, data, out, folds_path=folds, overwrite=overwrite, device=device,
                  trust_pickle=trust_pickle, batch_size=batch_size, jobs=jobs, backend=backend, scheduler=scheduler,
                  storage_options=parse_storage_options(storage_options))
    rate = summary.written / summary.seconds if summary.seconds and summary.written else 0.0
    output.print(f"{summary.store}: {summary.written} image(s) written, {summary.skipped} already complete, "
                 f"{summary.seconds:.1f} s ({rate:.2f} img/s)")
