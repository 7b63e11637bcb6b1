"""The competition's 29 classes, in submission order. The only place the class list is written."""

from __future__ import annotations

CLASSES: tuple[str, ...] = (
    *(f"finger-{i}" for i in range(1, 20)),
    "Trapezium",
    "Trapezoid",
    "Capitate",
    "Hamate",
    "Scaphoid",
    "Lunate",
    "Triquetrum",
    "Pisiform",
    "Radius",
    "Ulna",
)
NUM_CLASSES: int = len(CLASSES)
CLASS_TO_INDEX: dict[str, int] = {name: index for index, name in enumerate(CLASSES)}


def class_index(name: str) -> int:
    """Index (0..28) of a class name; raises ValueError naming the valid names for an unknown one."""
    try:
        return CLASS_TO_INDEX[name]
    except KeyError:
        raise ValueError(f"unknown class {name!r}; valid classes are: {', '.join(CLASSES)}") from None
