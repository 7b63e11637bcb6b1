"""What a search found, in words and tables: the per-class report (rows, CSV), the summary over classes and the
verdict on whether the recipe helps on held-out folds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segens.conventions.classes import CLASSES
from segens.infra.atomic import atomic_write
from segens.search.class_search import ClassResult
from segens.search.evidence import threshold_grid
from segens.search.levels import LEVEL_NAMES, Z
from segens.search.overall import Comparison, gate, image_scores
from segens.voting import get_strategy


@dataclass
class SearchReport:
    """The search's results for every class, and the recipe written."""

    strategy: str
    members: list[str]
    classes: list[ClassResult]
    recipe_path: str | None = None
    fallback: bool = True  # the no-loss rule chose each class's level and the overall gate ran (with CV)
    gate: Comparison | None = None  # the searched recipe's held-out gain over the plain rule (with CV)
    gated: bool = False  # the gate found that gain not reliably positive: the recipe written is the plain rule
    alternatives: dict[str, SearchReport] = field(default_factory=dict)  # --strategy auto: the others searched
    choice_reason: str = ""
    notes: list[str] = field(default_factory=list)
    patients: list[str] | None = None  # each image's patient (held-out comparisons are paired per patient)
    calibrate: str = "none"  # the calibration method the search fitted (segens.voting.calibration)
    ungated: list[ClassResult] | None = None  # where the gate wrote the plain rule: the classes as searched

    @property
    def cv(self) -> bool:
        return bool(self.classes and self.classes[0].held_out)

    def apply_gate(self) -> None:
        """With CV and the fallback, the overall gate: where the recipe's held-out gain over the plain rule (each
        image scored by levels and settings chosen without its fold, over all classes, paired per patient) is not
        reliably positive, the plain rule is written everywhere (``ungated`` keeps the classes as searched)."""
        if not (self.cv and self.fallback):
            return
        self.gate = gate(self.classes, self.patients)
        if not self.gate.reliable:
            self.gated, self.ungated = True, self.classes
            self.classes = [result.as_plain() for result in self.classes]

    def comparisons(self) -> dict[str, Comparison]:
        """Held-out comparisons over images (with CV): the written recipe and the searched setting everywhere,
        each against the plain mean, the strategy's plain rule and the best single member of each class."""
        pairs = {"recipe over mean": ("recipe", "mean"), "searched over mean": ("searched", "mean"),
                 "recipe over plain": ("recipe", "plain"), "recipe over best member": ("recipe", "best_member"),
                 "searched over best member": ("searched", "best_member")}
        return {name: Comparison.of(image_scores(self.classes, a), image_scores(self.classes, b), self.patients)
                for name, (a, b) in pairs.items()}

    def plain_is_mean(self) -> bool:
        """Whether the strategy's plain rule is the plain mean at 0.5 (soft, weighted): on every class it scores
        each held-out image exactly as that mean does. Hard voting's (a majority of votes at 0.5) is not."""
        return all(result.held_out.get("plain") == result.held_out.get("mean") for result in self.classes)

    def against_mean(self, found: dict[str, Comparison]) -> str:
        """A sentence for a strategy whose plain rule is not the plain mean (with CV): the written recipe's held-out
        gain over the plain mean, and where it reliably loses to it, that the mean (soft voting) does better."""
        gain = found["recipe over mean"]
        behind = Comparison.of(image_scores(self.classes, "mean"), image_scores(self.classes, "recipe"),
                               self.patients).reliable
        judged = "beats" if gain.reliable else "loses to" if behind else "is not reliably better than"
        advice = ": the plain mean does better here (--strategy soft, or auto to compare)" if behind else ""
        return (f"The {self.strategy} recipe written {judged} the plain mean (soft voting at 0.5) on held-out "
                f"images: {gain.text()} Dice{advice}.")

    def summary(self) -> dict[str, float]:
        """Means over classes: each member, the plain mean, the recipe; with CV the held-out Dice of each and the
        gains (mean and standard error over images), and the classes at each level."""
        summary = {f"member:{name}": float(np.mean([c.member_dice[m] for c in self.classes]))
                   for m, name in enumerate(self.members)}
        summary["plain_mean"] = float(np.mean([c.mean_dice for c in self.classes]))
        summary["recipe"] = float(np.mean([c.oof_dice for c in self.classes]))
        if self.cv:
            for column in ("recipe", "searched", "mean", "plain", "best_member"):
                summary[f"cv_{column}"] = float(image_scores(self.classes, column).mean())
            for name, comparison in self.comparisons().items():
                key = "cv_gain_" + name.removeprefix("recipe ").replace(" ", "_")
                summary[key], summary[f"{key}_se"] = comparison.gain, comparison.se
            for level in LEVEL_NAMES:
                if level != "calibrated" or self.calibrate != "none":
                    summary[f"classes_{level}"] = float(sum(c.level == level for c in self.classes))
            if self.gate is not None:
                summary["gate_gain"], summary["gate_se"] = self.gate.gain, self.gate.se
                summary["gated"] = float(self.gated)
        return summary

    def verdict(self) -> str:
        """Plain sentences: does the recipe beat the plain mean on held-out images, and where did it fall back?"""
        if not self.cv:
            return ("OOF scores of a searched recipe flatter it (fitted and scored on the same images); "
                    "run with --cv for an honest estimate (and the fallback to the plain rule where searching "
                    "does not pay).")
        found = self.comparisons()
        searched = f"searched everywhere: {found['searched over mean'].text()}"
        lines = []
        plain_written = all(c.level == "plain" for c in self.classes)  # gated, or no class moved
        if self.gated:
            lines.append(f"Searching does not beat the plain rule on held-out images: the searched recipe's gain over "
                         f"it, {self.gate.text()} Dice, is not reliably positive (it needs more than {Z:g} standard "
                         f"errors), so the recipe written is the plain rule ({searched}).")
        elif plain_written:
            lines.append(f"Searching does not beat the plain rule on held-out images for any class ({searched}); "
                         "the recipe is the plain rule.")
        else:
            counts = ", ".join(f"{sum(c.level == level for c in self.classes)} {level}" for level in LEVEL_NAMES
                               if any(c.level == level for c in self.classes))
            recipe = found["recipe over mean"]
            judged = "beats" if recipe.reliable else "is NOT reliably better than"
            lines.append(f"The recipe ({counts} classes) {judged} the plain mean on held-out images: {recipe.text()} "
                         f"Dice ({searched}); against the best single member of each class: "
                         f"{found['recipe over best member'].text()}.")
            lines.append("Each image's figure comes from levels and settings chosen without its fold." if self.fallback
                         else "No fallback: every class keeps its searched setting.")
        if plain_written and not self.plain_is_mean():  # the sentence above compared with its own plain rule
            lines.append(self.against_mean(found))
        if self.alternatives:
            others = "; ".join(f"{name}: {r.comparisons()['recipe over mean'].text()}"
                               for name, r in self.alternatives.items())
            lines.append(f"Strategy {self.strategy} chosen: {self.choice_reason}. Held-out gain over the plain mean "
                         f"of the others' recipes: {others}.")
        lines += self.notes
        return " ".join(lines)


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
        if result.held_out:
            row["level"] = result.level
            for column, name in (("recipe", "cv_gain_vs_mean"), ("searched", "cv_gain_searched_vs_mean")):
                row[name] = Comparison.of(result.held_out[column], result.held_out["mean"]).text()
        rows.append(row)
    return rows


def write_report_csv(rows: Sequence[dict[str, object]], path: str | Path) -> Path:
    """The per-class rows as a CSV file, written atomically."""
    import pandas as pd

    with atomic_write(path) as handle:
        pd.DataFrame(list(rows)).to_csv(handle, index=False)
    return Path(path)
