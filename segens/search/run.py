"""``ens search-weights``: run the per-class search over OOF stores (classes in parallel) and write the recipe,
a per-class report CSV and, on request, a plot."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from joblib import Parallel, delayed

from segens.conventions.classes import CLASSES, NUM_CLASSES
from segens.conventions.dataset import discover
from segens.ensemble.stores import check_stores
from segens.errors import SegensError
from segens.folds.file import load_folds
from segens.infra.backend import check_backend, check_jobs, n_jobs, parallel_backend
from segens.infra.outputs import Output, check_outputs
from segens.infra.progress import progress_bar
from segens.search.class_search import ClassResult, search_class
from segens.search.evidence import ClassEvidence, threshold_grid
from segens.search.evidence_files import (ClassOnDisk, batch_path, batch_search, batches, extract_batch, save_batch,
                                          valid_batch)
from segens.search.overall import auto_candidates, choose_strategy
from segens.search.report import SearchReport
from segens.search.resume import FinishedClasses, labels_digest, partial_root, search_key
from segens.store import ProbabilityStore, open_store
from segens.store.location import shared_location, store_options
from segens.voting import get_strategy
from segens.voting.calibration import METHODS as CALIBRATIONS
from segens.voting.mean import MIN_STEP
from segens.voting.recipe import Recipe, save_recipe

METHODS = ("grid", "caruana")


def _one_class(source: ClassEvidence | ClassOnDisk, strategies, step, method, folds_of_images, postprocess,
               fallback, patients, calibrate="none") -> dict[str, ClassResult]:
    """One class searched with every strategy asked for, on its evidence loaded once."""
    evidence = source.load() if isinstance(source, ClassOnDisk) else source
    return {name: search_class(evidence, name, threshold_grid(), step, method, folds_of_images, postprocess, fallback,
                               patients, calibrate) for name in strategies}


def build_recipe(report: SearchReport, stores: Sequence[ProbabilityStore], settings: dict) -> Recipe:
    """The recipe of a finished search (weights raw as searched; thresholds as float32 values)."""
    thresholds = threshold_grid()
    results = sorted(report.classes, key=lambda result: result.channel)
    members = [{"name": store.member, "checkpoints": {str(fold): checkpoint["sha256"]
                                                      for fold, checkpoint in store.checkpoints.items()}}
               for store in stores]
    recipe = Recipe(report.strategy, members, postprocess=[result.postprocess for result in results],
                    maps={name: [r.maps[m] for r in results] for m, name in enumerate(report.members)},
                    oof_dice={"per_class": {CLASSES[r.channel]: r.oof_dice for r in results},
                              "members": {name: [r.member_dice[m] for r in results] for m, name in enumerate(report.members)},
                              "plain_mean": [r.mean_dice for r in results], "summary": report.summary(),
                              "levels": {CLASSES[r.channel]: r.level for r in results},
                              "verdict": report.verdict()},
                    search=settings)
    fields = get_strategy(report.strategy).recipe_fields([r.recipe_choice for r in results], thresholds, len(stores))
    for name, value in fields.items():
        setattr(recipe, name, value)
    if any(result.calibration is not None for result in results):
        recipe.calibration = {"method": settings["calibrate"], "tables": {
            name: [None if r.calibration is None else r.calibration[m] for r in results]
            for m, name in enumerate(report.members)}}
    return recipe


def search_weights(store_urls: Sequence[str | Path], root: str | Path, folds_path: str | Path | None,
                   out: str | Path, strategy: str = "weighted", step: float = 0.1, method: str = "grid",
                   cv: bool = False, jobs: int = 1, postprocess: bool = True, progress: bool = True,
                   backend: str = "local", scheduler: str | None = None,
                   storage_options: dict | None = None, overwrite: bool = False,
                   also_written: Sequence[Output] = (), fallback: bool = True,
                   calibrate: str = "none") -> SearchReport:
    """Search every class, write ``out`` (recipe.json), return the report. The OOF evidence (each store and
    label file read once) and each finished class are kept beside ``out`` until the recipe is written, so a
    killed search run again with the same inputs resumes. With ``cv`` and ``fallback``, a class keeps a searched
    setting only where the held-out folds show it pays (``search.choose_level``). ``calibrate`` (isotonic or platt)
    fits each member's calibration per class on the OOF images (on the training folds only, for every held-out
    figure) and offers mean votes on the calibrated maps as one more level of that rule.

    ``out`` and ``also_written`` (the caller's report files) are checked before any work: an existing file is
    replaced only with ``overwrite``, an input never.

    Classes are searched by ``jobs`` local processes, or with ``backend="dask"`` by the workers of the Dask
    scheduler at ``scheduler``, which read the stores (shared file system, or URLs such as s3://bucket/m.oof.zarr
    opened with ``storage_options``) and the labels under ``root`` (the same path on every machine) themselves.
    """
    check_backend(backend, scheduler)
    check_jobs(jobs)
    check_outputs([Output(out, "file", "--out"), Output(partial_root(out), "folder", "--out's resume folder", True),
                   *also_written], inputs=[*store_urls, folds_path, root], overwrite=overwrite)
    strategies = auto_candidates() if strategy == "auto" else [strategy]
    votings = [get_strategy(name) for name in strategies]
    if strategy == "auto" and not cv:
        raise SegensError("--strategy auto picks the strategy by held-out scores: it needs --cv (and --folds)")
    if method not in METHODS:
        raise SegensError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if calibrate not in CALIBRATIONS:
        raise SegensError(f"unknown --calibrate {calibrate!r}; choose from {', '.join(CALIBRATIONS)}")
    if calibrate != "none" and not any(voting.calibrates for voting in votings):
        raise SegensError(f"--calibrate {calibrate} changes no vote of strategy {strategy} (a member votes at its own "
                          "searched threshold, and a calibration is monotone); use it with soft, weighted or auto")
    if not MIN_STEP <= step <= 0.5:  # NaN fails too; a finer grid changes no 8-bit vote and would not end
        raise SegensError(f"--step must be a number in [{MIN_STEP}, 0.5], got {step}")
    locations = [shared_location(url, backend) for url in store_urls]
    stores = [open_store(location, store_options(location, storage_options)) for location in locations]
    if any(store.split != "oof" for store in stores):
        raise SegensError(f"{next(s.url for s in stores if s.split != 'oof')}: search-weights needs OOF stores "
                          "(`ens predict-member --split oof`): weights fitted on test predictions cannot be checked")
    for voting in votings:
        voting.check_search(step, len(stores))
    keys, _, _ = check_stores(stores, allow_missing=False)
    records_by_key = discover(Path(root).resolve() if backend == "dask" else root, "train").by_key()
    missing = [key for key in keys if key not in records_by_key]
    if missing:
        raise SegensError(f"{stores[0].url}: image {missing[0]!r} is not a labelled training image of {root}")
    records = [records_by_key[key] for key in keys]
    folds_of_images = None
    if cv:
        if folds_path is None:
            raise SegensError("--cv needs --folds folds.json (the folds the OOF predictions came from)")
        folds = load_folds(folds_path, root=root)
        folds_of_images = [folds.fold_of(key) for key in keys]
    started = time.perf_counter()
    settings = {"step": step, "method": method, "thresholds": "255 midpoints (k + 0.5) / 255", "cv": cv,
                "fallback": bool(cv and fallback),
                "postprocess_search": postprocess, "images": len(keys), "folds": str(folds_path) if folds_path else None}
    if calibrate != "none":
        settings["calibrate"] = calibrate
    key = search_key(stores, keys, folds_of_images, {**settings, "strategy": strategy},
                     labels_digest([record.label_path for record in records]))
    finished = FinishedClasses(out, key, members=len(stores), strategies=strategies)
    by_class = finished.load()
    done = set(by_class)
    evidence_folder = finished.folder / "evidence"
    patients = [key.split("/", 1)[0] for key in keys]
    foreign_batches: list[Path] = []
    with parallel_backend(backend, scheduler), progress_bar("img", disable=not progress) as bar:
        if len(done) < NUM_CLASSES:
            foreign_batches = _extract_evidence(stores, records, evidence_folder, backend, jobs, bar, key)
        # local workers load their class themselves; Dask workers (other machines) are sent it
        sources = (ClassOnDisk(evidence_folder, channel, len(records), len(stores)) for channel in range(NUM_CLASSES)
                   if channel not in done)
        tasks = (delayed(_one_class)(source if backend == "local" else source.load(), strategies, step, method,
                                     folds_of_images, postprocess, fallback, patients, calibrate) for source in sources)
        resumed = f", {len(done)} resumed" if done else ""
        task = bar.add_task(f"search ({strategy}, {len(keys)} images{resumed})", total=NUM_CLASSES, completed=len(done))
        for results in Parallel(n_jobs=n_jobs(backend, jobs), return_as="generator_unordered")(tasks):
            finished.save(results)
            by_class[next(iter(results.values())).channel] = results
            bar.update(task, advance=1)
    members = [store.member for store in stores]
    reports = {name: SearchReport(name, members, [by_class[channel][name] for channel in range(NUM_CLASSES)],
                                  fallback=settings["fallback"], patients=patients,
                                  calibrate=calibrate if get_strategy(name).calibrates else "none")
               for name in strategies}
    for candidate in reports.values():
        candidate.apply_gate()
    chosen, why = choose_strategy({name: r.classes for name, r in reports.items()}, patients) if strategy == "auto" \
        else (strategy, "")
    report = reports[chosen]
    report.alternatives = {name: r for name, r in reports.items() if name != chosen}
    report.choice_reason = why
    report.notes += [f"ignored {path.name}: it belongs to another search (other stores, labels, folds or settings)"
                     for path in [*finished.ignored, *foreign_batches]]
    settings |= {"strategy": strategy, "seconds": round(time.perf_counter() - started, 3),
                 "ambiguous_pixels": int(sum(r.ambiguous_pixels for r in report.classes))}
    save_recipe(build_recipe(report, stores, settings), out)
    finished.clear()
    report.recipe_path = str(out)
    return report


def _extract_evidence(stores, records, folder: Path, backend: str, jobs: int, bar, search: str) -> list[Path]:
    """Every class's evidence of every image into ``folder`` (batches already there, valid and of this search are
    kept); returns the batch files found there that belong to another search (extracted again, for a note)."""
    folder.mkdir(parents=True, exist_ok=True)
    thresholds = threshold_grid()
    todo = [batch for batch in batches(len(records)) if not valid_batch(folder, batch, len(stores), search)]
    foreign = [batch_path(folder, batch) for batch in todo if batch_search(folder, batch) not in (None, search)]
    task = bar.add_task("evidence (every store and label read once)", total=len(records),
                        completed=len(records) - sum(len(batch) for batch in todo))
    here = folder if backend == "local" else None  # local workers write their batch; Dask workers return it
    jobs_of_batches = (delayed(_extracted)(batch, stores, [records[i] for i in batch], thresholds, here, search)
                       for batch in todo)
    for batch, arrays in Parallel(n_jobs=n_jobs(backend, jobs), return_as="generator_unordered")(jobs_of_batches):
        if arrays is not None:
            save_batch(folder, batch, arrays, search)
        bar.update(task, advance=len(batch))
    return foreign


def _extracted(batch: range, stores, records, thresholds, folder: Path | None,
               search: str) -> tuple[range, dict | None]:
    """Extract one batch; saved into ``folder`` by the worker when given, else returned."""
    arrays = extract_batch(stores, records, thresholds)
    if folder is None:
        return batch, arrays
    save_batch(folder, batch, arrays, search)
    return batch, None
