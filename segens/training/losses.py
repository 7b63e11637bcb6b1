"""Training losses for multi-label sigmoid heads, selectable and combinable with weights in a member spec:
``train: {loss: {bce: 0.5, dice: 0.5}}`` (also ``iou`` and ``focal``), built on segmentation-models-pytorch.

With ``ignore`` (training with pseudo-labels, segens.training.pseudo) a target equal to ``ignore`` marks a pixel of
a class that no term sees: its weight is 0 in every term, so neither its logit nor its label reaches the loss or
its gradient. bce and focal are then means over each class's kept pixels (focal: per class, then over classes, as
smp's focal; bce: over all kept elements), dice and iou are smp's with ``ignore_index`` (a class's intersection and
cardinality summed over its kept pixels; a class with no kept positive pixel in the batch contributes 0).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from segmentation_models_pytorch import losses as smp_losses
from segmentation_models_pytorch.losses._functional import focal_loss_with_logits
from torch import nn

from segens.errors import SegensError

LOSSES = {
    "bce": lambda: nn.BCEWithLogitsLoss(),
    "dice": lambda: smp_losses.DiceLoss(mode="multilabel", from_logits=True),
    "iou": lambda: smp_losses.JaccardLoss(mode="multilabel", from_logits=True),
    "focal": lambda: smp_losses.FocalLoss(mode="multilabel"),
}
DEFAULT_LOSS = {"bce": 0.5, "dice": 0.5}


class _MaskedBce(nn.Module):
    """Binary cross-entropy on logits, the mean over elements whose target is not ``ignore`` (0 when none is)."""

    def __init__(self, ignore: int) -> None:
        super().__init__()
        self.ignore = ignore

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        keep = targets != self.ignore
        values = F.binary_cross_entropy_with_logits(logits, torch.where(keep, targets, 0), reduction="none")
        return torch.where(keep, values, 0).sum() / keep.sum().clamp_min(1)


class _MaskedFocal(nn.Module):
    """smp's multilabel focal loss (gamma 2, no alpha) with ignored elements left out: per class the mean over its
    kept elements (0 when none is), then the mean over classes."""

    def __init__(self, ignore: int) -> None:
        super().__init__()
        self.ignore = ignore

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        keep = targets != self.ignore
        values = focal_loss_with_logits(logits, torch.where(keep, targets, 0), gamma=2.0, alpha=None,
                                        reduction="none")
        dims = [0, *range(2, logits.ndim)]
        per_class = torch.where(keep, values, 0).sum(dims) / keep.sum(dims).clamp_min(1)
        return per_class.mean()


MASKED = {
    "bce": _MaskedBce,
    "dice": lambda ignore: smp_losses.DiceLoss(mode="multilabel", from_logits=True, ignore_index=ignore),
    "iou": lambda ignore: smp_losses.JaccardLoss(mode="multilabel", from_logits=True, ignore_index=ignore),
    "focal": _MaskedFocal,
}
"""The terms with ignored pixels left out (``ignore``: the target value that marks them)."""


class WeightedLoss(nn.Module):
    """Sum of weighted losses on logits (N, C, H, W) against float targets (N, C, H, W); with ``ignore``, targets
    equal to it are left out of every term (module docstring)."""

    def __init__(self, weights: Mapping[str, float] | None = None, where: str = "member spec",
                 ignore: int | None = None) -> None:
        super().__init__()
        weights = dict(weights or DEFAULT_LOSS)
        unknown = sorted(set(weights) - set(LOSSES))
        if unknown or not weights:
            raise SegensError(f"{where}: unknown loss(es) {', '.join(unknown) or '(none given)'}; "
                              f"choose from {', '.join(LOSSES)}, e.g. {{bce: 0.5, dice: 0.5}}")
        self.weights = {name: float(weight) for name, weight in weights.items()}
        self.terms = nn.ModuleDict({name: LOSSES[name]() if ignore is None else MASKED[name](ignore)
                                    for name in self.weights})

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sum(weight * self.terms[name](logits, targets) for name, weight in self.weights.items())
