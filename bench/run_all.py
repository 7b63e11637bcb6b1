"""Run every benchmark (bench_rle, bench_store, bench_combine, bench_search) and print one table.

Each benchmark runs in its own fresh interpreter (this script with ``--child NAME``), so that its peak RSS is
its own (VmHWM of the child) and one benchmark's settings (bench_store pins itself to one core) do not leak
into the next. bench_rle's ``run()`` and bench_combine's and bench_search's ``run()`` are imported in the child;
bench_store exposes no run function, so its ``main()`` is run with its options and its printed table parsed.
The children's own output is passed through, prefixed with the benchmark's name.

    .venv/bin/python -m bench.run_all            # full: under 10 minutes on 2 cores once stores are cached
    .venv/bin/python -m bench.run_all --quick    # fewer images and repeats
    .venv/bin/python -m bench.run_all --only combine search --workdir DIR

Columns: this project and the straightforward baseline (seconds, bytes or MiB), ratio = baseline / ours,
peak RSS of the benchmark's process (ours and its baseline together; bench_combine's memory rows measure each
side alone in fresh processes).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import runpy
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_WORKDIR, ROOT, load_average, machine, peak_rss_mb, print_table, row

NAMES = ("rle", "store", "combine", "search")
MARKER = "BENCH_ROWS "


# ---- the benchmarks, as run inside a child -----------------------------------------------------------------


def bench_rle(quick: bool, workdir: Path) -> list[dict[str, Any]]:
    """bench_rle.run(): medians of encode and decode of 29 masks at 2048."""
    from bench import bench_rle

    patients, repeats = (1, 1) if quick else (2, 3)
    medians = bench_rle.run(2048, patients, repeats)
    runs = f"median of {patients * 2 * repeats} runs"
    return [row("RLE encode 29 masks 2048", medians["encode"], medians["encode_ref"], "s", runs),
            row("RLE decode 29 masks (boxes)", medians["decode_box"], medians["decode_ref"], "s", runs),
            row("RLE decode 29 masks (full array)", medians["decode_full"], medians["decode_ref"], "s", runs)]


class _Tee(io.TextIOBase):
    """A stream writing to two streams."""

    def __init__(self, *streams: Any) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)


STORE_LINES = {"seconds / image": ("logits -> store, per image", "s"),
               "read back, seconds / image": ("store read back, per image", "s"),
               "bytes / image": ("store bytes per image", "B")}


def bench_store(quick: bool, workdir: Path) -> list[dict[str, Any]]:
    """bench_store.py's main() with its options; its printed table parsed."""
    images, repeats = (2, 1) if quick else (5, 3)
    captured = io.StringIO()
    argv = sys.argv
    sys.argv = ["bench.bench_store", "--images", str(images), "--repeats", str(repeats)]
    try:
        with contextlib.redirect_stdout(_Tee(sys.stdout, captured)):
            runpy.run_module("bench.bench_store", run_name="__main__")
    finally:
        sys.argv = argv
    return parse_store_table(captured.getvalue(), images, repeats)


def parse_store_table(text: str, images: int, repeats: int) -> list[dict[str, Any]]:
    """Rows from bench_store's 'label  ours  baseline  ratio' lines."""
    rows = []
    for label, (operation, unit) in STORE_LINES.items():
        match = re.search(rf"^{re.escape(label)}\s+([\d,.]+)\s+([\d,.]+)", text, re.MULTILINE)
        if match is None:
            raise RuntimeError(f"bench_store's output has no line {label!r}")
        ours, baseline = (float(value.replace(",", "")) for value in match.groups())
        rows.append(row(operation, ours, baseline, unit, f"{images} images x {repeats} repeats, one core"))
    return rows


def bench_combine(quick: bool, workdir: Path) -> list[dict[str, Any]]:
    from bench import bench_combine

    if quick:
        return bench_combine.run(workdir, images=20, repeats=1, memory_images=100, baseline_memory_images=2)
    return bench_combine.run(workdir, images=20, repeats=2, memory_images=300, baseline_memory_images=4)


def bench_search(quick: bool, workdir: Path) -> list[dict[str, Any]]:
    from bench import bench_search

    if quick:
        return bench_search.run(workdir, images=4, repeats=1, brute_candidates=2)
    return bench_search.run(workdir, images=10, repeats=2, brute_candidates=4)


BENCHMARKS = {"rle": bench_rle, "store": bench_store, "combine": bench_combine, "search": bench_search}


def child(name: str, quick: bool, workdir: Path) -> None:
    """Run one benchmark here and print its rows and this process's peak RSS as one marked JSON line."""
    rows = BENCHMARKS[name](quick, workdir)
    print(MARKER + json.dumps({"rows": rows, "peak_rss_mb": peak_rss_mb()}), flush=True)


# ---- the parent --------------------------------------------------------------------------------------------


def run_child(name: str, quick: bool, workdir: Path) -> tuple[list[dict[str, Any]], float, float]:
    """(rows, peak RSS MiB, seconds) of one benchmark in a fresh interpreter, its output passed through."""
    command = [sys.executable, "-m", "bench.run_all", "--child", name, "--workdir", str(workdir)]
    command += ["--quick"] if quick else []
    started = time.perf_counter()
    result = None
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                          env=env) as process:
        for line in process.stdout:
            if line.startswith(MARKER):
                result = json.loads(line[len(MARKER):])
            else:
                print(f"  [{name}] {line}", end="", flush=True)
    if process.returncode != 0 or result is None:
        raise RuntimeError(f"benchmark {name} failed (exit code {process.returncode})")
    return result["rows"], result["peak_rss_mb"], time.perf_counter() - started


def with_peak(rows: list[dict[str, Any]], peak: float) -> list[dict[str, Any]]:
    """Timing rows get the benchmark process's peak RSS; memory rows (unit MiB) keep their own figures."""
    return [{**r, "peak_rss_mb": None if r["unit"] == "MiB" else peak} for r in rows]


def run(names: list[str], quick: bool, workdir: Path) -> list[dict[str, Any]]:
    """Every named benchmark, one after another; all rows."""
    rows = []
    for name in names:
        print(f"== {name}: load average {load_average()}", flush=True)
        found, peak, seconds = run_child(name, quick, workdir)
        print(f"== {name}: {seconds:.0f} s, peak RSS {peak:.0f} MiB", flush=True)
        rows.extend(with_peak(found, peak))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats")
    parser.add_argument("--only", nargs="+", choices=NAMES, default=list(NAMES))
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="cache of generated stores")
    parser.add_argument("--child", choices=NAMES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.quick, args.workdir)
        return
    started, before = time.perf_counter(), load_average()
    rows = run(args.only, args.quick, args.workdir)
    info = machine()
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, numpy {info['numpy']}, "
          f"torch {info['torch']}")
    print(f"{'quick' if args.quick else 'full'} mode, {time.perf_counter() - started:.0f} s in all; "
          f"load average before {before}, after {load_average()}")
    print_table(rows)


if __name__ == "__main__":
    main()
