"""Members of kind ``csv``: an existing submission CSV imported as a binary member (p is 0 or 1), matched to
images by (image_name, class), never by row position. This is how users vote over CSVs they already have.

Spec: ``model: {oof: team_a_oof.csv, test: team_a_test.csv}`` (paths relative to the spec's folder); either
may be left out if that split is not needed. The member's one "checkpoint" (fold 0) is its identity: a sha256 of
its name and of the content of every CSV the spec names, the same for its oof and test stores, so a recipe
searched on the oof store applies to the test store, and any changed CSV is a changed member.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segens.conventions.dataset import ImageRecord, image_size
from segens.conventions.rle import decode_stack
from segens.conventions.submission import Submission, read_submission
from segens.errors import SegensError
from segens.members.base import ImportedMember
from segens.members.registry import register
from segens.members.spec import MemberSpec, sha256_of
from segens.store import SCALE

SPLIT_FIELDS = ("oof", "test")
IDENTITY_FORMAT = "segens-csv-member/1"


@register("csv")
class CsvMember(ImportedMember):
    """Adapter that reads masks from a submission CSV instead of running a network."""

    model_fields = SPLIT_FIELDS  # a CSV path per split
    cannot_train = "its masks are read from submission CSVs"

    def __init__(self, spec: MemberSpec, device: str = "cpu", trust_pickle: bool = False,
                 trust_code: bool = False) -> None:
        super().__init__(spec, device, trust_pickle, trust_code)
        self._submissions: dict[str, Submission] = {}

    def csv_path(self, split: str) -> Path:
        """The CSV of a split, relative paths taken from the spec's folder."""
        if split not in self.spec.model:
            raise SegensError(f"{self.where}: member {self.spec.name!r} names no CSV for split {split!r} "
                              f"(add model: {{{split}: path.csv}})")
        path = Path(self.spec.model[split])
        base = self.spec.path.parent if self.spec.path else Path.cwd()
        path = path if path.is_absolute() else base / path
        if not path.exists():
            raise SegensError(f"{path}: CSV of member {self.spec.name!r} ({split}) not found")
        return path

    def identity(self) -> str:
        """sha256 (hex) of the member's name and the sha256 of each CSV its spec names, by split: the same for
        every split, different as soon as any of its CSVs changes."""
        csvs = {}
        for split in SPLIT_FIELDS:
            if split in self.spec.model:
                try:
                    csvs[split] = sha256_of(self.csv_path(split))
                except SegensError as exc:
                    raise SegensError(f"{exc}; a csv member's identity covers every CSV its spec names, so that a "
                                      "recipe searched on its oof store applies to its test store: add the file, "
                                      f"or remove model.{split} from the spec") from None
        document = {"format": IDENTITY_FORMAT, "name": self.spec.name, "csv_sha256": csvs}
        return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()

    def checkpoints_for(self, split: str) -> dict[int, dict[str, str]]:
        """The store's only 'checkpoint' (fold 0): this split's CSV path and the member's identity as sha256."""
        return {0: {"path": str(self.csv_path(split)), "sha256": self.identity()}}

    def check_images(self, split: str, records: Sequence[ImageRecord]) -> None:
        """Every CSV image must be one of ``records`` (a CSV of another split or data set is an error)."""
        submission = self._submission(split)
        names = {record.name for record in records}
        extra = sorted(set(submission.rles) - names)
        if extra:
            raise SegensError(f"{submission.path}: {len(extra)} image(s) are not in this split of the data root, "
                              f"first {extra[0]}; is it the CSV of another split?")

    def _submission(self, split: str) -> Submission:
        if split not in self._submissions:
            self._submissions[split] = read_submission(self.csv_path(split))
        return self._submissions[split]

    def predict_records(self, records: Sequence[ImageRecord], split: str) -> list[np.ndarray]:
        """(29, H, W) uint8 maps, 255 inside each class's mask and 0 elsewhere, at each image's own size."""
        submission = self._submission(split)
        maps = []
        for record in records:
            height, width = image_size(record.image_path)
            masks = decode_stack(submission.image(record.name), height, width, f"{submission.path} {record.name}")
            maps.append(masks.view(np.uint8) * np.uint8(SCALE))
        return maps
