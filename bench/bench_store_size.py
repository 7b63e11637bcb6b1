"""Store size of a trained member's real output at 2048x2048: segens' uint8 store against float32.

Predicts a few synthetic 2048x2048 test images with a trained member (its spec's checkpoints) into a store and
reports bytes per image against raw float32 (29 x 2048 x 2048 x 4 bytes) and against float32 in zarr with its
default compression. Run after `ens demo` (or any training):
    .venv/bin/python -m bench.bench_store_size --spec demo/members/unetpp-vgg19.yaml
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import zarr

from segens.conventions.dataset import discover, read_image
from segens.members.registry import factory
from segens.members.spec import load_spec
from segens.store import create_store, quantize
from segens.synth import generate


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(spec_path: str, images: int = 3, size: int = 2048) -> dict[str, float]:
    spec = load_spec(spec_path)
    member = factory(spec.kind)(spec, trust_pickle=True)
    folds = sorted(spec.checkpoints)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        generate(folder / "data", n_train_patients=1, n_test_patients=max(1, (images + 1) // 2), size=size, seed=11)
        records = discover(folder / "data", "test").records[:images]
        store = create_store(folder / "ours.zarr", spec.name, spec.kind, "test", spec.to_dict(), {},
                             images=[record.key for record in records])
        baseline = zarr.open_group(str(folder / "float32.zarr"), mode="w")
        ours, theirs, nonzero = [], [], []
        for record in records:
            (probabilities,) = member.predict([read_image(record.image_path)], folds)
            values = quantize(probabilities)
            store.write_image(record.key, values)
            ours.append(store.nbytes_stored(record.key))
            name = record.key.replace("/", "__")
            baseline.create_array(name, data=probabilities, chunks=(1, 512, 512))
            theirs.append(folder_bytes(folder / "float32.zarr" / name))
            nonzero.append(float(np.count_nonzero(values)) / values.size)
    raw = 29 * size * size * 4
    return {"ours": statistics.median(ours), "float32_zarr": statistics.median(theirs), "raw_float32": raw,
            "nonzero": statistics.median(nonzero)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    figures = run(args.spec, args.images, args.size)
    print(f"member {args.spec}, {args.images} images of {args.size}x{args.size}, "
          f"{figures['nonzero']:.2%} of uint8 values non-zero")
    print(f"segens store: {figures['ours'] / 1e6:.2f} MB per image; raw float32 {figures['raw_float32'] / 1e6:.1f} MB "
          f"({figures['raw_float32'] / figures['ours']:.0f}x smaller); float32 zarr default compression "
          f"{figures['float32_zarr'] / 1e6:.1f} MB ({figures['float32_zarr'] / figures['ours']:.0f}x smaller)")


if __name__ == "__main__":
    main()
