"""combine and search-weights against the stores' planned image lists: a CSV never misses an image silently."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from segens.conventions.classes import NUM_CLASSES
from segens.ensemble.combine import combine
from segens.errors import SegensError
from segens.store import create_store

KEYS = ["ID001/image1", "ID001/image2", "ID002/image3"]


def ens(*arguments: object) -> subprocess.CompletedProcess:
    """The real command line (exit status and stderr as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "segens.cli", *map(str, arguments)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "400"})


def store_of(path: Path, member: str, written: list[str], planned: list[str] = KEYS) -> Path:
    store = create_store(path, member, "smp", "test", {"name": member}, {0: {"path": member, "sha256": member}},
                         images=planned)
    for index, key in enumerate(written):
        maps = np.zeros((NUM_CLASSES, 8, 8), np.uint8)
        maps[index % NUM_CLASSES, 2:6, 2:6] = 200
        store.write_image(key, maps)
    return path


def test_an_image_complete_in_no_store_fails_naming_it(tmp_path: Path) -> None:
    stores = [store_of(tmp_path / f"{m}.zarr", m, KEYS[:2]) for m in ("a", "b")]
    for allow_missing in (False, True):
        with pytest.raises(SegensError, match=r"image 'ID002/image3' is planned for these stores but "
                                              r"complete in none of them"):
            combine(stores, tmp_path / "out.csv", "soft", allow_missing=allow_missing, progress=False)
    assert not (tmp_path / "out.csv").exists()


def test_an_image_with_corrupt_metadata_in_every_store_fails_through_the_cli(tmp_path: Path) -> None:
    stores = [store_of(tmp_path / f"{m}.zarr", m, KEYS) for m in ("a", "b")]
    for store in stores:
        (store / "ID001" / "image2" / "zarr.json").write_text('{"node_type": "array", "shape": [')
    result = ens("combine", *stores, "--out", tmp_path / "out.csv")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "image 'ID001/image2'" in result.stderr and "complete in none of them" in result.stderr
    assert not (tmp_path / "out.csv").exists()


def test_stores_planned_for_other_images_are_refused(tmp_path: Path) -> None:
    a = store_of(tmp_path / "a.zarr", "a", KEYS)
    b = store_of(tmp_path / "b.zarr", "b", KEYS[:2], planned=KEYS[:2])
    with pytest.raises(SegensError, match=r"b\.zarr: planned for other images than .*a\.zarr \(e\.g\. 'ID002/image3' "
                                          r"is planned only in .*a\.zarr\)"):
        combine([a, b], tmp_path / "out.csv", "soft", progress=False)


def test_a_deleted_chunk_fails_the_combine_naming_store_image_and_class(tmp_path: Path) -> None:
    stores = [store_of(tmp_path / f"{m}.zarr", m, KEYS) for m in ("a", "b")]
    chunk = next((stores[1] / "ID001" / "image2" / "c").rglob("0"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    chunk.unlink()
    result = ens("combine", *stores, "--out", tmp_path / "out.csv")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "b.zarr: image 'ID001/image2', class 'finger-2'" in result.stderr
    assert "the chunk is missing" in result.stderr
    assert not (tmp_path / "out.csv").exists()
    attributes = json.loads((stores[1] / "zarr.json").read_text())["attributes"]
    assert attributes["images"] == sorted(KEYS) and attributes["version"] == 3


# ---- stores that lie about their images (store format 3) -------------------------------------------------------


def test_image_folders_swapped_with_mv_are_an_error_naming_both_keys(tmp_path: Path) -> None:
    store = store_of(tmp_path / "a.zarr", "a", KEYS)
    first, second = store / "ID001" / "image1", store / "ID001" / "image2"
    subprocess.run(["mv", str(first), str(tmp_path / "held")], check=True)
    subprocess.run(["mv", str(second), str(first)], check=True)
    subprocess.run(["mv", str(tmp_path / "held"), str(second)], check=True)
    result = ens("combine", store, "--out", tmp_path / "out.csv")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert ("a.zarr: image 'ID001/image1': this folder holds the metadata of image 'ID001/image2', not of "
            "'ID001/image1': image folders were moved, swapped or copied inside the store") in result.stderr
    assert not (tmp_path / "out.csv").exists()


def test_an_image_folder_replaced_by_a_copy_of_another_is_an_error(tmp_path: Path) -> None:
    store = store_of(tmp_path / "a.zarr", "a", KEYS)
    subprocess.run(["rm", "-r", str(store / "ID002" / "image3")], check=True)
    subprocess.run(["cp", "-r", str(store / "ID001" / "image1"), str(store / "ID002" / "image3")], check=True)
    with pytest.raises(SegensError, match=r"image 'ID002/image3': this folder holds the metadata of image "
                                          r"'ID001/image1', not of 'ID002/image3'"):
        combine([store], tmp_path / "out.csv", "soft", progress=False)


def test_an_image_copied_from_another_members_store_is_an_error(tmp_path: Path) -> None:
    a, b = store_of(tmp_path / "a.zarr", "a", KEYS), store_of(tmp_path / "b.zarr", "b", KEYS)
    subprocess.run(["rm", "-r", str(a / "ID001" / "image2")], check=True)
    subprocess.run(["cp", "-r", str(b / "ID001" / "image2"), str(a / "ID001" / "image2")], check=True)
    with pytest.raises(SegensError, match=r"a\.zarr: image 'ID001/image2': this image was written by another store"):
        combine([a, b], tmp_path / "out.csv", "soft", progress=False)


def test_a_planned_key_removed_from_the_root_attributes_is_an_error(tmp_path: Path) -> None:
    """The CSV must never silently lack an image that is complete in the store: the root attributes carry their
    digest, so editing the planned list by hand fails every reader."""
    store = store_of(tmp_path / "a.zarr", "a", KEYS)
    root = json.loads((store / "zarr.json").read_text())
    root["attributes"]["images"].remove("ID002/image3")
    (store / "zarr.json").write_text(json.dumps(root))
    result = ens("combine", store, "--out", tmp_path / "out.csv")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "a.zarr: the store's root attributes (member, checkpoints, planned images, ...) do not match their digest" \
        in result.stderr
    assert not (tmp_path / "out.csv").exists()


def test_a_masks_store_is_not_a_member(tmp_path: Path) -> None:
    stores = [store_of(tmp_path / f"{m}.zarr", m, KEYS) for m in ("a", "b")]
    combine(stores, tmp_path / "out.csv", "soft", masks_out=tmp_path / "masks.zarr", progress=False)
    attributes = json.loads((tmp_path / "masks.zarr" / "zarr.json").read_text())["attributes"]
    assert attributes["role"] == "masks" and attributes["fold"] is None
    with pytest.raises(SegensError, match=r"masks\.zarr: holds an ensemble's binary masks"):
        combine([stores[0], tmp_path / "masks.zarr"], tmp_path / "again.csv", "soft", progress=False)
