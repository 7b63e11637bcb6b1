"""Synthetic hand radiographs in the competition's exact layout, for demos and tests without the real data.

``generate(root)`` writes ``ROOT/train/DCM/IDxxx/image<13 digits>[_X].png`` with labels in
``ROOT/train/outputs_json/IDxxx/<same stem>.json``, the same for ``test`` (test labels kept apart from the images,
for scoring only), and ``ROOT/meta_data.xlsx``. Every patient folder holds the two hands (right and left, mirrored).
The same seed gives byte-identical files; every image is drawn from its own derived seed, so the order of
generation does not matter.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from segens.conventions.labels import write_label_json
from segens.conventions.metadata import write_metadata
from segens.errors import SegensError
from segens.infra.outputs import data_root_above
from segens.synth.anatomy import build_hand, sample_patient_traits, sample_pose
from segens.synth.preview import preview
from segens.synth.render import render_radiograph

__all__ = ["SynthSummary", "generate", "preview"]

MIN_SIZE = 64  # below this the smallest phalanges vanish
_DAY_MS = 86_400_000


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate` wrote."""

    root: Path
    n_train_images: int
    n_test_images: int
    n_train_patients: int
    n_test_patients: int
    size: int
    seed: int


@dataclass(frozen=True)
class _Image:
    """One planned image: where it goes and the seeds that fully determine it."""

    split: str
    patient: str  # "ID007"
    stem: str  # "image1661130828152" or "image1661130828152_R"
    side: str  # "R" or "L"
    seed: tuple[int, ...]


def generate(root: str | Path, n_train_patients: int = 20, n_test_patients: int = 5, size: int = 2048,
             seed: int = 0, progress: bool = False, overwrite: bool = False, render: bool = True) -> SynthSummary:
    """Write a synthetic data set under ``root`` (two ``size`` x ``size`` uint8 PNGs per patient, all 29 labels
    each, metadata). Refuses a root that already holds a data set unless ``overwrite`` (which replaces only
    ``train/``, ``test/`` and ``meta_data.xlsx``). ``render=False`` writes black placeholder PNGs of the same size
    (the labels are identical; 0.4 s less per 2048 image) for work that never looks at the pixels."""
    root = Path(root)
    _check_arguments(n_train_patients, n_test_patients, size, seed)
    outer = data_root_above(root)
    if outer is not None:
        raise SegensError(f"{root}: lies inside the data root {outer}; its images would join that data set: write "
                          "the new one to another folder")
    _clear_root(root, overwrite)
    patients = [("train", i) for i in range(1, n_train_patients + 1)]
    patients += [("test", i) for i in range(n_train_patients + 1, n_train_patients + n_test_patients + 1)]
    plan = [image for split, number in patients for image in _plan_patient(split, number, seed)]
    for image in _progress(plan, progress):
        _write_image(root, image, size, render)
    write_metadata(root / "meta_data.xlsx", [_metadata_row(number, seed) for _, number in patients])
    return SynthSummary(root=root, n_train_images=2 * n_train_patients, n_test_images=2 * n_test_patients,
                        n_train_patients=n_train_patients, n_test_patients=n_test_patients, size=size, seed=seed)


def _check_arguments(n_train: int, n_test: int, size: int, seed: int) -> None:
    """SegensError for impossible patient counts, image sizes or seeds."""
    if n_train < 1 or n_test < 0 or n_train + n_test > 999:
        raise SegensError(f"need 1 or more train patients, 0 or more test patients, 999 in all (IDs have 3 digits); "
                          f"got {n_train} train and {n_test} test")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SegensError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise SegensError(f"image size {size} is too small; use at least {MIN_SIZE} pixels")


def _clear_root(root: Path, overwrite: bool) -> None:
    """Remove a previous data set's ``train/``, ``test/`` and ``meta_data.xlsx`` when ``overwrite``; else refuse
    (SegensError) a root holding any of them, so that two data sets never mix."""
    existing = [root / name for name in ("train", "test", "meta_data.xlsx") if (root / name).exists()]
    if existing and not overwrite:
        raise SegensError(f"{root}: already holds a data set ({existing[0].name}); choose an empty folder "
                          "or pass --overwrite to replace it")
    for path in existing:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _plan_patient(split: str, number: int, seed: int) -> list[_Image]:
    """The two images of patient ``number``: unique millisecond-timestamp names (patients a day apart), the hands in
    random order, and a name suffix on about one image in ten."""
    rng = np.random.default_rng([seed, number, 0])
    start = 1_640_995_200_000 + int(np.random.default_rng([seed]).integers(0, 200)) * _DAY_MS
    first = start + (number - 1) * _DAY_MS + int(rng.integers(8, 18) * 3_600_000 + rng.integers(0, 3_600_000))
    stamps = (first, first + int(rng.integers(4_000, 90_000)))
    sides = ("R", "L") if rng.random() < 0.5 else ("L", "R")
    images = []
    for hand, (stamp, side) in enumerate(zip(stamps, sides)):
        suffix = f"_{side}" if (2 * number + hand) % 10 == 3 else ""
        images.append(_Image(split, f"ID{number:03d}", f"image{stamp}{suffix}", side, (seed, number, hand + 1)))
    return images


def _patient_traits(number: int, seed: int) -> tuple[dict[str, float], dict[str, object]]:
    """The traits both hands share (scale from body height) and the patient's clean metadata values."""
    rng = np.random.default_rng([seed, number, 1000])
    sex = "남" if rng.random() < 0.5 else "여"
    height = float(np.clip(rng.normal(173 if sex == "남" else 161, 6), 145, 195))
    weight = float(np.clip(rng.normal(22.5, 3) * (height / 100) ** 2, 38, 120))
    values = {"ID": number, "나이": int(rng.integers(18, 75)), "성별": sex, "체중(몸무게)": round(weight),
              "키(신장)": round(height)}
    return sample_patient_traits(rng, height), values


def _metadata_row(number: int, seed: int) -> dict[str, object]:
    """One meta_data.xlsx row, dirty like the real file for some patients (control character or space in the sex,
    a missing weight, a height written as text)."""
    row = dict(_patient_traits(number, seed)[1])
    if number % 6 == 2:
        row["성별"] = "_x0008_" + str(row["성별"])
    if number % 6 == 4:
        row["성별"] = " " + str(row["성별"])
    if number % 7 == 3:
        row["체중(몸무게)"] = None
    if number % 8 == 5:
        row["키(신장)"] = f"{row['키(신장)']}cm"
    return row


def _write_image(root: Path, image: _Image, size: int, render: bool = True) -> None:
    """Render one hand (or a black placeholder) and write its PNG and label JSON."""
    traits, _ = _patient_traits(int(image.patient[2:]), image.seed[0])
    pose = sample_pose(np.random.default_rng([*image.seed, 0]), image.side, traits)
    hand = build_hand(pose, size)
    if render:
        pixels = render_radiograph(hand, np.random.default_rng([*image.seed, 1]))
    else:
        pixels = np.zeros((size, size), np.uint8)
    png = root / image.split / "DCM" / image.patient / f"{image.stem}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise SegensError(f"{png}: PNG encoding failed")
    png.write_bytes(encoded.tobytes())
    label = root / image.split / "outputs_json" / image.patient / f"{image.stem}.json"
    write_label_json(label, hand.polygons, metadata=_stale_metadata(size))


def _stale_metadata(size: int) -> dict[str, int]:
    """A label file's ``metadata``, wrong on purpose (as leftovers in the real files): readers must take the size
    from the PNG, never from here."""
    return {"width": 2048, "height": 2048} if size != 2048 else {"width": 2880, "height": 2304}


def _progress(items: list[_Image], show: bool):
    """Iterate ``items``, with a rich progress bar when ``show``."""
    if not show:
        yield from items
        return
    from rich.progress import Progress

    with Progress() as bar:
        task = bar.add_task("synthesising images", total=len(items))
        for item in items:
            yield item
            bar.advance(task)
