"""A toy member kind, the whole of it: an "oracle" whose maps are each image's own label (p = 1 inside a bone,
0 elsewhere), for checking a pipeline end to end. Import this module and ``kind: oracle`` is a member spec kind.
tests/test_extending.py runs it."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from segens.conventions.dataset import ImageRecord, image_size
from segens.conventions.labels import read_label_mask
from segens.errors import SegensError
from segens.members.base import ImportedMember
from segens.members.registry import register


@register("oracle")
class OracleMember(ImportedMember):
    model_fields = ()  # nothing to configure
    cannot_train = "it reads the labels"

    def check_images(self, split: str, records: Sequence[ImageRecord]) -> None:
        unlabelled = [record for record in records if record.label_path is None]
        if unlabelled:
            raise SegensError(f"{unlabelled[0].image_path}: kind oracle needs every image's label file")

    def checkpoints_for(self, split: str) -> dict[int, dict[str, str]]:
        identity = hashlib.sha256(f"oracle/{self.spec.name}".encode()).hexdigest()
        return {0: {"path": "labels", "sha256": identity}}

    def predict_records(self, records: Sequence[ImageRecord], split: str) -> list[np.ndarray]:
        return [read_label_mask(record.label_path, *image_size(record.image_path)).view(np.uint8) * np.uint8(255)
                for record in records]
