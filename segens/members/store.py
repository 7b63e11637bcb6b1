"""The probability store: one zarr v3 group per member and split. The only reader and writer of the format.

```
<member>.<split>.zarr/            group attributes: format, version, member, kind, split, classes,
  zarr.json                         quantization, spec, checkpoints {fold: {path, sha256}}
  ID001/                          one nested group per directory of the image key
    image1661130828152_R/         one array per image: (29, H, W) uint8, p = v / 255, chunks (1, 512, 512),
      zarr.json                     blosc; all-zero chunks are never written; attributes height, width,
      c/<class>/<row>/<col>         boxes (per class [row0, row1, col0, col1] half-open, or null) and
                                    "complete": true, written last
```
An image whose array lacks the completion marker does not exist for readers and is rewritten by writers, so a
killed run resumed gives the same bytes as an uninterrupted one. Writers of disjoint images may run at once.
Everything written is deterministic (no times, no host names). Paths may be local or fsspec URLs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from numcodecs import Blosc
from zarr.codecs import BloscCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from segens.classes import CLASSES, NUM_CLASSES
from segens.errors import SegensError

if TYPE_CHECKING:  # segens.rle imports numba, slow to start in worker processes
    from segens.rle import BBox

FORMAT = "segens-probability-store"
VERSION = 1
SPLITS = ("oof", "test")
SCALE = 255
QUANTIZATION = {"dtype": "uint8", "scale": SCALE}
CHUNK_SIDE = 512
COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle", typesize=1)
_BLOSC = Blosc(cname="zstd", clevel=3, shuffle=Blosc.NOSHUFFLE)  # decoding reads the codec from each frame
"""Measured on the non-empty chunks of bone-like 29x2048x2048 maps (bench/bench_store.py --codecs, one core):
230x smaller than raw uint8, against 135x for lz4 + shuffle and 183x for zstd 3 + bitshuffle (bitshuffle hurts
smooth 8-bit maps); 0.03 s/image to encode and 0.01 s/image to decode, small next to the rest of the work."""

# All-zero chunks are never written: write_image skips them itself (a uint8 max per chunk), which is ~20x
# cheaper than zarr's own write_empty_chunks=False test (np.array_equal on every chunk).
_ARRAY_CONFIG = {"write_empty_chunks": True}
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
        self.checkpoints: dict[int, dict[str, Any]] = {int(f): c for f, c in attributes["checkpoints"].items()}
        self._zarr_store = _make_store(url, storage_options, read_only=not writable)
        self._arrays: dict[str, zarr.Array] = {}

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

        ``boxes`` (as from ``logits_to_uint8``) must contain every non-zero value; computed when None.
        """
        if not self.writable:
            raise SegensError(f"{self.url}: store was opened read-only; open it with create_store to write")
        _check_key(key, self.url)
        _check_probs(probs, key, self.url)
        boxes = image_boxes(probs) if boxes is None else _check_boxes(boxes, probs.shape, key)
        self._arrays.pop(key, None)
        _, height, width = probs.shape
        chunks = (1, min(CHUNK_SIDE, height), min(CHUNK_SIDE, width))
        array = zarr.create_array(
            self._zarr_store, name=key, shape=probs.shape, dtype="uint8", fill_value=0, chunks=chunks,
            compressors=COMPRESSOR, dimension_names=("class", "row", "col"), overwrite=True, config=_ARRAY_CONFIG,
            attributes={"height": height, "width": width, "boxes": [_box_json(box) for box in boxes]},
        )
        writes = [array.async_array.setitem((channel, rows, cols), probs[channel, rows, cols])
                  for channel, rows, cols in _nonzero_chunks(probs, boxes, chunks[1:])]
        sync(_gather(writes))
        array.update_attributes({"complete": True})  # the marker, last

    # ---- reading -------------------------------------------------------------------------------------------

    def completed(self) -> set[str]:
        """Keys of the images whose completion marker is written (reads metadata only, never chunks)."""
        return set(sync(_completed_keys(self._zarr_store)))

    def keys(self) -> list[str]:
        """Completed image keys in submission order (sorted as strings)."""
        return sorted(self.completed())

    def __contains__(self, key: str) -> bool:
        try:
            self._array(key)
        except SegensError:
            return False
        return True

    def image_size(self, key: str) -> tuple[int, int]:
        """(height, width) of an image at its original size."""
        attributes = self._array(key).attrs
        return int(attributes["height"]), int(attributes["width"])

    def boxes(self, key: str) -> list[BBox | None]:
        """Per-class bounding box (row0, row1, col0, col1), half-open, of the non-zero values, or None."""
        return [None if box is None else tuple(box) for box in self._array(key).attrs["boxes"]]

    def read(self, key: str) -> np.ndarray:
        """(29, H, W) uint8 probabilities of an image (p = v / 255); reads only the chunks under the boxes."""
        array = self._array(key)
        out = np.zeros(array.shape, dtype=np.uint8)
        boxes = [(channel, box) for channel, box in enumerate(self.boxes(key)) if box is not None]
        values = sync(_gather([array.async_array.getitem(_box_selection(channel, box)) for channel, box in boxes]))
        for (channel, box), value in zip(boxes, values):
            out[_box_selection(channel, box)] = value
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
        return box, self._array(key)[channel, box[0]:box[1], box[2]:box[3]]

    def read_region(self, key: str, channel: int, box: BBox) -> np.ndarray:
        """uint8 values of one class inside any box (row0, row1, col0, col1); zeros where nothing was written,
        read only from the chunks the box touches.

        The chunks of this format's layout are fetched at once and decoded by blosc directly: zarr's per-chunk
        overhead (about 0.5 ms) was most of ``ens combine``'s time. Any other layout goes through zarr.
        """
        array = self._array(key)
        codecs = [type(codec).__name__ for codec in array.metadata.codecs]
        if codecs != ["BytesCodec", "BloscCodec"] or array.metadata.chunk_key_encoding.separator != "/":
            return array[channel, box[0]:box[1], box[2]:box[3]]
        _, side_r, side_c = array.chunks
        out = np.zeros((box[1] - box[0], box[3] - box[2]), np.uint8)
        names = [(r, c) for r in range(box[0] // side_r, (box[1] - 1) // side_r + 1)
                 for c in range(box[2] // side_c, (box[3] - 1) // side_c + 1)]
        for (r, c), blob in zip(names, self._chunk_bytes([f"{key}/c/{channel}/{r}/{c}" for r, c in names])):
            if blob is None:
                continue  # never written: zeros
            chunk = np.frombuffer(_BLOSC.decode(blob), np.uint8).reshape(side_r, side_c)
            r0, r1 = max(box[0], r * side_r), min(box[1], (r + 1) * side_r)
            c0, c1 = max(box[2], c * side_c), min(box[3], (c + 1) * side_c)
            out[r0 - box[0]:r1 - box[0], c0 - box[2]:c1 - box[2]] = \
                chunk[r0 - r * side_r:r1 - r * side_r, c0 - c * side_c:c1 - c * side_c]
        return out

    def _chunk_bytes(self, names: list[str]) -> list[bytes | None]:
        """The stored bytes of chunk keys (None where absent): plain file reads for a local store, where a
        round trip through zarr's event loop per call cost more than the reads; one gathered call otherwise."""
        if isinstance(self._zarr_store, zarr.storage.LocalStore):
            root = Path(self._zarr_store.root)
            blobs: list[bytes | None] = []
            for name in names:
                try:
                    blobs.append((root / name).read_bytes())
                except FileNotFoundError:
                    blobs.append(None)
            return blobs
        prototype = default_buffer_prototype()
        found = sync(_gather([self._zarr_store.get(name, prototype=prototype) for name in names]))
        return [None if blob is None else blob.to_bytes() for blob in found]

    def nbytes_stored(self, key: str) -> int:
        """Bytes the image takes in the store: its compressed chunks and its metadata."""
        return int(self._array(key).nbytes_stored())

    def _array(self, key: str) -> zarr.Array:
        """The opened array of a completed image; a SegensError if it is missing or incomplete."""
        array = self._arrays.get(key)
        if array is None:
            _check_key(key, self.url)
            try:
                array = zarr.open_array(self._zarr_store, path=key, mode="r" if not self.writable else "r+",
                                        zarr_format=3)
            except (FileNotFoundError, KeyError, ValueError, TypeError):  # zarr's not-found errors are ValueErrors
                array = None
            if array is None or array.attrs.get("complete") is not True:
                raise SegensError(
                    f"{self.url}: image {key!r} is not in the store (or its write did not finish); "
                    f"run `ens predict-member` for member {self.member!r} to (re)write it"
                )
            if len(self._arrays) >= _MAX_OPEN_ARRAYS:
                self._arrays.clear()
            self._arrays[key] = array
        return array


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
                 checkpoints: dict[int, dict[str, Any]], overwrite: bool = False,
                 storage_options: dict[str, Any] | None = None) -> ProbabilityStore:
    """Create a store for writing, or reopen one of the same identity to resume it.

    ``checkpoints`` maps fold -> {"path", "sha256"}. A store of another identity (member, kind, split, spec,
    checkpoint hashes) is replaced only with ``overwrite``; a path holding anything else is never replaced.
    Call it once before starting workers and hand them the (picklable) store: with ``overwrite`` a late caller
    would delete what others wrote.
    """
    url = str(url)
    if split not in SPLITS:
        raise SegensError(f"{url}: split must be one of {', '.join(SPLITS)}, got {split!r}")
    attributes = _store_attributes(member_name, kind, split, spec, checkpoints)
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
                      checkpoints: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The group attributes, as JSON round-trips them (so a comparison with a stored copy is exact)."""
    folds = {}
    for fold, checkpoint in sorted(checkpoints.items()):
        if "path" not in checkpoint or "sha256" not in checkpoint:
            raise SegensError(f"member {member_name!r}: checkpoint of fold {fold} needs 'path' and 'sha256'")
        folds[str(int(fold))] = {"path": str(checkpoint["path"]), "sha256": str(checkpoint["sha256"])}
    attributes = {"format": FORMAT, "version": VERSION, "member": member_name, "kind": kind, "split": split,
                  "classes": list(CLASSES), "quantization": QUANTIZATION, "spec": spec, "checkpoints": folds}
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
            "quantization": attributes.get("quantization"), "spec": spec, "checkpoint sha256": hashes}


def _identity_differences(existing: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    old, new = _identity(existing), _identity(wanted)
    return [f"{name}: {old[name]!r} there, {new[name]!r} now" for name in new if old[name] != new[name]]


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
        elif (document.get("attributes") or {}).get("complete") is True:
            keys.append(child)
    for found in await asyncio.gather(*groups):
        keys.extend(found)
    return keys


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
