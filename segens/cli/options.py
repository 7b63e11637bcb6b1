"""Options shared by several commands (where their work runs: local processes, or a Dask cluster reading shared
storage), declared once."""

from __future__ import annotations

from typing import Annotated

import typer

from segens.infra.backend import BACKEND_HELP, SCHEDULER_HELP, STORAGE_OPTIONS_ENV, STORAGE_OPTIONS_HELP

Backend = Annotated[str, typer.Option(help=BACKEND_HELP)]
Scheduler = Annotated[str | None, typer.Option(help=SCHEDULER_HELP)]
StorageOptions = Annotated[str | None, typer.Option(help=STORAGE_OPTIONS_HELP, envvar=STORAGE_OPTIONS_ENV)]
Jobs = Annotated[int, typer.Option(min=1, help="Local processes working side by side (joblib), each on its share of "
                                                "the images; with --backend dask every worker of the cluster works.")]
