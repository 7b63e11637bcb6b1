"""``ens combine --strategy weighted`` against the straightforward pipeline teams use today.

ours:     segens.ensemble.combine.combine(stores, out, strategy="weighted", weights=...): per class, only the
          union of the members' boxes is read and summed; compiled RLE of the box; streamed CSV.
baseline: segens.reference.reference_combine: per image, every member's full (29, 2048, 2048) map as float32,
          weighted sum member by member, ``>``, reference RLE, pandas CSV; with the float32 weights and
          thresholds resolve_settings produces, so both compute the same thing.

Three members' stores at 2048x2048x29 (bone-shaped maps made from synthetic hand labels, ~1% non-zero; see
bench/common.py), cached under --workdir. Ours and the baseline run in this one process, alternating, for
--repeats repeats; the two CSVs must be byte-identical. Seconds per image are medians over repeats.

Peak memory: ours runs in a fresh interpreter on --images images and on --memory-images images (a store made by
copying the same images under new keys) and reports each child's peak RSS; the 300-image peak must be within
10% of the 20-image peak. The baseline's peak RSS is measured the same way on --baseline-memory-images images.

    .venv/bin/python -m bench.bench_combine [--images 20] [--repeats 2] [--memory-images 300] [--workdir DIR]
"""

from __future__ import annotations

import filecmp
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    DEFAULT_WORKDIR,
    load_average,
    machine_line,
    median,
    peak_rss_mb,
    print_table,
    row,
    run_python,
    stores_parser,
    timed,
)
from bench.fixture import BenchData, bench_data, nonzero_fraction, replicated_stores
from segens.ensemble.combine import combine, resolve_settings
from segens.reference import reference_combine

WEIGHTS = {"unetpp-vgg19": 2.0, "unetpp-hrnet64": 1.0, "yolov8-seg": 1.0}
THRESHOLD = 0.45
MEMORY_LIMIT = 0.10  # the 300-image peak RSS may exceed the 20-image peak by at most this fraction


def ours(stores: Sequence[Path], out: Path) -> None:
    """segens: ``ens combine --strategy weighted --weights ... --threshold ...``."""
    combine([str(path) for path in stores], out, strategy="weighted", weights=WEIGHTS, threshold=THRESHOLD,
            jobs=1, progress=False, overwrite=True)  # each repeat replaces the last one's CSV


def baseline(stores: Sequence[Path], members: Sequence[str], out: Path) -> None:
    """The reference pipeline with the same float32 weights and thresholds as ours."""
    settings = resolve_settings("weighted", list(members), weights=WEIGHTS, threshold=THRESHOLD)
    reference_combine([str(path) for path in stores], settings.weights, settings.thresholds, out)


def time_side_by_side(data: BenchData, repeats: int, folder: Path) -> tuple[list[float], list[float], int]:
    """Seconds per image of ours and of the baseline, alternating which goes first; CSVs compared each time."""
    warm = replicated_stores(data, 1)
    ours(warm, folder / "warm.csv")  # numba kernels and imports outside the timing
    baseline(warm, data.members, folder / "warm_ref.csv")
    ours_times, base_times = [], []
    images = len(data.records)
    for repeat in range(repeats):
        order = ("ours", "base") if repeat % 2 == 0 else ("base", "ours")
        for side in order:
            if side == "ours":
                ours_times.append(timed(ours, data.stores, folder / "ours.csv")[0] / images)
            else:
                base_times.append(timed(baseline, data.stores, data.members, folder / "ref.csv")[0] / images)
        if not filecmp.cmp(folder / "ours.csv", folder / "ref.csv", shallow=False):
            raise AssertionError("ens combine's CSV differs from the reference pipeline's")
    return ours_times, base_times, (folder / "ours.csv").stat().st_size


def child_ours(stores: Sequence[Path], out: Path) -> dict[str, Any]:
    """Ours on ``stores`` in a fresh interpreter: seconds, images, peak RSS."""
    code = (f"import json\nfrom segens.ensemble.combine import combine\n"
            f"s = combine({[str(p) for p in stores]!r}, {str(out)!r}, strategy='weighted', weights={WEIGHTS!r}, "
            f"threshold={THRESHOLD!r}, jobs=1, progress=False, overwrite=True)\n"
            f"print(json.dumps({{'seconds': s.seconds, 'images': s.images}}))")
    return run_python(code)


def child_baseline(stores: Sequence[Path], members: Sequence[str], out: Path) -> dict[str, Any]:
    """The reference pipeline on ``stores`` in a fresh interpreter: seconds, peak RSS."""
    code = (f"import json, time\nfrom segens.ensemble.combine import resolve_settings\n"
            f"from segens.reference import reference_combine\n"
            f"s = resolve_settings('weighted', {list(members)!r}, weights={WEIGHTS!r}, threshold={THRESHOLD!r})\n"
            f"t = time.perf_counter()\n"
            f"reference_combine({[str(p) for p in stores]!r}, s.weights, s.thresholds, {str(out)!r})\n"
            f"print(json.dumps({{'seconds': time.perf_counter() - t}}))")
    return run_python(code)


def memory_runs(data: BenchData, memory_images: int, baseline_images: int, folder: Path) -> dict[str, dict[str, Any]]:
    """Peak RSS of ours on the data's images and on ``memory_images``, and of the baseline, each in a fresh process."""
    runs = {"ours_small": child_ours(data.stores, folder / "mem_small.csv"),
            "ours_large": child_ours(replicated_stores(data, memory_images), folder / "mem_large.csv")}
    runs["ours_large"]["images"] = memory_images
    runs["baseline"] = child_baseline(replicated_stores(data, baseline_images), data.members, folder / "mem_ref.csv")
    runs["baseline"]["images"] = baseline_images
    return runs


def run(workdir: Path = DEFAULT_WORKDIR, images: int = 20, repeats: int = 2, memory_images: int = 300,
        baseline_memory_images: int = 4, size: int = 2048, verbose: bool = True) -> list[dict[str, Any]]:
    """Time ours and the baseline side by side, measure peak memory; rows for the summary table."""
    say = print if verbose else (lambda *_: None)
    data = bench_data(workdir, images, size, log=say)
    say(f"{images} images x {len(data.stores)} members at {size}x{size}x29; "
        f"{100 * nonzero_fraction(data.stores[0], [data.records[0].key]):.2f}% non-zero ({data.members[0]}, image 1); "
        f"load average before {load_average()}")
    with tempfile.TemporaryDirectory(prefix="bench_combine_") as name:
        folder = Path(name)
        ours_times, base_times, csv_bytes = time_side_by_side(data, repeats, folder)
        say(f"CSVs byte-identical in all {repeats} repeats ({csv_bytes:,} bytes); load average {load_average()}")
        memory = memory_runs(data, memory_images, baseline_memory_images, folder)
    small, large = memory["ours_small"], memory["ours_large"]
    growth = large["peak_rss_mb"] / small["peak_rss_mb"] - 1
    verdict = "within" if abs(growth) <= MEMORY_LIMIT else "NOT within"
    return [
        row("combine weighted, 3 members, per image", median(ours_times), median(base_times), "s",
            f"median of {repeats} runs of {images} images; CSV byte-identical", peak_rss_mb()),
        row(f"combine peak RSS, {images} images (fresh process)", small["peak_rss_mb"],
            memory["baseline"]["peak_rss_mb"], "MiB",
            f"baseline on {memory['baseline']['images']} images (its peak is per image)"),
        row(f"combine peak RSS, {memory_images} images (fresh process)", large["peak_rss_mb"], None, "MiB",
            f"{100 * growth:+.1f}% vs {images} images: {verdict} {100 * MEMORY_LIMIT:.0f}%; "
            f"{large['seconds'] / memory_images:.3f} s/image"),
    ]


def main() -> None:
    parser = stores_parser(__doc__, images=20, repeats=2)
    parser.add_argument("--memory-images", type=int, default=300)
    parser.add_argument("--baseline-memory-images", type=int, default=4)
    args = parser.parse_args()
    rows = run(args.workdir, args.images, args.repeats, args.memory_images, args.baseline_memory_images, args.size)
    print(machine_line())
    print_table(rows)


if __name__ == "__main__":
    main()
