"""An opened probability store (see segens.store.format): images written by key, read back verified.

Every read is verified: the array's metadata must be this format's and match its digest, the boxes must lie
inside the image and cover every chunk written, every listed chunk that a read touches must be there with its
crc32, and no unlisted chunk may be there; anything else is a SegensError naming the store, image and class.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.buffer.cpu import Buffer
from zarr.core.sync import sync

from segens.conventions.classes import NUM_CLASSES
from segens.errors import SegensError
from segens.store.format import BLOSC, CHUNK_SIDE, COMPRESSOR, check_key, is_temporary, repair_advice, store_id
from segens.store.image import (
    ImageMetadata,
    box_json,
    box_selection,
    check_boxes,
    check_probs,
    encode_chunk,
    image_boxes,
    nonzero_chunks,
    valid_metadata,
    with_digest,
)
from segens.store.location import open_zarr
from segens.store.quantize import dequantize

if TYPE_CHECKING:  # segens.conventions.rle imports numba, slow to start in worker processes
    from segens.conventions.rle import BBox

_MAX_OPEN_ARRAYS = 256


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
        self.role: str = attributes["role"]
        self.fold: int | None = attributes["fold"]
        self.store_id = store_id(attributes)
        self._zarr_store = open_zarr(url, storage_options, read_only=not writable)
        self._arrays: dict[str, ImageMetadata] = {}

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
        check_key(key, self.url)
        if key not in self._planned_set:
            raise SegensError(f"{self.url}: image {key!r} is not among the {len(self.planned)} images this store "
                              "was created for; write it into a store created for this split's images")
        check_probs(probs, key, self.url)
        boxes = image_boxes(probs) if boxes is None else check_boxes(boxes, probs.shape, key)
        self._arrays.pop(key, None)
        _, height, width = probs.shape
        chunks = (1, min(CHUNK_SIDE, height), min(CHUNK_SIDE, width))
        blobs = {(channel, rows.start // chunks[1], cols.start // chunks[2]): encode_chunk(probs[channel, rows, cols],
                                                                                           chunks[1:])
                 for channel, rows, cols in nonzero_chunks(probs, boxes, chunks[1:])}
        written: list[list[list[int]]] = [[] for _ in range(NUM_CLASSES)]
        for (channel, row, col), blob in blobs.items():
            written[channel].append([row, col, zlib.crc32(blob)])
        array = zarr.create_array(
            self._zarr_store, name=key, shape=probs.shape, dtype="uint8", fill_value=0, chunks=chunks,
            compressors=COMPRESSOR, dimension_names=("class", "row", "col"), overwrite=True,
            attributes=with_digest({"key": key, "store": self.store_id, "height": height, "width": width,
                                    "boxes": [box_json(box) for box in boxes],
                                     "chunks": written}),
        )
        # the chunks are encoded here (the bytes zarr's BloscCodec writes) so that their crc32 can be recorded
        sync(gather([self._zarr_store.set(f"{key}/c/{channel}/{row}/{col}", Buffer.from_bytes(blob))
                      for (channel, row, col), blob in blobs.items()]))
        array.update_attributes({"complete": True})  # the marker, last

    # ---- reading -------------------------------------------------------------------------------------------

    def completed(self) -> set[str]:
        """Keys of the images whose completion marker is written (reads metadata only, never chunks)."""
        return set(sync(completed_keys(self._zarr_store, self.store_id)))

    def keys(self) -> list[str]:
        """Completed image keys in submission order (sorted as strings)."""
        return sorted(self.completed())

    def missing(self) -> list[str]:
        """Planned image keys that are not complete (never written, killed mid-write, or unreadable metadata)."""
        done = self.completed()
        return [key for key in self.planned if key not in done]

    def explain_missing(self, key: str) -> None:
        """A SegensError saying why image ``key`` does not count as complete when its metadata is there but fails
        verification (moved, copied, altered); nothing when it is complete, or simply not written (yet)."""
        document = sync(get_json(self._zarr_store, f"{key}/zarr.json"))
        if document is not None and document.get("node_type") == "array" \
                and (document.get("attributes") or {}).get("complete") is True:
            ImageMetadata.from_metadata(document, key, f"{self.url}: image {key!r}", self.classes, self.store_id)

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
                out[box_selection(channel, box)] = self.read_region(key, channel, box)
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
                        crc: int | None, image: ImageMetadata) -> np.ndarray | None:
        """The decoded (rows, cols) chunk, None for one never written; a SegensError for anything else."""
        where = f"{self.url}: image {key!r}, class {self.classes[channel]!r}, chunk {position}"
        fix = "; " + repair_advice(key, self.member)
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
            chunk = np.frombuffer(BLOSC.decode(blob), np.uint8)
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
                                      f"{repair_advice(name.split('/c/')[0], self.member)}") from None
            return blobs
        prototype = default_buffer_prototype()
        found = sync(gather([self._zarr_store.get(name, prototype=prototype) for name in names]))
        return [None if blob is None else blob.to_bytes() for blob in found]

    def nbytes_stored(self, key: str) -> int:
        """Bytes the image takes in the store: its compressed chunks and its metadata."""
        self._image(key)
        return int(zarr.open_array(self._zarr_store, path=key, mode="r", zarr_format=3).nbytes_stored())

    def _image(self, key: str) -> ImageMetadata:
        """A completed image's verified metadata; a SegensError if it is missing, incomplete or malformed."""
        image = self._arrays.get(key)
        if image is None:
            check_key(key, self.url)
            document = sync(get_json(self._zarr_store, f"{key}/zarr.json"))
            if document is None or document.get("node_type") != "array" \
                    or (document.get("attributes") or {}).get("complete") is not True:
                raise SegensError(
                    f"{self.url}: image {key!r} is not in the store (or its write did not finish, or its metadata "
                    f"is unreadable); run `ens predict-member` for member {self.member!r} to (re)write it"
                )
            image = ImageMetadata.from_metadata(document, key, f"{self.url}: image {key!r}", self.classes,
                                                self.store_id)
            if len(self._arrays) >= _MAX_OPEN_ARRAYS:
                self._arrays.clear()
            self._arrays[key] = image
        return image



# ---- the metadata walk --------------------------------------------------------------------------------------


async def get_json(zarr_store: zarr.abc.store.Store, key: str) -> dict[str, Any] | None:
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


async def completed_keys(zarr_store: zarr.abc.store.Store, store: str, prefix: str = "") -> list[str]:
    """Keys under ``prefix`` of arrays with the completion marker; metadata fetched concurrently."""
    names = sorted([name async for name in zarr_store.list_dir(prefix)])
    children = [f"{prefix}{name}" for name in names if name != "zarr.json" and not is_temporary(name)]
    documents = await asyncio.gather(*(get_json(zarr_store, f"{child}/zarr.json") for child in children))
    keys: list[str] = []
    groups = []
    for child, document in zip(children, documents):
        if document is None:
            continue
        if document.get("node_type") == "group":
            groups.append(completed_keys(zarr_store, store, f"{child}/"))
        elif (document.get("attributes") or {}).get("complete") is True and valid_metadata(document, child, store):
            keys.append(child)
    for found in await asyncio.gather(*groups):
        keys.extend(found)
    return keys


async def gather(coroutines: list[Any]) -> list[Any]:
    """Run zarr coroutines concurrently in one trip to zarr's event loop."""
    return list(await asyncio.gather(*coroutines))
