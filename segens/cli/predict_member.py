"""``ens predict-member``: a member's probability maps at original resolution, into a store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from segens.cli._app import app, output
from segens.cli.options import Backend, Jobs, Scheduler, StorageOptions


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
    trust_code: Annotated[bool, typer.Option(help="Allow importing the model factory a spec names (runs that code).")] = False,
    per_fold: Annotated[bool, typer.Option(help="--split test: one store per fold model (m.test.fold0.zarr, ...) instead of their mean; `ens combine` applies a recipe to each fold's maps and merges the results.")] = False,
    jobs: Jobs = 1,
    backend: Backend = "local",
    scheduler: Scheduler = None,
    storage_options: StorageOptions = None,
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
                  trust_pickle=trust_pickle, trust_code=trust_code, batch_size=batch_size, jobs=jobs, backend=backend, scheduler=scheduler,
                  storage_options=parse_storage_options(storage_options), per_fold=per_fold)
    rate = summary.written / summary.seconds if summary.seconds and summary.written else 0.0
    output.print(f"{escape(summary.store)}: {summary.written} image(s) written, {summary.skipped} already complete, "
                 f"{summary.seconds:.1f} s ({rate:.2f} img/s)")
