"""What a search found, in words and tables: the per-class report (rows, CSV), the summary over classes and the
verdict on whether the recipe helps on held-out folds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segens.conventions.classes import CLASSES
from segens.infra.atomic import atomic_write
from segens.search.class_search import ClassResult
from segens.search.evidence import threshold_grid
from segens.search.levels import LEVEL_NAMES
from segens.voting import get_strategy


@dataclass
class SearchReport:
    """The search's results for every class, and the recipe written."""

    strategy: str
    members: list[str]
    classes: list[ClassResult]
    recipe_path: str | None = None
    fallback: bool = True  # the no-loss rule chose each class's level (with CV)

    def summary(self) -> dict[str, float]:
        """Means over classes: each member, the plain mean, the recipe; and the CV gains if run."""
        summary = {f"member:{name}": float(np.mean([c.member_dice[m] for c in self.classes]))
                   for m, name in enumerate(self.members)}
        summary["plain_mean"] = float(np.mean([c.mean_dice for c in self.classes]))
        summary["recipe"] = float(np.mean([c.oof_dice for c in self.classes]))
        folds = [row["fold"] for row in self.classes[0].cv]
        if folds:
            for column in ("recipe", "searched", "mean", "best_member"):  # held-out Dice, mean over folds
                summary[f"cv_{column}"] = float(np.mean([np.mean([c.cv[i][column] for c in self.classes])
                                                         for i in range(len(folds))]))
            for name, column in (("", "recipe"), ("_searched", "searched")):
                over_mean = [np.mean([c.cv[i][column] - c.cv[i]["mean"] for c in self.classes]) for i in range(len(folds))]
                over_best = [np.mean([c.cv[i][column] - c.cv[i]["best_member"] for c in self.classes])
                             for i in range(len(folds))]
                summary.update({f"cv_gain{name}_over_mean": float(np.mean(over_mean)),
                                f"cv_gain{name}_over_mean_std": float(np.std(over_mean)),
                                f"cv_gain{name}_over_best_member": float(np.mean(over_best)),
                                f"cv_gain{name}_over_best_member_std": float(np.std(over_best))})
            for level in LEVEL_NAMES:
                summary[f"classes_{level}"] = float(sum(c.level == level for c in self.classes))
        return summary

    def verdict(self) -> str:
        """Plain sentences: does the recipe beat the plain mean on held-out folds, and where did it fall back?"""
        summary = self.summary()
        if "cv_gain_over_mean" not in summary:
            return ("OOF scores of a searched recipe flatter it (fitted and scored on the same images); "
                    "run with --cv for an honest estimate (and the fallback to the plain rule where searching "
                    "does not pay).")
        levels = ", ".join(f"{int(summary[f'classes_{level}'])} {level}" for level in LEVEL_NAMES
                           if summary.get(f"classes_{level}"))
        searched = (f"searched everywhere: {summary['cv_gain_searched_over_mean']:+.4f} ± "
                    f"{summary['cv_gain_searched_over_mean_std']:.4f}")
        gain, spread = summary["cv_gain_over_mean"], summary["cv_gain_over_mean_std"]
        if summary.get("classes_searched", 0) == 0 and summary.get("classes_threshold", 0) == 0:
            return (f"Searching does not beat the plain rule on held-out folds for any class ({searched}); the "
                    f"recipe is the plain rule.")
        judged = "beats" if gain > 0 and gain >= spread else "is NOT reliably better than"
        best, best_spread = summary["cv_gain_over_best_member"], summary["cv_gain_over_best_member_std"]
        return (f"The recipe ({levels} classes) {judged} the plain mean on held-out folds: {gain:+.4f} ± "
                f"{spread:.4f} Dice ({searched}); against the best single member of each class: {best:+.4f} ± "
                f"{best_spread:.4f}." + (" Each fold's figure comes from levels chosen on the other folds."
                                         if self.fallback else " No fallback: every class keeps its searched setting."))


def report_rows(report: SearchReport) -> list[dict[str, object]]:
    """One row per class (and a mean row): each member, the plain mean, the recipe, its settings, CV gains."""
    rows = []
    thresholds = threshold_grid()
    for result in report.classes:
        row: dict[str, object] = {"class": CLASSES[result.channel]}
        for m, name in enumerate(report.members):
            row[name] = round(result.member_dice[m], 6)
        row["plain_mean"] = round(result.mean_dice, 6)
        row["recipe"] = round(result.oof_dice, 6)
        row |= get_strategy(report.strategy).report_columns(result.recipe_choice, thresholds)
        row["postprocess"] = "+".join(result.postprocess) or "-"
        if result.cv:
            row["level"] = result.level
            for column, name in (("recipe", "cv_gain_vs_mean"), ("searched", "cv_gain_searched_vs_mean")):
                gains = [fold[column] - fold["mean"] for fold in result.cv]
                row[name] = f"{np.mean(gains):+.4f} ± {np.std(gains):.4f}"
        rows.append(row)
    return rows


def write_report_csv(rows: Sequence[dict[str, object]], path: str | Path) -> Path:
    """The per-class rows as a CSV file, written atomically."""
    import pandas as pd

    with atomic_write(path) as handle:
        pd.DataFrame(list(rows)).to_csv(handle, index=False)
    return Path(path)
