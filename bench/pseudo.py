"""Pseudo-labels at demo scale (issue 24, item 4): does a member retrained on the ensemble's test masks get better
on held-out images, and do the qc filter and the ignore masks matter?

Per seed (``--seeds``, default 0 1 2; the seed makes the synthetic data, the folds and every member's training):
1. the demo's data and ensemble, exactly as ``ens demo`` makes them on a CPU (segens.demo.config.FULL: 32 + 32
   patients at 192 px, 2 folds, UNet++ MobileNetV2, UNet++ MobileNetV3 and YOLOv8n-seg trained by
   ``ens train-member`` with the demo's specs), OOF and test stores, and the demo's main recipe
   (``search-weights --strategy auto --calibrate isotonic --cv``);
2. two pseudo-label folders of every test image (``ens pseudo-label``): **unfiltered** (``--max-qc-score 1
   --min-confidence 0 --no-ignore``: every class's mask as its label, as the seed team did) and **filtered** (the
   defaults: qc score <= 0.4, confidence >= 0.7, ignore masks);
3. one member (``--member``, default unetpp-mobilenetv2, an smp member) in three variants, same spec, seed and
   step budget (the spec's ``train.steps``, as the demo trains it): (a) without pseudo-labels (the ensemble's own
   training of it), (b) with the unfiltered, (c) with the filtered pseudo-labels (``ens train-member --pseudo``).
   At a fixed step budget the pseudo images take steps from the real ones (each real image is seen less often),
   and the demo's members are far from converged at 250 steps; ``--budget epochs`` (or ``both``) also trains
   (a+), (b+), (c+) with the steps scaled by (real + test images) / real images per fold, so that (b+) and (c+)
   see each real image as often as (a) does, and (a+) is the same compute without pseudo-labels;
4. each variant's test store (its folds' mean) combined at 0.5 and scored with the competition's Dice on the test
   labels. The test labels are used for nothing else: pseudo-label reads the test images and the training labels
   (qc's area ranges); its qc.csv lists true Dice only as a report.
The table gives each variant's test Dice per seed, the mean ± the standard deviation over seeds, and the paired
difference from (a) (from (a+) for (b+) and (c+)). A test image is both pseudo-labelled and scored (the seed team's setting: the test set
labelled by the ensemble, the member scored on it): the question is whether the member learns more than its own
errors from the ensemble's labels.

Run (the full run on 2 idle CPU cores: about 25 minutes with --budget steps, about 65 minutes with both; the
estimate is printed at the start, the time left after each seed):
    .venv/bin/python -m bench.pseudo [--budget steps|epochs|both] [--seeds 0 1 2] [--member unetpp-mobilenetv2]
                                     [--device cpu] [--workdir DIR]
    .venv/bin/python -m bench.pseudo --quick      # tiny sizes, one seed, smp members only: well under a minute
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import DEFAULT_WORKDIR, load_average, machine, machine_line
from segens.conventions.dataset import discover
from segens.demo.config import FULL, QUICK, DemoConfig, member_specs
from segens.ensemble.combine import combine
from segens.ensemble.evaluate import evaluate_submission
from segens.ensemble.pseudo import MAX_QC_SCORE, MIN_CONFIDENCE, pseudo_label
from segens.ensemble.qc import BAND
from segens.errors import SegensError
from segens.folds.file import save_folds
from segens.folds.splits import make_folds
from segens.members.predict import predict_member
from segens.members.spec import save_spec
from segens.members.train import train_member
from segens.search.run import search_weights
from segens.synth import generate

VARIANTS = {"a": "without pseudo-labels", "b": "unfiltered pseudo-labels, no ignore masks",
            "c": "filtered pseudo-labels with ignore masks"}
BASE_SECONDS, RETRAIN_SECONDS = 300, 90
"""The full run's estimate on 2 idle CPU cores (measured: AMD EPYC, load 2 from the run's own two processes): per
seed the demo's member training, prediction, recipe search and two pseudo-label folders (255-270 s, 15 s, 12-14 s,
7 s), then per retraining of unetpp-mobilenetv2 at its 250 steps about 90 s with prediction and scoring (78-96 s);
(a+), (b+), (c+) take their step factor times that (250-266 s measured at 750 steps)."""


def expected_seconds(config: DemoConfig, budgets: tuple[str, ...]) -> float:
    """The estimate of one seed's seconds (BASE_SECONDS, RETRAIN_SECONDS)."""
    real = 2 * config.train_patients * (config.k - 1) / config.k
    factor = (real + 2 * config.test_patients) / real
    return BASE_SECONDS + RETRAIN_SECONDS * (2 * ("steps" in budgets) + 3 * factor * ("epochs" in budgets))


TINY_MODEL = {"model.architecture": "Unet", "model.encoder": "resnet18",
              "model.options": {"decoder_channels": [16, 8, 8, 8, 8]}}


def quick_config() -> DemoConfig:
    """For --quick (the plumbing, not the figures): the demo's two smp members as tiny U-Nets at 32 px for 1 step,
    on 3 + 1 patients at 64 px (YOLO's import and epoch alone would take most of a minute)."""
    return dataclasses.replace(QUICK, members=QUICK.members[:2], train_patients=3, test_patients=1, image_size=64,
                               overrides={"smp": {"input.size": 32, "train.steps": 1, "train.batch_size": 4,
                                                  "train.val_every": 1, **TINY_MODEL}})


def seeded_specs(config: DemoConfig, seed: int) -> dict:
    """The demo's member specs with ``train.seed`` set to ``seed``."""
    specs = member_specs(config)
    for spec in specs.values():
        spec.train["seed"] = seed
    return specs


def test_dice(store: Path, root: Path, out: Path) -> float:
    """The competition's Dice of one member's test store at 0.5 on the test labels."""
    csv = out.with_suffix(".csv")
    combine([store], csv, "soft", overwrite=True, progress=False)
    return float(evaluate_submission(csv, root, "test").mean())


def run_seed(seed: int, config: DemoConfig, member: str, workdir: Path, device: str, quick: bool,
             filters: dict[str, float], budgets: tuple[str, ...], log) -> dict[str, Any]:
    """One seed's ensemble, pseudo folders and the three variants' test Dice, with the seconds of each stage."""
    base = workdir / f"seed{seed}"
    shutil.rmtree(base, ignore_errors=True)  # nothing resumed from an earlier run
    root, stores, folds_path = base / "data", base / "stores", base / "folds.json"
    seconds: dict[str, float] = {}

    def stage(name: str, action):
        started = time.perf_counter()
        value = action()
        seconds[name] = round(time.perf_counter() - started, 1)
        log(f"seed {seed}: {name} {seconds[name]:.1f} s")
        return value

    stage("data and folds", lambda: (
        generate(root, config.train_patients, config.test_patients, size=config.image_size, seed=seed,
                 overwrite=True),
        save_folds(make_folds(root, k=config.k, seed=seed)[0], folds_path)))
    specs = seeded_specs(config, seed)
    if member not in specs or specs[member].kind != "smp":
        raise SystemExit(f"--member {member!r} is not one of the demo's smp members here (YOLO cannot train with "
                         f"pseudo-labels): {', '.join(name for name in specs if specs[name].kind == 'smp')}")

    def train_ensemble() -> None:
        for name, spec in specs.items():
            path = save_spec(spec, base / "members" / f"{name}.yaml")
            train_member(path, root, folds_path, device=device, jobs=config.jobs, progress=False, trust_pickle=True,
                         overwrite=True)
    stage("train the ensemble", train_ensemble)

    def predict() -> None:
        for name in specs:
            for split in ("oof", "test"):
                predict_member(base / "members" / f"{name}.yaml", split, root, stores / f"{name}.{split}.zarr",
                               folds_path=folds_path, overwrite=True, device=device, trust_pickle=True,
                               progress=False)
    stage("predict OOF and test stores", predict)
    oof = [stores / f"{name}.oof.zarr" for name in specs]
    test = [str(stores / f"{name}.test.zarr") for name in specs]
    recipe = base / "recipe.json"
    if quick:
        stage("search the recipe", lambda: search_weights(oof, root, folds_path, recipe, strategy="soft", step=0.5,
                                                          progress=False, overwrite=True))
    else:  # the demo's main recipe
        stage("search the recipe", lambda: search_weights(oof, root, folds_path, recipe, strategy="auto",
                                                          step=config.step, cv=True, jobs=2, overwrite=True,
                                                          calibrate="isotonic", progress=False))
    folders = {"b": base / "pseudo_unfiltered", "c": base / "pseudo_filtered"}
    counts = {}
    counts["b"] = stage("pseudo-label unfiltered", lambda: pseudo_label(
        test, recipe, root, folders["b"], max_qc_score=1, min_confidence=0, ignore=False, progress=False,
        overwrite=True).counts)
    try:
        counts["c"] = stage("pseudo-label filtered", lambda: pseudo_label(
            test, recipe, root, folders["c"], progress=False, overwrite=True, **filters).counts)
    except SegensError as exc:  # no pair passed the filters: (c) is the member without pseudo-labels; say so
        log(f"seed {seed}: (c) not trained: {exc}")
        counts["c"] = {"annotated": 0, "pairs": 0, "ignored_share": 0.0}
        del folders["c"]

    dice = {variant + suffix: float("nan") for variant in VARIANTS for suffix in ("", "+")}
    dice["a"] = stage("score (a)", lambda: test_dice(stores / f"{member}.test.zarr", root, base / "a"))
    steps = int(specs[member].train["steps"])
    runs = [(variant, folder, steps) for variant, folder in folders.items()] if "steps" in budgets else []
    if "epochs" in budgets:  # every real image seen as often as in (a): the steps scaled by (real + test) / real
        real = len(discover(root, "train").records) * (config.k - 1) / config.k
        more = round(steps * (real + len(discover(root, "test").records)) / real)
        runs += [(variant + "+", folders.get(variant), more) for variant in ("a", *folders)]
    for variant, folder, budget in runs:
        spec = dataclasses.replace(specs[member], name=f"{member}-{variant.replace('+', 'e')}", checkpoints={},
                                   train={**specs[member].train, "steps": budget})
        path = save_spec(spec, base / "retrained" / f"{spec.name}.yaml")
        stage(f"retrain ({variant}, {budget} steps)", lambda: train_member(
            path, root, folds_path, device=device, jobs=config.jobs, progress=False, overwrite=True, pseudo=folder))
        store = stores / f"{spec.name}.test.zarr"
        stage(f"predict ({variant})", lambda: predict_member(path, "test", root, store, overwrite=True,
                                                             device=device, progress=False))
        dice[variant] = stage(f"score ({variant})", lambda: test_dice(store, root, base / spec.name))
    return {"seed": seed, "dice": dice, "pseudo": counts, "seconds": seconds,
            "steps": {"steps": steps, "epochs": runs[-1][2] if "epochs" in budgets else None}}


def spread(values: list[float]) -> str:
    """``mean ± sd`` over seeds (the sample standard deviation; ± 0 for one seed)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {sd:.4f}"


def table(results: list[dict[str, Any]], member: str) -> str:
    """The printed table: per variant run its test Dice per seed, mean ± sd, and the paired difference from the
    variant without pseudo-labels of the same budget ((a), or (a+))."""
    seeds = [result["seed"] for result in results]
    steps = results[0]["steps"]
    lines = [f"held-out (test) Dice of {member}, retrained; mean ± sd over seeds {', '.join(map(str, seeds))}; "
             f"(a), (b), (c): {steps['steps']} steps"
             + (f"; (a+), (b+), (c+): {steps['epochs']} steps (each real image seen as often as in (a))"
                if steps["epochs"] else ""),
             f"{'variant':<50}" + "".join(f"{'seed ' + str(s):>9}" for s in seeds) + f"{'mean ± sd':>18}"
             + f"{'minus (a)':>20}"]
    for suffix in ("", "+"):
        for variant, what in VARIANTS.items():
            key = variant + suffix
            values = [result["dice"][key] for result in results]
            if all(value != value for value in values):  # not run (nan)
                continue
            gains = [result["dice"][key] - result["dice"]["a" + suffix] for result in results]
            lines.append(f"({key}) {what:<{46 - len(suffix)}}" + "".join(f"{v:>9.4f}" for v in values)
                         + f"{spread(values):>18}" + (f"{spread(gains):>20}" if variant != "a" else f"{'':>20}"))
    for variant in ("b", "c"):
        counts = [result["pseudo"][variant] for result in results]
        lines.append(f"({variant}) pairs annotated: " + ", ".join(f"{c['annotated']}/{c['pairs']}" for c in counts)
                     + "; pixels ignored in written images: "
                     + ", ".join(f"{c['ignored_share']:.1%}" for c in counts))
    return "\n".join(lines)


def _log(text: str) -> None:
    print(text, flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (--quick: 0)")
    parser.add_argument("--member", default="unetpp-mobilenetv2", help="the member retrained (a demo member)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR / "pseudo")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed, smp members only")
    parser.add_argument("--budget", choices=("steps", "epochs", "both"), default="steps",
                        help="steps: the spec's steps for every variant (as the demo trains); epochs: (a+), (b+), "
                             "(c+) with the steps scaled so that each real image is seen as often as in (a); both")
    parser.add_argument("--max-qc-score", type=float, default=MAX_QC_SCORE, help="(c)'s filter")
    parser.add_argument("--band", type=float, default=BAND, help="(c)'s ignore band around the threshold")
    parser.add_argument("--min-confidence", type=float, default=None,
                        help=f"(c)'s filter (default {MIN_CONFIDENCE}; --quick: 0, its 2-step members are unsure)")
    args = parser.parse_args(argv)
    config = quick_config() if args.quick else FULL
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    workdir = args.workdir / ("quick" if args.quick else "full")
    budgets = ("steps", "epochs") if args.budget == "both" else (args.budget,)
    started = time.perf_counter()
    if not args.quick:
        per_seed = expected_seconds(config, budgets)
        print(f"expected time: about {len(seeds) * per_seed / 60:.0f} minutes on 2 idle CPU cores "
              f"({per_seed / 60:.0f} per seed; less on a GPU); load average {load_average()}",
              flush=True)
    filters = {"max_qc_score": args.max_qc_score, "band": args.band,
               "min_confidence": args.min_confidence if args.min_confidence is not None else
               (0.0 if args.quick else MIN_CONFIDENCE)}
    threads = torch.get_num_threads()
    if args.quick:  # tiny networks: one thread is faster than two fighting over a shared CPU (36 s against 78 s)
        torch.set_num_threads(1)
    try:
        results = []
        for number, seed in enumerate(seeds, 1):
            results.append(run_seed(seed, config, args.member, workdir, args.device, args.quick, filters, budgets,
                                    _log))
            spent = time.perf_counter() - started
            if number < len(seeds):
                _log(f"{number} of {len(seeds)} seeds in {spent / 60:.1f} min; about "
                     f"{spent / number * (len(seeds) - number) / 60:.0f} min left")
    finally:
        torch.set_num_threads(threads)
    report = {"config": config.name if not args.quick else "quick", "member": args.member, "seeds": seeds,
              "filters": filters,
              "results": results, "seconds": round(time.perf_counter() - started, 1), "machine": machine(),
              "load_average": load_average()}
    print(table(results, args.member))
    print(f"{report['seconds']:.0f} s in all; {machine_line()}")
    (workdir / "pseudo_bench.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
