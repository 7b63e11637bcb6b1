"""Where the per-image and per-class work runs: joblib on this machine, or a Dask cluster.

``backend="local"`` (the default): joblib on this machine (``jobs`` processes; 1 runs in this process).
``backend="dask", scheduler="tcp://HOST:8786"``: the same joblib ``Parallel`` calls run as tasks on a Dask
cluster (``joblib.parallel_config(backend="dask")`` inside a ``distributed.Client``). To make a cluster: run
``dask scheduler`` on one machine (it prints its address), ``dask worker tcp://HOST:8786`` on each machine
(with the same segens installed; for GPUs one worker process per GPU, e.g. ``CUDA_VISIBLE_DEVICES=0 dask worker
tcp://HOST:8786 --nworkers 1`` or dask-cuda's ``dask cuda worker``).

Workers read and write the probability stores themselves, so stores must be where every worker reaches them: a
shared file system (local paths are made absolute before they are handed to workers) or an fsspec URL such as
``s3://bucket/member.oof.zarr`` (credentials from the workers' own AWS_* environment or the storage options,
which travel with each store). Data roots, member specs, checkpoints and folds.json are read as local paths: on
a cluster they must be on a shared file system at the same path on every machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from segens.errors import SegensError
from segens.infra.safeload import parse_json

BACKENDS = ("local", "dask")
STORAGE_OPTIONS_ENV = "SEGENS_STORAGE_OPTIONS"
CONNECT_TIMEOUT_S = 10.0
"""Seconds to keep trying to reach the scheduler before giving up with a SegensError."""
WORKERS_TIMEOUT_S = 30.0
"""Seconds to wait for a reachable scheduler to have at least one worker."""

CLUSTER_HELP = ("start a scheduler with `dask scheduler` (it prints its address, e.g. tcp://10.0.0.5:8786), "
                "`dask worker ADDRESS` on each machine (segens installed there too), and pass that address "
                "to --scheduler")

BACKEND_HELP = ("local: this machine (--jobs processes). dask: the workers of the Dask cluster at --scheduler. "
                "Make one with `dask scheduler` on one machine (it prints its address) and `dask worker ADDRESS` on "
                "each machine, segens installed everywhere. Workers read and write the stores themselves: put them "
                "on a shared file system or an object store (s3://bucket/name.zarr); data roots, specs, "
                "checkpoints and folds stay paths on a shared file system, the same on every machine.")
SCHEDULER_HELP = ("Address of the Dask scheduler for --backend dask, e.g. tcp://10.0.0.5:8786 "
                  "(printed by `dask scheduler`).")
STORAGE_OPTIONS_HELP = ("fsspec storage options for stores given as URLs, as JSON, e.g. "
                        "'{\"client_kwargs\": {\"endpoint_url\": \"http://127.0.0.1:9000\"}}' for an S3-compatible "
                        "endpoint. Credentials come from the usual AWS_* environment variables (the workers' own, with "
                        "Dask) or from these options, which travel to the workers with each store.")


def check_backend(backend: str, scheduler: str | None) -> None:
    """A SegensError for an unknown backend, dask without a scheduler, or a scheduler without dask."""
    if backend not in BACKENDS:
        raise SegensError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "dask" and not scheduler:
        raise SegensError(f"--backend dask needs --scheduler ADDRESS: {CLUSTER_HELP}")
    if backend == "local" and scheduler:
        raise SegensError(f"--scheduler {scheduler} is only used with --backend dask")


def connect(scheduler: str, timeout: float | None = None):
    """A ``distributed.Client`` of the scheduler with at least one worker, or a SegensError saying what to do."""
    try:
        from distributed import Client
    except ImportError:
        raise SegensError("--backend dask needs dask.distributed: pip install 'segens[dask]'") from None
    timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
    try:
        client = Client(scheduler, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise SegensError(f"cannot reach the Dask scheduler at {scheduler} ({exc}); is it running and reachable "
                          f"from here? {CLUSTER_HELP}") from None
    try:
        client.wait_for_workers(1, timeout=WORKERS_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        client.close()
        raise SegensError(f"the Dask scheduler at {scheduler} has no worker after {WORKERS_TIMEOUT_S:.0f} s "
                          f"({type(exc).__name__}); start `dask worker {scheduler}` on each machine") from None
    return client


@contextmanager
def parallel_backend(backend: str = "local", scheduler: str | None = None) -> Iterator[Any]:
    """A context in which joblib ``Parallel(...)`` runs locally (yields None) or on the Dask cluster at
    ``scheduler`` (yields the ``distributed.Client``, closed on exit; the cluster keeps running)."""
    check_backend(backend, scheduler)
    if backend == "local":
        yield None
        return
    import joblib

    client = connect(scheduler)
    try:
        with joblib.parallel_config(backend="dask", client=client, wait_for_workers_timeout=WORKERS_TIMEOUT_S):
            yield client
    finally:
        client.close()


def check_jobs(jobs: int) -> int:
    """``jobs`` if it is an integer >= 1 (joblib would read 0 as an error and negatives as "all cores but n");
    a SegensError otherwise."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise SegensError(f"--jobs must be a whole number >= 1 (processes side by side), got {jobs!r}")
    return jobs


def n_jobs(backend: str, jobs: int) -> int:
    """``n_jobs`` for ``Parallel``: ``jobs`` (checked, >= 1) locally; on Dask every worker thread is used (-1)."""
    check_jobs(jobs)
    return jobs if backend == "local" else -1


def worker_count(client: Any, jobs: int) -> int:
    """How many tasks run at once: ``jobs`` locally, every worker thread of the cluster with a client."""
    return jobs if client is None else max(1, sum(client.nthreads().values()))


def parse_storage_options(text: str | None) -> dict[str, Any] | None:
    """fsspec storage options from JSON text (``--storage-options`` or ``$SEGENS_STORAGE_OPTIONS``), e.g.
    ``{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}``; None for None or empty text."""
    if text is None or not text.strip():
        return None
    try:
        options = parse_json(text, "--storage-options", "storage options")
    except SegensError as exc:
        raise SegensError(f"{exc}; storage options must be a JSON object, e.g. "
                          f"'{{\"client_kwargs\": {{\"endpoint_url\": \"http://HOST:PORT\"}}}}'") from None
    if not isinstance(options, dict):
        raise SegensError(f"storage options must be a JSON object, got {type(options).__name__}: {text!r}")
    return options
