"""Member specs (YAML): what a member is, how it trains, and its checkpoints by fold. The only reader and
writer of the format; ``ens train-member`` writes checkpoints into it, ``ens predict-member`` reads them.

```yaml
version: 1
name: unetpp-vgg19
kind: smp                      # a registered adapter kind: smp, yolo, csv
input_size: 512                # square side, or [height, width]; the network's input
tta: [hflip]                   # test-time augmentation: [] or [hflip]
model: {architecture: UnetPlusPlus, encoder: vgg19, encoder_weights: null}   # kind-specific
train: {epochs: 30, batch_size: 2, lr: 0.001}                                # kind-specific
checkpoints:                   # fold -> checkpoint, relative to this file's folder
  0: {path: unetpp-vgg19/fold0/best.pt, sha256: 3f1e..., val_dice: 0.93}
```
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from segens.atomic import atomic_write_text
from segens.errors import SegensError

SPEC_VERSION = 1
FIELDS = ("version", "name", "kind", "input_size", "tta", "model", "train", "checkpoints")
TTA_CHOICES = ("hflip",)


@dataclass
class Checkpoint:
    """One fold's checkpoint: path (absolute once loaded), its sha256, and its validation Dice if known."""

    path: Path
    sha256: str
    val_dice: float | None = None


@dataclass
class MemberSpec:
    """A member: identity, input handling, kind-specific model and training settings, checkpoints by fold."""

    name: str
    kind: str
    input_size: tuple[int, int] = (512, 512)
    tta: list[str] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    checkpoints: dict[int, Checkpoint] = field(default_factory=dict)
    path: Path | None = None  # the YAML file it was read from, if any

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
        """The YAML document, checkpoint paths relative to the spec's folder where possible."""
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
        return {"version": SPEC_VERSION, "name": self.name, "kind": self.kind,
                "input_size": list(self.input_size), "tta": list(self.tta), "model": copy.deepcopy(self.model),
                "train": copy.deepcopy(self.train), "checkpoints": checkpoints}


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


def _input_size(value: Any, where: str) -> tuple[int, int]:
    if isinstance(value, int) and value > 0:
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    raise SegensError(f"{where}: input_size must be a positive integer or [height, width], got {value!r}")


def spec_from_dict(document: Any, where: str, path: Path | None = None) -> MemberSpec:
    """Validate a spec document; unknown fields, versions or kinds are SegensErrors naming ``where``."""
    from segens.members.registry import kinds

    if not isinstance(document, dict):
        raise SegensError(f"{where}: a member spec is a YAML mapping with at least 'name' and 'kind'")
    unknown = sorted(set(document) - set(FIELDS))
    if unknown:
        raise SegensError(f"{where}: unknown field(s) {', '.join(unknown)}; a spec has: {', '.join(FIELDS)}")
    version = document.get("version", SPEC_VERSION)
    if version != SPEC_VERSION:
        raise SegensError(f"{where}: spec version {version!r} is not known to this segens (knows {SPEC_VERSION})")
    for required in ("name", "kind"):
        if not isinstance(document.get(required), str) or not document[required]:
            raise SegensError(f"{where}: '{required}' is required and must be a non-empty string")
    if document["kind"] not in kinds():
        raise SegensError(f"{where}: unknown kind {document['kind']!r}; known kinds: {', '.join(kinds())}")
    tta = document.get("tta") or []
    if not isinstance(tta, list) or any(t not in TTA_CHOICES for t in tta):
        raise SegensError(f"{where}: tta must be a list of {', '.join(TTA_CHOICES)}, got {tta!r}")
    for section in ("model", "train"):
        if not isinstance(document.get(section) or {}, dict):
            raise SegensError(f"{where}: '{section}' must be a mapping")
    base = path.parent if path else Path.cwd()
    checkpoints = {}
    for fold, entry in (document.get("checkpoints") or {}).items():
        if not isinstance(entry, dict) or "path" not in entry or "sha256" not in entry:
            raise SegensError(f"{where}: checkpoint of fold {fold} needs 'path' and 'sha256'")
        try:
            fold_number = int(fold)
        except (TypeError, ValueError):
            raise SegensError(f"{where}: checkpoint fold {fold!r} is not an integer") from None
        checkpoint_path = Path(entry["path"])
        checkpoints[fold_number] = Checkpoint(
            checkpoint_path if checkpoint_path.is_absolute() else base / checkpoint_path,
            str(entry["sha256"]), entry.get("val_dice"),
        )
    return MemberSpec(
        name=document["name"], kind=document["kind"],
        input_size=_input_size(document.get("input_size", 512), where), tta=list(tta),
        model=dict(document.get("model") or {}), train=dict(document.get("train") or {}),
        checkpoints=checkpoints, path=path,
    )


def load_spec(path: str | Path) -> MemberSpec:
    """Read and validate a member spec YAML file."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SegensError(f"{path}: cannot read member spec ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise SegensError(f"{path}: not valid YAML ({exc})") from None
    return spec_from_dict(document, str(path), path)


def save_spec(spec: MemberSpec, path: str | Path | None = None) -> Path:
    """Write a spec atomically (to ``path`` or where it was read from) and return the path."""
    target = Path(path) if path is not None else spec.path
    if target is None:
        raise ValueError("save_spec needs a path for a spec that was not read from a file")
    spec.path = target
    atomic_write_text(target, yaml.safe_dump(spec.to_dict(), sort_keys=False))
    return target
