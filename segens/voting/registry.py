"""The registry of voting strategies: a new strategy is one new module whose class is decorated with
``@register`` (built-in ones are imported by segens.voting)."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from segens.errors import SegensError

if TYPE_CHECKING:
    from segens.voting.base import Strategy

_STRATEGIES: dict[str, Strategy] = {}
S = TypeVar("S", bound=type)


def register(cls: S) -> S:
    """Class decorator: register one instance of a Strategy subclass under its ``name``."""
    _STRATEGIES[cls.name] = cls()
    return cls


def names() -> tuple[str, ...]:
    """Every registered strategy's name, in registration order (the built-ins: soft, weighted, hard)."""
    return tuple(_STRATEGIES)


def get_strategy(name: str) -> Strategy:
    """The strategy registered as ``name``; a SegensError listing the known ones otherwise."""
    if name not in _STRATEGIES:
        raise SegensError(f"unknown strategy {name!r}; choose from {', '.join(names())}")
    return _STRATEGIES[name]
