"""The probability store: one zarr v3 group per member and split. The only reader and writer of the format.

```
<member>.<split>.zarr/            group attributes: format, version (2), member, kind, split, classes,
  zarr.json                         quantization, spec, input (the member's input contract, or null),
                                    checkpoints {fold: {path, sha256}}, images (the planned image keys, sorted)
  ID001/                          one nested group per directory of the image key
    image1661130828152_R/         one array per image: (29, H, W) uint8, p = v / 255, chunks (1, 512, 512),
      zarr.json                     blosc; all-zero chunks are never written; attributes height, width,
      c/<class>/<row>/<col>         boxes (per class [row0, row1, col0, col1] half-open, or null), chunks (per
                                    class the [row, col, crc32] of every chunk written), digest (crc32 of the
                                    size, boxes and chunks) and "complete": true, written last
```
An image whose array lacks the completion marker does not exist for readers and is rewritten by writers, so a
killed run resumed gives the same bytes as an uninterrupted one. Writers of disjoint images may run at once.
Everything written is deterministic (no times, no host names). Paths may be local or fsspec URLs.

Every read is verified: the array's metadata must be this format's and match its digest (so boxes that were
shrunk, which would hide pixels, are caught), the boxes must lie inside the image and cover every chunk written,
every listed chunk that a read touches must be there with its crc32, and no unlisted chunk may be there. A store
that fails any check is an error naming the store, image and class, never zeros read in silence. An image whose
metadata fails the checks does not count as complete, so `ens predict-member` rewrites it; one with a damaged
chunk is rewritten once its folder is removed. The planned image list lets readers tell an unfinished store (an
image planned but not complete) from a finished one.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from numcodecs import Blosc
from zarr.codecs import BloscCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.buffer.cpu import Buffer
from zarr.core.sync import sync

from segens.classes import CLASSES, NUM_CLASSES
from segens.errors import SegensError

if TYPE_CHECKING:  # segens.rle imports numba, slow to start in worker processes
    from segens.rle import BBox

FORMAT = "segens-probability-store"
VERSION = 2
SPLITS = ("oof", "test")
SCALE = 255
QUANTIZATION = {"dtype": "uint8", "scale": SCALE}
CHUNK_SIDE = 512
COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle", typesize=1)
_BLOSC = Blosc(cname="zstd", clevel=3, shuffle=Blosc.NOSHUFFLE)  # decoding reads the codec from each frame
"""Measured on the non-empty chunks of bone-like 29x2048x2048 maps (bench/bench_store.py --codecs, one core):
230x smaller than raw uint8, against 135x for lz4 + shuffle and 183x for zstd 3 + bitshuffle (bitshuffle hurts
smooth 8-bit maps); 0.03 s/image to encode and 0.01 s/image to decode, small next to the rest of the work."""

# All-zero chunks are never written: write_image skips them itself (a uint8 max per chunk) and encodes the others.
_MAX_OPEN_ARRAYS = 256
_QUANTIZE_BLOCK = 1 << 18


def quantize(prob: np.ndarray) -> np.ndarray:
    """float probabilities in [0, 1] (any shape; computed in float32) -> uint8 v = round(p * 255), half to even,
    clipped to 0..255. NaN is a SegensError."""
    flat = np.ascontiguousarray(prob, dtype=np.float32).reshape(-1)
    out = np.empty(flat.size, dtype=np.uint8)
    scratch = np.empty(min(flat.size, _QUANTIZE_BLOCK), dtype=np.float32)  # blocks: no full-size temporaries
    for start in range(0, flat.size, _QUANTIZE_BLOCK):
        block = scratch[:min(_QUANTIZE_BLOCK, flat.size - start)]
        np.clip(flat[start:start + block.size], 0, 1, out=block)
        if np.isnan(block.max()):
            raise SegensError("probabilities contain NaN: the model produced NaN; check the checkpoint and input")
        block *= np.float32(SCALE)
        np.rint(block, out=block)
        out[start:start + block.size] = block
    return out.reshape(np.shape(prob))


def dequantize(values: np.ndarray) -> np.ndarray:
    """uint8 quantized values -> float32 probabilities p = v / 255."""
    return np.divide(values, np.float32(SCALE), dtype=np.float32)


def image_boxes(probs: np.ndarray) -> list[BBox | None]:
    """Per-class bounding box of the non-zero values of a (C, H, W) uint8 stack (None for an empty class)."""
    boxes: list[BBox | None] = []
    for plane in probs:
        rows = np.flatnonzero(plane.max(axis=1))  # max of uint8 is a fast SIMD reduction, unlike any()
        if rows.size == 0:
            boxes.append(None)
            continue
        cols = np.flatnonzero(plane[rows[0]:rows[-1] + 1].max(axis=0))
        boxes.append((int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1))
    return boxes


class ProbabilityStore:
    """An opened store: identity from the group attributes, images by key. Picklable (reopens by URL)."""

    def __init__(self, url: str, attributes: dict[str, Any], writable: bool,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.storage_options = storage_options
        self.writable = writable
        self.attributes = attributes
        self.member: str = attributes["member"]
        self.kind: str = attributes["kind"]
        self.split: str = attributes["split"]
        self.classes: tuple[str, ...] = tuple(attributes["classes"])
        self.spec: dict[str, Any] = attributes["spec"]
        self.input: dict[str, Any] | None = attributes.get("input")
        self.planned: tuple[str, ...] = tuple(attributes["images"])
        self._planned_set = frozenset(self.planned)
        self.checkpoints: dict[int, dict[str, Any]] = {int(f): c for f, c in attributes["checkpoints"].items()}
        self._zarr_store = _make_store(url, storage_options, read_only=not writable)
        self._arrays: dict[str, _Image] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "attributes": self.attributes, "writable": self.writable,
                "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["attributes"], state["writable"], state["storage_options"])

    def __repr__(self) -> str:
        return f"ProbabilityStore({self.url!r}, member={self.member!r}, split={self.split!r})"

    # ---- writing -------------------------------------------------------------------------------------------

    def write_image(self, key: str, probs: np.ndarray, boxes: list[BBox | None] | None = None) -> None:
        """Write one image's (29, H, W) uint8 probabilities, replacing any earlier (complete or not) array.

        ``boxes`` (as from ``logits_to_uint8``) must contain every non-zero value; computed when None. The key
        must be one of the store's planned images.
        """
        if not self.writable:
            raise SegensError(f"{self.url}: store was opened read-only; open it with create_store to write")
        _check_key(key, self.url)
        if key not in self._planned_set:
            raise SegensError(f"{self.url}: image {key!r} is not among the {len(self.planned)} images this store "
                              "was created for; write it into a store created for this split's images")
        _check_probs(probs, key, self.url)
        boxes = image_boxes(probs) if boxes is None else _check_boxes(boxes, probs.shape, key)
        self._arrays.pop(key, None)
        _, height, width = probs.shape
        chunks = (1, min(CHUNK_SIDE, height), min(CHUNK_SIDE, width))
        blobs = {(channel, rows.start // chunks[1], cols.start // chunks[2]): _encode_chunk(probs[channel, rows, cols],
                                                                                           chunks[1:])
                 for channel, rows, cols in _nonzero_chunks(probs, boxes, chunks[1:])}
        written: list[list[list[int]]] = [[] for _ in range(NUM_CLASSES)]
        for (channel, row, col), blob in blobs.items():
            written[channel].append([row, col, zlib.crc32(blob)])
        array = zarr.create_array(
            self._zarr_store, name=key, shape=probs.shape, dtype="uint8", fill_value=0, chunks=chunks,
            compressors=COMPRESSOR, dimension_names=("class", "row", "col"), overwrite=True,
            attributes=_with_digest({"height": height, "width": width, "boxes": [_box_json(box) for box in boxes],
                                     "chunks": written}),
        )
        # the chunks are encoded here (the bytes zarr's BloscCodec writes) so that their crc32 can be recorded
        sync(_gather([self._zarr_store.set(f"{key}/c/{channel}/{row}/{col}", Buffer.from_bytes(blob))
                      for (channel, row, col), blob in blobs.items()]))
        array.update_attributes({"complete": True})  # the marker, last

    # ---- reading -------------------------------------------------------------------------------------------

    def completed(self) -> set[str]:
        """Keys of the images whose completion marker is written (reads metadata only, never chunks)."""
        return set(sync(_completed_keys(self._zarr_store)))

    def keys(self) -> list[str]:
        """Completed image keys in submission order (sorted as strings)."""
        return sorted(self.completed())

    def missing(self) -> list[str]:
        """Planned image keys that are not complete (never written, killed mid-write, or unreadable metadata)."""
        done = self.completed()
        return [key for key in self.planned if key not in done]

    def __contains__(self, key: str) -> bool:
        try:
            self._image(key)
        except SegensError:
            return False
        return True

    def image_size(self, key: str) -> tuple[int, int]:
        """(height, width) of an image at its original size."""
        return self._image(key).size

    def boxes(self, key: str) -> list[BBox | None]:
        """Per-class bounding box (row0, row1, col0, col1), half-open, of the non-zero values, or None."""
        return list(self._image(key).boxes)

    def read(self, key: str) -> np.ndarray:
        """(29, H, W) uint8 probabilities of an image (p = v / 255); reads only the chunks under the boxes."""
        image = self._image(key)
        out = np.zeros((NUM_CLASSES, *image.size), dtype=np.uint8)
        for channel, box in enumerate(image.boxes):
            if box is not None:
                out[_box_selection(channel, box)] = self.read_region(key, channel, box)
        return out

    def read_float(self, key: str) -> np.ndarray:
        """(29, H, W) float32 probabilities of an image."""
        return dequantize(self.read(key))

    def read_class(self, key: str, channel: int) -> np.ndarray:
        """(H, W) uint8 probabilities of one class (index into ``classes``)."""
        box, values = self.read_class_box(key, channel)
        out = np.zeros(self.image_size(key), dtype=np.uint8)
        if box is not None:
            out[box[0]:box[1], box[2]:box[3]] = values
        return out

    def read_class_box(self, key: str, channel: int) -> tuple[BBox | None, np.ndarray]:
        """One class as (its box, the uint8 values inside it), reading only chunks under the box.

        (None, a (0, 0) array) for a class with no non-zero value.
        """
        if not 0 <= channel < len(self.classes):
            raise SegensError(f"{self.url}: class index {channel} out of range 0..{len(self.classes) - 1}")
        box = self.boxes(key)[channel]
        if box is None:
            return None, np.zeros((0, 0), dtype=np.uint8)
        return box, self.read_region(key, channel, box)

    def read_region(self, key: str, channel: int, box: BBox) -> np.ndarray:
        """uint8 values of one class inside any box (row0, row1, col0, col1); zeros where nothing was written,
        read only from the chunks the box touches, each verified (see the module docstring).

        The chunks are fetched at once and decoded by blosc directly: zarr's per-chunk overhead (about 0.5 ms)
        was most of ``ens combine``'s time.
        """
        image = self._image(key)
        height, width = image.size
        if not (0 <= box[0] < box[1] <= height and 0 <= box[2] < box[3] <= width):
            raise SegensError(f"{self.url}: image {key!r}: region {tuple(box)!r} is not inside {height}x{width}")
        side_r, side_c = image.chunk_shape
        written = image.chunks[channel]
        out = np.zeros((box[1] - box[0], box[3] - box[2]), np.uint8)
        names = [(r, c) for r in range(box[0] // side_r, (box[1] - 1) // side_r + 1)
                 for c in range(box[2] // side_c, (box[3] - 1) // side_c + 1)]
        for (r, c), blob in zip(names, self._chunk_bytes([f"{key}/c/{channel}/{r}/{c}" for r, c in names])):
            chunk = self._verified_chunk(key, channel, (r, c), blob, written.get((r, c)), image)
            if chunk is None:
                continue  # never written: zeros
            r0, r1 = max(box[0], r * side_r), min(box[1], (r + 1) * side_r)
            c0, c1 = max(box[2], c * side_c), min(box[3], (c + 1) * side_c)
            out[r0 - box[0]:r1 - box[0], c0 - box[2]:c1 - box[2]] = \
                chunk[r0 - r * side_r:r1 - r * side_r, c0 - c * side_c:c1 - c * side_c]
        return out

    def _verified_chunk(self, key: str, channel: int, position: tuple[int, int], blob: bytes | None,
                        crc: int | None, image: _Image) -> np.ndarray | None:
        """The decoded (rows, cols) chunk, None for one never written; a SegensError for anything else."""
        where = f"{self.url}: image {key!r}, class {self.classes[channel]!r}, chunk {position}"
        fix = "; " + _repair_advice(key, self.member)
        if blob is None:
            if crc is not None:
                raise SegensError(f"{where}: the chunk is missing from the store{fix}")
            return None
        if crc is None:
            raise SegensError(f"{where}: a chunk is there that the image's metadata does not list{fix}")
        if zlib.crc32(blob) != crc:
            raise SegensError(f"{where}: the chunk's checksum differs from the one recorded (corrupt){fix}")
        side_r, side_c = image.chunk_shape
        try:
            chunk = np.frombuffer(_BLOSC.decode(blob), np.uint8)
        except (RuntimeError, ValueError) as exc:  # numcodecs' blosc raises these for damaged frames
            raise SegensError(f"{where}: the chunk cannot be decoded ({exc}){fix}") from None
        if chunk.size != side_r * side_c:
            raise SegensError(f"{where}: the chunk decodes to {chunk.size} values, not {side_r}x{side_c}{fix}")
        return chunk.reshape(side_r, side_c)

    def _chunk_bytes(self, names: list[str]) -> list[bytes | None]:
        """The stored bytes of chunk keys (None where absent): plain file reads for a local store, where a
        round trip through zarr's event loop per call cost more than the reads; one gathered call otherwise."""
        if isinstance(self._zarr_store, zarr.storage.LocalStore):
            root = Path(self._zarr_store.root)
            blobs: list[bytes | None] = []
            for name in names:
                try:
                    blobs.append((root / name).read_bytes())
                except (FileNotFoundError, NotADirectoryError):
                    blobs.append(None)
                except OSError as exc:  # a folder where the chunk belongs, no permission, an I/O error
                    raise SegensError(f"{self.url}: cannot read chunk {name!r} ({exc.strerror or exc}); "
                                      f"{_repair_advice(name.split('/c/')[0], self.member)}") from None
            return blobs
        prototype = default_buffer_prototype()
        found = sync(_gather([self._zarr_store.get(name, prototype=prototype) for name in names]))
        return [None if blob is None else blob.to_bytes() for blob in found]

    def nbytes_stored(self, key: str) -> int:
        """Bytes the image takes in the store: its compressed chunks and its metadata."""
        self._image(key)
        return int(zarr.open_array(self._zarr_store, path=key, mode="r", zarr_format=3).nbytes_stored())

    def _image(self, key: str) -> _Image:
        """A completed image's verified metadata; a SegensError if it is missing, incomplete or malformed."""
        image = self._arrays.get(key)
        if image is None:
            _check_key(key, self.url)
            document = sync(_get_json(self._zarr_store, f"{key}/zarr.json"))
            if document is None or document.get("node_type") != "array" \
                    or (document.get("attributes") or {}).get("complete") is not True:
                raise SegensError(
                    f"{self.url}: image {key!r} is not in the store (or its write did not finish, or its metadata "
                    f"is unreadable); run `ens predict-member` for member {self.member!r} to (re)write it"
                )
            image = _Image.from_metadata(document, key, f"{self.url}: image {key!r}", self.classes)
            if len(self._arrays) >= _MAX_OPEN_ARRAYS:
                self._arrays.clear()
            self._arrays[key] = image
        return image


@dataclass(frozen=True)
class _Image:
    """One image's metadata, checked: size, chunk shape, per-class boxes and written chunks {(row, col): crc32}."""

    size: tuple[int, int]
    chunk_shape: tuple[int, int]
    boxes: tuple[BBox | None, ...]
    chunks: tuple[dict[tuple[int, int], int], ...]

    @classmethod
    def from_metadata(cls, document: dict[str, Any], key: str, where: str, classes: Sequence[str]) -> _Image:
        """Validate image ``key``'s zarr.json against this format; a SegensError naming ``where`` (and the class)."""
        fix = f"; the store was altered or damaged: {_repair_advice(key)}"
        attributes = document.get("attributes") or {}
        if attributes.get("digest") != _digest(attributes):
            raise SegensError(f"{where}: the image's metadata (size, boxes, chunks) does not match its digest{fix}")
        height, width = attributes.get("height"), attributes.get("width")
        if not (_is_int(height) and _is_int(width) and height > 0 and width > 0):
            raise SegensError(f"{where}: height/width {height!r}x{width!r} are not positive integers{fix}")
        chunk_shape = (1, min(CHUNK_SIDE, height), min(CHUNK_SIDE, width))
        grid = ((document.get("chunk_grid") or {}).get("configuration") or {}).get("chunk_shape")
        codecs = [codec.get("name") for codec in document.get("codecs") or [] if isinstance(codec, dict)]
        separator = (((document.get("chunk_key_encoding") or {}).get("configuration") or {}).get("separator"))
        if document.get("shape") != [NUM_CLASSES, height, width] or document.get("data_type") != "uint8" \
                or grid != list(chunk_shape) or codecs != ["bytes", "blosc"] or separator != "/":
            raise SegensError(f"{where}: the array's metadata is not this store format's (shape "
                              f"{document.get('shape')}, dtype {document.get('data_type')}, chunks {grid}, codecs "
                              f"{codecs}){fix}")
        raw_boxes, raw_chunks = attributes.get("boxes"), attributes.get("chunks")
        if not isinstance(raw_boxes, list) or len(raw_boxes) != NUM_CLASSES \
                or not isinstance(raw_chunks, list) or len(raw_chunks) != NUM_CLASSES:
            raise SegensError(f"{where}: boxes and chunks must list {NUM_CLASSES} classes each{fix}")
        boxes: list[BBox | None] = []
        chunks: list[dict[tuple[int, int], int]] = []
        for channel, (box, listed) in enumerate(zip(raw_boxes, raw_chunks)):
            here = f"{where}, class {classes[channel]!r}"
            if box is not None and not (isinstance(box, list) and len(box) == 4 and all(map(_is_int, box))
                                        and 0 <= box[0] < box[1] <= height and 0 <= box[2] < box[3] <= width):
                raise SegensError(f"{here}: box {box!r} is not [row0, row1, col0, col1] inside {height}x{width}{fix}")
            written: dict[tuple[int, int], int] = {}
            for entry in listed if isinstance(listed, list) else [None]:
                if not (isinstance(entry, list) and len(entry) == 3 and all(map(_is_int, entry))):
                    raise SegensError(f"{here}: chunk entry {entry!r} is not [row, col, crc32]{fix}")
                row, col, crc = entry
                if box is None or not (box[0] // chunk_shape[1] <= row <= (box[1] - 1) // chunk_shape[1]
                                       and box[2] // chunk_shape[2] <= col <= (box[3] - 1) // chunk_shape[2]):
                    raise SegensError(f"{here}: written chunk ({row}, {col}) lies outside the recorded box "
                                      f"{box!r}{fix}")
                written[(row, col)] = crc
            boxes.append(None if box is None else tuple(box))
            chunks.append(written)
        return cls((height, width), chunk_shape[1:], tuple(boxes), tuple(chunks))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _encode_chunk(values: np.ndarray, chunk_shape: tuple[int, int]) -> bytes:
    """One chunk's stored bytes, as zarr's BytesCodec + BloscCodec write them (edge chunks padded with zeros)."""
    if values.shape != chunk_shape:
        padded = np.zeros(chunk_shape, np.uint8)
        padded[:values.shape[0], :values.shape[1]] = values
        values = padded
    return bytes(_BLOSC.encode(np.ascontiguousarray(values)))


# ---- opening and creating ----------------------------------------------------------------------------------


def open_store(url: str | Path, storage_options: dict[str, Any] | None = None) -> ProbabilityStore:
    """Open an existing store for reading; a SegensError naming the path if it is not a known segens store."""
    url = str(url)
    try:
        zarr_store = _make_store(url, storage_options, read_only=True)
        attributes = _root_attributes(zarr_store)
    except FileNotFoundError:
        attributes = None
    if attributes is None:
        raise SegensError(f"{url}: no probability store there; write it with `ens predict-member`")
    _check_format(attributes, url)
    return ProbabilityStore(url, attributes, writable=False, storage_options=storage_options)


def create_store(url: str | Path, member_name: str, kind: str, split: str, spec: dict[str, Any],
                 checkpoints: dict[int, dict[str, Any]], *, images: Sequence[str], overwrite: bool = False,
                 storage_options: dict[str, Any] | None = None) -> ProbabilityStore:
    """Create a store for writing, or reopen one of the same identity to resume it.

    ``checkpoints`` maps fold -> {"path", "sha256"}; ``images`` are the keys of every image the store is for (its
    planned list: readers tell a finished store from an unfinished one by it). A store of another identity
    (member, kind, split, spec, input contract, checkpoint hashes, planned images) is replaced only with
    ``overwrite``; a path holding anything else is never replaced. Call it once before starting workers and hand
    them the (picklable) store: with ``overwrite`` a late caller would delete what others wrote.
    """
    url = str(url)
    if split not in SPLITS:
        raise SegensError(f"{url}: split must be one of {', '.join(SPLITS)}, got {split!r}")
    attributes = _store_attributes(member_name, kind, split, spec, checkpoints, images, url)
    zarr_store = _make_store(url, storage_options, read_only=False)
    existing = _root_attributes(zarr_store)
    if existing is None:
        if _holds_anything(zarr_store):
            raise SegensError(f"{url}: exists and is not a probability store; choose another path or remove it")
        try:
            zarr.create_group(zarr_store, attributes=attributes, zarr_format=3)
            return ProbabilityStore(url, attributes, writable=True, storage_options=storage_options)
        except zarr.errors.ContainsGroupError:  # another process created it meanwhile: compare identities
            existing = _root_attributes(zarr_store) or {}
    if existing.get("format") != FORMAT:
        raise SegensError(f"{url}: exists and is not a segens probability store; choose another path or remove it")
    if overwrite:
        zarr.create_group(zarr_store, overwrite=True, attributes=attributes, zarr_format=3)
        return ProbabilityStore(url, attributes, writable=True, storage_options=storage_options)
    differences = _identity_differences(existing, attributes)
    if differences:
        raise SegensError(f"{url}: a store of another identity exists ({'; '.join(differences)}); "
                          "pass --overwrite to replace it, or write to another path")
    return ProbabilityStore(url, existing, writable=True, storage_options=storage_options)


def _store_attributes(member_name: str, kind: str, split: str, spec: dict[str, Any],
                      checkpoints: dict[int, dict[str, Any]], images: Sequence[str], url: str) -> dict[str, Any]:
    """The group attributes, as JSON round-trips them (so a comparison with a stored copy is exact)."""
    folds = {}
    for fold, checkpoint in sorted(checkpoints.items()):
        if "path" not in checkpoint or "sha256" not in checkpoint:
            raise SegensError(f"member {member_name!r}: checkpoint of fold {fold} needs 'path' and 'sha256'")
        folds[str(int(fold))] = {"path": str(checkpoint["path"]), "sha256": str(checkpoint["sha256"])}
    if isinstance(images, str):
        raise SegensError(f"{url}: images must be a list of image keys, not one string")
    planned = sorted(images)
    for key in planned:
        _check_key(key, url)
    if len(set(planned)) != len(planned):
        repeated = next(key for key, after in zip(planned, planned[1:]) if key == after)
        raise SegensError(f"{url}: image {repeated!r} is planned twice; each image key once")
    contract = spec.get("input") if isinstance(spec, dict) else None
    attributes = {"format": FORMAT, "version": VERSION, "member": member_name, "kind": kind, "split": split,
                  "classes": list(CLASSES), "quantization": QUANTIZATION, "spec": spec, "input": contract,
                  "checkpoints": folds, "images": planned}
    try:
        return json.loads(json.dumps(attributes, default=str))
    except (TypeError, ValueError) as exc:
        raise SegensError(f"member {member_name!r}: the spec cannot be stored as JSON ({exc})") from None


def _identity(attributes: dict[str, Any]) -> dict[str, Any]:
    """What decides a store's content: everything but checkpoint paths (a moved checkpoint is the same)."""
    spec = {k: v for k, v in (attributes.get("spec") or {}).items() if k not in ("checkpoints", "path")}
    hashes = {fold: c.get("sha256") for fold, c in (attributes.get("checkpoints") or {}).items()}
    return {"version": attributes.get("version"), "member": attributes.get("member"), "kind": attributes.get("kind"),
            "split": attributes.get("split"), "classes": attributes.get("classes"),
            "quantization": attributes.get("quantization"), "spec": spec, "input": attributes.get("input"),
            "checkpoint sha256": hashes, "planned images": attributes.get("images")}


def _identity_differences(existing: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    old, new = _identity(existing), _identity(wanted)
    differences = []
    for name in new:
        if old[name] == new[name]:
            continue
        if name == "planned images":
            there, now = set(old[name] or []), set(new[name] or [])
            example = sorted(now - there)[:1] or sorted(there - now)[:1]
            differences.append(f"planned images: {len(there)} there, {len(now)} now (e.g. {example[0]!r} differs)"
                               if example else "planned images differ")
        else:
            differences.append(f"{name}: {old[name]!r} there, {new[name]!r} now")
    return differences


def _check_format(attributes: dict[str, Any], url: str) -> None:
    if attributes.get("format") != FORMAT:
        raise SegensError(f"{url}: not a segens probability store (a zarr group without the store attributes)")
    if attributes.get("version") != VERSION:
        raise SegensError(
            f"{url}: probability store version {attributes.get('version')!r} is not known to this segens "
            f"(knows {VERSION}); rewrite it with `ens predict-member --overwrite` or use a matching segens"
        )
    if attributes.get("quantization") != QUANTIZATION or attributes.get("classes") != list(CLASSES):
        raise SegensError(f"{url}: store has another quantization or class list than this segens; rewrite it")
    for name, kind in (("member", str), ("kind", str), ("split", str), ("spec", dict), ("checkpoints", dict),
                       ("images", list)):
        if not isinstance(attributes.get(name), kind):
            raise SegensError(f"{url}: the store's attribute {name!r} is missing or malformed; rewrite the store "
                              "with `ens predict-member --overwrite`")
    if attributes["split"] not in SPLITS or not all(isinstance(key, str) for key in attributes["images"]) \
            or not all(isinstance(c, dict) and "sha256" in c for c in attributes["checkpoints"].values()):
        raise SegensError(f"{url}: the store's split, planned images or checkpoints are malformed; rewrite the "
                          "store with `ens predict-member --overwrite`")
    if not all(isinstance(fold, str) and fold.isdecimal() for fold in attributes["checkpoints"]):
        raise SegensError(f"{url}: the store's checkpoints are not keyed by fold numbers; rewrite the store with "
                          "`ens predict-member --overwrite`")
    for key in attributes["images"]:
        _check_key(key, url)


def _make_store(url: str, storage_options: dict[str, Any] | None, read_only: bool) -> zarr.abc.store.Store:
    """A zarr store for a local path (or file:// URL) or an fsspec URL (``s3://...`` with ``storage_options``)."""
    if url.startswith("file://"):
        url = url[len("file://"):]  # zarr's LocalStore: atomic writes; fsspec's local file system makes no folders
    if "://" in url:
        # other processes add images: a cached directory listing (s3fs caches them per process) would hide them
        options = {"use_listings_cache": False, **(storage_options or {})}
        return zarr.storage.FsspecStore.from_url(url, storage_options=options, read_only=read_only)
    if storage_options:
        raise SegensError(f"{url}: storage options are only for URLs such as s3://bucket/path")
    if read_only and not Path(url).is_dir():
        raise FileNotFoundError(url)
    return zarr.storage.LocalStore(url, read_only=read_only)


def _root_attributes(zarr_store: zarr.abc.store.Store) -> dict[str, Any] | None:
    """The root group's attributes, or None where there is no root metadata."""
    document = sync(_get_json(zarr_store, "zarr.json"))
    if document is None:
        return None
    if document.get("node_type") != "group":
        return {}
    return document.get("attributes") or {}


def _holds_anything(zarr_store: zarr.abc.store.Store) -> bool:
    """Whether the store's root holds anything but root metadata and temporary files of a killed write."""
    async def first() -> bool:
        async for name in zarr_store.list_dir(""):
            if name != "zarr.json" and not _is_temporary(name):
                return True
        return False

    return sync(first())


# ---- keys, metadata walk -----------------------------------------------------------------------------------


async def _get_json(zarr_store: zarr.abc.store.Store, key: str) -> dict[str, Any] | None:
    """A JSON document of the store, or None if it is missing or unreadable."""
    try:
        buffer = await zarr_store.get(key, prototype=default_buffer_prototype())
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    if buffer is None:
        return None
    try:
        document = json.loads(buffer.to_bytes())
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


async def _completed_keys(zarr_store: zarr.abc.store.Store, prefix: str = "") -> list[str]:
    """Keys under ``prefix`` of arrays with the completion marker; metadata fetched concurrently."""
    names = sorted([name async for name in zarr_store.list_dir(prefix)])
    children = [f"{prefix}{name}" for name in names if name != "zarr.json" and not _is_temporary(name)]
    documents = await asyncio.gather(*(_get_json(zarr_store, f"{child}/zarr.json") for child in children))
    keys: list[str] = []
    groups = []
    for child, document in zip(children, documents):
        if document is None:
            continue
        if document.get("node_type") == "group":
            groups.append(_completed_keys(zarr_store, f"{child}/"))
        elif (document.get("attributes") or {}).get("complete") is True and _valid_metadata(document, child):
            keys.append(child)
    for found in await asyncio.gather(*groups):
        keys.extend(found)
    return keys


def _valid_metadata(document: dict[str, Any], key: str) -> bool:
    """Whether an image's metadata passes ``_Image.from_metadata`` (an image whose metadata does not is missing)."""
    try:
        _Image.from_metadata(document, key, key, CLASSES)
    except SegensError:
        return False
    return True


def _digest(attributes: dict[str, Any]) -> int:
    """crc32 of the canonical JSON of an image's height, width, boxes and chunks."""
    content = {name: attributes.get(name) for name in ("height", "width", "boxes", "chunks")}
    return zlib.crc32(json.dumps(content, sort_keys=True, separators=(",", ":")).encode())


def _with_digest(attributes: dict[str, Any]) -> dict[str, Any]:
    return {**attributes, "digest": _digest(attributes)}


def _repair_advice(key: str, member: str | None = None) -> str:
    """What to do about a damaged image: resuming rewrites images that are missing."""
    who = f" for member {member!r}" if member else ""
    return (f"remove the image's folder {key!r} from the store and run `ens predict-member`{who} again (it rewrites "
            "missing images), or restore the store")


def _is_temporary(name: str) -> bool:
    return name.endswith(".partial")  # zarr's LocalStore writes to NAME.<uuid>.partial, then renames


# ---- checks and small helpers ------------------------------------------------------------------------------


def _check_key(key: str, url: str) -> None:
    """A key is an image relpath without extension: non-empty '/'-separated parts, none special."""
    parts = key.split("/") if isinstance(key, str) else [""]
    if any(part in ("", ".", "..", "zarr.json") or "\\" in part or _is_temporary(part) for part in parts):
        raise SegensError(f"{url}: {key!r} is not a valid image key (a relative path without extension, "
                          "like 'ID001/image1661130828152_R')")


def _check_probs(probs: np.ndarray, key: str, url: str) -> None:
    if not isinstance(probs, np.ndarray) or probs.dtype != np.uint8 or probs.ndim != 3 \
            or probs.shape[0] != NUM_CLASSES or 0 in probs.shape:
        raise SegensError(f"{url}: image {key!r}: probabilities must be a ({NUM_CLASSES}, H, W) uint8 array "
                          f"(quantize them with segens.members.store.quantize), got "
                          f"{getattr(probs, 'dtype', type(probs).__name__)} {getattr(probs, 'shape', '')}")


def _check_boxes(boxes: Iterable[Any], shape: tuple[int, ...], key: str) -> list[BBox | None]:
    boxes = list(boxes)
    _, height, width = shape
    if len(boxes) != NUM_CLASSES:
        raise SegensError(f"image {key!r}: expected {NUM_CLASSES} boxes, got {len(boxes)}")
    checked: list[BBox | None] = []
    for box in boxes:
        if box is not None:
            box = tuple(int(v) for v in box)
            if len(box) != 4 or not (0 <= box[0] < box[1] <= height and 0 <= box[2] < box[3] <= width):
                raise SegensError(f"image {key!r}: box {box!r} is not (row0, row1, col0, col1) inside {height}x{width}")
        checked.append(box)
    return checked


def _box_json(box: BBox | None) -> list[int] | None:
    return None if box is None else [int(v) for v in box]


def _box_selection(channel: int, box: BBox) -> tuple[int, slice, slice]:
    return channel, slice(box[0], box[1]), slice(box[2], box[3])


def _nonzero_chunks(probs: np.ndarray, boxes: list[BBox | None],
                    chunks: tuple[int, int]) -> Iterable[tuple[int, slice, slice]]:
    """(class, rows, cols) of every whole chunk under a class's box that holds a non-zero value."""
    _, height, width = probs.shape
    for channel, box in enumerate(boxes):
        if box is None:
            continue
        for row in range(box[0] // chunks[0] * chunks[0], box[1], chunks[0]):
            for col in range(box[2] // chunks[1] * chunks[1], box[3], chunks[1]):
                rows, cols = slice(row, min(row + chunks[0], height)), slice(col, min(col + chunks[1], width))
                if probs[channel, rows, cols].max():
                    yield channel, rows, cols


async def _gather(coroutines: list[Any]) -> list[Any]:
    """Run zarr coroutines concurrently in one trip to zarr's event loop."""
    return list(await asyncio.gather(*coroutines))
