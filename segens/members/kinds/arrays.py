"""Members of kind ``arrays``: predictions saved elsewhere as one numpy file per image (``.npy``, or ``.npz``
with a named array), imported into a store. This is how teams that kept float16 maps, nnU-Net's
``--save_probabilities`` or MMSegmentation outputs join an ensemble.

```yaml
version: 2
name: team-npy
kind: arrays
model:
  oof: preds/oof/{key}.npy     # {key}: the image's relative path without extension, ID001/image1661130828152
  test: preds/test/{key}.npy   # or {stem}: its file name without extension, image1661130828152 (flat folders)
  array: probabilities         # .npz only: the array's name (optional when the file holds one array)
  values: probabilities        # probabilities | logits
  scale: 1                     # integer arrays: divide by this (255 for uint8, 65535 for uint16); floats: 1
classes: [...]                 # channel order when it is not the competition's (optional)
input: {resize: area}          # how maps at another size reach the image's (area | bilinear | nearest)
```

An array is float16/32/64, uint8 or uint16, of shape (29, H, W) or (29, 1, H, W), at the image's size or any
other (resized per class with ``input.resize``: area averages when shrinking and is bilinear when enlarging;
logits are resized before the sigmoid, as a network's are). Values declared as probabilities must lie in [0, 1].
Files are read with ``allow_pickle=False`` always.

The member's identity (the store's one "checkpoint") is a sha256 of its name, its model settings, its class
order and, for every split the spec names, each file's relative path, size and modification time: the same for
its oof and test stores, different as soon as a file is added, removed, rewritten or the spec changes. (The
files' contents are not hashed: 800 float16 maps at 2048 are 190 GB, more to read than the import itself.)
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segens.conventions.classes import NUM_CLASSES
from segens.conventions.dataset import ImageRecord, discover, image_size
from segens.errors import SegensError
from segens.infra.safeload import require_regular
from segens.members.base import ImportedMember
from segens.members.class_map import class_permutation
from segens.members.registry import register
from segens.members.spec import MemberSpec
from segens.store import SCALE, quantize

SPLIT_FIELDS = ("oof", "test")
VALUES = ("probabilities", "logits")
IDENTITY_FORMAT = "segens-arrays-member/1"
DTYPES = ("float16", "float32", "float64", "uint8", "uint16")
KEY = "{key}"
STEM = "{stem}"
PLACEHOLDERS = (KEY, STEM)


@register("arrays")
class ArraysMember(ImportedMember):
    """Adapter that reads each image's maps from a numpy file named after the image's key."""

    spec_fields = frozenset({"classes", "input"})
    model_fields = (*SPLIT_FIELDS, "array", "values", "scale")
    cannot_train = "its maps are read from numpy files made elsewhere"

    def __init__(self, spec: MemberSpec, device: str = "cpu", trust_pickle: bool = False,
                 trust_code: bool = False) -> None:
        super().__init__(spec, device, trust_pickle, trust_code)
        self.order = class_permutation(spec.classes, f"{self.where}: classes") if spec.classes else None
        self._root: Path | None = None

    def parse_model(self, section: dict[str, Any]) -> dict[str, Any]:
        for split in SPLIT_FIELDS:
            pattern = section.get(split)
            if pattern is not None and (not isinstance(pattern, str) or not pattern.endswith((".npy", ".npz"))
                                        or sorted(pattern.count(mark) for mark in PLACEHOLDERS) != [0, 1]):
                raise SegensError(f"{self.where}: model.{split} must be a path with {KEY} or {STEM} once, ending in "
                                  f".npy or .npz (e.g. preds/{split}/{KEY}.npy), got {pattern!r}")
        if not any(split in section for split in SPLIT_FIELDS):
            raise SegensError(f"{self.where}: an arrays member needs model.oof or model.test (a path pattern with "
                              f"{KEY})")
        values = section.setdefault("values", "probabilities")
        if values not in VALUES:
            raise SegensError(f"{self.where}: model.values must be probabilities or logits, got {values!r}")
        scale = section.setdefault("scale", 1)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
            raise SegensError(f"{self.where}: model.scale must be a positive number (255 for uint8 arrays, 65535 "
                              f"for uint16, 1 for floats), got {scale!r}")
        array = section.get("array")
        if array is not None and not isinstance(array, str):
            raise SegensError(f"{self.where}: model.array must be the name of the array in each .npz, got {array!r}")
        return section

    # ---- files ------------------------------------------------------------------------------------------

    def pattern(self, split: str) -> str:
        if split not in self.model_settings:
            raise SegensError(f"{self.where}: member {self.spec.name!r} names no files for split {split!r} (add "
                              f"model: {{{split}: preds/{split}/{KEY}.npy}})")
        return self.model_settings[split]

    def placeholder(self, split: str) -> str:
        """The split's pattern's placeholder: {key} or {stem}."""
        return KEY if KEY in self.pattern(split) else STEM

    def name_of(self, split: str, record: ImageRecord) -> str:
        """What the split's placeholder stands for in an image's file: its key or its file name's stem."""
        return record.key if self.placeholder(split) == KEY else Path(record.name).stem

    def path_of(self, split: str, name: str) -> Path:
        """The file of an image named ``name`` (``name_of``; relative patterns taken from the spec's folder)."""
        path = Path(self.pattern(split).replace(self.placeholder(split), name))
        base = self.spec.path.parent if self.spec.path else Path.cwd()
        return path if path.is_absolute() else base / path

    def files(self, split: str, records: Sequence[ImageRecord]) -> dict[str, Path]:
        """name -> file of every record; a missing file, or a file no record names, is an error naming it."""
        found: dict[str, Path] = {}
        for record in records:
            name = self.name_of(split, record)
            if name in found:
                raise SegensError(f"{self.where}: two {split} images are named {name!r} ({record.key} and another); "
                                  f"{STEM} cannot tell them apart: use {KEY}")
            found[name] = self.path_of(split, name)
        missing = [key for key, path in found.items() if not path.is_file()]
        if missing:
            raise SegensError(f"{found[missing[0]]}: no {split} array for image {missing[0]} ({len(missing)} of "
                              f"{len(found)} missing; member {self.spec.name!r}, pattern {self.pattern(split)})")
        listed = self._listed(split)
        extra = sorted(set(listed) - set(found))
        if extra:
            raise SegensError(f"{listed[extra[0]]}: array of image {extra[0]}, which is not in the "
                              f"{split} images of the data root ({len(extra)} such files); is it another split's or "
                              "another data set's?")
        return found

    def _listed(self, split: str) -> dict[str, Path]:
        """name -> file of every file the split's pattern matches on disk."""
        mark = self.placeholder(split)
        prefix, suffix = self.path_of(split, mark).as_posix().split(mark)
        folder = Path(prefix if prefix.endswith("/") else Path(prefix).parent)
        if not folder.is_dir():
            return {}
        listed = {}
        for path in folder.rglob(f"*{suffix.rsplit('/', 1)[-1]}"):
            text = path.as_posix()
            name = text[len(prefix):len(text) - len(suffix)]
            if path.is_file() and text.startswith(prefix) and text.endswith(suffix) and name \
                    and (mark == KEY or "/" not in name):
                listed[name] = path
        return listed

    def identity(self) -> str:
        """sha256 (hex) of the name, the model settings, the class order and each split's file listing (relative
        path, size, modification time): the same for the member's oof and test stores."""
        if self._root is None:
            raise SegensError(f"{self.where}: the member's identity needs the data root (plan a split first)")
        listing = {}
        for split in SPLIT_FIELDS:
            if split not in self.model_settings:
                continue
            records = discover(self._root, "train" if split == "oof" else "test", require_labels=False).records
            try:
                files = self.files(split, records)
            except SegensError as exc:
                raise SegensError(f"{exc}; an arrays member's identity covers every split its spec names, so that a "
                                  f"recipe searched on its oof store applies to its test store: add the files, or "
                                  f"remove model.{split} from the spec") from None
            stats = {key: path.stat() for key, path in files.items()}
            listing[split] = {key: [stat.st_size, stat.st_mtime_ns] for key, stat in sorted(stats.items())}
        document = {"format": IDENTITY_FORMAT, "name": self.spec.name, "model": self.model_settings,
                    "classes": self.spec.classes, "resize": self.spec.input.resize, "files": listing}
        return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()

    # ---- the member interface -----------------------------------------------------------------------------

    def plan(self, split: str, root: str | Path, folds_path: str | Path | None):
        self._root = Path(root)
        return super().plan(split, root, folds_path)

    def check_images(self, split: str, records: Sequence[ImageRecord]) -> None:
        self.files(split, records)

    def checkpoints_for(self, split: str) -> dict[int, dict[str, str]]:
        """The store's only 'checkpoint' (fold 0): the split's pattern and the member's identity as sha256."""
        return {0: {"path": str(self.path_of(split, self.placeholder(split))), "sha256": self.identity()}}

    def predict_records(self, records: Sequence[ImageRecord], split: str) -> list[np.ndarray]:
        """(29, H, W) uint8 maps of each record at its own size, in the competition's class order."""
        return [self.read_maps(self.path_of(split, self.name_of(split, record)), image_size(record.image_path), split)
                for record in records]

    def read_maps(self, path: Path, size: tuple[int, int], split: str) -> np.ndarray:
        """One file -> (29, height, width) uint8; every problem is a SegensError naming the file."""
        values = load_array(path, self.model_settings.get("array"))
        where = f"{path} (member {self.spec.name!r})"
        if values.ndim == 4 and values.shape[1] == 1:
            values = values[:, 0]
        if values.ndim != 3:
            raise SegensError(f"{where}: expected an array of shape (classes, H, W) or (classes, 1, H, W), got "
                              f"{tuple(values.shape)}")
        if values.dtype.name not in DTYPES:
            raise SegensError(f"{where}: dtype {values.dtype} is not one of {', '.join(DTYPES)}")
        return self._to_uint8(np.asarray(self.competition_channels(values, where, split)), size, where)

    def competition_channels(self, values: np.ndarray, where: str, split: str) -> np.ndarray:
        """(C, H, W) as saved for ``split`` -> (29, H, W) in the competition's class order (a wrong channel
        count named)."""
        if values.shape[0] != NUM_CLASSES:
            raise SegensError(f"{where}: {values.shape[0]} channels, expected {NUM_CLASSES} (one per class; set "
                              "classes in the spec when the order is not the competition's)")
        return values if self.order is None else values[self.order]

    def _to_uint8(self, values: np.ndarray, size: tuple[int, int], where: str) -> np.ndarray:
        scale, logits = self.model_settings["scale"], self.model_settings["values"] == "logits"
        integer = values.dtype.kind == "u"
        if integer and logits:
            raise SegensError(f"{where}: integer arrays hold probabilities x scale, not logits; set model.values "
                              "to probabilities")
        if not integer and scale != 1:
            raise SegensError(f"{where}: a {values.dtype} array is read as it is: model.scale must be 1 (it "
                              f"divides integer arrays), got {scale!r}")
        if integer and scale == SCALE and values.dtype == np.uint8 and values.shape[1:] == size:
            return np.ascontiguousarray(values)  # already the store's levels: v / 255 quantizes back to v
        maps = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        if integer:
            maps = maps / np.float32(scale)
        low, high = (float(x) for x in torch.aminmax(maps))
        if not (np.isfinite(low) and np.isfinite(high)):
            raise SegensError(f"{where}: the array holds NaN or infinite values")
        if not logits and (low < 0 or high > 1):
            raise SegensError(f"{where}: values from {low:g} to {high:g} are declared probabilities (model.values); "
                              "if the file holds logits, set model.values: logits"
                              + ("; if integers, set model.scale" if integer else ""))
        if tuple(maps.shape[1:]) != size:
            maps = resize(maps, size, self.spec.input.resize)
        if logits:
            maps = torch.sigmoid(maps)
        return quantize(maps.numpy())


def load_array(path: Path, name: str | None) -> np.ndarray:
    """The array in a .npy file, or the array ``name`` of a .npz (its only array when ``name`` is None), read
    without pickles (a pickled array is a SegensError naming the file)."""
    require_regular(path, "array")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.files)
                if name is None and len(names) != 1:
                    raise SegensError(f"{path}: holds {len(names)} arrays ({', '.join(names)}); name one with "
                                      "model.array")
                chosen = name if name is not None else names[0]
                if chosen not in names:
                    raise SegensError(f"{path}: has no array {chosen!r} (has {', '.join(names) or 'none'}); "
                                      "check model.array")
                return archive[chosen]
        if name is not None:
            raise SegensError(f"{path}: model.array names an array of a .npz file; a .npy file holds one: remove it")
        return np.load(path, allow_pickle=False)
    except SegensError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise SegensError(f"{path}: holds a pickled (object) array; segens reads numeric arrays only, never "
                              "pickles: save it with np.save(path, array.astype(np.float16))") from None
        raise SegensError(f"{path}: not a readable numpy file ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise SegensError(f"{path}: not a readable numpy file ({exc})") from None


def resize(maps: torch.Tensor, size: tuple[int, int], rule: str) -> torch.Tensor:
    """(C, h, w) float32 -> (C, height, width) by the input contract's rule: area (averaging when both sides
    shrink, else bilinear), bilinear (align_corners False, as networks' outputs are upsampled) or nearest."""
    shrinking = size[0] <= maps.shape[1] and size[1] <= maps.shape[2]
    if rule == "nearest":
        return F.interpolate(maps[None], size=size, mode="nearest")[0]
    if rule == "area" and shrinking:
        return F.interpolate(maps[None], size=size, mode="area")[0]
    return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]
