"""segens against the ensembling its users would otherwise pick, nnU-Net's and MONAI's, on the same maps.

Maps: the bench fixture's 3 members on 20 training images at 2048 (bone-shaped maps from synthetic hand labels;
bench/fixture.py), written the way a team keeps them for nnU-Net: per member and image one ``<case>.npz``
(``np.savez_compressed``, array ``probabilities``, shape (29, 1, H, W), float16 as cached by teams; nnU-Net's own
export writes float32, measured for disk on one file) and the member's ``dataset.json`` (one region per bone).
Values: inside a bone's margin the fixture's level v as a float anywhere in [v - 1/2, v + 1/2) / 255 (so a
member's map is a float map, not a copy of the store); elsewhere what a sigmoid network leaves, the sigmoid of a
smooth logit field around -9 (1e-4 to 6e-4, never exactly 0).

  (a) nnU-Net:  ``nnunetv2.ensembling.ensemble.average_probabilities(files)`` then ``> 0.5`` per channel.
  (b) MONAI:    ``MeanEnsemble()`` on the members' tensors (read from the same files), then
                ``AsDiscrete(threshold=0.5)``; ``VoteEnsemble()`` on each member's ``AsDiscrete(threshold=0.5)``.
  (c) segens:   the three folders imported once with ``ens predict-member`` as members of kind ``nnunet`` (a one-off,
                timed apart), then ``ens combine --strategy soft`` (and ``hard`` against MONAI's vote).
Every side writes the competition's CSV; the peers' masks are RLE-encoded with segens' own encoder (the fastest
here, so the peers' figure is their ensembling, not a slow RLE loop). Checks: the masks are identical to segens'
wherever the members' float mean is more than half a quantization level (1/510) from 0.5; the pixels inside that
band, where the float rule and the stored levels' rule may differ, are counted. Seconds per image: medians of
--repeats alternating runs over all images; peak RSS of each side in a fresh process on --rss-images images.

    .venv/bin/python -m bench.peers [--images 20] [--repeats 2] [--rss-images 4] [--workdir DIR]

Needs the ``bench`` extra (``pip install -e ".[bench]"``): nnunetv2 and monai, imported here only.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.common import (DEFAULT_WORKDIR, load_average, machine_line, median, print_table, row, run_python,
                          stores_parser, timed)
from bench.fixture import BenchData, bench_data
from segens.conventions.classes import CLASSES, NUM_CLASSES
from segens.conventions.rle import decode_stack, encode_stack
from segens.conventions.submission import image_rows, read_submission, write_submission
from segens.store import open_store

BAND = 0.5 / 255  # half a quantization level around 0.5: where float and stored-level rules may disagree
NPZ_VERSION = 1


def npz_folders(data: BenchData, workdir: Path) -> list[Path]:
    """One folder of nnU-Net-style predictions per member (cached under ``workdir``)."""
    base = workdir / f"peers-{data.size}-{len(data.records)}"
    folders = [base / member for member in data.members]
    done = base / "done.json"
    if done.is_file() and json.loads(done.read_text()) == {"version": NPZ_VERSION, "source": str(data.root)}:
        return folders
    for member, (folder, store_path) in enumerate(zip(folders, data.stores)):
        folder.mkdir(parents=True, exist_ok=True)
        labels = {"background": 0, **{name: [index + 1, 100 + index] for index, name in enumerate(CLASSES)}}
        (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "X-ray"}, "labels": labels,
                                                         "regions_class_order": list(range(1, NUM_CLASSES + 1)),
                                                         "file_ending": ".png"}))
        store = open_store(store_path)
        for index, record in enumerate(data.records):
            maps = float_maps(store.read(record.key), np.random.default_rng([member, index]))
            np.savez_compressed(folder / f"{Path(record.name).stem}.npz", probabilities=maps[:, None])
    done.write_text(json.dumps({"version": NPZ_VERSION, "source": str(data.root)}))
    return folders


def float_maps(levels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(29, H, W) uint8 levels -> float16 maps a network could have written that quantize back to ``levels``."""
    classes, height, width = levels.shape
    coarse = rng.normal(-9.0, 0.6, (classes, 16, 16)).astype(np.float32)
    logits = np.stack([cv2.resize(plane, (width, height), interpolation=cv2.INTER_CUBIC) for plane in coarse])
    maps = (1 / (1 + np.exp(-logits))).astype(np.float16)
    bone = levels > 0
    jitter = rng.random(int(bone.sum()), dtype=np.float32) - np.float32(0.5)
    maps[bone] = np.clip((levels[bone].astype(np.float32) + jitter) / 255, 0, 1).astype(np.float16)
    return maps


# ---- the four pipelines, each image to a CSV ---------------------------------------------------------------


def files_of(folders: Sequence[Path], record) -> list[str]:
    return [str(folder / f"{Path(record.name).stem}.npz") for folder in folders]


def nnunet_masks(files: Sequence[str]) -> np.ndarray:
    from nnunetv2.ensembling.ensemble import average_probabilities

    return average_probabilities(list(files))[:, 0] > 0.5


def monai_tensors(files: Sequence[str]) -> list:
    import torch

    return [torch.from_numpy(np.load(path)["probabilities"][:, 0].astype(np.float32)) for path in files]


def monai_mean_masks(files: Sequence[str]) -> np.ndarray:
    from monai.transforms import AsDiscrete, MeanEnsemble

    return AsDiscrete(threshold=0.5)(MeanEnsemble()(monai_tensors(files))).numpy().astype(bool)


def monai_vote_masks(files: Sequence[str]) -> np.ndarray:
    from monai.transforms import AsDiscrete, VoteEnsemble

    binary = AsDiscrete(threshold=0.5)
    return VoteEnsemble()([binary(tensor) for tensor in monai_tensors(files)]).numpy().astype(bool)


PEERS: dict[str, Callable[[Sequence[str]], np.ndarray]] = {
    "nnU-Net average_probabilities": nnunet_masks, "MONAI MeanEnsemble": monai_mean_masks,
    "MONAI VoteEnsemble": monai_vote_masks}
SEGENS_RULE = {"nnU-Net average_probabilities": "soft", "MONAI MeanEnsemble": "soft", "MONAI VoteEnsemble": "hard"}


def peer_csv(masks_of: Callable, data: BenchData, folders: Sequence[Path], out: Path) -> None:
    rows = []
    for record in data.records:
        rows += image_rows(record.name, encode_stack(masks_of(files_of(folders, record))))
    write_submission(out, rows)


def segens_csv(stores: Sequence[Path], strategy: str, out: Path) -> None:
    from segens.ensemble.combine import combine

    combine([str(path) for path in stores], out, strategy=strategy, progress=False, overwrite=True)


def import_stores(data: BenchData, folders: Sequence[Path], target: Path) -> list[Path]:
    """``ens predict-member`` of each member folder as kind nnunet; the stores."""
    import yaml

    from segens.members.predict import predict_member

    stores = []
    for folder in folders:
        spec = target / f"{folder.name}.yaml"
        spec.write_text(yaml.safe_dump({"version": 2, "name": folder.name, "kind": "nnunet",
                                        "model": {"oof": str(folder)}}))
        stores.append(target / f"{folder.name}.oof.zarr")
        predict_member(spec, "oof", data.root, stores[-1], progress=False, overwrite=True)
    return stores


# ---- checks ---------------------------------------------------------------------------------------------------


def disagreement(peer: Path, ours: Path, data: BenchData, folders: Sequence[Path]) -> tuple[int, int, int]:
    """(pixels where the two CSVs' masks differ, of those outside the band around 0.5 of the members' float
    mean, pixels in the band); the CSVs are compared byte for byte first."""
    if peer.read_bytes() == ours.read_bytes():
        return 0, 0, band_pixels(data, folders)
    mine, theirs = read_submission(ours), read_submission(peer)
    differ = outside = 0
    for record in data.records:
        height, width = data.size, data.size
        difference = decode_stack(mine.rles[record.name], height, width) != decode_stack(
            theirs.rles[record.name], height, width)
        mean = np.mean([np.load(f)["probabilities"][:, 0].astype(np.float32) for f in files_of(folders, record)], 0)
        differ += int(difference.sum())
        outside += int((difference & (np.abs(mean - 0.5) > BAND)).sum())
    return differ, outside, band_pixels(data, folders)


def band_pixels(data: BenchData, folders: Sequence[Path]) -> int:
    return sum(int((np.abs(np.mean([np.load(f)["probabilities"][:, 0].astype(np.float32)
                                    for f in files_of(folders, record)], 0) - 0.5) <= BAND).sum())
               for record in data.records)


def disk_per_image(data: BenchData, folders: Sequence[Path], stores: Sequence[Path]) -> dict[str, float]:
    """Mean bytes per image and member: float16 npz, the store; float32 npz (nnU-Net's own dtype) of one image."""
    npz = [path.stat().st_size for folder in folders for path in folder.glob("*.npz")]
    store = [sum(path.stat().st_size for path in (Path(store) / record.key).rglob("*") if path.is_file())
             for store in stores for record in data.records]
    first = np.load(files_of(folders, data.records[0])[0])["probabilities"].astype(np.float32)
    with tempfile.TemporaryDirectory() as name:
        np.savez_compressed(Path(name) / "f32.npz", probabilities=first)
        float32 = (Path(name) / "f32.npz").stat().st_size
    return {"npz float16": float(np.mean(npz)), "npz float32": float(float32), "store": float(np.mean(store))}


def child_peak(code: str) -> float:
    return run_python(code + "\nimport json\nprint(json.dumps({}))")["peak_rss_mb"]


def peak_rss(workdir: Path, data: BenchData, folders: Sequence[Path], stores: Sequence[Path], images: int,
             folder: Path) -> dict:
    """Each side's peak RSS in a fresh interpreter over ``images`` images."""
    setup = (f"from pathlib import Path\nfrom bench.peers import *\nfrom bench.fixture import BenchData, bench_data\n"
             f"data = bench_data(Path({str(workdir)!r}), {len(data.records)}, {data.size}, log=lambda *_: None)\n"
             f"folders = [Path(p) for p in {[str(f) for f in folders]!r}]\n"
             f"data = BenchData(data.root, data.stores, data.records[:{images}], data.size, data.members)\n")
    peaks = {name: child_peak(setup + f"peer_csv(PEERS[{name!r}], data, folders, Path({str(folder / 'rss.csv')!r}))")
             for name in PEERS}
    keys = [record.key for record in data.records[:images]]
    sub = [str(path) for path in subset_stores(stores, keys, folder / "rss")]
    peaks["segens"] = child_peak(setup + f"segens_csv({sub!r}, 'soft', Path({str(folder / 'rss.csv')!r}))")
    return peaks


def subset_stores(stores: Sequence[Path], keys: Sequence[str], folder: Path) -> list[Path]:
    """The same stores limited to ``keys`` (copies whose planned image list is those keys)."""
    from bench.fixture import _replicate

    out = []
    for store in stores:
        target = folder / store.name
        if not target.exists():
            _replicate(store, target, list(keys), len(keys))
        out.append(target)
    return out


# ---- the run ------------------------------------------------------------------------------------------------------


def run(workdir: Path = DEFAULT_WORKDIR, images: int = 20, repeats: int = 2, rss_images: int = 4, size: int = 2048,
        verbose: bool = True) -> dict[str, Any]:
    say = print if verbose else (lambda *_: None)
    data = bench_data(workdir, images, size, log=say)
    folders = npz_folders(data, workdir)
    say(f"{images} images x {len(folders)} members at {size}x{size}x29; load average {load_average()}")
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as name:
        folder = Path(name)
        import_seconds, stores = timed(import_stores, data, folders, folder)
        times: dict[str, list[float]] = {key: [] for key in (*PEERS, "soft", "hard")}
        for _ in range(repeats):
            for peer, masks_of in PEERS.items():
                times[peer].append(timed(peer_csv, masks_of, data, folders, folder / f"{peer}.csv")[0] / images)
            for strategy in ("soft", "hard"):
                times[strategy].append(timed(segens_csv, stores, strategy, folder / f"{strategy}.csv")[0] / images)
        checks = {peer: disagreement(folder / f"{peer}.csv", folder / f"{SEGENS_RULE[peer]}.csv", data, folders)
                  for peer in PEERS}
        disk = disk_per_image(data, folders, stores)
        peaks = peak_rss(workdir, data, folders, stores, rss_images, folder) if rss_images else {}
    say(f"load average after {load_average()}")
    return {"images": images, "size": size, "repeats": repeats, "import_seconds_per_image": import_seconds / images,
            "seconds_per_image": {key: median(values) for key, values in times.items()}, "checks": checks,
            "disk": disk, "peak_rss_mb": peaks, "rss_images": rss_images}


def table(result: dict[str, Any]) -> list[dict[str, Any]]:
    seconds, peaks, disk = result["seconds_per_image"], result["peak_rss_mb"], result["disk"]
    rows = []
    for peer, strategy in SEGENS_RULE.items():
        differ, outside, band = result["checks"][peer]
        same = "identical masks" if differ == 0 else f"{differ} px differ ({outside} outside the band of {band})"
        rows.append(row(f"{peer} vs combine {strategy}, per image", seconds[strategy], seconds[peer], "s", same,
                        peaks.get(peer)))
    rows.append(row("segens import (predict-member, once), per image", result["import_seconds_per_image"], None, "s",
                    f"combine peak RSS {peaks['segens']:.0f} MiB" if "segens" in peaks else ""))
    rows.append(row("disk per image and member: store vs npz float16", disk["store"], disk["npz float16"], "B",
                    f"nnU-Net's own float32 npz: {disk['npz float32']:,.0f} B "
                    f"({disk['npz float32'] / disk['store']:.0f}x the store)"))
    return rows


def main() -> None:
    parser = stores_parser(__doc__, images=20, repeats=2)
    parser.add_argument("--rss-images", type=int, default=4)
    args = parser.parse_args()
    result = run(args.workdir, args.images, args.repeats, args.rss_images, args.size)
    print(machine_line())
    print_table(table(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
