"""Training losses for multi-label sigmoid heads, selectable and combinable with weights in a member spec:
``train: {loss: {bce: 0.5, dice: 0.5}}`` (also ``iou`` and ``focal``), built on segmentation-models-pytorch."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from segmentation_models_pytorch import losses as smp_losses
from torch import nn

from segens.errors import SegensError

LOSSES = {
    "bce": lambda: nn.BCEWithLogitsLoss(),
    "dice": lambda: smp_losses.DiceLoss(mode="multilabel", from_logits=True),
    "iou": lambda: smp_losses.JaccardLoss(mode="multilabel", from_logits=True),
    "focal": lambda: smp_losses.FocalLoss(mode="multilabel"),
}
DEFAULT_LOSS = {"bce": 0.5, "dice": 0.5}


class WeightedLoss(nn.Module):
    """Sum of weighted losses on logits (N, C, H, W) against float targets (N, C, H, W)."""

    def __init__(self, weights: Mapping[str, float] | None = None, where: str = "member spec") -> None:
        super().__init__()
        weights = dict(weights or DEFAULT_LOSS)
        unknown = sorted(set(weights) - set(LOSSES))
        if unknown or not weights:
            raise SegensError(f"{where}: unknown loss(es) {', '.join(unknown) or '(none given)'}; "
                              f"choose from {', '.join(LOSSES)}, e.g. {{bce: 0.5, dice: 0.5}}")
        self.weights = {name: float(weight) for name, weight in weights.items()}
        self.terms = nn.ModuleDict({name: LOSSES[name]() for name in self.weights})

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sum(weight * self.terms[name](logits, targets) for name, weight in self.weights.items())
