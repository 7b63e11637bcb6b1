"""The users' real workload on one machine: 800 OOF + 300 test images at 2048, 3 and 5 strong members.

For each fixture seed (``bench/fixture.py``: synthetic labels, member stores from an error model, cached under
``--workdir``) and each member count M, this runs the real commands as users do, each in its own process:

- ``ens search-weights --cv`` with each strategy (wall time and the peak memory of its process tree);
- ``ens combine`` of the test images with each recipe and with the plain mean (wall time, peak memory);
- ``ens evaluate``-style scoring of every CSV on the test labels (``evaluate_submission``) and of the best single
  member (chosen on OOF) at 0.5.

It prints two tables (timing on the first seed; quality as mean +- spread over seeds) and writes every figure to
``--json``. ``--quick`` runs a small version (a few 512 px images) in about a minute, for the test suite.

    .venv/bin/python -m bench.scale --seeds 0 1 2 --members 3 5 --json scale.json
    .venv/bin/python -m bench.scale --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import DEFAULT_WORKDIR, ROOT, load_average, machine_line
from bench.fixture import Fixture, fixture
from segens.ensemble.evaluate import evaluate_store, evaluate_submission

STRATEGIES = ("soft", "weighted", "hard", "auto")
CALIBRATED = tuple(f"{strategy}+{method}" for strategy in ("soft", "weighted", "auto") for method in ("isotonic", "platt"))
"""Strategies searched with --calibrate: 'weighted+isotonic' is --strategy weighted --calibrate isotonic."""


def tree_rss_mb(pid: int) -> float:
    """Resident memory (MiB) of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
            children.setdefault(int(fields[1]), []).append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += rss.get(current, 0)
        todo.extend(children.get(current, []))
    return total / 2**20


def run_command(arguments: list[str]) -> dict[str, float]:
    """Run ``ens ARGUMENTS`` in a fresh process; its wall seconds and the peak RSS of its process tree (sampled
    every 50 ms)."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "YOLO_OFFLINE": "1"}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "segens.cli", *arguments], cwd=ROOT, env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0.0]

    def sample() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], tree_rss_mb(process.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    sampler.join()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"ens {' '.join(arguments)} failed ({process.returncode}):\n{output[-4000:]}")
    return {"seconds": seconds, "peak_rss_mb": peak[0]}


def measure(data: Fixture, members: int, jobs: int, strategies: list[str], folder: Path,
            log=print) -> dict[str, Any]:
    """Search, combine and score one fixture with its first ``members`` members."""
    folder.mkdir(parents=True, exist_ok=True)
    oof, test = [str(path) for path in data.oof[:members]], [str(path) for path in data.test[:members]]
    result: dict[str, Any] = {"members": members, "names": data.members[:members], "searches": {}, "combines": {}}
    for strategy in strategies:
        recipe = folder / f"recipe-{strategy}.json"
        name, _, calibrate = strategy.partition("+")
        timing = run_command(["search-weights", *oof, "--data", str(data.root), "--folds", str(data.folds), "--cv",
                              "--strategy", name, "--calibrate", calibrate or "none", "--jobs", str(jobs), "--out",
                              str(recipe), "--overwrite"])
        document = json.loads(recipe.read_text())
        result["searches"][strategy] = {**timing, "summary": document["oof_dice"]["summary"],
                                        "levels": document["oof_dice"].get("levels", {}),
                                        "strategy": document["strategy"]}
        log(f"    search {strategy}: {timing['seconds']:.0f} s, {timing['peak_rss_mb']:.0f} MiB; "
            f"{document['oof_dice']['verdict']}")
    # the recipe names its strategy (auto has chosen one), so combine takes it from there
    plans = [("plain mean", ["--strategy", "soft"])] + [(strategy, ["--recipe", str(folder / f"recipe-{strategy}.json")])
                                                        for strategy in strategies]
    per_fold = [str(path) for fold in data.test_folds for path in fold[:members]]
    for name, options in plans:
        csv = folder / f"test-{name.replace(' ', '-')}.csv"
        timing = run_command(["combine", *test, *options, "--jobs", str(jobs), "--out", str(csv), "--overwrite"])
        result["combines"][name] = {**timing, "test_dice": evaluate_submission(csv, data.root, "test").mean()}
        log(f"    combine {name}: {timing['seconds']:.1f} s, {timing['peak_rss_mb']:.0f} MiB, "
            f"test Dice {result['combines'][name]['test_dice']:.5f}")
        if per_fold and "--recipe" in options:  # the same recipe on each fold model's own maps, merged
            csv = folder / f"test-{name.replace(' ', '-')}-per-fold.csv"
            timing = run_command(["combine", *per_fold, *options, "--jobs", str(jobs), "--out", str(csv),
                                  "--overwrite"])
            result["combines"][name]["per_fold"] = {**timing, "test_dice": evaluate_submission(csv, data.root,
                                                                                              "test").mean()}
            log(f"    combine {name}, per fold: {timing['seconds']:.1f} s, test Dice "
                f"{result['combines'][name]['per_fold']['test_dice']:.5f}")
    summary = result["searches"][strategies[0]]["summary"]
    oof_members = {name: summary[f"member:{name}"] for name in result["names"]}
    best = max(oof_members, key=oof_members.get)
    result["best_member"] = {"name": best, "oof_dice": oof_members[best],
                             "test_dice": evaluate_store(data.test[data.members.index(best)], data.root).mean()}
    return result


def quality_rows(runs: list[dict[str, Any]], strategies: list[str]) -> list[dict[str, Any]]:
    """Per setting: OOF Dice, CV estimate and test Dice as lists over seeds."""
    rows = []
    best = [run["best_member"] for run in runs]
    first = [run["searches"][strategies[0]]["summary"] for run in runs]
    rows.append({"setting": "best single member (chosen on OOF), 0.5", "oof": [b["oof_dice"] for b in best],
                 "cv": [s["cv_best_member"] for s in first], "test": [b["test_dice"] for b in best]})
    rows.append({"setting": "plain mean, 0.5", "oof": [s["plain_mean"] for s in first],
                 "cv": [s["cv_mean"] for s in first], "test": [run["combines"]["plain mean"]["test_dice"] for run in runs]})
    for strategy in strategies:
        summaries = [run["searches"][strategy]["summary"] for run in runs]
        levels = [run["searches"][strategy]["levels"] for run in runs]
        kept = [sum(level != "plain" for level in seed.values()) for seed in levels]
        calibrated = [sum(level == "calibrated" for level in seed.values()) for seed in levels]
        chosen = [run["searches"][strategy].get("strategy", strategy) for run in runs]
        rows.append({"setting": f"{strategy}, searched + fallback", "oof": [s["recipe"] for s in summaries],
                     "cv": [s["cv_recipe"] for s in summaries], "cv_searched": [s["cv_searched"] for s in summaries],
                     "test": [run["combines"][strategy]["test_dice"] for run in runs], "classes_not_plain": kept, "calibrated": calibrated,
                     "gated": [bool(s.get("gated")) for s in summaries], "chosen": chosen})
        if "per_fold" in runs[0]["combines"][strategy]:
            rows.append({"setting": f"{strategy}, per-fold test maps", "oof": rows[-1]["oof"], "cv": rows[-1]["cv"],
                         "test": [run["combines"][strategy]["per_fold"]["test_dice"] for run in runs]})
    return rows


def spread(values: list[float]) -> str:
    return f"{np.mean(values):.5f} ± {np.std(values):.5f}" if len(values) > 1 else f"{values[0]:.5f}"


def print_tables(report: dict[str, Any]) -> None:
    print(f"\n{report['machine']}")
    print("\nTiming (first seed), wall seconds and peak RSS of the command's process tree:")
    print("| M | step | seconds | peak RSS |\n|---|---|---|---|")
    for run in report["timing"]:
        for strategy, item in run["searches"].items():
            print(f"| {run['members']} | search-weights --cv --strategy {strategy} | {item['seconds']:.0f} | "
                  f"{item['peak_rss_mb']:.0f} MiB |")
        for name, item in run["combines"].items():
            print(f"| {run['members']} | combine {report['test_images']} test images ({name}) | {item['seconds']:.1f} | "
                  f"{item['peak_rss_mb']:.0f} MiB |")
    for members, rows in report["quality"].items():
        print(f"\nQuality, M = {members}, mean ± spread over seeds {report['seeds']}:")
        print("| setting | OOF Dice | CV estimate | test Dice | test - plain mean | classes moved |\n"
              "|---|---|---|---|---|---|")
        plain = rows[1]["test"]
        for row in rows:
            gains = [t - p for t, p in zip(row["test"], plain)]
            moved = ", ".join(f"{count}{' (gated)' if gated else ''}{f' ({tuned} calibrated)' if tuned else ''}"
                              f"{'' if name == row['setting'].split(',')[0].split('+')[0] else ' ' + name}"
                              for count, gated, tuned, name in zip(row["classes_not_plain"], row["gated"],
                                                                   row.get("calibrated", [0] * len(row["gated"])),
                                                                   row["chosen"])) \
                if "classes_not_plain" in row else ""
            print(f"| {row['setting']} | {spread(row['oof'])} | {spread(row['cv'])} | {spread(row['test'])} | "
                  f"{spread(gains)} (min {min(gains):+.5f}) | {moved} |")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--members", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES[:3]), choices=STRATEGIES + CALIBRATED)
    parser.add_argument("--mode", default="strong", choices=("strong", "null", "calibration"),
                        help="strong: diverse, mis-calibrated members; null: equal, calibrated members (nothing to gain); "
                             "calibration: the fifth member over-confident")
    parser.add_argument("--k", type=int, default=5, help="folds")
    parser.add_argument("--fold-maps", action="store_true",
                        help="test maps as the mean of each fold model's own maps, and per-fold test stores "
                             "(combined fold by fold as well)")
    parser.add_argument("--train-images", type=int, default=800)
    parser.add_argument("--test-images", type=int, default=300)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--quality-members", type=int, nargs="+", default=None,
                        help="member counts run on every seed (default: all of --members); others run on the first seed only")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="16 + 8 images at 512, M = 3, one seed")
    options = parser.parse_args(argv)
    if options.quick:
        options.train_images, options.test_images, options.size = 16, 8, 512
        options.seeds, options.members = options.seeds[:1], [3]
    quality_members = options.quality_members or options.members
    report: dict[str, Any] = {"machine": machine_line(), "mode": options.mode, "k": options.k,
                              "seeds": options.seeds, "train_images": options.train_images,
                              "test_images": options.test_images, "size": options.size, "jobs": options.jobs,
                              "timing": [], "quality": {}, "fixtures": {}}
    runs: dict[int, list[dict[str, Any]]] = {members: [] for members in quality_members}
    for index, seed in enumerate(options.seeds):
        data = fixture(options.workdir, options.train_images, options.test_images, options.size, max(options.members),
                       seed, options.jobs, mode=options.mode, k=options.k, fold_maps=options.fold_maps)
        report["fixtures"][seed] = data.build_seconds
        for members in options.members:
            if index > 0 and members not in quality_members:
                continue
            print(f"seed {seed}, M = {members} (load {load_average()})", flush=True)
            run = measure(data, members, options.jobs, options.strategies,
                          data.folder / f"runs-M{members}")
            if index == 0:
                report["timing"].append(run)
            if members in runs:
                runs[members].append(run)
    report["quality"] = {members: quality_rows(items, options.strategies) for members, items in runs.items()}
    report["load_after"] = load_average()
    print_tables(report)
    if options.json:
        options.json.write_text(json.dumps(report, indent=1, default=float))
    return report


if __name__ == "__main__":
    main()
