"""Shared helpers of the benchmarks: realistic member probability stores built from synthetic hand labels
(cached on disk), cheap large stores made by copying images under new keys, timing, peak memory, the machine,
and the printed table.

A member map is made per class from the ground-truth mask as a network's upsampled output looks: a logit that
rises inside the bone (reaching p = 1.0, v = 255, a few pixels in) and falls slowly outside (a soft halo of
~20-45 px at 2048), shifted by a few pixels, with smooth noise and a few faint false-positive spots; p < 0.03
is cut to 0. Three members differ in sharpness, halo width, shift and noise. About 1% of the values are
non-zero (0.8-1.2% by member; the truth covers 0.45%), within a box around each bone.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from segens.conventions.classes import NUM_CLASSES  # noqa: E402
from segens.conventions.dataset import ImageRecord, discover, read_record_mask  # noqa: E402
from segens.store import create_store, open_store  # noqa: E402
from segens.synth import generate  # noqa: E402

DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "segens-bench"  # $TMPDIR or the system default
CACHE_VERSION = 1
CUT = 0.03  # probabilities below this are written as 0, as predict-member's outputs are


@dataclass(frozen=True)
class Member:
    """How one synthetic member blurs the truth: logit = rise + slope_in * d_in inside, -slope_out * d_out
    outside (d: distance to the shifted boundary in px), plus smooth noise of std ``noise``."""

    name: str
    rise: float
    slope_in: float
    slope_out: float
    shift: tuple[int, int]
    noise: float


MEMBERS = (
    Member("sharp", 1.0, 1.5, 0.15, (0, 0), 0.6),
    Member("blurry", 0.5, 0.6, 0.08, (1, -1), 0.4),
    Member("shifted", 1.0, 1.0, 0.11, (3, 2), 0.8),
)


# ---- synthetic member maps ---------------------------------------------------------------------------------


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int = 32) -> np.ndarray:
    """Unit-std noise, smooth over about ``cell`` pixels (bicubic upsampling of a coarse normal grid)."""
    coarse = rng.normal(0, 1, (shape[0] // cell + 2, shape[1] // cell + 2)).astype(np.float32)
    return cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def class_map(mask: np.ndarray, member: Member, rng: np.random.Generator,
              margin: int = 64) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    """One class of one member: (crop box, uint8 values inside it), or None for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    height, width = mask.shape
    box = (max(0, rows[0] - margin), min(height, rows[-1] + 1 + margin),
           max(0, cols[0] - margin), min(width, cols[-1] + 1 + margin))
    crop = np.roll(mask[box[0]:box[1], box[2]:box[3]], member.shift, axis=(0, 1)).astype(np.uint8)
    inside = cv2.distanceTransform(crop, cv2.DIST_L2, 3)
    outside = cv2.distanceTransform(1 - crop, cv2.DIST_L2, 3)
    logit = np.where(crop > 0, member.rise + member.slope_in * inside, -member.slope_out * outside)
    logit += member.noise * smooth_noise(rng, crop.shape)
    p = 1.0 / (1.0 + np.exp(-logit.astype(np.float32)))
    p[p < CUT] = 0
    return box, np.rint(p * 255).astype(np.uint8)


def member_maps(truth: np.ndarray, member: Member, rng: np.random.Generator, spots: int = 4) -> np.ndarray:
    """(29, H, W) uint8 'network output' of one member for one image's (29, H, W) bool truth."""
    maps = np.zeros(truth.shape, np.uint8)
    for channel, mask in enumerate(truth):
        made = class_map(mask, member, rng)
        if made is not None:
            (r0, r1, c0, c1), values = made
            maps[channel, r0:r1, c0:c1] = values
    _, height, width = truth.shape
    for _ in range(spots):  # faint false positives away from the bones
        channel, row, col = rng.integers(NUM_CLASSES), rng.integers(8, height - 8), rng.integers(8, width - 8)
        maps[channel, row - 3:row + 3, col - 3:col + 3] = np.uint8(rng.integers(8, 50))
    return maps


# ---- cached data root and stores ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchData:
    """A synthetic data root and one OOF store per member over its train images."""

    root: Path
    stores: list[Path]
    records: list[ImageRecord]
    size: int

    @property
    def members(self) -> list[str]:
        return [member.name for member in MEMBERS]


def bench_data(workdir: Path = DEFAULT_WORKDIR, images: int = 20, size: int = 2048, seed: int = 0,
               log: Callable[[str], None] = print) -> BenchData:
    """The data root and member stores under ``workdir``, built on first use and reused while the settings
    (images, size, seed, cache version) match."""
    folder = Path(workdir) / f"hands-{size}-{images}-s{seed}"
    manifest = {"version": CACHE_VERSION, "images": images, "size": size, "seed": seed,
                "members": [asdict(member) for member in MEMBERS]}
    stores = [folder / f"{member.name}.oof.zarr" for member in MEMBERS]
    done = folder / "manifest.json"
    if not (done.is_file() and json.loads(done.read_text()) == json.loads(json.dumps(manifest))):
        started = time.perf_counter()
        log(f"building {images} images x {len(MEMBERS)} members at {size}x{size} in {folder} (cached for reuse)")
        shutil.rmtree(folder, ignore_errors=True)
        generate(folder / "data", n_train_patients=(images + 1) // 2, n_test_patients=0, size=size, seed=seed)
        records = discover(folder / "data", "train").records[:images]
        _write_stores(stores, records, seed)
        done.write_text(json.dumps(manifest))
        log(f"built in {time.perf_counter() - started:.0f} s")
    records = discover(folder / "data", "train").records[:images]
    return BenchData(folder / "data", stores, records, size)


def _write_stores(paths: Sequence[Path], records: Sequence[ImageRecord], seed: int) -> None:
    """Each member's maps of every record into its store (truth read once per image)."""
    stores = [create_store(path, member.name, "smp", "oof", {"name": member.name},
                           {0: {"path": f"{member.name}.pt", "sha256": f"sha-{member.name}"}},
                           images=[record.key for record in records], overwrite=True)
              for path, member in zip(paths, MEMBERS)]
    for index, record in enumerate(records):
        truth = read_record_mask(record)
        for number, (store, member) in enumerate(zip(stores, MEMBERS)):
            rng = np.random.default_rng([seed, index, number])
            store.write_image(record.key, member_maps(truth, member, rng))


def replicated_stores(data: BenchData, images: int, workdir: Path | None = None) -> list[Path]:
    """Stores of ``images`` images made by copying the data's images on disk under new keys (cheap: no
    encoding), cached under ``workdir`` (default: next to the data). Keys ``IDnnn/image<13 digits>``."""
    folder = (Path(workdir) if workdir else data.root.parent) / f"replicated-{images}"
    paths = [folder / path.name for path in data.stores]
    done = folder / "done.json"
    if done.is_file() and json.loads(done.read_text()) == {"images": images, "source": str(data.root.parent)}:
        return paths
    shutil.rmtree(folder, ignore_errors=True)
    for source, target in zip(data.stores, paths):
        _replicate(source, target, [record.key for record in data.records], images)
    done.write_text(json.dumps({"images": images, "source": str(data.root.parent)}))
    return paths


def _replicate(source: Path, target: Path, keys: Sequence[str], images: int) -> None:
    """Copy the root metadata (planned images replaced by the new keys), then image i from ``keys[i % len(keys)]``
    as ID{i//2+1:03d}/image{...}."""
    target.mkdir(parents=True)
    root = json.loads((source / "zarr.json").read_text())
    root["attributes"]["images"] = sorted(f"ID{index // 2 + 1:03d}/image{1661130000000 + index}"
                                          for index in range(images))
    (target / "zarr.json").write_text(json.dumps(root))
    for index in range(images):
        patient = target / f"ID{index // 2 + 1:03d}"
        if not patient.is_dir():
            patient.mkdir()
            shutil.copy(source / keys[0].split("/")[0] / "zarr.json", patient / "zarr.json")
        shutil.copytree(source / keys[index % len(keys)], patient / f"image{1661130000000 + index}")


def nonzero_fraction(store_path: Path, keys: Sequence[str]) -> float:
    """Fraction of non-zero uint8 values over the given images of a store."""
    store = open_store(store_path)
    return float(np.mean([np.count_nonzero(store.read(key)) / store.read(key).size for key in keys]))


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
    wrapper = (code + "\nimport json as _j, sys as _s\n_s.path.insert(0, " + repr(str(Path(__file__).parent)) + ")\n"
               "from common import peak_rss_mb as _p\nprint(_j.dumps({'__rss_mb': _p()}))\n")
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
