"""The probability store's format (version 3): names, group attributes, identity, keys. One zarr v3 group per
member and split; the only writer and reader of the format is segens.store.

```
<member>.<split>.zarr/            group attributes: format, version (3), role (probabilities, or masks for an
  zarr.json                         ensemble's binary masks), member, kind, split, fold (null: the checkpoints'
                                    mean; a number: that fold's model alone), classes, quantization, spec, input
                                    (the member's input contract, or null), checkpoints {fold: {path, sha256}},
                                    images (the planned image keys, sorted), digest (sha256 of all the others)
  ID001/                          one nested group per directory of the image key
    image1661130828152_R/         one array per image: (29, H, W) uint8, p = v / 255, chunks (1, 512, 512),
      zarr.json                     blosc; all-zero chunks are never written; attributes key (the image's own
      c/<class>/<row>/<col>         key), store (its store's identity), height, width, boxes (per class [row0,
                                    row1, col0, col1] half-open, or null), chunks (per class the [row, col, crc32]
                                    of every chunk written), digest (crc32 of all of these) and "complete": true,
                                    written last
```
An image's metadata names its own key and its store's identity, inside its digest: an image folder moved, copied
or swapped within a store, or copied from another store, is an error naming both; so are root attributes edited
by hand (a planned image removed, say), which must match their digest.
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

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from numcodecs import Blosc
from zarr.codecs import BloscCodec

from segens.conventions.classes import CLASSES
from segens.errors import SegensError
from segens.store.quantize import QUANTIZATION

FORMAT = "segens-probability-store"
VERSION = 3
ROLES = ("probabilities", "masks")
SPLITS = ("oof", "test")
CHUNK_SIDE = 512
COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle", typesize=1)
BLOSC = Blosc(cname="zstd", clevel=3, shuffle=Blosc.NOSHUFFLE)  # decoding reads the codec from each frame
"""Measured on the non-empty chunks of bone-like 29x2048x2048 maps (bench/bench_store.py --codecs, one core):
230x smaller than raw uint8, against 135x for lz4 + shuffle and 183x for zstd 3 + bitshuffle (bitshuffle hurts
smooth 8-bit maps); 0.03 s/image to encode and 0.01 s/image to decode, small next to the rest of the work."""

# All-zero chunks are never written: write_image skips them itself (a uint8 max per chunk) and encodes the others.


def store_attributes(member_name: str, kind: str, split: str, spec: dict[str, Any],
                     checkpoints: dict[int, dict[str, Any]], images: Sequence[str], url: str,
                     role: str = "probabilities", fold: int | None = None) -> dict[str, Any]:
    """The group attributes with their digest, as JSON round-trips them (so a comparison with a stored copy is
    exact)."""
    folds = {}
    for number, checkpoint in sorted(checkpoints.items()):
        if "path" not in checkpoint or "sha256" not in checkpoint:
            raise SegensError(f"member {member_name!r}: checkpoint of fold {number} needs 'path' and 'sha256'")
        folds[str(int(number))] = {"path": str(checkpoint["path"]), "sha256": str(checkpoint["sha256"])}
    if isinstance(images, str):
        raise SegensError(f"{url}: images must be a list of image keys, not one string")
    planned = sorted(images)
    for key in planned:
        check_key(key, url)
    if len(set(planned)) != len(planned):
        repeated = next(key for key, after in zip(planned, planned[1:]) if key == after)
        raise SegensError(f"{url}: image {repeated!r} is planned twice; each image key once")
    if role not in ROLES:
        raise SegensError(f"{url}: role must be one of {', '.join(ROLES)}, got {role!r}")
    if fold is not None and str(int(fold)) not in folds:
        raise SegensError(f"{url}: a store of fold {fold}'s model alone needs that fold's checkpoint")
    contract = spec.get("input") if isinstance(spec, dict) else None
    attributes = {"format": FORMAT, "version": VERSION, "role": role, "member": member_name, "kind": kind,
                  "split": split, "fold": None if fold is None else int(fold), "classes": list(CLASSES),
                  "quantization": QUANTIZATION, "spec": spec, "input": contract, "checkpoints": folds, "images": planned}
    try:
        attributes = json.loads(json.dumps(attributes, default=str))
    except (TypeError, ValueError) as exc:
        raise SegensError(f"member {member_name!r}: the spec cannot be stored as JSON ({exc})") from None
    return {**attributes, "digest": attributes_digest(attributes)}


def attributes_digest(attributes: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of a store's group attributes, their own digest left out."""
    content = {name: value for name, value in attributes.items() if name != "digest"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def store_id(attributes: dict[str, Any]) -> str:
    """A store's identity as its images record it: sha256 (hex, 16 digits) of ``identity``."""
    return hashlib.sha256(json.dumps(identity(attributes), sort_keys=True, default=str).encode()).hexdigest()[:16]


def identity(attributes: dict[str, Any]) -> dict[str, Any]:
    """What decides a store's content: everything but checkpoint paths (a moved checkpoint is the same)."""
    spec = {k: v for k, v in (attributes.get("spec") or {}).items() if k not in ("checkpoints", "path")}
    hashes = {fold: c.get("sha256") for fold, c in (attributes.get("checkpoints") or {}).items()}
    return {"version": attributes.get("version"), "role": attributes.get("role"), "member": attributes.get("member"),
            "kind": attributes.get("kind"), "split": attributes.get("split"), "fold": attributes.get("fold"),
            "classes": attributes.get("classes"),
            "quantization": attributes.get("quantization"), "spec": spec, "input": attributes.get("input"),
            "checkpoint sha256": hashes, "planned images": attributes.get("images")}


def identity_differences(existing: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    old, new = identity(existing), identity(wanted)
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


def check_format(attributes: dict[str, Any], url: str) -> None:
    """A SegensError naming ``url`` unless the group attributes are this format's, complete and well-typed."""
    if attributes.get("format") != FORMAT:
        raise SegensError(f"{url}: not a segens probability store (a zarr group without the store attributes)")
    if attributes.get("version") != VERSION:
        raise SegensError(
            f"{url}: probability store version {attributes.get('version')!r} is not known to this segens "
            f"(knows {VERSION}); rewrite it with `ens predict-member --overwrite` or use a matching segens"
        )
    if attributes.get("digest") != attributes_digest(attributes):
        raise SegensError(f"{url}: the store's root attributes (member, checkpoints, planned images, ...) do not match "
                          "their digest: they were edited or damaged; restore the store or rewrite it with "
                          "`ens predict-member --overwrite`")
    if attributes.get("quantization") != QUANTIZATION or attributes.get("classes") != list(CLASSES):
        raise SegensError(f"{url}: store has another quantization or class list than this segens; rewrite it")
    for name, kind in (("member", str), ("kind", str), ("split", str), ("spec", dict), ("checkpoints", dict),
                       ("images", list)):
        if not isinstance(attributes.get(name), kind):
            raise SegensError(f"{url}: the store's attribute {name!r} is missing or malformed; rewrite the store "
                              "with `ens predict-member --overwrite`")
    fold = attributes.get("fold")
    if attributes.get("role") not in ROLES or not (fold is None or (isinstance(fold, int) and str(fold) in
                                                                     attributes["checkpoints"])):
        raise SegensError(f"{url}: the store's role or fold is malformed; rewrite the store with "
                          "`ens predict-member --overwrite`")
    if attributes["split"] not in SPLITS or not all(isinstance(key, str) for key in attributes["images"]) \
            or not all(isinstance(c, dict) and "sha256" in c for c in attributes["checkpoints"].values()):
        raise SegensError(f"{url}: the store's split, planned images or checkpoints are malformed; rewrite the "
                          "store with `ens predict-member --overwrite`")
    if not all(isinstance(fold, str) and fold.isdecimal() for fold in attributes["checkpoints"]):
        raise SegensError(f"{url}: the store's checkpoints are not keyed by fold numbers; rewrite the store with "
                          "`ens predict-member --overwrite`")
    for key in attributes["images"]:
        check_key(key, url)


def repair_advice(key: str, member: str | None = None) -> str:
    """What to do about a damaged image: resuming rewrites images that are missing."""
    who = f" for member {member!r}" if member else ""
    return (f"remove the image's folder {key!r} from the store and run `ens predict-member`{who} again (it rewrites "
            "missing images), or restore the store")


def is_temporary(name: str) -> bool:
    return name.endswith(".partial")  # zarr's LocalStore writes to NAME.<uuid>.partial, then renames


def check_key(key: str, url: str) -> None:
    """A key is an image relpath without extension: non-empty '/'-separated parts, none special."""
    parts = key.split("/") if isinstance(key, str) else [""]
    if any(part in ("", ".", "..", "zarr.json") or "\\" in part or is_temporary(part) for part in parts):
        raise SegensError(f"{url}: {key!r} is not a valid image key (a relative path without extension, "
                          "like 'ID001/image1661130828152_R')")
