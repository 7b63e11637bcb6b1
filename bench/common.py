"""Shared helpers of the benchmarks: timing, peak memory, the machine and its load, and the printed table. The
synthetic members' stores they measure on are made by bench.fixture."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "segens-bench"  # $TMPDIR or the system default


def stores_parser(doc: str | None, images: int, repeats: int) -> argparse.ArgumentParser:
    """A benchmark's argument parser with the options every store benchmark shares: --workdir (the fixture's
    cache), --images, --repeats and --size."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="cache of generated stores")
    parser.add_argument("--images", type=int, default=images)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--size", type=int, default=2048)
    return parser


# ---- timing, memory, machine, table ------------------------------------------------------------------------


def timed(function: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB: VmHWM of /proc/self/status. (getrusage's
    ru_maxrss is no good in a child: Linux copies the parent's high-water mark on fork and keeps it over exec.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_python(code: str, timeout: float | None = None) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter of this venv; its last stdout line must be a JSON object, to which
    the child's own peak RSS (MiB, VmHWM printed by a wrapper after ``code``) is added as ``peak_rss_mb``."""
    wrapper = (code + "\nimport json as _j\nfrom bench.common import peak_rss_mb as _p\n"
               "print(_j.dumps({'__rss_mb': _p()}))\n")
    done = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-2]) if len(lines) >= 2 else {}
    result["peak_rss_mb"] = json.loads(lines[-1])["__rss_mb"]
    return result


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def machine() -> dict[str, str]:
    """CPU model, cores, Python, numpy and torch versions (torch only if installed)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = "not installed"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": str(cores), "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch_version}


def machine_line() -> str:
    info = machine()
    return (f"machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, numpy {info['numpy']}, "
            f"torch {info['torch']}; load average {load_average()}")


def row(operation: str, ours: float | None, baseline: float | None, unit: str, note: str = "",
        peak_rss: float | None = None) -> dict[str, Any]:
    """One result row; ``ratio`` is baseline / ours (how many times faster or smaller ours is)."""
    ratio = baseline / ours if ours and baseline is not None else None
    return {"operation": operation, "ours": ours, "baseline": baseline, "unit": unit, "ratio": ratio,
            "peak_rss_mb": peak_rss, "note": note}


def format_value(value: float | None, unit: str) -> str:
    """A value in its unit, scaled for reading (s -> ms below 0.1 s)."""
    if value is None:
        return "-"
    if unit == "s" and value < 0.1:
        return f"{value * 1e3:.1f} ms"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "MiB":
        return f"{value:.0f} MiB"
    if unit == "B":
        return f"{value:,.0f} B"
    return f"{value:.4g} {unit}".strip()


def print_table(rows: Sequence[dict[str, Any]], title: str = "") -> None:
    """Operation, ours, baseline, ratio, peak RSS, note: one line per row."""
    if title:
        print(title)
    width = max([len("operation"), *(len(r["operation"]) for r in rows)]) + 2
    print(f"{'operation':<{width}}{'this project':>14}{'baseline':>14}{'ratio':>9}{'peak RSS':>11}  note")
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.1f}x"
        rss = "-" if r.get("peak_rss_mb") is None else f"{r['peak_rss_mb']:.0f} MiB"
        print(f"{r['operation']:<{width}}{format_value(r['ours'], r['unit']):>14}"
              f"{format_value(r['baseline'], r['unit']):>14}{ratio:>9}{rss:>11}  {r.get('note', '')}")
