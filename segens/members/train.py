"""``ens train-member``: train a member's checkpoint for each requested fold on the other folds and write the
checkpoints into its spec, so that ``ens predict-member`` uses them without any editing by hand."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from joblib import Parallel, delayed

from segens.conventions.dataset import discover
from segens.store.pseudo_folder import load_pseudo
from segens.errors import SegensError
from segens.folds.file import load_folds
from segens.infra.backend import check_jobs
from segens.infra.outputs import Output, check_outputs
from segens.members.base import FoldResult
from segens.members.registry import build_member
from segens.members.spec import MemberSpec, load_spec, record_checkpoint


@dataclass
class FoldSummary:
    """One trained fold: its number, image counts, best validation Dice, epochs run, checkpoint path."""

    fold: int
    train_images: int
    val_images: int
    val_dice: float | None
    epochs: int
    checkpoint: Path


def parse_fold_choice(choice: str, k: int) -> list[int]:
    """``all`` -> 0..k-1; ``2`` or ``0,3`` -> those folds, each checked against k."""
    if choice == "all":
        return list(range(k))
    try:
        folds = [int(part) for part in choice.split(",")]
    except ValueError:
        raise SegensError(f"--fold must be 'all' or fold numbers like 0 or 0,3, got {choice!r}") from None
    bad = [fold for fold in folds if not 0 <= fold < k]
    if bad:
        raise SegensError(f"--fold {bad[0]} is outside the folds file's 0..{k - 1}")
    return folds


def _train_one(spec_path: Path, root: Path, folds_path: Path, number: int, device: str, base: Path,
               progress: bool, trust_pickle: bool = False,
               pseudo: Path | None = None) -> tuple[int, FoldResult, int, int]:
    """Train one fold in this process (a joblib worker when --jobs > 1); ``pseudo``: a pseudo-label folder whose
    images join the fold's training images (never its validation images)."""
    spec = load_spec(spec_path)
    folds = load_folds(folds_path)
    records = discover(root, "train").by_key()
    train = [records[key] for key in folds.train_keys(number)]
    val = [records[key] for key in folds.keys_in(number)]
    member = build_member(spec, device=device, trust_pickle=trust_pickle)
    if pseudo is None:
        result = member.train_fold(number, train, val, base / f"fold{number}", progress=progress)
    else:
        result = member.train_fold(number, train, val, base / f"fold{number}", progress=progress,
                                   pseudo=load_pseudo(pseudo))
    return number, result, len(train), len(val)


def pseudo_folder(spec: MemberSpec, given: str | Path | None) -> Path | None:
    """The pseudo-label folder to train with: ``given`` (--pseudo), else the spec's ``train.pseudo`` (relative to
    the spec's folder), else None."""
    if given is not None:
        return Path(given)
    value = spec.train.get("pseudo")
    if value is None:
        return None
    path = Path(value)
    return path if path.is_absolute() or spec.path is None else spec.path.parent / path


def check_pseudo(spec: MemberSpec, member, folder: Path, root: Path) -> int:
    """The pseudo folder opened and checked against the member's kind and the data root: a pseudo image that is
    also one of the root's training images (it would be validated on) is an error. Its image count."""
    if member.train_fields is not None and not member.trains_with_pseudo:  # (one segens cannot train says so later)
        raise SegensError(f"{spec.where}: kind {spec.kind} cannot train with pseudo-labels ({folder}): "
                          f"{member.cannot_pseudo}")
    pseudo = load_pseudo(folder)
    training = discover(root, "train").by_key()
    shared = sorted(record.key for record in pseudo.records if record.key in training)
    if shared:
        raise SegensError(f"{folder}: image {shared[0]!r} is pseudo-labelled and also a training image of {root} "
                          f"({len(shared)} in all): it could land in a validation fold; pseudo-label test images only")
    return len(pseudo.records)


def check_own_checkpoints(spec: MemberSpec, folds: list[int], base: Path, overwrite: bool) -> None:
    """A SegensError, unless ``overwrite``, for a fold whose spec entry names a checkpoint that train-member did
    not write (not under ``base``): training the fold would replace the user's entry."""
    if overwrite:
        return
    base = base.resolve()
    for number in folds:
        checkpoint = spec.checkpoints.get(number)
        if checkpoint is not None and not Path(checkpoint.path).resolve().is_relative_to(base):
            raise SegensError(f"{spec.where}: fold {number}'s checkpoint is {checkpoint.path}, not one train-member "
                              f"wrote (under {base}); training fold {number} would replace that entry. Pass "
                              "--overwrite to replace it, or train with a copy of the spec")


def train_member(spec_path: str | Path, root: str | Path, folds_path: str | Path, fold: str = "all",
                 device: str = "cpu", jobs: int = 1, checkpoints_dir: str | Path | None = None,
                 progress: bool = True, trust_pickle: bool = False, overwrite: bool = False,
                 pseudo: str | Path | None = None) -> list[FoldSummary]:
    """Train the requested folds (one after another, or ``jobs`` side by side); the spec is rewritten
    atomically, by this process only, as each fold finishes.

    The spec and the folds file are checked against the data root before any training starts. Checkpoints go
    to ``checkpoints_dir`` (default: ``<spec folder>/<member name>/``), one sub-folder per fold; an interrupted
    fold there resumes. Resume state that needs a full unpickler (YOLO's, an older segens' last.pt) is loaded
    only with ``trust_pickle``. A fold whose spec entry names a checkpoint outside that folder (one the user
    put there) is trained only with ``overwrite``: its entry would be replaced.

    ``pseudo`` (else the spec's ``train.pseudo``): a folder from ``ens pseudo-label`` whose images are added to
    every fold's training images, never to its validation images; their ignored pixels are left out of the loss
    and each checkpoint records the folder's identity, the recipe's sha256 among it (segens.training.loop).
    """
    check_jobs(jobs)
    spec_path, root, folds_path = Path(spec_path), Path(root), Path(folds_path)
    spec = load_spec(spec_path)
    base = Path(checkpoints_dir) if checkpoints_dir else spec_path.parent / spec.name
    check_outputs([Output(base, "folder", "--checkpoints", resumable=True)], inputs=[spec_path, root, folds_path])
    if not os.access(spec_path.parent, os.W_OK | os.X_OK):
        raise SegensError(f"{spec_path}: its folder is not writable, and train-member writes the trained checkpoints "
                          "into the spec (atomically, beside it); copy the spec to a writable folder")
    folds = load_folds(folds_path, root=root)
    chosen = parse_fold_choice(fold, folds.k)
    check_own_checkpoints(spec, chosen, base, overwrite)
    member = build_member(spec, device=device)  # validates the spec's kind-specific fields up front
    folder = pseudo_folder(spec, pseudo)
    if folder is not None:
        check_pseudo(spec, member, folder, root)
    tasks = (delayed(_train_one)(spec_path, root, folds_path, number, device, base, progress and jobs == 1,
                                 trust_pickle, folder) for number in chosen)
    summaries = []
    for number, result, train_count, val_count in Parallel(n_jobs=jobs, return_as="generator_unordered")(tasks):
        record_checkpoint(spec_path, number, result.checkpoint)  # the rest of the spec stays as written
        summaries.append(FoldSummary(number, train_count, val_count, result.checkpoint.val_dice,
                                     len(result.history), result.checkpoint.path))
    return sorted(summaries, key=lambda summary: summary.fold)
