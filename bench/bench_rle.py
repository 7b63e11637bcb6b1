"""RLE benchmark: all 29 masks of 2048x2048 synthetic hand X-rays, segens against the straightforward code.

Encode: segens.conventions.rle.encode_stack vs the reference (flatten, pad, diff, join). Decode: segens.conventions.rle.decode_box
(the compact form every segens consumer uses) and decode_stack (full (29, H, W) masks) vs a per-run Python
loop. Outputs are checked identical; medians over images and repeats. Run: .venv/bin/python -m bench.bench_rle
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import numpy as np

from segens.conventions import rle
from segens.conventions.dataset import discover, read_record_mask
from segens.reference import reference_decode, reference_encode
from segens.synth import generate


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def run(size: int = 2048, patients: int = 2, repeats: int = 3) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        generate(folder, n_train_patients=patients, n_test_patients=1, size=size, seed=0)
        stacks = [read_record_mask(record) for record in discover(folder, "train").records]
    warm = rle.encode_stack(stacks[0])  # load the numba kernels outside the timing
    rle.decode_box(warm[0], size, size)
    rle.decode_stack(warm, size, size)
    times: dict[str, list[float]] = {k: [] for k in ("encode_ref", "encode", "decode_ref", "decode_box", "decode_full")}
    for _ in range(repeats):
        for masks in stacks:
            t_ref, expected = timed(lambda m: [reference_encode(c) for c in m], masks)
            t_ours, ours = timed(rle.encode_stack, masks)
            assert ours == expected, "encoder output differs from the reference"
            t_dref, decoded_ref = timed(lambda texts: [reference_decode(t, size, size) for t in texts], expected)
            t_box, boxes = timed(lambda texts: [rle.decode_box(t, size, size) for t in texts], expected)
            t_full, full = timed(rle.decode_stack, expected, size, size)
            assert np.array_equal(full, np.stack(decoded_ref).astype(bool)), "decoder output differs"
            for (box, sub), mask in zip(boxes, masks):
                assert box is None or np.array_equal(sub, mask[box[0] : box[1], box[2] : box[3]])
            for key, value in zip(times, (t_ref, t_ours, t_dref, t_box, t_full)):
                times[key].append(value)
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--patients", type=int, default=2, help="train patients (two images each)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    medians = run(args.size, args.patients, args.repeats)
    print(f"machine: {platform.processor() or platform.machine()}, {platform.python_version()}, numpy {np.__version__}")
    print(f"29 masks of one {args.size}x{args.size} image, median of {args.patients * 2 * args.repeats} runs")
    print(f"{'operation':<38}{'segens':>10}{'baseline':>11}{'ratio':>8}")
    rows = [("encode 29 masks", medians["encode"], medians["encode_ref"]),
            ("decode 29 masks (boxes)", medians["decode_box"], medians["decode_ref"]),
            ("decode 29 masks (full 29xHxW array)", medians["decode_full"], medians["decode_ref"])]
    for name, ours, baseline in rows:
        print(f"{name:<38}{ours * 1e3:>8.1f}ms{baseline * 1e3:>9.1f}ms{baseline / ours:>7.1f}x")


if __name__ == "__main__":
    main()
