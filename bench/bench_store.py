"""Per-image work after the network, on one CPU core: logits at model resolution -> probability store.

ours:     segens.members.decode.logits_to_uint8 (float32, only where a class can be non-zero) + uint8
          store write (blosc, all-zero chunks skipped, boxes).
baseline: float32 bilinear upsampling of all 29 maps, float32 sigmoid, zarr write of float32 with the same
          chunking and zarr's default compression.

    python -m bench.bench_store [--images 5] [--repeats 3] [--size 512] [--out 2048] [--codecs]

``--codecs`` also compares blosc settings on the chunks the store writes (encode/decode seconds, size).
The synthetic logits look like network output: bone-shaped blobs (signed-distance logits, up to +8 inside,
about -0.5 per model pixel outside, floored at -20), smooth noise, a few faint false-positive spots.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from segens.conventions.classes import NUM_CLASSES
from segens.members.decode import logits_to_uint8, reference_logits_to_uint8
from segens.store import create_store


def synthetic_logits(seed: int, size: int = 512) -> torch.Tensor:
    """(29, size, size) float32 logits of a hand: 19 phalanx/metacarpal rods, 8 carpals, radius and ulna."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    logits = np.empty((NUM_CLASSES, size, size), dtype=np.float32)
    for channel, (cy, cx, ay, ax, angle) in enumerate(_bone_layout(rng)):
        cos, sin = np.cos(angle), np.sin(angle)
        u = ((yy - cy) * cos + (xx - cx) * sin) / ay
        v = (-(yy - cy) * sin + (xx - cx) * cos) / ax
        radius = np.sqrt(u * u + v * v)
        logits[channel] = np.maximum((1.0 - radius) * np.minimum(ay, ax) * size * 0.5, -20.0)
    noise = torch.from_numpy(rng.normal(0, 1.0, (NUM_CLASSES, size // 16, size // 16)).astype(np.float32))
    logits += F.interpolate(noise[None], size=(size, size), mode="bicubic", align_corners=False)[0].numpy()
    for _ in range(6):  # faint false positives (p ~ 0.01 .. 0.2) away from the bone
        channel, y, x = rng.integers(NUM_CLASSES), rng.integers(8, size - 8), rng.integers(8, size - 8)
        logits[channel, y - 3:y + 3, x - 3:x + 3] = rng.uniform(-4.5, -1.5)
    return torch.from_numpy(np.clip(logits, -20.0, 20.0))


def _bone_layout(rng: np.random.Generator) -> list[tuple[float, float, float, float, float]]:
    """(centre y, centre x, half-length, half-width, angle) in image fractions for the 29 classes."""
    bones = []
    for finger in range(5):  # 4 bones in fingers 2-5, 3 in the thumb: 19
        base_x = 0.30 + 0.1 * finger + rng.normal(0, 0.01)
        count = 3 if finger == 0 else 4
        for segment in range(count):
            length = 0.045 - 0.006 * segment + rng.normal(0, 0.003)
            cy = 0.55 - segment * 0.09 - (0.05 if finger == 0 else 0)
            bones.append((cy, base_x + segment * (0.02 if finger == 0 else 0.0), length, 0.018, rng.normal(0, 0.08)))
    for carpal in range(8):
        bones.append((0.68 + 0.03 * (carpal // 4), 0.38 + 0.045 * (carpal % 4), 0.026, 0.022, rng.normal(0, 0.3)))
    bones.append((0.86, 0.40, 0.14, 0.05, 0.05))  # radius, reaching the bottom edge
    bones.append((0.86, 0.60, 0.14, 0.032, -0.05))  # ulna
    return bones


def ours(logits: torch.Tensor, store, key: str, size: int) -> None:
    """logits -> uint8 probabilities at the original size + boxes -> store."""
    probs, boxes = logits_to_uint8(logits, size, size)
    store.write_image(key, probs, boxes)


def baseline(logits: torch.Tensor, root: Path, key: str, size: int) -> None:
    """Straightforward float32 upsample + sigmoid of all classes, zarr float32 write (default compression)."""
    probs = torch.sigmoid(F.interpolate(logits[None], size=(size, size), mode="bilinear", align_corners=False)[0])
    array = zarr.create_array(str(root), name=key, shape=probs.shape, dtype="float32", fill_value=0,
                              chunks=(1, min(512, size), min(512, size)), overwrite=True)
    array[:] = probs.numpy()


def _time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _stored_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def bench_pipeline(images: int, repeats: int, size: int, out: int, workdir: Path) -> None:
    batch = [synthetic_logits(seed, size) for seed in range(images)]
    store = create_store(workdir / "ours.zarr", "bench", "smp", "test", {"name": "bench"}, {},
                         images=[f"ID{index:03d}/image{index}_R" for index in range(images)], overwrite=True)
    ours_s, base_s, ours_read, base_read, ours_bytes, base_bytes, nonzero = [], [], [], [], [], [], []
    for index, logits in enumerate(batch):
        key = f"ID{index:03d}/image{index}_R"
        ours_s.append(_time(lambda: ours(logits, store, key, out), repeats))
        base_s.append(_time(lambda: baseline(logits, workdir / "base.zarr", key, out), repeats))
        ours_read.append(_time(lambda: store.read(key), repeats))
        base_read.append(_time(lambda: zarr.open_array(str(workdir / "base.zarr"), path=key, mode="r")[:], repeats))
        ours_bytes.append(store.nbytes_stored(key))
        base_bytes.append(_stored_bytes(workdir / "base.zarr" / key))
        nonzero.append(float((store.read(key) > 0).mean()))
    ours_m, base_m = statistics.median(ours_s), statistics.median(base_s)
    raw = NUM_CLASSES * out * out * 4
    print(f"\n{images} images, logits {NUM_CLASSES}x{size}x{size} -> {NUM_CLASSES}x{out}x{out}, one core, "
          f"median of {repeats} repeats each; {100 * statistics.mean(nonzero):.2f}% of values non-zero")
    print(f"{'':28}{'ours':>12}{'baseline':>12}{'ratio':>9}")
    print(f"{'seconds / image':28}{ours_m:12.3f}{base_m:12.3f}{base_m / ours_m:8.1f}x")
    read_o, read_b = statistics.median(ours_read), statistics.median(base_read)
    print(f"{'read back, seconds / image':28}{read_o:12.3f}{read_b:12.3f}{read_b / read_o:8.1f}x")
    print(f"{'bytes / image':28}{statistics.median(ours_bytes):12,.0f}{statistics.median(base_bytes):12,.0f}"
          f"{statistics.median(base_bytes) / statistics.median(ours_bytes):8.1f}x")
    print(f"{'raw float32 bytes / image':28}{raw:12,}   (ours {raw / statistics.median(ours_bytes):,.0f}x smaller)")


def bench_codecs(images: int, repeats: int, size: int, out: int) -> None:
    """Blosc settings on the non-empty (1, 512, 512) chunks of uint8 maps: the only chunks the store writes."""
    from numcodecs import Blosc

    chunks = []
    for seed in range(images):
        probs = logits_to_uint8(synthetic_logits(seed, size), out, out)[0]
        for plane in probs:
            for row in range(0, out, 512):
                for col in range(0, out, 512):
                    chunk = np.ascontiguousarray(plane[row:row + 512, col:col + 512])
                    if chunk.max():
                        chunks.append(chunk)
    codecs = {"lz4 5 + shuffle": Blosc("lz4", 5, Blosc.SHUFFLE),
              "zstd 3 + bitshuffle": Blosc("zstd", 3, Blosc.BITSHUFFLE),
              "zstd 3 + noshuffle": Blosc("zstd", 3, Blosc.NOSHUFFLE),
              "zstd 1 + noshuffle": Blosc("zstd", 1, Blosc.NOSHUFFLE),
              "lz4 9 + noshuffle": Blosc("lz4", 9, Blosc.NOSHUFFLE)}
    full = NUM_CLASSES * out * out * images
    print(f"\ncodecs on the {len(chunks)} non-empty chunks of {images} uint8 maps (one core, per image)")
    print(f"{'codec':24}{'encode s':>10}{'decode s':>10}{'bytes':>12}{'vs uint8':>10}")
    for name, codec in codecs.items():
        encoded = [codec.encode(chunk) for chunk in chunks]
        encode = _time(lambda: [codec.encode(chunk) for chunk in chunks], repeats) / images
        decode = _time(lambda: [codec.decode(blob) for blob in encoded], repeats) / images
        stored = sum(len(blob) for blob in encoded)
        print(f"{name:24}{encode:10.3f}{decode:10.3f}{stored / images:12,.0f}{full / stored:9.0f}x")


def check_exact(images: int, size: int, out: int) -> None:
    mismatches = 0
    for seed in range(images):
        logits = synthetic_logits(seed, size)
        mismatches += int((logits_to_uint8(logits, out, out)[0] != reference_logits_to_uint8(logits, out, out)).sum())
    print(f"\nexactness: {mismatches} values differ from the float32 reference over {images} images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=512, help="model output side")
    parser.add_argument("--out", type=int, default=2048, help="original image side")
    parser.add_argument("--codecs", action="store_true", help="also compare blosc settings")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core for torch, blosc and zarr
    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="bench_store_"))
    try:
        bench_pipeline(args.images, args.repeats, args.size, args.out, workdir)
        check_exact(min(args.images, 2), args.size, args.out)
        if args.codecs:
            bench_codecs(args.images, args.repeats, args.size, args.out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
