"""Members of kind ``nnunet``: nnU-Net v2 predictions imported into a store, read the way nnU-Net wrote them
(``nnUNetv2_predict --save_probabilities`` for test images, the ``fold_N/validation`` folders that
``nnUNetv2_train --npz`` leaves for OOF images).

```yaml
version: 2
name: nnunet-2d
kind: nnunet
model:
  oof: results/Dataset501_Hand/nnUNetTrainer__nnUNetPlans__2d/fold_*/validation   # a folder, a glob or a list
  test: predictions/test       # the -o folder of nnUNetv2_predict (its folds already averaged by nnU-Net)
  case: "{stem}"               # an image's case name: {stem} its file name, {folder} its patient folder
  dataset_json: null           # default: dataset.json in the folder, else its parent's, else its grandparent's
classes: [...]                 # optional: the competition's name of each dataset.json label/region, in its order
input: {resize: bilinear}      # maps at another size than the image's (nnU-Net run on downscaled images)
```

Channels, as nnU-Net's ``LabelManager`` lays them out: region-based training (a label given as a list of more
than one value; the only way nnU-Net learns overlapping bones) saves one sigmoid channel per region, in the order
of ``labels`` without background and ``ignore``; label-based training saves one softmax channel per label value,
sorted, background (0) first, which is dropped. The foreground channels are matched to the 29 classes by name.

Cases: every ``<case>.npz`` in the split's folders (not their subfolders) must be exactly one image's case, and
every image must have one; a case in two folders is an error naming both. The ``probabilities`` array is
``(C, 1, H, W)`` for 2-D images. nnU-Net's ``<case>.pkl`` beside it is a pickle: it is opened only with
``--trust-pickle``, and then its ``shape_before_cropping`` must equal the map's shape (the two files belong to
one prediction, and the map covers the whole image nnU-Net read). Without it nothing the maps need is lost: the
maps are exported at nnU-Net's raw image size already, and segens checks them against each image itself.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segens.conventions.dataset import ImageRecord, image_size
from segens.errors import SegensError
from segens.infra.safeload import load_json, pickle_load
from segens.members.class_map import class_permutation
from segens.members.kinds.arrays import SPLIT_FIELDS, ArraysMember
from segens.members.registry import register
from segens.members.spec import MemberSpec

CASE_PLACEHOLDERS = ("{stem}", "{folder}")
ARRAY = "probabilities"


@register("nnunet")
class NnunetMember(ArraysMember):
    """Adapter that reads nnU-Net's per-case ``.npz`` files, its channels named by ``dataset.json``."""

    spec_fields = frozenset({"classes", "input"})
    model_fields = (*SPLIT_FIELDS, "case", "dataset_json")
    cannot_train = "nnU-Net trains it: run `nnUNetv2_train`, then import its predictions"

    def __init__(self, spec: MemberSpec, device: str = "cpu", trust_pickle: bool = False,
                 trust_code: bool = False) -> None:
        super().__init__(spec, device, trust_pickle, trust_code)
        self.order = None  # the channels come from dataset.json (``layout``); classes names its labels
        self._cases: dict[str, dict[str, Path]] = {}
        self._layouts: dict[str, tuple[int, list[int]]] = {}

    def parse_model(self, section: dict[str, Any]) -> dict[str, Any]:
        for split in SPLIT_FIELDS:
            folders = section.get(split)
            if folders is not None and not (isinstance(folders, str) or (
                    isinstance(folders, list) and folders and all(isinstance(f, str) for f in folders))):
                raise SegensError(f"{self.where}: model.{split} must be a folder of nnU-Net's .npz files, a glob of "
                                  f"folders or a list of folders, got {folders!r}")
        if not any(split in section for split in SPLIT_FIELDS):
            raise SegensError(f"{self.where}: an nnunet member needs model.oof or model.test (a folder of nnU-Net's "
                              "<case>.npz files)")
        case = section.setdefault("case", "{stem}")
        if not isinstance(case, str) or case.count("{stem}") != 1 or "/" in case \
                or case.replace("{stem}", "").replace("{folder}", "").count("{"):
            raise SegensError(f"{self.where}: model.case must name each case with {{stem}} once (the image's file "
                              f"name without extension) and optionally {{folder}} (its patient folder), e.g. "
                              f"'{{folder}}_{{stem}}'; got {case!r}")
        dataset_json = section.get("dataset_json")
        if dataset_json is not None and not isinstance(dataset_json, str):
            raise SegensError(f"{self.where}: model.dataset_json must be a path, got {dataset_json!r}")
        # what ArraysMember reads: nnU-Net saves probabilities (softmax or sigmoid) in an array of this name
        return {**section, "array": ARRAY, "values": "probabilities", "scale": 1}

    # ---- folders and cases ----------------------------------------------------------------------------------

    def _resolve(self, path: str) -> Path:
        base = self.spec.path.parent if self.spec.path else Path.cwd()
        return Path(path) if Path(path).is_absolute() else base / path

    def folders(self, split: str) -> list[Path]:
        """The split's folders (globs expanded, sorted); a folder that is not there is an error naming it."""
        if split not in self.model_settings:
            raise SegensError(f"{self.where}: member {self.spec.name!r} names no folder for split {split!r} (add "
                              f"model: {{{split}: <nnU-Net output folder>}})")
        given = self.model_settings[split]
        folders: list[Path] = []
        for entry in [given] if isinstance(given, str) else given:
            path = self._resolve(entry)
            if any(mark in entry for mark in "*?["):  # a glob of folders
                matched = sorted(Path(found) for found in glob.glob(str(path)) if Path(found).is_dir())
                if not matched:
                    raise SegensError(f"{path}: no folder matches this {split} pattern (member {self.spec.name!r})")
                folders += matched
            elif not path.is_dir():
                raise SegensError(f"{path}: the {split} folder of nnU-Net predictions is not there (member "
                                  f"{self.spec.name!r})")
            else:
                folders.append(path)
        return folders

    def cases(self, split: str) -> dict[str, Path]:
        """case -> its .npz over the split's folders; a case in two folders is an error naming both files."""
        if split not in self._cases:
            found: dict[str, Path] = {}
            for folder in self.folders(split):
                for path in sorted(folder.glob("*.npz")):
                    case = path.name[:-len(".npz")]
                    if case in found:
                        raise SegensError(f"{path}: case {case!r} is also in {found[case]}; each image needs one "
                                          f"prediction (member {self.spec.name!r}, split {split})")
                    found[case] = path
            self._cases[split] = found
        return self._cases[split]

    def case_of(self, record: ImageRecord) -> str:
        """The case name of an image: model.case with {stem} and {folder} filled in."""
        folder = record.key.split("/", 1)[0] if "/" in record.key else ""
        return self.model_settings["case"].replace("{stem}", Path(record.name).stem).replace("{folder}", folder)

    def files(self, split: str, records: Sequence[ImageRecord]) -> dict[str, Path]:
        """case -> .npz of every record; an image without a case, or a case without an image, is an error."""
        cases = self.cases(split)
        wanted: dict[str, str] = {}
        for record in records:
            case = self.case_of(record)
            if case in wanted:
                raise SegensError(f"{self.where}: images {wanted[case]} and {record.key} are both case {case!r}; "
                                  "set model.case: '{folder}_{stem}' if the cases carry the patient folder")
            wanted[case] = record.key
        missing = [case for case in wanted if case not in cases]
        if missing:
            raise SegensError(f"{self.folders(split)[0]}: no {split} prediction {missing[0]}.npz for image "
                              f"{wanted[missing[0]]} ({len(missing)} of {len(wanted)} missing; member "
                              f"{self.spec.name!r}, case rule {self.model_settings['case']!r})")
        extra = sorted(set(cases) - set(wanted))
        if extra:
            raise SegensError(f"{cases[extra[0]]}: case {extra[0]!r} is none of the {split} images of the data root "
                              f"({len(extra)} such files; member {self.spec.name!r}, case rule "
                              f"{self.model_settings['case']!r})")
        return {case: cases[case] for case in wanted}

    # ---- channels -------------------------------------------------------------------------------------------

    def dataset_json(self, split: str) -> Path:
        """The split's dataset.json: model.dataset_json, else the first folder's, its parent's or grandparent's."""
        if self.model_settings.get("dataset_json"):
            return self._resolve(self.model_settings["dataset_json"])
        first = self.folders(split)[0]
        for folder in (first, first.parent, first.parent.parent):
            if (folder / "dataset.json").is_file():
                return folder / "dataset.json"
        raise SegensError(f"{first}: no dataset.json here, in its parent or grandparent (nnU-Net copies it into "
                          f"its output folder); set model.dataset_json (member {self.spec.name!r})")

    def layout(self, split: str) -> tuple[int, list[int]]:
        """(channels in the split's ``probabilities`` arrays, and for each competition class the one holding it)."""
        if split not in self._layouts:
            path = self.dataset_json(split)
            every = channel_names(load_json(path, "nnU-Net dataset.json"), path)
            channels = [index for index, name in enumerate(every) if name != "background"]
            names = [every[index] for index in channels]
            if self.spec.classes is not None:
                if len(self.spec.classes) != len(names):
                    raise SegensError(f"{self.where}: classes names {len(self.spec.classes)} classes, {path} has "
                                      f"{len(names)} foreground labels ({', '.join(names)})")
                names = list(self.spec.classes)
            order = class_permutation(names, f"{path}: labels" if self.spec.classes is None else
                                      f"{self.where}: classes") or list(range(len(names)))
            self._layouts[split] = (len(every), [channels[index] for index in order])
        return self._layouts[split]

    # ---- the member interface ---------------------------------------------------------------------------------

    def identity(self) -> str:
        """The arrays identity (name, settings, every split's file listing) and every split's channel layout."""
        layout = {split: self.layout(split) for split in SPLIT_FIELDS if split in self.model_settings}
        document = {"files": super().identity(), "channels": layout}
        return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()

    def check_images(self, split: str, records: Sequence[ImageRecord]) -> None:
        self.files(split, records)
        self.layout(split)

    def checkpoints_for(self, split: str) -> dict[int, dict[str, str]]:
        return {0: {"path": ", ".join(str(folder) for folder in self.folders(split)), "sha256": self.identity()}}

    def predict_records(self, records: Sequence[ImageRecord], split: str) -> list[np.ndarray]:
        cases = self.cases(split)  # every case was matched to an image by check_images when the split was planned
        maps = []
        for record in records:
            path = cases[self.case_of(record)]
            if self.trust_pickle:
                self.check_properties(path)
            maps.append(self.read_maps(path, image_size(record.image_path), split))
        return maps

    def competition_channels(self, values: np.ndarray, where: str, split: str) -> np.ndarray:
        count, channels = self.layout(split)
        if values.shape[0] != count:
            raise SegensError(f"{where}: {values.shape[0]} channels, but {self.dataset_json(split)} describes "
                              f"{count}; are these predictions of another dataset?")
        return values[channels]

    def check_properties(self, path: Path) -> None:
        """With --trust-pickle: the case's .pkl describes a raw image of the map's shape."""
        pkl = path.with_suffix(".pkl")
        if not pkl.is_file():
            raise SegensError(f"{pkl}: nnU-Net's properties of {path.name} are missing (run without --trust-pickle to "
                              "import the maps without them)")
        properties = pickle_load(pkl, "nnU-Net properties file")
        shape = properties.get("shape_before_cropping") if isinstance(properties, dict) else None
        with np.load(path, allow_pickle=False) as archive:
            mapped = tuple(archive[ARRAY].shape[1:])
        if shape is None or tuple(int(side) for side in shape) != mapped:
            raise SegensError(f"{pkl}: shape_before_cropping {shape} is not the shape {mapped} of the maps in "
                              f"{path.name}; the two files come from different predictions")


def channel_names(dataset: Any, path: Path) -> list[str]:
    """The name of each channel of nnU-Net's ``probabilities`` for this dataset.json (background included for
    label-based training), as nnunetv2's LabelManager lays them out."""
    labels = dataset.get("labels") if isinstance(dataset, dict) else None
    if not isinstance(labels, dict) or labels.get("background") != 0:
        raise SegensError(f"{path}: not an nnU-Net v2 dataset.json (needs 'labels' with 'background': 0)")
    labels = {name: value for name, value in labels.items() if name != "ignore"}
    if any(isinstance(value, list) and len(value) > 1 for value in labels.values()):
        return [name for name, value in labels.items() if set(np.atleast_1d(value).tolist()) != {0}]
    by_value: dict[int, str] = {}
    for name, value in labels.items():
        number = value[0] if isinstance(value, list) and len(value) == 1 else value
        if isinstance(number, bool) or not isinstance(number, int) or number in by_value:
            raise SegensError(f"{path}: label {name!r} has value {value!r}; label-based datasets give each label "
                              "its own integer")
        by_value[number] = name
    return [by_value[value] for value in sorted(by_value)]
