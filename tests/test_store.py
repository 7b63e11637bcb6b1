"""The probability store (format, identity, kill-and-resume, concurrent writers) and logits_to_uint8."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from segens.conventions.classes import CLASSES, NUM_CLASSES
from segens.conventions.rle import bbox
from segens.errors import SegensError
from segens.members.decode import logits_to_uint8, reference_logits_to_uint8
from segens.store import (
    create_store,
    dequantize,
    image_boxes,
    open_store,
    quantize,
)
from segens.store.format import attributes_digest
from segens.store.image import metadata_digest as _digest

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("ID001/image1661130828152_R", "ID001/image1661130828153", "ID002/image1661130900001_L")
CHECKPOINTS = {0: {"path": "m/fold0.pt", "sha256": "aa" * 32}, 1: {"path": "m/fold1.pt", "sha256": "bb" * 32}}
SPEC = {"version": 1, "name": "m", "kind": "smp", "input_size": [64, 64], "tta": ["hflip"],
        "model": {"architecture": "Unet"}, "train": {"epochs": 1}, "checkpoints": {}}


def blob_logits(seed: int, height: int, width: int) -> torch.Tensor:
    """(29, height, width) float32 logits: one soft ellipse per class (some at the border), a faint spot."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    logits = np.full((NUM_CLASSES, height, width), -20.0, dtype=np.float32)
    for channel in range(NUM_CLASSES - 2):  # the last two classes stay empty
        cy, cx = rng.uniform(-0.1, 1.1) * height, rng.uniform(-0.1, 1.1) * width
        ry, rx = rng.uniform(0.03, 0.2) * height, rng.uniform(0.03, 0.2) * width
        radius = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        logits[channel] = np.maximum(rng.uniform(2, 12) * (1 - radius), -20) + rng.normal(0, 0.3, (height, width))
    logits[0, 2, 3] = -3.0  # an isolated faint positive far from most blobs
    return torch.from_numpy(logits)


def probability_maps(seed: int, height: int, width: int) -> np.ndarray:
    return logits_to_uint8(blob_logits(seed, height // 4, width // 4), height, width)[0]


def tree(path: Path) -> dict[str, bytes]:
    """Every file of a directory by relative path, with its bytes."""
    return {file.relative_to(path).as_posix(): file.read_bytes() for file in sorted(path.rglob("*")) if file.is_file()}


def new_store(path: Path, **changes):
    arguments = {"member_name": "m", "kind": "smp", "split": "oof", "spec": SPEC, "checkpoints": CHECKPOINTS} | changes
    return create_store(path, **({"images": KEYS} | arguments))


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference's sigmoid is then one vectorized pass, as logits_to_uint8's is
    yield
    torch.set_num_threads(threads)


# ---- quantization ----------------------------------------------------------------------------------------------


def test_quantize_rounds_half_to_even_and_clips():
    p = np.array([-0.5, 0.0, 0.49 / 255, 0.5 / 255, 0.51 / 255, 1.5 / 255, 0.5, 1.0, 3.0], dtype=np.float32)
    assert quantize(p).tolist() == [0, 0, 0, 0, 1, 2, 128, 255, 255]
    values = np.arange(256, dtype=np.uint8)
    assert dequantize(values).dtype == np.float32
    assert np.array_equal(quantize(dequantize(values)), values)
    big = np.random.default_rng(0).random((3, 700, 300), dtype=np.float32)  # several blocks
    assert np.array_equal(quantize(big), np.rint(big * np.float32(255)).astype(np.uint8))
    with pytest.raises(SegensError, match="NaN"):
        quantize(np.array([0.2, np.nan], dtype=np.float32))


# ---- writing and reading ---------------------------------------------------------------------------------------


def test_round_trip_keys_boxes_and_sparse_chunks(tmp_path):
    store = new_store(tmp_path / "m.oof.zarr")
    maps = {KEYS[0]: probability_maps(0, 600, 700), KEYS[2]: probability_maps(1, 200, 136)}
    for key, probs in maps.items():
        store.write_image(key, probs)

    reader = open_store(tmp_path / "m.oof.zarr")
    assert (reader.member, reader.kind, reader.split, reader.classes) == ("m", "smp", "oof", CLASSES)
    assert reader.checkpoints == {0: CHECKPOINTS[0], 1: CHECKPOINTS[1]} and reader.spec == SPEC
    assert reader.keys() == sorted(maps) and store.completed() == set(maps)
    for key, probs in maps.items():
        assert reader.image_size(key) == probs.shape[1:]
        assert reader.boxes(key) == [bbox(plane) for plane in probs] == image_boxes(probs)
        assert np.array_equal(reader.read(key), probs)
        assert np.array_equal(reader.read_float(key), probs.astype(np.float32) / 255)
        for channel in (0, 5, NUM_CLASSES - 1):
            assert np.array_equal(reader.read_class(key, channel), probs[channel])
            box, values = reader.read_class_box(key, channel)
            assert box == bbox(probs[channel])
            expected = probs[channel, box[0]:box[1], box[2]:box[3]] if box else np.zeros((0, 0), np.uint8)
            assert np.array_equal(values, expected)
        assert 0 < reader.nbytes_stored(key) < probs.nbytes / 10

    # all-zero chunks are never written: one file per non-empty (1, 512, 512) chunk; small images get 1 chunk
    chunk_files = [f for f in (tmp_path / "m.oof.zarr" / KEYS[0] / "c").rglob("*") if f.is_file()]
    probs = maps[KEYS[0]]
    non_empty = sum(bool(probs[c, r:r + 512, q:q + 512].any()) for c in range(29) for r in (0, 512) for q in (0, 512))
    assert len(chunk_files) == non_empty < 29 * 4
    assert zarr.open_array(tmp_path / "m.oof.zarr" / KEYS[2], mode="r").chunks == (1, 200, 136)


def test_bad_input_is_a_clear_error(tmp_path):
    store = new_store(tmp_path / "s.zarr")
    with pytest.raises(SegensError, match="uint8"):
        store.write_image(KEYS[0], np.zeros((29, 8, 8), np.float32))
    with pytest.raises(SegensError, match="not a valid image key"):
        store.write_image("ID001/../x", np.zeros((29, 8, 8), np.uint8))
    with pytest.raises(SegensError, match="box"):
        store.write_image(KEYS[0], np.zeros((29, 8, 8), np.uint8), [(0, 9, 0, 1)] + [None] * 28)
    with pytest.raises(SegensError, match="not in the store"):
        open_store(tmp_path / "s.zarr").read(KEYS[1])
    with pytest.raises(SegensError, match="read-only"):
        open_store(tmp_path / "s.zarr").write_image(KEYS[0], np.zeros((29, 8, 8), np.uint8))
    with pytest.raises(SegensError, match="split"):
        new_store(tmp_path / "t.zarr", split="train")


def test_open_refuses_what_is_not_a_known_store(tmp_path):
    with pytest.raises(SegensError, match="no probability store"):
        open_store(tmp_path / "missing.zarr")
    zarr.create_group(tmp_path / "plain.zarr", attributes={"something": 1})
    with pytest.raises(SegensError, match=r"plain\.zarr: not a segens probability store"):
        open_store(tmp_path / "plain.zarr")
    with pytest.raises(SegensError, match="not a segens probability store"):
        new_store(tmp_path / "plain.zarr", overwrite=True)
    new_store(tmp_path / "future.zarr")
    group = zarr.open_group(tmp_path / "future.zarr", mode="r+")
    group.attrs["version"] = 99
    with pytest.raises(SegensError, match=r"future\.zarr: probability store version 99"):
        open_store(tmp_path / "future.zarr")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("mine")
    with pytest.raises(SegensError, match="not a probability store"):
        new_store(tmp_path / "folder", overwrite=True)
    assert (tmp_path / "folder" / "notes.txt").exists()


def test_identity_resume_overwrite(tmp_path):
    path = tmp_path / "m.oof.zarr"
    new_store(path).write_image(KEYS[0], probability_maps(0, 64, 64))
    moved = {fold: {**c, "path": f"/elsewhere/{fold}.pt"} for fold, c in CHECKPOINTS.items()}
    assert new_store(path, checkpoints=moved).completed() == {KEYS[0]}  # same hashes: resumes
    for change in ({"split": "test"}, {"member_name": "n"}, {"spec": {**SPEC, "tta": []}},
                   {"checkpoints": {0: CHECKPOINTS[0], 1: {"path": "x", "sha256": "cc" * 32}}}):
        with pytest.raises(SegensError, match="--overwrite"):
            new_store(path, **change)
    replaced = new_store(path, split="test", overwrite=True)
    assert replaced.completed() == set() and open_store(path).split == "test"


def test_store_pickles_for_worker_processes(tmp_path):
    store = new_store(tmp_path / "s.zarr")
    probs = probability_maps(3, 64, 64)
    copy = pickle.loads(pickle.dumps(store))
    copy.write_image(KEYS[1], probs)
    assert np.array_equal(pickle.loads(pickle.dumps(open_store(tmp_path / "s.zarr"))).read(KEYS[1]), probs)


# ---- kill and resume, concurrent writers ---------------------------------------------------------------------


def test_incomplete_image_is_invisible_and_rewritten_identically(tmp_path):
    maps = [probability_maps(seed, 300, 280) for seed in range(2)]
    for name in ("clean", "killed"):
        new_store(tmp_path / name).write_image(KEYS[0], maps[0])
    # what a kill leaves: metadata without the marker, some chunks, a temporary file of zarr's LocalStore
    killed = tmp_path / "killed"
    array = zarr.create_array(killed, name=KEYS[1], shape=maps[1].shape, dtype="uint8", chunks=(1, 300, 280),
                              attributes={"height": 300, "width": 280})
    array[:5] = 255
    (killed / KEYS[1] / "c" / "0" / "0" / "zarr.0123.partial").write_bytes(b"half")
    (killed / "zarr.4567.partial").write_bytes(b"half")  # at the root too: the store must still open

    resumed = new_store(killed)
    assert resumed.completed() == {KEYS[0]} and KEYS[1] not in resumed
    with pytest.raises(SegensError, match="did not finish"):
        open_store(killed).read(KEYS[1])
    resumed.write_image(KEYS[1], maps[1])
    new_store(tmp_path / "clean").write_image(KEYS[1], maps[1])
    (killed / "zarr.4567.partial").unlink()
    assert tree(killed) == tree(tmp_path / "clean")


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from segens.store import create_store
    planned = [f"ID{index % 2:03d}/image{index}_R" for index in range(int(sys.argv[2]))]
    store = create_store(sys.argv[1], "m", "smp", "oof", {"name": "m"}, {0: {"path": "f.pt", "sha256": "ab"}},
                         images=planned)
    done = store.completed()
    for index in range(int(sys.argv[2])):
        key = f"ID{index % 2:03d}/image{index}_R"
        if key not in done:
            probs = np.zeros((29, 1024, 1024), np.uint8)
            for channel in range(29):  # noisy blocks: slow to compress, so a kill lands mid-write
                probs[channel, 64 * (channel % 9):600, 32 * (channel % 13):700] = \\
                    np.random.default_rng(index * 29 + channel).integers(0, 256, (1, 1), np.uint8)
                probs[channel, 300:400, 300:500] = np.random.default_rng(index).integers(0, 256, (100, 200))
            print("writing", index, flush=True)
            store.write_image(key, probs)
""")


def test_killed_run_resumed_gives_identical_bytes(tmp_path):
    count, killed = 5, tmp_path / "killed"
    command = [sys.executable, "-c", WRITER]
    subprocess.run([*command, str(tmp_path / "clean"), str(count)], check=True, capture_output=True, cwd=ROOT)
    process = subprocess.Popen([*command, str(killed), str(count)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    for line in process.stdout:
        if line.strip() == "writing 2":
            break
    chunks = killed / "ID000" / "image2_R" / "c"
    while process.poll() is None and sum(1 for f in chunks.rglob("*") if f.is_file()) < 10:
        time.sleep(0.001)
    os.kill(process.pid, signal.SIGKILL)  # in the middle of image 2's chunks
    process.wait()
    process.stdout.close()
    assert process.returncode == -signal.SIGKILL
    assert open_store(killed).completed() == {"ID000/image0_R", "ID001/image1_R"}
    subprocess.run([*command, str(killed), str(count)], check=True, capture_output=True, cwd=ROOT)
    assert tree(killed) == tree(tmp_path / "clean")


def test_two_processes_write_disjoint_images(tmp_path):
    maps = {key: probability_maps(index, 256, 256) for index, key in enumerate(KEYS)}
    store = new_store(tmp_path / "shared.zarr")
    context = multiprocessing.get_context("spawn")  # the bound method pickles the store; no torch in the workers
    workers = [context.Process(target=store.write_image, args=(key, maps[key])) for key in KEYS[:2]]  # same group
    for worker in workers:
        worker.start()
    store.write_image(KEYS[2], maps[KEYS[2]])
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0, 0]
    serial = new_store(tmp_path / "serial.zarr")
    for key, probs in maps.items():
        serial.write_image(key, probs)
    assert open_store(tmp_path / "shared.zarr").keys() == sorted(KEYS)
    assert tree(tmp_path / "shared.zarr") == tree(tmp_path / "serial.zarr")


# ---- logits -> uint8 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("low, high", [
    ((64, 64), (256, 256)),  # 4x, the common case
    ((48, 40), (96, 160)),  # 2x and 4x
    ((48, 48), (128, 128)),  # 8/3: dyadic, not integer
    ((50, 30), (128, 77)),  # not dyadic: full-size planes
    ((64, 64), (64, 64)),  # equal sizes
    ((96, 96), (64, 64)),  # downsampling
])
def test_logits_to_uint8_equals_float32_path(one_thread, low, high):
    for seed in range(2):
        logits = blob_logits(seed, *low)
        probs, boxes = logits_to_uint8(logits, *high)
        reference = reference_logits_to_uint8(logits, *high)
        assert probs.dtype == np.uint8 and probs.shape == (NUM_CLASSES, *high)
        assert np.array_equal(probs, reference)
        assert boxes == [bbox(plane) for plane in reference]
        assert boxes[-1] is None and boxes[0] is not None


def test_logits_to_uint8_rejects_non_finite_and_wrong_shapes():
    logits = blob_logits(0, 16, 16)
    logits[3, 4, 5] = float("nan")
    with pytest.raises(SegensError, match="image7.*NaN"):
        logits_to_uint8(logits, 64, 64, where="image7")
    with pytest.raises(SegensError, match="29 classes"):
        logits_to_uint8(torch.zeros(3, 16, 16), 64, 64)


def _sigmoid_disagreements(limit: int = 8) -> np.ndarray:
    """float32 logits where torch's scalar and vectorized sigmoid round to different quantized values."""
    found: list[float] = []
    for level in range(1, 80):
        p = (level + 0.5) / 255
        centre = np.float32(np.log(p / (1 - p)))
        xs = (centre.view(np.int32) + np.arange(-2048, 2048, dtype=np.int32)).view(np.float32)
        vectorized = torch.sigmoid(torch.from_numpy(xs)).numpy()
        scalar = np.concatenate([torch.sigmoid(torch.from_numpy(xs[i:i + 7].copy())).numpy()  # below one vector
                                 for i in range(0, xs.size, 7)])
        found.extend(xs[quantize(vectorized) != quantize(scalar)].tolist())
        if len(found) >= limit:
            break
    return np.array(found[:limit], dtype=np.float32)


def test_logits_at_rounding_boundaries_match_the_full_size_path(one_thread):
    values = _sigmoid_disagreements()
    if values.size == 0:
        pytest.skip("torch's scalar and vectorized sigmoid agree at every quantization boundary on this CPU")
    logits = torch.full((NUM_CLASSES, 4, 8), -20.0)  # 928 values: the reference's sigmoid is all vectorized
    logits[0, 3] = torch.from_numpy(np.resize(values, 8))  # the crop (3 x 8) is below one vector: padded
    probs, _ = logits_to_uint8(logits, 4, 8)
    assert np.array_equal(probs, reference_logits_to_uint8(logits, 4, 8))


def test_read_region_equals_zarr_slicing_on_any_box(tmp_path) -> None:
    """The direct chunk reader gives exactly zarr's values for boxes across chunk edges and unwritten chunks."""
    from segens.store import create_store

    rng = np.random.default_rng(4)
    probs = np.zeros((29, 700, 1100), np.uint8)
    probs[3, 100:650, 200:1050] = rng.integers(0, 255, (550, 850), dtype=np.uint8)
    probs[7, 0:20, 1090:1100] = 255
    store = create_store(tmp_path / "s.zarr", "m", "smp", "test", {}, {}, images=["ID001/img"])
    store.write_image("ID001/img", probs)
    array = zarr.open_array(tmp_path / "s.zarr" / "ID001" / "img", mode="r")  # zarr decodes the chunks itself
    for _ in range(40):
        r0, c0 = int(rng.integers(0, 699)), int(rng.integers(0, 1099))
        box = (r0, int(rng.integers(r0 + 1, 701)), c0, int(rng.integers(c0 + 1, 1101)))
        for channel in (3, 7, 10):
            assert np.array_equal(store.read_region("ID001/img", channel, box),
                                  array[channel, box[0]:box[1], box[2]:box[3]])


# ---- format v2: planned images, verified reads ----------------------------------------------------------------


def written_store(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A store of KEYS whose first image has class 3 across four chunks (and is the one tampered with)."""
    probs = np.zeros((NUM_CLASSES, 700, 1100), np.uint8)
    probs[3, 100:650, 200:1050] = np.random.default_rng(5).integers(1, 255, (550, 850), dtype=np.uint8)
    probs[9, 5:9, 5:9] = 200
    path = tmp_path / "s.zarr"
    new_store(path).write_image(KEYS[0], probs)
    return path, probs


def image_metadata(path: Path) -> tuple[Path, dict]:
    document_path = path / KEYS[0] / "zarr.json"
    return document_path, json.loads(document_path.read_text())


def test_chunks_are_the_bytes_zarr_itself_writes(tmp_path):
    path, probs = written_store(tmp_path)
    reference = zarr.create_array(tmp_path / "zarr-own.zarr", shape=probs.shape, dtype="uint8", chunks=(1, 512, 512),
                                  fill_value=0, compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=3,
                                                                                 shuffle="noshuffle", typesize=1))
    reference[3] = probs[3]
    ours = tree(path / KEYS[0] / "c" / "3")
    assert ours == tree(tmp_path / "zarr-own.zarr" / "c" / "3") and len(ours) == 6
    assert np.array_equal(open_store(path).read(KEYS[0]), probs)


def test_planned_images_tell_an_unfinished_store(tmp_path):
    path, _ = written_store(tmp_path)
    store = open_store(path)
    assert store.planned == tuple(sorted(KEYS))
    assert set(store.missing()) == set(KEYS[1:])
    with pytest.raises(SegensError, match=r"'ID009/x' is not among the 3 images this store was created for"):
        new_store(path).write_image("ID009/x", np.zeros((NUM_CLASSES, 4, 4), np.uint8))
    with pytest.raises(SegensError, match=r"planned images: 3 there, 2 now"):
        new_store(path, images=KEYS[:2])


@pytest.mark.parametrize("damage, channel, message", [
    ("delete", 3, r"class 'finger-4', chunk \(0, 1\): the chunk is missing from the store"),
    ("flip", 3, r"class 'finger-4', chunk \(0, 1\): the chunk's checksum differs"),
    ("extra", 4, r"class 'finger-5', chunk \(0, 0\): a chunk is there that the image's metadata does not list"),
])
def test_damaged_chunks_are_errors_naming_store_image_and_class(tmp_path, damage, channel, message):
    path, _ = written_store(tmp_path)
    chunk = path / KEYS[0] / "c" / "3" / "0" / "1"
    if damage == "delete":
        chunk.unlink()
    elif damage == "flip":
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))
    else:  # a chunk of class 3 copied where class 4 wrote nothing
        target = path / KEYS[0] / "c" / "4" / "0" / "0"
        target.parent.mkdir(parents=True)
        target.write_bytes((path / KEYS[0] / "c" / "3" / "0" / "0").read_bytes())
    store = open_store(path)
    with pytest.raises(SegensError, match=rf"s\.zarr: image '{KEYS[0]}', {message}"):
        store.read_region(KEYS[0], channel, (0, 700, 0, 1100))
    if damage != "extra":  # a whole-image read of the damaged class fails too
        with pytest.raises(SegensError, match="remove the image.s folder .* and run `ens predict-member` for member .m. again"):
            store.read(KEYS[0])


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["attributes"]["boxes"][3].__setitem__(3, 600), r"class 'finger-4': written chunk \(0, 2\) lies outside"),
    (lambda m: m["attributes"]["boxes"].__setitem__(3, [650, 100, 200, 1050]), r"box \[650, 100, 200, 1050\] is not"),
    (lambda m: m["attributes"]["boxes"].pop(), r"boxes and chunks must list 29 classes each"),
    (lambda m: m["attributes"]["boxes"].__setitem__(3, None), r"written chunk \(0, 0\) lies outside the recorded box None"),
    (lambda m: m["attributes"].__setitem__("height", "700"), r"height/width '700'x1100 are not positive integers"),
    (lambda m: m.__setitem__("shape", [29, 700, 1000]), r"the array's metadata is not this store format's"),
])
def test_altered_image_metadata_is_an_error_and_the_image_is_missing(tmp_path, edit, message):
    """Metadata edited consistently (its digest recomputed, as a buggy writer would) fails the format's checks;
    such an image is not complete, so resuming rewrites it."""
    path, probs = written_store(tmp_path)
    document_path, document = image_metadata(path)
    edit(document)
    document["attributes"]["digest"] = _digest(document["attributes"])
    document_path.write_text(json.dumps(document))
    with pytest.raises(SegensError, match=rf"s\.zarr: image '{KEYS[0]}'.*{message}.*remove the image's folder"):
        open_store(path).read(KEYS[0])
    assert KEYS[0] in open_store(path).missing()
    new_store(path).write_image(KEYS[0], probs)  # what predict-member does with a missing image
    assert np.array_equal(open_store(path).read(KEYS[0]), probs)


@pytest.mark.parametrize("rows", [(100, 600), (100, 650 - 1), (101, 650)])
def test_boxes_edited_without_their_digest_are_an_error(tmp_path, rows):
    """A shrunk box would hide pixels inside a chunk the box still covers: the digest catches it."""
    path, _ = written_store(tmp_path)
    document_path, document = image_metadata(path)
    document["attributes"]["boxes"][3][:2] = list(rows)
    document_path.write_text(json.dumps(document))
    with pytest.raises(SegensError, match=rf"image '{KEYS[0]}': the image's metadata \(key, size, boxes, chunks\) "
                                          "does not match its digest"):
        open_store(path).read(KEYS[0])


def test_a_damaged_chunk_is_repaired_by_removing_the_image_and_resuming(tmp_path):
    path, probs = written_store(tmp_path)
    (path / KEYS[0] / "c" / "3" / "0" / "1").write_bytes(b"torn")
    with pytest.raises(SegensError, match=rf"remove the image's folder '{KEYS[0]}' from the store and run "
                                          r"`ens predict-member` for member 'm' again"):
        open_store(path).read(KEYS[0])
    shutil.rmtree(path / KEYS[0])
    assert KEYS[0] in open_store(path).missing()
    new_store(path).write_image(KEYS[0], probs)
    assert np.array_equal(open_store(path).read(KEYS[0]), probs)


def test_a_folder_where_a_chunk_belongs_is_an_error(tmp_path):
    path, _ = written_store(tmp_path)
    chunk = path / KEYS[0] / "c" / "3" / "0" / "1"
    chunk.unlink()
    chunk.mkdir()
    with pytest.raises(SegensError, match=r"cannot read chunk '.*c/3/0/1' \(Is a directory\)"):
        open_store(path).read(KEYS[0])


def edit_root(path: Path, change, digest: bool = True) -> None:
    """Edit a store's root attributes; with ``digest``, recompute their digest as a buggy writer would (to reach
    the format's other checks)."""
    root = json.loads((path / "zarr.json").read_text())
    change(root["attributes"])
    if digest:
        root["attributes"]["digest"] = attributes_digest(root["attributes"])
    (path / "zarr.json").write_text(json.dumps(root))


def test_checkpoints_not_keyed_by_fold_are_refused(tmp_path):
    path, _ = written_store(tmp_path)
    edit_root(path, lambda attributes: attributes.__setitem__("checkpoints", {"fold0": {"path": "a", "sha256": "b"}}))
    with pytest.raises(SegensError, match="checkpoints are not keyed by fold numbers"):
        open_store(path)


def test_unreadable_image_metadata_counts_as_missing(tmp_path):
    path, _ = written_store(tmp_path)
    document_path, _ = image_metadata(path)
    document_path.write_text("{not json")
    store = open_store(path)
    assert set(store.missing()) == set(KEYS)
    with pytest.raises(SegensError, match=rf"image '{KEYS[0]}' is not in the store .*metadata is unreadable"):
        store.read(KEYS[0])


def test_a_version_1_store_is_refused_with_what_to_do(tmp_path):
    path, _ = written_store(tmp_path)
    edit_root(path, lambda attributes: attributes.__setitem__("version", 1))
    with pytest.raises(SegensError, match=r"version 1 is not known to this segens \(knows 3\); rewrite it"):
        open_store(path)


def test_a_planned_key_that_escapes_the_store_is_refused_on_open(tmp_path):
    path, _ = written_store(tmp_path)
    edit_root(path, lambda attributes: attributes.__setitem__("images", ["../../outside"]))
    with pytest.raises(SegensError, match=r"'\.\./\.\./outside' is not a valid image key"):
        open_store(path)
