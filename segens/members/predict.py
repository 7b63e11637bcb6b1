"""``ens predict-member``: a member's per-class probabilities at original resolution, written into a store.

``oof``: every training image predicted only by the checkpoint of the fold that held it out (honest
out-of-fold predictions). ``test``: every test image, all fold checkpoints averaged in probability space.
Completed images are skipped (resume is the default); a killed run loses at most the images in flight.

Batches are fixed by each image's position in the planned list (consecutive images sharing their folds), never
by which images are already done: a network's values can depend on the batch an image is in (a batch of 1 and
of 4 convolve with different rounding), so a batch with any unfinished image is predicted whole and only its
unfinished images are written. A resumed run, ``--jobs N`` and the Dask backend therefore write the same bytes
as one uninterrupted run. Locally, the next batches' images are decoded in background threads while the
network runs, and finished images are compressed and written in a thread pool, both through bounded queues.
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segens.conventions.dataset import ImageRecord
from segens.errors import SegensError
from segens.infra.backend import check_backend, check_jobs, n_jobs, parallel_backend, worker_count
from segens.infra.locations import local_path
from segens.infra.outputs import Output, check_outputs
from segens.infra.progress import progress_bar
from segens.members.registry import build_member
from segens.members.spec import MemberSpec, load_spec, sha256_of
from segens.store import ProbabilityStore, create_store
from segens.store.location import shared_location, store_options

CHUNKS_PER_WORKER = 4
"""The parallel path splits the images to do into about this many chunks per worker (whole batches each)."""
READ_AHEAD = 2
"""Batches whose images are decoded in background threads while the current batch is predicted."""
WRITE_THREADS = 2
"""Threads that compress and write finished images (blosc releases the GIL)."""
WRITES_IN_FLIGHT = 8
"""At most this many finished images wait for their write: memory stays flat in the number of images."""

@dataclass
class PredictSummary:
    """What a prediction run did: images written and skipped, seconds, and the store's URL."""

    store: str
    written: int
    skipped: int
    seconds: float


def _batches(jobs: Sequence[tuple[ImageRecord, tuple[int, ...]]], size: int) -> Iterator[list]:
    """Consecutive images that share the same folds, at most ``size`` at a time."""
    batch: list = []
    for job in jobs:
        if batch and (len(batch) == size or batch[-1][1] != job[1]):
            yield batch
            batch = []
        batch.append(job)
    if batch:
        yield batch


def planned_batches(jobs: Sequence[tuple[ImageRecord, tuple[int, ...]]], size: int,
                    done: set[str]) -> list[list]:
    """The batches of the planned list (``_batches``) that hold at least one image not in ``done``."""
    return [batch for batch in _batches(jobs, size) if any(record.key not in done for record, _ in batch)]


def fold_store_path(out: str | Path, fold: int) -> str:
    """Where ``--per-fold`` writes fold ``fold``'s maps: ``m.test.zarr`` -> ``m.test.fold2.zarr``."""
    text = str(out).rstrip("/")
    return text[:-len(".zarr")] + f".fold{fold}.zarr" if text.endswith(".zarr") else f"{text}.fold{fold}"


def predict_member(spec_path: str | Path, split: str, root: str | Path, out: str | Path,
                   folds_path: str | Path | None = None, overwrite: bool = False, device: str = "cpu",
                   trust_pickle: bool = False, trust_code: bool = False, batch_size: int = 4, progress: bool = True,
                   jobs: int = 1,
                   backend: str = "local", scheduler: str | None = None,
                   storage_options: dict[str, Any] | None = None, pipelined: bool = True,
                   per_fold: bool = False) -> PredictSummary:
    """Predict a split into the store at ``out`` (created, or resumed if it has the same identity).

    ``per_fold`` (test split): one store per fold model instead of their mean, at ``fold_store_path(out, f)``, each
    recording its fold: maps made in the conditions of the OOF maps a recipe is fitted on (``ens combine`` applies
    a recipe to each fold's stores and merges the results).

    ``backend="local"`` with ``jobs=1`` predicts in this process; ``jobs > 1`` in joblib processes, and
    ``backend="dask"`` on the workers of the Dask scheduler at ``scheduler`` (see segens.infra.backend). In parallel,
    each worker process builds the member once (one model copy, on its own GPU with ``device="auto"``) and writes
    its images straight into the store, so ``out`` must be reachable from every worker (a shared file system or
    a URL such as s3://bucket/m.oof.zarr opened with ``storage_options``); the data root, spec and checkpoints
    are read by the workers at the same paths. On one kind of device, the store's bytes do not depend on the
    backend, on resuming, or on ``pipelined`` (False: decode, predict and write one batch after another in this
    thread, as before the overlap; kept for benchmarks and as the reference of the pipelined path); a CUDA run
    may differ from a CPU run by one level on some values (its post-processing runs on the GPU), so predict a
    store on one kind of device.
    """
    check_backend(backend, scheduler)
    check_jobs(jobs)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise SegensError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    spec = load_spec(spec_path)
    if per_fold and split != "test":
        raise SegensError("--per-fold is for --split test (an OOF image is predicted by one fold model already)")
    if per_fold and not spec.checkpoints:
        raise SegensError(f"{spec.where}: --per-fold needs a member with fold checkpoints")
    outs = [fold_store_path(out, fold) for fold in sorted(spec.checkpoints)] if per_fold else [str(out)]
    check_outputs([Output(path, "store", "--out", resumable=True) for path in outs],
                  inputs=[spec_path, root, folds_path], overwrite=overwrite)
    member = build_member(spec, device=device, trust_pickle=trust_pickle, trust_code=trust_code)
    if backend == "dask":
        root = Path(root).resolve()  # workers read the images by these paths, from their own working directory
    jobs_planned, checkpoints = member.plan(split, root, folds_path)
    targets = [(str(out), None, jobs_planned, checkpoints)]
    if per_fold:
        targets = [(path, fold, [(record, (fold,)) for record, _ in jobs_planned], {fold: checkpoints[fold]})
                   for path, fold in zip(outs, sorted(spec.checkpoints))]
    # every model loads and runs on a dummy input before a store exists: a refused or broken checkpoint leaves
    # nothing behind that a fixed rerun would trip over
    member.prepare(sorted({fold for _, folds_used in jobs_planned for fold in folds_used}))
    serial = backend == "local" and jobs == 1
    if not serial:
        member.release()  # each worker process loads its own copy
    trust = (trust_pickle, trust_code)
    written = skipped = 0
    started = time.perf_counter()
    with parallel_backend(backend, scheduler) as client:  # reach the cluster before anything is written
        for path, fold, planned, used in targets:
            location = shared_location(path, backend)
            fresh = local_path(location) is not None and not local_path(location).exists()
            store = create_store(location, spec.name, spec.kind, split, spec.to_dict(), used,
                                 images=[record.key for record, _ in planned], overwrite=overwrite,
                                 storage_options=store_options(location, storage_options), fold=fold)
            done = store.completed()
            todo = [job for job in planned if job[0].key not in done]
            batches = planned_batches(planned, batch_size, done)
            try:
                if serial:
                    _run(member, store, batches, done, split, progress, len(todo), pipelined)
                else:
                    _run_parallel(_portable(spec), _spec_hash(spec), device, trust, store, batches, done,
                                  split, progress, len(todo), n_jobs(backend, jobs), worker_count(client, jobs))
            except BaseException:
                if fresh and not store.completed():  # refused before its first image (a pickle, a bad output):
                    shutil.rmtree(local_path(location), ignore_errors=True)  # the rerun starts clean
                raise
            written, skipped = written + len(todo), skipped + len(planned) - len(todo)
    return PredictSummary(", ".join(outs), written, skipped, time.perf_counter() - started)


def _write_batch(member, store: ProbabilityStore, batch: list, split: str, done: set[str]) -> Iterator[str]:
    """Predict one whole batch (images sharing their folds) and write each image not in ``done``; yields keys as
    they are written."""
    records = [record for record, _ in batch]
    for record, (values, boxes) in zip(records, member.predict_batch(records, batch[0][1], split), strict=True):
        if record.key not in done:
            store.write_image(record.key, values, boxes)
            yield record.key


def _run(member, store: ProbabilityStore, batches: list[list], done: set[str], split: str, progress: bool,
         total: int, pipelined: bool = True) -> None:
    with progress_bar("img", disable=not progress) as bar:
        task = bar.add_task(f"{member.spec.name} {split}", total=total)
        if not pipelined:
            for batch in batches:
                for _ in _write_batch(member, store, batch, split, done):
                    bar.update(task, advance=1)
            return
        for _ in _pipelined(member, store, batches, done, split):
            bar.update(task, advance=1)


def _pipelined(member, store: ProbabilityStore, batches: list[list], done: set[str], split: str) -> Iterator[str]:
    """The serial path's predictions and writes, overlapped: up to ``READ_AHEAD`` batches are decoded in threads
    while the network runs, and up to ``WRITES_IN_FLIGHT`` finished images are written by ``WRITE_THREADS``
    threads; yields keys as their writes finish. On an error every started write is waited for (each image is
    complete or invisible), then the error is raised."""
    with ThreadPoolExecutor(max(1, READ_AHEAD), thread_name_prefix="segens-read") as readers, \
            ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="segens-write") as writers:
        pending: deque[list] = deque()  # batches whose images are being read, in order
        reads: deque[Future] = deque()
        writes: deque[tuple[str, Future]] = deque()
        upcoming = iter(batches)

        def read_next() -> None:
            batch = next(upcoming, None)
            if batch is not None:
                reads.append(readers.submit(member.read_batch, [record for record, _ in batch]))
                pending.append(batch)

        try:
            for _ in range(max(1, READ_AHEAD)):
                read_next()
            while pending:
                batch, images = pending.popleft(), reads.popleft().result()
                read_next()
                records = [record for record, _ in batch]
                results = member.predict_batch(records, batch[0][1], split, images=images)
                del images
                for record, (values, boxes) in zip(records, results, strict=True):
                    if record.key in done:
                        continue
                    while len(writes) >= WRITES_IN_FLIGHT:
                        key, future = writes.popleft()
                        future.result()
                        yield key
                    writes.append((record.key, writers.submit(store.write_image, record.key, values, boxes)))
                del results
            while writes:
                key, future = writes.popleft()
                future.result()
                yield key
        finally:
            for future in reads:
                future.cancel()
            for _, future in writes:  # let started writes finish: never leave the pool mid-image
                try:
                    future.result()
                except Exception:  # noqa: BLE001 - the first error is the one raised
                    pass


# ---- the parallel path: chunks of whole batches, one member per worker process ---------------------------------

_WORKER_MEMBERS: dict[tuple[str, str, str, tuple[bool, bool]], Any] = {}
_WORKER_LOCK = threading.Lock()


def _spec_hash(spec: MemberSpec) -> str:
    """sha256 of the spec file's content (or of its document, for a spec not read from a file)."""
    if spec.path is not None and Path(spec.path).is_file():
        return sha256_of(spec.path)
    import hashlib
    import json

    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


def _portable(spec: MemberSpec) -> MemberSpec:
    """The spec with absolute paths (its file, each checkpoint) for processes whose working directory differs."""
    return dataclasses.replace(
        spec, path=Path(spec.path).resolve() if spec.path is not None else None,
        checkpoints={fold: dataclasses.replace(checkpoint, path=Path(checkpoint.path).resolve())
                     for fold, checkpoint in spec.checkpoints.items()})


def worker_member(spec: MemberSpec, spec_hash: str, device: str, trust: tuple[bool, bool]):
    """The member adapter of this process, built on first use and kept in a module-level cache keyed by the spec
    file's content hash, its path, the device and ``trust`` (trust_pickle, trust_code): one model copy per worker
    process, reused by every task of the run (a task of another member replaces it)."""
    key = (spec_hash, str(spec.path), device, trust)
    with _WORKER_LOCK:  # threads of one worker share the copy
        member = _WORKER_MEMBERS.get(key)
        if member is None:
            _WORKER_MEMBERS.clear()  # only the latest member stays: a long-lived worker never piles up models
            member = _WORKER_MEMBERS[key] = build_member(spec, device=device, trust_pickle=trust[0],
                                                                 trust_code=trust[1])
    return member


def _predict_chunk(spec: MemberSpec, spec_hash: str, device: str, trust: tuple[bool, bool], store: ProbabilityStore,
                   batches: list[list], split: str, done: set[str]) -> int:
    """A task: predict a chunk of whole batches with this process's member and write their images not in
    ``done``; the number of images written."""
    member = worker_member(spec, spec_hash, device, trust)
    return sum(1 for batch in batches for _ in _write_batch(member, store, batch, split, done))


def chunk_batches(batches: list[list], workers: int) -> list[list[list]]:
    """Whole batches grouped into about ``CHUNKS_PER_WORKER`` chunks per worker, batches of the same folds
    together (a worker then loads fewer fold models); batch composition is never changed."""
    if not batches:
        return []
    ordered = sorted(batches, key=lambda batch: batch[0][1])  # stable: submission order within the same folds
    count = min(len(ordered), max(1, workers) * CHUNKS_PER_WORKER)
    size = -(-len(ordered) // count)
    return [ordered[start:start + size] for start in range(0, len(ordered), size)]


def _run_parallel(spec: MemberSpec, spec_hash: str, device: str, trust: tuple[bool, bool], store: ProbabilityStore,
                  batches: list[list], done: set[str], split: str, progress: bool, total: int, jobs: int,
                  workers: int) -> None:
    """Chunks of the same batches as the serial path, as tasks of the active joblib backend (local or Dask)."""
    from joblib import Parallel, delayed

    chunks = chunk_batches(batches, workers)
    tasks = (delayed(_predict_chunk)(spec, spec_hash, device, trust, store, chunk, split,
                                     {record.key for batch in chunk for record, _ in batch if record.key in done})
             for chunk in chunks)
    with progress_bar("img", disable=not progress) as bar:
        task = bar.add_task(f"{spec.name} {split}", total=total)
        for written in Parallel(n_jobs=jobs, batch_size=1, return_as="generator_unordered")(tasks):
            bar.update(task, advance=written)
