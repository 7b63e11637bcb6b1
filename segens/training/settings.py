"""A network member's ``train:`` section, checked once: budget (epochs or steps), optimizer, learning-rate
schedule with warmup, precision and data cache.

```yaml
train:
  steps: 600             # optimizer steps in all (an alternative to epochs: 30); the last epoch may be partial
  batch_size: 8
  lr: 0.003
  weight_decay: 0.0001
  optimizer: adamw       # adam | adamw | lion
  scheduler: cosine      # cosine (per step, to lr x min_lr) | none | plateau (halves on a flat val Dice)
  warmup: 0.05           # linear warmup: a fraction of all steps (< 1) or a number of steps
  min_lr: 0.01           # cosine's final lr as a fraction of lr
  amp: auto              # auto (CUDA: bf16 where supported, else fp16 with a grad scaler; CPU: off) | off | bf16 | fp16
  channels_last: auto    # auto (CUDA only) | true | false
  cache: memory          # memory | disk (the decoded images also kept beside the fold folders) | none (decode per step)
  val_every: 1           # validate at the input size every N epochs (and after the last)
  loss: {bce: 0.5, dice: 0.5}
  augment: {hflip: 0.5}
  seed: 0
  workers: 0
  pseudo: pseudo/        # a folder from `ens pseudo-label` (relative to the spec's folder): its images join every
                         # fold's training images, their ignored pixels left out of the loss (--pseudo overrides)
```
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from segens.errors import SegensError

TRAIN_FIELDS = ("epochs", "steps", "batch_size", "lr", "weight_decay", "optimizer", "scheduler", "warmup",
                "min_lr", "amp", "channels_last", "cache", "val_every", "loss", "augment", "seed", "workers",
                "predict_batch_size", "pseudo")
OPTIMIZERS = ("adam", "adamw", "lion")
SCHEDULERS = ("none", "plateau", "cosine")
AMPS = ("auto", "off", "bf16", "fp16")
CACHES = ("memory", "disk", "none")


@dataclass(frozen=True)
class TrainSettings:
    """The checked ``train:`` section (see the module docstring); ``epochs`` or ``steps`` is None when not set."""

    epochs: int | None = 30
    steps: int | None = None
    batch_size: int = 2
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    scheduler: str = "none"
    warmup: float = 0.0
    min_lr: float = 0.01
    amp: str = "auto"
    channels_last: str = "auto"
    cache: str = "memory"
    val_every: int = 1
    loss: Mapping[str, float] | None = None
    augment: Mapping[str, Any] | None = None
    seed: int = 0
    workers: int = 0
    extra: dict = field(default_factory=dict)
    pseudo: str | None = None

    def total_steps(self, steps_per_epoch: int) -> int:
        """All optimizer steps of a fold: ``steps``, else ``epochs`` x ``steps_per_epoch``."""
        return self.steps if self.steps is not None else int(self.epochs) * steps_per_epoch

    def warmup_steps(self, total: int) -> int:
        """Warmup length in steps: a fraction of ``total`` (warmup < 1) or a step count."""
        return int(round(self.warmup * total)) if self.warmup < 1 else int(self.warmup)

    def lr_factor(self, step: int, total: int) -> float:
        """The multiplier of ``lr`` for optimizer step ``step`` (0-based): linear warmup, then constant (none,
        plateau) or cosine down to ``min_lr``."""
        warmup = self.warmup_steps(total)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if self.scheduler != "cosine":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return self.min_lr + (1 - self.min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _number(section: Mapping[str, Any], name: str, kind: type, default: Any, where: str, minimum: float = 0,
            strict: bool = False) -> Any:
    value = section.get(name, default)
    if value is None:
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise SegensError(f"{where}: train.{name} must be a number, got {value!r}") from None
    if (kind is int and number != value) or number < minimum or (strict and number == minimum):
        raise SegensError(f"{where}: train.{name} must be {'an integer ' if kind is int else ''}"
                          f"{'>' if strict else '>='} {minimum}, got {value!r}")
    return number


def _choice(section: Mapping[str, Any], name: str, choices: tuple[str, ...], default: str, where: str) -> str:
    value = str(section.get(name, default)).lower()
    if value in ("true", "false") and name == "channels_last":
        return value
    if value not in choices:
        raise SegensError(f"{where}: unknown train.{name} {section.get(name)!r}; choose from {', '.join(choices)}")
    return value


def parse_settings(section: Mapping[str, Any], where: str, fields: tuple[str, ...] = TRAIN_FIELDS) -> TrainSettings:
    """A spec's ``train`` mapping checked into TrainSettings; a SegensError naming the spec and the field."""
    section = dict(section or {})
    unknown = sorted(set(section) - set(fields))
    if unknown:
        raise SegensError(f"{where}: unknown train field(s) {', '.join(unknown)}; allowed: {', '.join(fields)}")
    if section.get("epochs") is not None and section.get("steps") is not None:
        raise SegensError(f"{where}: train.epochs and train.steps are alternatives; set one of them")
    steps = _number(section, "steps", int, None, where, 1)
    epochs = None if steps is not None else _number(section, "epochs", int, 30, where, 1)
    warmup = _number(section, "warmup", float, 0.0, where)
    if warmup >= 1 and not float(warmup).is_integer():
        raise SegensError(f"{where}: train.warmup is a fraction of all steps (< 1) or a whole number of steps, "
                          f"got {warmup!r}")
    channels_last = section.get("channels_last", "auto")
    channels_last = str(channels_last).lower() if isinstance(channels_last, bool) else channels_last
    return TrainSettings(
        epochs=epochs, steps=steps, batch_size=_number(section, "batch_size", int, 2, where, 1),
        lr=_number(section, "lr", float, 1e-3, where, 0, strict=True),
        weight_decay=_number(section, "weight_decay", float, 1e-4, where),
        optimizer=_choice(section, "optimizer", OPTIMIZERS, "adamw", where),
        scheduler=_choice(section, "scheduler", SCHEDULERS, "none", where), warmup=warmup,
        min_lr=_number(section, "min_lr", float, 0.01, where), amp=_choice(section, "amp", AMPS, "auto", where),
        channels_last=_choice({"channels_last": channels_last}, "channels_last", ("auto",), "auto", where),
        cache=_choice(section, "cache", CACHES, "memory", where),
        val_every=_number(section, "val_every", int, 1, where, 1), loss=section.get("loss"),
        augment=section.get("augment"), seed=_number(section, "seed", int, 0, where),
        workers=_number(section, "workers", int, 0, where), pseudo=_pseudo(section, where))


def _pseudo(section: Mapping[str, Any], where: str) -> str | None:
    value = section.get("pseudo")
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise SegensError(f"{where}: train.pseudo must be the path of a folder from `ens pseudo-label`, got {value!r}")
    return value


def make_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """The configured optimizer over all of ``model``'s parameters."""
    if settings.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    from timm.optim import Lion

    return Lion(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
