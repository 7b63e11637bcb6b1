"""Pictures people would rather see than read: the search report (weights heatmap, Dice gain per class) and
per-class Dice bars of several predictions side by side. matplotlib, Agg backend, PNG files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from segens.conventions.classes import CLASSES  # noqa: E402


def plot_search_report(report, out: str | Path) -> Path:
    """Left: per-class member weights (heatmap). Right: recipe Dice minus plain-mean Dice per class (OOF), with
    the cross-validated gain when it was measured."""
    members = report.members
    weights = np.array([r.recipe_choice.weights / r.recipe_choice.weights.sum() for r in report.classes])
    gain = np.array([r.oof_dice - r.mean_dice for r in report.classes])
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 9), gridspec_kw={"width_ratios": [max(2, len(members)), 5]})
    image = left.imshow(weights, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    left.set_xticks(range(len(members)), members, rotation=45, ha="right")
    left.set_yticks(range(len(CLASSES)), CLASSES, fontsize=7)
    left.set_title("weights per class" if report.strategy != "hard" else "votes per class")
    figure.colorbar(image, ax=left, fraction=0.05)
    positions = np.arange(len(CLASSES))
    right.barh(positions, gain, color=np.where(gain >= 0, "tab:green", "tab:red"), label="OOF (fitted here)")
    if report.classes[0].cv:
        cv_gain = np.array([np.mean([f["recipe"] - f["mean"] for f in r.cv]) for r in report.classes])
        right.scatter(cv_gain, positions, color="black", marker="x", label="held-out folds (CV)", zorder=3)
    right.axvline(0, color="gray", linewidth=0.8)
    right.set_yticks(positions, CLASSES, fontsize=7)
    right.invert_yaxis()
    right.set_xlabel("Dice gain of the recipe over the plain mean")
    right.legend(loc="lower right", fontsize=8)
    right.set_title(report.verdict(), fontsize=8, wrap=True)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return Path(out)


def plot_dice_bars(per_class: Mapping[str, Sequence[float]], out: str | Path, title: str = "Dice per class") -> Path:
    """Per-class Dice bars, one colour per prediction (members side by side), with each one's mean in the legend."""
    names = list(per_class)
    positions = np.arange(len(CLASSES))
    height = 0.8 / max(1, len(names))
    figure, axes = plt.subplots(figsize=(9, 10))
    for index, name in enumerate(names):
        scores = np.asarray(per_class[name])
        axes.barh(positions + index * height, scores, height=height, label=f"{name} (mean {scores.mean():.4f})")
    axes.set_yticks(positions + height * (len(names) - 1) / 2, CLASSES, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, 1.005)  # a bar at exactly 1 stays visible against the frame
    axes.set_xlabel("Dice")
    axes.set_title(title)
    axes.grid(axis="x", alpha=0.3)
    # below the axes, so that it never hides a bar
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.06), ncols=min(3, len(names)), fontsize=8, frameon=False)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return Path(out)
