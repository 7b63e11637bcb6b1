"""A model's output channels mapped to the 29 competition classes by name, whatever the model's order.

Names come from the checkpoint (ultralytics ``model.names``, an smp ``save_pretrained`` config, a segens
checkpoint, a module's ``classes`` attribute) or from the spec's ``classes``. Names match exactly; a missing,
unknown or repeated name is an error naming it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from segens.conventions.classes import CLASSES, NUM_CLASSES
from segens.errors import SegensError


def class_permutation(names: Sequence[str], where: str) -> list[int] | None:
    """For each competition class, the model channel holding it (None when the model's order is already the
    competition's); a SegensError naming a missing, unknown or repeated name."""
    names = list(names)
    unknown = [name for name in names if name not in CLASSES]
    if unknown:
        raise SegensError(f"{where}: class name {unknown[0]!r} is not one of the competition's {NUM_CLASSES} "
                          f"classes ({', '.join(CLASSES)})")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise SegensError(f"{where}: class name {repeated[0]!r} appears more than once")
    missing = [name for name in CLASSES if name not in names]
    if missing:
        raise SegensError(f"{where}: class {missing[0]!r} is missing ({len(names)} names given, "
                          f"{NUM_CLASSES} needed)")
    order = [names.index(name) for name in CLASSES]
    return None if order == list(range(NUM_CLASSES)) else order


def names_from(value: Any) -> list[str] | None:
    """Class names from a checkpoint's record: a list, or a mapping index -> name (ultralytics), else None."""
    if isinstance(value, Mapping):
        try:
            return [str(value[index]) for index in sorted(value, key=int)]
        except (TypeError, ValueError):
            return None
    if isinstance(value, (list, tuple)) and all(isinstance(name, str) for name in value):
        return list(value)
    return None


def resolve_names(spec_names: Sequence[str] | None, model_names: Sequence[str] | None, where: str,
                  checkpoint: str) -> list[str] | None:
    """The model's channel order: the checkpoint's names, or the spec's when it carries none; both given and
    different is an error naming both (the checkpoint's are what the model learned)."""
    if model_names is not None and spec_names is not None and list(model_names) != list(spec_names):
        raise SegensError(f"{where}: classes {list(spec_names)} contradict the class names recorded in "
                          f"{checkpoint} ({list(model_names)}); remove 'classes' from the spec")
    return list(model_names) if model_names is not None else (list(spec_names) if spec_names is not None else None)


def channel_order(spec_names: Sequence[str] | None, model_names: Sequence[str] | None, where: str,
                  checkpoint: str | Path) -> tuple[list[int] | None, list[str] | None]:
    """(competition class -> model channel, the model's names) from the checkpoint's names or the spec's
    ``classes`` (``resolve_names``); (None, None) where neither gives names (the competition's order)."""
    names = resolve_names(spec_names, model_names, where, str(checkpoint))
    return (class_permutation(names, f"{checkpoint}: class names") if names is not None else None), names
