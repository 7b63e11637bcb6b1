"""The interface every member kind implements, and its two families. A new kind is one module: a subclass of
``NetworkMember`` (it runs a network from fold checkpoints) or of ``ImportedMember`` (it imports predictions made
elsewhere), decorated with ``@register("kind")`` (segens.members.registry).

A member is built from its spec once per process (it may hold models in memory) and then plans a split, predicts
batches of images into uint8 maps for the store, trains folds, and describes a checkpoint for ``ens inspect``.
Maps are (29, H, W) at the image's original size, in the competition's class order, p = v / 255. Every hook has
a default; the ones a kind cannot do raise a SegensError that names the spec and says what to do instead.

A kind declares what its spec's ``model:`` and ``train:`` sections may hold (``model_fields``, ``train_fields``;
None: it takes no training settings) and checks their values in ``parse_model`` / ``parse_train``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from segens.conventions.dataset import ImageRecord, discover
from segens.errors import SegensError
from segens.members.spec import Checkpoint, MemberSpec, sha256_of

Job = tuple[ImageRecord, tuple[int, ...]]
"""One image of a split and the folds whose checkpoints predict it (none for imported predictions)."""
StoredMaps = tuple[np.ndarray, list | None]
"""One image's (29, H, W) uint8 maps and per-class boxes of non-zero values (None: computed on write)."""


@dataclass
class FoldResult:
    """What training one fold produced: the kept checkpoint and its per-epoch history."""

    checkpoint: Checkpoint
    history: list[dict] = field(default_factory=list)  # one dict per epoch: epoch, loss, val_dice, ...


@dataclass
class CheckpointReport:
    """What ``ens inspect`` found; ``spec`` is the YAML a member spec for this checkpoint needs."""

    path: Path
    format: str
    kind: str | None = None
    architecture: str | None = None
    encoder: str | None = None
    class_names: list[str] | None = None
    mapping: list[tuple[int, str, int]] | None = None  # (model channel, name, competition index)
    recorded_input: dict[str, Any] | None = None
    input_used: dict[str, Any] | None = None  # the spec's contract, when inspected with a spec
    parameters: int | None = None
    input_shape: tuple[int, ...] | None = None
    output: str | None = None
    needs_trust_pickle: bool = False
    needs_trust_code: bool = False  # the spec names a model factory, not imported without --trust-code
    notes: list[str] = field(default_factory=list)
    spec: dict[str, Any] = field(default_factory=dict)

    def set_class_names(self, names: list[str] | None) -> None:
        """The class names a checkpoint carries and how they map to the competition's (a note if they do not)."""
        from segens.conventions.classes import CLASSES, NUM_CLASSES
        from segens.members.class_map import class_permutation

        self.class_names = names
        if names is None:
            return
        try:
            order = class_permutation(names, str(self.path))
        except SegensError as exc:
            self.notes.append(str(exc))
            return
        order = order or list(range(NUM_CLASSES))
        self.mapping = [(order[index], name, index) for index, name in enumerate(CLASSES)]

    @classmethod
    def of_spec(cls, path: Path, spec: MemberSpec) -> CheckpointReport:
        """An empty report of a checkpoint loaded through a member spec."""
        return cls(path, f"loaded as kind {spec.kind} by {spec.path}", kind=spec.kind)


def check_section(section: dict[str, Any], allowed: Sequence[str], where: str, kind: str, name: str) -> None:
    """A SegensError naming the spec, the section and the kind for fields a kind does not know."""
    unknown = sorted(str(key) for key in set(section) - set(allowed))
    if unknown:
        raise SegensError(f"{where}: unknown {name} field(s) {', '.join(unknown)} for kind {kind}; allowed: "
                          f"{', '.join(allowed) or 'none'}")


class Member(ABC):
    """A member kind's adapter (see the module docstring)."""

    kind: ClassVar[str] = ""
    spec_fields: ClassVar[frozenset[str]] = frozenset({"input", "input_size", "classes", "tta"})
    """The spec's general fields this kind reads (a spec that sets one it does not is an error)."""
    model_fields: ClassVar[tuple[str, ...]] = ()
    train_fields: ClassVar[tuple[str, ...] | None] = None
    cannot_train: ClassVar[str] = "its models are trained elsewhere"
    """Why ``ens train-member`` refuses this kind (when ``train_fields`` is None)."""
    trains_with_pseudo: ClassVar[bool] = False
    """Whether ``train_fold`` takes ``pseudo`` (pseudo-labelled images whose ignored pixels its loss leaves out)."""
    cannot_pseudo: ClassVar[str] = "its training cannot leave a pseudo-label's ignored pixels out of the loss"
    """Why ``ens train-member --pseudo`` refuses this kind (when ``trains_with_pseudo`` is False)."""

    def __init__(self, spec: MemberSpec, device: str = "cpu", trust_pickle: bool = False,
                 trust_code: bool = False) -> None:
        self.spec = spec
        self.where = spec.where
        self.trust_pickle = trust_pickle
        self.trust_code = trust_code
        """Whether code the spec names (a model factory) may be imported and run."""
        unused = sorted(spec.given & ({"input", "input_size", "classes", "tta"} - self.spec_fields))
        if unused:
            raise SegensError(f"{self.where}: kind {self.kind} does not use {', '.join(unused)}: it would be ignored; "
                              "remove it from the spec")
        check_section(spec.model, self.model_fields, self.where, self.kind, "model")
        if self.train_fields is None and spec.train:
            raise SegensError(f"{self.where}: kind {self.kind} has no 'train' settings: {self.cannot_train}; remove "
                              "the section")
        if self.train_fields is not None:
            check_section(spec.train, self.train_fields, self.where, self.kind, "train")
        self.model_settings = self.parse_model(dict(spec.model))
        self.train_settings = self.parse_train(dict(spec.train)) if self.train_fields is not None else None

    # ---- the spec's kind-specific sections ----------------------------------------------------------------

    def parse_model(self, section: dict[str, Any]) -> Any:
        """The checked ``model:`` section (fields already known to be ``model_fields``)."""
        return section

    def parse_train(self, section: dict[str, Any]) -> Any:
        """The checked ``train:`` section (fields already known to be ``train_fields``)."""
        return section

    # ---- a split ------------------------------------------------------------------------------------------

    @abstractmethod
    def plan(self, split: str, root: str | Path, folds_path: str | Path | None) -> tuple[list[Job], dict[int, dict[str, str]]]:
        """Each image of ``split`` with the folds that predict it, and the checkpoints the store records
        (fold -> {path, sha256}); every problem is an error before anything is written."""

    def read_batch(self, records: Sequence[ImageRecord]) -> list[np.ndarray] | None:
        """The decoded images of a batch as this member reads them (None: the kind reads no pixels)."""
        return None

    @abstractmethod
    def predict_batch(self, records: Sequence[ImageRecord], folds: Sequence[int], split: str,
                      images: Sequence[np.ndarray] | None = None) -> list[StoredMaps]:
        """The stored maps of each record (``images``: the records' decoded images when ``read_batch`` gave them)."""

    def prepare(self, folds: Sequence[int]) -> None:
        """Load what predicting with ``folds`` needs, so that a checkpoint or model that cannot be used is an
        error before any store exists (default: nothing to load)."""

    def release(self) -> None:
        """Drop what ``prepare`` loaded (the models live in worker processes instead)."""

    # ---- training and inspecting ----------------------------------------------------------------------------

    def train_fold(self, fold: int, train: Sequence[ImageRecord], val: Sequence[ImageRecord], out_dir: Path,
                   progress: bool = True) -> FoldResult:
        """Train on ``train``, validate on ``val`` with the competition's Dice, keep the best checkpoint in
        ``out_dir`` (resuming from its last checkpoint if one is there). A kind with ``trains_with_pseudo`` also
        takes ``pseudo=`` (a segens.training.pseudo.PseudoSource) and adds those images to ``train`` only."""
        raise SegensError(f"{self.where}: kind {self.kind} is not trained by segens ({self.cannot_train}); put each "
                          "fold's checkpoint in the spec's checkpoints and run `ens predict-member`")

    def describe(self, path: Path) -> CheckpointReport:
        """What ``ens inspect --spec`` prints: the checkpoint loaded exactly as prediction loads it."""
        raise SegensError(f"{self.where}: kind {self.kind} has no checkpoints to inspect")


class NetworkMember(Member):
    """Members that run a network: one checkpoint per fold (OOF images predicted by the fold that held them out,
    test images by every fold, averaged), images read by the spec's input contract, TTA passes. Subclasses give
    ``predict`` (float32 probabilities) and may give a faster exact ``predict_uint8``."""

    def plan(self, split: str, root: str | Path, folds_path: str | Path | None) -> tuple[list[Job], dict[int, dict[str, str]]]:
        from segens.folds.file import load_folds

        spec = self.spec
        if split == "oof":
            if folds_path is None:
                raise SegensError("--split oof needs --folds folds.json: each training image is predicted by the "
                                  "checkpoint of the fold that held it out")
            folds = load_folds(folds_path, root=root)
            jobs = [(record, (folds.fold_of(record.key),)) for record in discover(root, "train").records]
        elif split == "test":
            every_fold = tuple(sorted(spec.checkpoints))
            if not every_fold:
                raise SegensError(f"{spec.path}: member {spec.name!r} has no checkpoints; run `ens train-member` first")
            jobs = [(record, every_fold) for record in discover(root, "test", require_labels=False).records]
        else:
            raise SegensError(f"unknown split {split!r}; use oof or test")
        used = sorted({fold for _, folds_used in jobs for fold in folds_used})
        for fold in used:
            spec.checkpoint(fold)  # a missing checkpoint is an error before anything is written
        return jobs, self.verified_checkpoints(used)

    def verified_checkpoints(self, folds_used: Sequence[int]) -> dict[int, dict[str, str]]:
        """fold -> {path, sha256} of the checkpoints in use, each file's hash checked against the spec."""
        spec = self.spec
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

    @abstractmethod
    def model_for(self, fold: int) -> Any:
        """The loaded, checked model of ``fold``'s checkpoint (cached)."""

    def prepare(self, folds: Sequence[int]) -> None:
        for fold in folds:
            self.model_for(fold)

    def release(self) -> None:
        self._models.clear()

    def read_image(self, path: str | Path) -> np.ndarray:
        """An image as the input contract reads it: (H, W) gray or (H, W, 3) colour uint8."""
        return self.spec.input.read(path)

    def read_batch(self, records: Sequence[ImageRecord]) -> list[np.ndarray]:
        return [self.read_image(record.image_path) for record in records]

    def predict_batch(self, records: Sequence[ImageRecord], folds: Sequence[int], split: str,
                      images: Sequence[np.ndarray] | None = None) -> list[StoredMaps]:
        return self.predict_uint8(self.read_batch(records) if images is None else images, folds)

    @abstractmethod
    def predict(self, images: Sequence[np.ndarray], folds: Sequence[int]) -> list[np.ndarray]:
        """Images from ``read_image`` -> (29, H, W) float32 probabilities, averaged over the checkpoints of ``folds``."""

    def predict_uint8(self, images: Sequence[np.ndarray], folds: Sequence[int]) -> list[StoredMaps]:
        """The quantized ``predict`` (boxes computed on write)."""
        from segens.store import quantize

        return [(quantize(probabilities), None) for probabilities in self.predict(images, folds)]


class ImportedMember(Member):
    """Members whose predictions were made elsewhere (a submission CSV, arrays): no folds, no pixels read; the
    store's one 'checkpoint' (fold 0) is the member's identity, the same for its oof and test stores."""

    spec_fields = frozenset()

    def plan(self, split: str, root: str | Path, folds_path: str | Path | None) -> tuple[list[Job], dict[int, dict[str, str]]]:
        if split not in ("oof", "test"):
            raise SegensError(f"unknown split {split!r}; use oof or test")
        records = discover(root, "train" if split == "oof" else "test", require_labels=False).records
        self.check_images(split, records)
        return [(record, ()) for record in records], self.checkpoints_for(split)

    def predict_batch(self, records: Sequence[ImageRecord], folds: Sequence[int], split: str,
                      images: Sequence[np.ndarray] | None = None) -> list[StoredMaps]:
        return [(values, None) for values in self.predict_records(records, split)]

    @abstractmethod
    def check_images(self, split: str, records: Sequence[ImageRecord]) -> None:
        """A SegensError when the imported predictions name an image that is not one of ``records``."""

    @abstractmethod
    def checkpoints_for(self, split: str) -> dict[int, dict[str, str]]:
        """The store's only 'checkpoint' (fold 0): what was imported for this split and the member's identity."""

    @abstractmethod
    def predict_records(self, records: Sequence[ImageRecord], split: str) -> list[np.ndarray]:
        """(29, H, W) uint8 maps of each record, at its own size."""
