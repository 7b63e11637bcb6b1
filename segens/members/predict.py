"""``ens predict-member``: a member's per-class probabilities at original resolution, written into a store.

``oof``: every training image predicted only by the checkpoint of the fold that held it out (honest
out-of-fold predictions). ``test``: every test image, all fold checkpoints averaged in probability space.
Completed images are skipped (resume is the default); a killed run loses at most the images in flight.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segens.dataset import ImageRecord, discover, read_image
from segens.errors import SegensError
from segens.folds.splits import load_folds
from segens.members.registry import factory
from segens.members.spec import MemberSpec, load_spec, sha256_of
from segens.members.store import ProbabilityStore, create_store, quantize
from segens.progress import progress_bar

@dataclass
class PredictSummary:
    """What a prediction run did: images written and skipped, seconds, and the store's URL."""

    store: str
    written: int
    skipped: int
    seconds: float


def plan(spec: MemberSpec, split: str, root: str | Path, folds_path: str | Path | None) -> list[tuple[ImageRecord, tuple[int, ...]]]:
    """Each image of the split with the folds whose checkpoints predict it, checked against the spec."""
    if split == "oof":
        if folds_path is None:
            raise SegensError("--split oof needs --folds folds.json: each training image is predicted by the "
                              "checkpoint of the fold that held it out")
        folds = load_folds(folds_path, root=root)
        records = discover(root, "train").records
        jobs = [(record, (folds.fold_of(record.key),)) for record in records]
    elif split == "test":
        records = discover(root, "test", require_labels=False).records
        every_fold = tuple(sorted(spec.checkpoints))
        if not every_fold:
            raise SegensError(f"{spec.path}: member {spec.name!r} has no checkpoints; run `ens train-member` first")
        jobs = [(record, every_fold) for record in records]
    else:
        raise SegensError(f"unknown split {split!r}; use oof or test")
    for fold in sorted({fold for _, folds_used in jobs for fold in folds_used}):
        spec.checkpoint(fold)  # a missing checkpoint is an error before anything is written
    return jobs


def verified_checkpoints(spec: MemberSpec, folds_used: set[int]) -> dict[int, dict[str, str]]:
    """fold -> {path, sha256} of the checkpoints in use, each file's hash checked against the spec."""
    checkpoints = {}
    for fold in sorted(folds_used):
        checkpoint = spec.checkpoint(fold)
        if not checkpoint.path.exists():
            raise SegensError(f"{checkpoint.path}: checkpoint of fold {fold} (member {spec.name}) not found")
        actual = sha256_of(checkpoint.path)
        if actual != checkpoint.sha256:
            raise SegensError(f"{checkpoint.path}: sha256 {actual[:12]}... differs from the spec's "
                              f"{checkpoint.sha256[:12]}...; the file changed since `ens train-member` wrote it")
        checkpoints[fold] = {"path": str(checkpoint.path), "sha256": checkpoint.sha256}
    return checkpoints


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


def predict_batch(member, records: Sequence[ImageRecord], folds_used: Sequence[int], split: str) -> list[np.ndarray]:
    """(29, H, W) probabilities per record: float32 in [0, 1], or uint8 already quantized (kind csv, which
    reads its CSV rather than pixels)."""
    if not getattr(member, "uses_folds", True):
        return member.predict_records(records, split)
    return member.predict([read_image(record.image_path) for record in records], folds_used)


def predict_member(spec_path: str | Path, split: str, root: str | Path, out: str | Path,
                   folds_path: str | Path | None = None, overwrite: bool = False, device: str = "cpu",
                   trust_pickle: bool = False, batch_size: int = 4, progress: bool = True) -> PredictSummary:
    """Predict a split into the store at ``out`` (created, or resumed if it has the same identity)."""
    spec = load_spec(spec_path)
    member = factory(spec.kind)(spec, device=device, trust_pickle=trust_pickle)
    if getattr(member, "uses_folds", True):
        jobs = plan(spec, split, root, folds_path)
        checkpoints = verified_checkpoints(spec, {fold for _, folds_used in jobs for fold in folds_used})
    else:
        records = discover(root, "train" if split == "oof" else "test", require_labels=False).records
        member.check_images(split, records)
        jobs, checkpoints = [(record, ()) for record in records], member.checkpoints_for(split)
    store = create_store(out, spec.name, spec.kind, split, spec.to_dict(), checkpoints, overwrite=overwrite)
    done = store.completed()
    todo = [job for job in jobs if job[0].key not in done]
    started = time.perf_counter()
    _run(member, store, todo, batch_size, split, progress)
    return PredictSummary(str(out), len(todo), len(jobs) - len(todo), time.perf_counter() - started)


def _run(member, store: ProbabilityStore, todo: list, batch_size: int, split: str, progress: bool) -> None:
    with progress_bar("img", disable=not progress) as bar:
        task = bar.add_task(f"{member.spec.name} {split}", total=len(todo))
        for batch in _batches(todo, batch_size):
            records = [record for record, _ in batch]
            for record, probabilities in zip(records, predict_batch(member, records, batch[0][1], split), strict=True):
                values = probabilities if probabilities.dtype == np.uint8 else quantize(probabilities)
                store.write_image(record.key, values)
                bar.update(task, advance=1)
