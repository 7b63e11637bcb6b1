"""What calibration costs the search, part by part, on the scale fixture's calibration mode (800 OOF images at
2048, 5 members, 5 patient-grouped folds, the fifth member over-confident).

Per class (``--jobs`` classes at a time, as the search runs them; a class's parts one after another):

- evidence: the class's OOF evidence extracted once (every store and label read; shared by both searches);
- search: ``search_class`` as ``ens search-weights --cv --strategy weighted`` runs it (no calibration);
- fit: the calibration tables alone (``calibration_tables``: level histograms from the evidence rows, then an
  isotonic fit per member on each of the CV plan's selecting subsets);
- calibrated search: ``search_class`` with ``calibrate="isotonic"`` (the fit, the calibrated level scored on
  every subset, its post-processing variants, and the no-loss rule with one level more).

The issue's goal is a fit under 20% of the search's time. The table reports the fit against the uncalibrated
search and what the calibrated level adds in all. Medians over ``--repeats``; every class by default.

    .venv/bin/python -m bench.calibration_cost [--classes finger-4 Capitate] [--repeats 1] [--json F]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import sklearn.isotonic  # noqa: F401  (imported here, outside the timings: fit_table imports it lazily)
from joblib import Parallel, delayed

from bench.common import DEFAULT_WORKDIR, load_average, machine_line, median, timed
from bench.fixture import fixture
from segens.conventions.classes import CLASSES, class_index
from segens.conventions.dataset import discover
from segens.folds.file import load_folds
from segens.search.class_search import calibration_tables, search_class
from segens.search.evidence import extract_class, threshold_grid
from segens.search.levels import make_plan
from segens.store import open_store


def measure_class(store_paths: list[str], records, channel: int, folds_of_images: list[int], patients: list[str],
                  repeats: int) -> dict[str, Any]:
    """Seconds of each part for one class (medians over ``repeats``) and the level the calibrated search kept."""
    thresholds = threshold_grid()
    stores = [open_store(path) for path in store_paths]
    evidence_seconds, evidence = timed(extract_class, stores, records, channel, thresholds)
    subsets = make_plan(folds_of_images, np.asarray(patients)).subsets
    calibration_tables(evidence, subsets, "isotonic")  # untimed: a worker's first fit pays scikit-learn's set-up
    plain, fit, calibrated = [], [], []
    level = ""
    for _ in range(repeats):
        plain.append(timed(search_class, evidence, "weighted", thresholds, 0.1, "grid", folds_of_images, True, True,
                           patients)[0])
        fit.append(timed(calibration_tables, evidence, subsets, "isotonic")[0])
        seconds, result = timed(search_class, evidence, "weighted", thresholds, 0.1, "grid", folds_of_images, True,
                                True, patients, "isotonic")
        calibrated.append(seconds)
        level = result.level
    return {"class": CLASSES[channel], "rows": int(evidence.values.shape[1]), "subsets": len(subsets.selecting),
            "evidence_s": evidence_seconds, "search_s": median(plain), "fit_s": median(fit),
            "calibrated_search_s": median(calibrated), "level": level}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", nargs="+", default=list(CLASSES))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--train-images", type=int, default=800)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2,
                        help="processes building the fixture and timing classes side by side (as the search runs them)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="16 images at 512, 3 members, 2 classes")
    options = parser.parse_args(argv)
    if options.quick:
        options.train_images, options.size, options.members = 16, 512, 3
        options.classes = options.classes[:2] if options.classes != list(CLASSES) else ["finger-4", "Capitate"]
    data = fixture(options.workdir, options.train_images, 0, options.size, options.members, options.seed,
                   options.jobs, mode="calibration", k=5)
    paths = [str(path) for path in data.oof[:options.members]]
    by_key = discover(data.root, "train").by_key()
    keys = list(open_store(paths[0]).keys())
    records = [by_key[key] for key in keys]
    folds = load_folds(data.folds, root=data.root)
    folds_of_images = [folds.fold_of(key) for key in keys]
    patients = [key.split("/", 1)[0] for key in keys]
    print(f"{machine_line()}; load before {load_average()}", flush=True)
    tasks = (delayed(measure_class)(paths, records, class_index(name), folds_of_images, patients, options.repeats)
             for name in options.classes)
    rows = []
    for row in Parallel(n_jobs=options.jobs, return_as="generator")(tasks):
        print(f"  {row['class']}: search {row['search_s']:.2f} s, fit {row['fit_s']:.3f} s, calibrated search "
              f"{row['calibrated_search_s']:.2f} s ({row['level']})", flush=True)
        rows.append(row)
    totals = {part: sum(row[part] for row in rows) for part in ("evidence_s", "search_s", "fit_s", "calibrated_search_s")}
    report = {"machine": machine_line(), "load_after": load_average(), "images": options.train_images,
              "size": options.size, "members": options.members, "classes": rows, "totals": totals}
    search = totals["search_s"]
    print(f"{'part (all classes)':<36}{'seconds':>10}{'of the search':>15}")
    for label, part in (("evidence (read once, shared)", "evidence_s"), ("search, weighted", "search_s"),
                        ("fit the calibration tables", "fit_s"), ("search, weighted and calibrated", "calibrated_search_s")):
        share = "" if part == "evidence_s" else f"{100 * totals[part] / search:.1f}%"
        print(f"{label:<36}{totals[part]:>10.1f}{share:>15}")
    if options.json:
        options.json.write_text(json.dumps(report, indent=1, default=float))
    return report


if __name__ == "__main__":
    main()
