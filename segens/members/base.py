"""The interface every member kind implements (one module per kind, registered in segens.members.registry).

A member is built from its spec once per process (it may hold models in memory) and then trains folds or
predicts images. Probabilities are float32 in [0, 1], shape (29, H, W) at the image's original size, in the
competition's class order. Kinds that run a torch network subclass segens.members.network.NetworkMember, which
does the input contract, TTA, class mapping and fold averaging; they only say how a checkpoint loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from segens.conventions.dataset import ImageRecord
from segens.members.spec import Checkpoint, MemberSpec


@dataclass
class FoldResult:
    """What training one fold produced: the kept checkpoint and its per-epoch history."""

    checkpoint: Checkpoint
    history: list[dict] = field(default_factory=list)  # one dict per epoch: epoch, loss, val_dice, ...


class Member(Protocol):
    """What ``ens train-member`` and ``ens predict-member`` need from a kind's adapter."""

    spec: MemberSpec

    def train_fold(
        self, fold: int, train: Sequence[ImageRecord], val: Sequence[ImageRecord], out_dir: Path, progress: bool = True
    ) -> FoldResult:
        """Train on ``train``, validate on ``val`` with the competition's Dice, keep the best checkpoint in
        ``out_dir`` (resuming from its last checkpoint if one is there)."""
        ...

    def read_image(self, path: Path) -> np.ndarray:
        """An image as the member's input contract reads it: (H, W) or (H, W, 3) uint8 (optional: without it,
        segens.conventions.dataset.read_image's grayscale is used)."""
        ...

    def predict(self, images: Sequence[np.ndarray], folds: Sequence[int]) -> list[np.ndarray]:
        """Images from ``read_image`` -> (29, H, W) float32 probabilities, averaged over the checkpoints of ``folds``."""
        ...
