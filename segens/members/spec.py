"""Member specs (YAML): what a member is, how it trains, and its checkpoints by fold. The only reader and
writer of the format; ``ens train-member`` writes checkpoints into it, ``ens predict-member`` reads them.

```yaml
version: 2
name: unetpp-vgg19             # letters, digits, '.', '_', '+', '-': it names folders
kind: smp                      # a registered adapter kind: smp, yolo, torch, csv
input: {size: [512, 512], channels: 3, color: gray, scale: 255, normalize: none, resize: area}
classes: [finger-1, ...]       # optional: the model's output channel order, when it is not the competition's
tta: [hflip, vflip, {scale: 0.75}]   # test-time augmentation passes besides the plain one
model: {architecture: UnetPlusPlus, encoder: vgg19, encoder_weights: null}   # kind-specific
train: {epochs: 30, batch_size: 2, lr: 0.001}                                # kind-specific
checkpoints:                   # fold -> checkpoint, relative to this file's folder
  0: {path: unetpp-vgg19/fold0/best.pt, sha256: 3f1e..., val_dice: 0.93}
```

Version-1 specs (``input_size: 512`` instead of ``input``) are still read; version 2 is written. The document is
read with segens.infra.safeload (bounded size, nesting and alias expansion) and validated by a strict pydantic model.
See segens.members.input_contract for the ``input`` fields.
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml

from segens.errors import SegensError
from segens.infra.atomic import atomic_write_text
from segens.infra.safeload import check_name, load_yaml, parse_yaml, read_text, validate
from segens.members.input_contract import MAX_SIDE, InputContract

SPEC_VERSION = 2
READABLE_VERSIONS = (1, 2)
FIELDS = ("version", "name", "kind", "input_size", "input", "classes", "tta", "model", "train", "checkpoints")
MAX_TTA_SCALE = 4.0
POSITIVE_TRAIN_INTEGERS = ("epochs", "batch_size", "batch", "predict_batch_size")


def _side(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_SIDE


def _check_size(value: Any) -> Any:
    """A positive side up to MAX_SIDE, or [height, width] of them."""
    if value is None or _side(value) or (isinstance(value, list) and len(value) == 2 and all(map(_side, value))):
        return value
    raise ValueError(f"must be a positive integer side or [height, width], each at most {MAX_SIDE}, got {value!r}")


_Size = Annotated[Any, pydantic.AfterValidator(_check_size)]
"""An input size: a positive side or [height, width], checked by ``_check_size``."""


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class _Input(_Strict):
    size: _Size = None
    channels: Literal[1, 3] = 3
    color: Literal["gray", "rgb", "bgr"] = "gray"
    scale: pydantic.confloat(gt=0) = 255.0
    normalize: Any = "none"
    resize: Literal["area", "bilinear", "nearest"] = "area"

    @pydantic.field_validator("normalize")
    @classmethod
    def _normalize(cls, value: Any) -> Any:
        if value in ("none", "imagenet"):
            return value
        if isinstance(value, dict) and set(value) == {"mean", "std"} and all(
                isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
                for v in value.values()):
            _check_finite(value, "")
            return value
        raise ValueError(f"must be none, imagenet or {{mean: [...], std: [...]}} (one number per channel), got {value!r}")


class _Checkpoint(_Strict):
    path: str
    sha256: str
    val_dice: float | None = None


class _Spec(_Strict):
    version: Literal[1, 2] = SPEC_VERSION
    name: str
    kind: str
    input_size: _Size = None
    input: _Input | None = None
    classes: list[str] | None = None
    tta: list[Any] | None = None
    model: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    checkpoints: dict[int, _Checkpoint] | None = None

    @pydantic.field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        from segens.members.registry import kinds

        if kind not in kinds():
            raise ValueError(f"unknown kind {kind!r}; known kinds: {', '.join(kinds())}")
        return kind

    @pydantic.field_validator("tta")
    @classmethod
    def _tta(cls, tta: list[Any] | None) -> list[Any] | None:
        for index, entry in enumerate(tta or []):
            scale = entry.get("scale") if isinstance(entry, dict) and set(entry) == {"scale"} else None
            scaled = isinstance(scale, (int, float)) and not isinstance(scale, bool) and 0 < scale <= MAX_TTA_SCALE
            if entry not in ("hflip", "vflip") and not scaled:
                raise ValueError(f"entry {index} must be hflip, vflip or {{scale: s}} with 0 < s <= {MAX_TTA_SCALE:g}, "
                                 f"got {entry!r}")
        return tta

    @pydantic.field_validator("model", "train")
    @classmethod
    def _finite(cls, section: dict[str, Any] | None) -> dict[str, Any] | None:
        _check_finite(section, "")
        return section

    @pydantic.field_validator("train")
    @classmethod
    def _positive(cls, train: dict[str, Any] | None) -> dict[str, Any] | None:
        for key in POSITIVE_TRAIN_INTEGERS:
            value = (train or {}).get(key)
            if key in (train or {}) and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        return train


def _check_finite(value: Any, at: str) -> None:
    """ValueError for a NaN or infinite number anywhere in a nested document."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{at.lstrip('.') or 'value'} must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{at}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_finite(item, f"{at}[{index}]")


@dataclass
class Checkpoint:
    """One fold's checkpoint: path (absolute once loaded), its sha256, and its validation Dice if known."""

    path: Path
    sha256: str
    val_dice: float | None = None


@dataclass
class MemberSpec:
    """A member: identity, input contract, class order, TTA, kind-specific settings, checkpoints by fold.

    ``input`` is the source of truth for the input; ``input_size`` mirrors ``input.size`` (given alone, it makes
    the default contract at that size)."""

    name: str
    kind: str
    input_size: tuple[int, int] = (512, 512)
    tta: list[Any] = field(default_factory=list)  # "hflip", "vflip" or {"scale": s}
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    checkpoints: dict[int, Checkpoint] = field(default_factory=dict)
    path: Path | None = None  # the YAML file it was read from, if any
    input: InputContract | None = None
    classes: list[str] | None = None  # the model's output channel order, if the spec gives it
    given: frozenset[str] = frozenset()  # the top-level fields the document itself holds

    def __post_init__(self) -> None:
        if self.input is None:
            self.input = InputContract(size=tuple(self.input_size))
        self.input_size = tuple(self.input.size)

    @property
    def where(self) -> str:
        """How errors name this spec: its file, or its name."""
        return str(self.path or self.name)

    def checkpoint(self, fold: int) -> Checkpoint:
        """The checkpoint of a fold, or a SegensError saying how to make it."""
        if fold not in self.checkpoints:
            have = ", ".join(map(str, sorted(self.checkpoints))) or "none"
            raise SegensError(
                f"{self.path or self.name}: member {self.name!r} has no checkpoint for fold {fold} (has: {have}); "
                f"run `ens train-member {self.path or 'SPEC'} --fold {fold}`"
            )
        return self.checkpoints[fold]

    def to_dict(self) -> dict[str, Any]:
        """The version-2 YAML document: the full ``input`` mapping (defaults filled in), ``classes`` when given,
        checkpoint paths relative to the spec's folder where possible."""
        base = self.path.parent.resolve() if self.path else None
        checkpoints = {}
        for fold, checkpoint in sorted(self.checkpoints.items()):
            path = checkpoint.path.resolve()
            if base is not None and path.is_relative_to(base):
                path = path.relative_to(base)
            entry: dict[str, Any] = {"path": path.as_posix(), "sha256": checkpoint.sha256}
            if checkpoint.val_dice is not None:
                entry["val_dice"] = round(float(checkpoint.val_dice), 6)
            checkpoints[fold] = entry
        document: dict[str, Any] = {"version": SPEC_VERSION, "name": self.name, "kind": self.kind,
                                    "input": self.input.to_dict()}
        if self.classes is not None:
            document["classes"] = list(self.classes)
        document.update({"tta": copy.deepcopy(list(self.tta)), "model": copy.deepcopy(self.model),
                         "train": copy.deepcopy(self.train), "checkpoints": checkpoints})
        return document


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file (or of every file of a directory, in sorted order)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _size(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def spec_from_dict(document: Any, where: str, path: Path | None = None) -> MemberSpec:
    """Validate a spec document (version 1 or 2); anything wrong is a SegensError naming ``where`` and the field."""
    if not isinstance(document, dict):
        raise SegensError(f"{where}: a member spec is a YAML mapping with at least 'name' and 'kind'")
    version = document.get("version", SPEC_VERSION)
    if version not in READABLE_VERSIONS:
        raise SegensError(f"{where}: spec version {version!r} is not known to this segens (knows "
                          f"{', '.join(map(str, READABLE_VERSIONS))})")
    unknown = sorted(str(key) for key in set(document) - set(FIELDS))
    if unknown:
        raise SegensError(f"{where}: unknown field(s) {', '.join(unknown)}; a spec has: {', '.join(FIELDS)}")
    if "name" in document:
        check_name(document["name"], "member name", where)
    parsed = validate(_Spec, document, where)
    input_doc = parsed.input.model_dump(exclude_unset=True) if parsed.input is not None else {}
    in_channels = (parsed.model or {}).get("in_channels")
    if "channels" not in input_doc and in_channels in (1, 3):  # version 1 said it in the smp model section
        input_doc["channels"] = in_channels
    alias, size = _size(parsed.input_size), _size(input_doc.get("size"))
    if alias is not None and size is not None and alias != size:
        raise SegensError(f"{where}: input_size {list(alias)} and input.size {list(size)} disagree; keep input.size")
    try:
        contract = InputContract.from_document(input_doc, size or alias or (512, 512))
    except SegensError as exc:
        raise SegensError(f"{where}: {exc}") from None
    tta = [entry if isinstance(entry, str) else {"scale": float(entry["scale"])} for entry in (parsed.tta or [])]
    for entry in tta:  # the work is bounded before any model runs: a scaled pass is an input like the plain one
        if isinstance(entry, dict) and max(contract.size) * entry["scale"] > MAX_SIDE:
            raise SegensError(f"{where}: tta {{scale: {entry['scale']:g}}} makes the input "
                              f"{round(max(contract.size) * entry['scale'])} pixels on a side with input.size "
                              f"{list(contract.size)}; segens runs inputs up to {MAX_SIDE}: lower the scale or the size")
    base = path.parent if path else Path.cwd()
    checkpoints = {}
    for fold, entry in (parsed.checkpoints or {}).items():
        checkpoint_path = Path(entry.path)
        checkpoints[fold] = Checkpoint(checkpoint_path if checkpoint_path.is_absolute() else base / checkpoint_path,
                                       entry.sha256, entry.val_dice)
    if parsed.classes is not None:
        from segens.members.class_map import class_permutation

        class_permutation(parsed.classes, f"{where}: classes")
    return MemberSpec(name=parsed.name, kind=parsed.kind, tta=tta, model=dict(parsed.model or {}),
                      train=dict(parsed.train or {}), checkpoints=checkpoints, path=path, input=contract,
                      classes=list(parsed.classes) if parsed.classes is not None else None,
                      given=frozenset(str(key) for key in document))


def load_spec(path: str | Path) -> MemberSpec:
    """Read and validate a member spec YAML file (bounded: see segens.infra.safeload)."""
    path = Path(path)
    return spec_from_dict(load_yaml(path, "member spec"), str(path), path)


def save_spec(spec: MemberSpec, path: str | Path | None = None) -> Path:
    """Write a spec atomically (to ``path`` or where it was read from) and return the path."""
    target = Path(path) if path is not None else spec.path
    if target is None:
        raise ValueError("save_spec needs a path for a spec that was not read from a file")
    spec.path = target
    atomic_write_text(target, yaml.safe_dump(spec.to_dict(), sort_keys=False))
    return target


def record_checkpoint(path: str | Path, fold: int, checkpoint: Checkpoint) -> None:
    """Write ``fold``'s checkpoint entry into the spec file at ``path`` atomically, keeping the rest of the document
    as its author wrote it (comments, order, quoting: a round-trip YAML edit); a version-1 spec is rewritten
    whole, as version 2."""
    from io import StringIO

    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    path = Path(path)
    text = read_text(path, "member spec")
    original = parse_yaml(text, path, "member spec")  # bounded and validated before the round-trip parser sees it
    spec = spec_from_dict(original, str(path), path)
    spec.checkpoints[fold] = checkpoint
    if original.get("version") != SPEC_VERSION:
        save_spec(spec, path)
        return
    editor = YAML(typ="rt")
    editor.preserve_quotes = True
    editor.width = 4096
    document = editor.load(text)
    if not isinstance(document.get("checkpoints"), dict):
        document["checkpoints"] = CommentedMap()
    entries = document["checkpoints"]
    key = next((existing for existing in entries if str(existing).strip() == str(fold)), fold)
    entries[key] = spec.to_dict()["checkpoints"][fold]
    buffer = StringIO()
    editor.dump(document, buffer)
    atomic_write_text(path, buffer.getvalue())
