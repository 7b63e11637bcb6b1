"""Training benchmark: optimizer steps per second of the shared training loop's data path against the old one.

Baseline: every step decodes the batch's PNGs, resizes them and fills their label polygons again
(segens.training.data.LabelledImages, what `ens train-member` did before). segens: images decoded, resized and
rasterized once into the uint8 cache (CachedImages), then only augmented and scaled per step; on CUDA also AMP
(bf16, else fp16 + grad scaler) and channels_last. Both run the same model, optimizer, loss and augmentation, side
by side in one process with alternating repeats; each step is timed (data + forward + backward + step), and the
medians are printed with the load average. The one-off decode of the cache is timed separately.

Run: .venv/bin/python -m bench.bench_train [--device cpu|cuda] [--image-size 512] [--input 128] [--steps 6]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch

from segens.conventions.dataset import discover
from segens.members.input_contract import InputContract
from segens.members.kinds.smp import build_model
from segens.members.network import output_of
from segens.synth import generate
from segens.training.augment import Augment
from segens.training.data import CachedImages, LabelledImages, cache_records
from segens.training.losses import WeightedLoss
from segens.training.precision import choose_precision

AUGMENT = {"hflip": 0.5, "brightness_contrast": 0.1}


def _batches(dataset, batch_size: int):
    """An endless stream of shuffled batches (a fresh DataLoader epoch whenever one runs out)."""
    batch_size = min(batch_size, len(dataset))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)
    while True:
        yield from loader


def _step_times(model, optimizer, loss_fn, batches, precision, steps: int) -> list[float]:
    """Seconds of each of ``steps`` full steps: next batch, to device, forward, loss, backward, optimizer step."""
    scaler = precision.grad_scaler()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        images, masks = next(batches)
        images = precision.layout(images.to(precision.device))
        masks = masks.to(precision.device)
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            out = output_of(model(images), None, "bench")
        loss = loss_fn(out.float(), masks)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if precision.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def run(device: str = "cpu", image_size: int = 512, input_size: int = 128, patients: int = 8, batch_size: int = 8,
        steps: int = 6, repeats: int = 3, encoder: str = "mobilenet_v2") -> dict[str, float]:
    torch.manual_seed(0)
    dev = torch.device(device)
    contract = InputContract(size=(input_size, input_size))
    options = {"decoder_channels": [64, 32, 16, 16, 16]}
    with tempfile.TemporaryDirectory() as folder:
        generate(folder, n_train_patients=patients, n_test_patients=1, size=image_size, seed=0)
        records = discover(folder, "train").records
        started = time.perf_counter()
        items = cache_records(records, contract)
        cache_seconds = time.perf_counter() - started
        augment = Augment(AUGMENT)
        paths = {"baseline": (LabelledImages(records, contract, augment), choose_precision(dev, "off", "false")),
                 "segens": (CachedImages(items, contract, augment), choose_precision(dev))}
        runs = {}
        for name, (dataset, precision) in paths.items():
            model = precision.layout(build_model("UnetPlusPlus", encoder, options=options).to(dev).train())
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            runs[name] = (model, optimizer, _batches(dataset, batch_size), precision)
        loss_fn = WeightedLoss({"bce": 0.2, "dice": 1.0}).to(dev)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for name, (model, optimizer, batches, precision) in runs.items():  # warm-up: allocator, kernels, cudnn
            _step_times(model, optimizer, loss_fn, batches, precision, 2)
        for _ in range(repeats):
            for name, (model, optimizer, batches, precision) in runs.items():
                times[name] += _step_times(model, optimizer, loss_fn, batches, precision, steps)
        # the data path alone: one batch's worth of items
        data = {}
        for name, (dataset, _) in paths.items():
            per_batch = []
            for repeat in range(repeats):
                start = time.perf_counter()
                for index in range(batch_size):
                    dataset[(repeat * batch_size + index) % len(dataset)]
                per_batch.append(time.perf_counter() - start)
            data[name] = statistics.median(per_batch)
    result = {"images": len(records), "cache_seconds": cache_seconds}
    for name in runs:
        median = statistics.median(times[name])
        result[f"{name}_step_s"] = median
        result[f"{name}_steps_per_s"] = 1 / median
        result[f"{name}_data_s"] = data[name]
    result["speedup"] = result["baseline_step_s"] / result["segens_step_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--input", type=int, default=128)
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--encoder", default="mobilenet_v2")
    args = parser.parse_args()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}{', ' + gpu if gpu else ''}; load average before: {load}")
    result = run(args.device, args.image_size, args.input, args.patients, args.batch_size, args.steps, args.repeats,
                 args.encoder)
    print(f"UNet++ {args.encoder} (decoder 64-32-16-16-16), input {args.input}, batch {args.batch_size}, "
          f"{result['images']} synthetic images of {args.image_size} px, {args.device}; medians of "
          f"{args.repeats} x {args.steps} steps")
    print("| data path | step (s) | steps/s | data per batch (s) |")
    print("| --- | --- | --- | --- |")
    for name in ("baseline", "segens"):
        print(f"| {name} | {result[f'{name}_step_s']:.3f} | {result[f'{name}_steps_per_s']:.2f} | "
              f"{result[f'{name}_data_s']:.4f} |")
    print(f"speed-up {result['speedup']:.2f}x; the cache is built once per fold in {result['cache_seconds']:.2f} s "
          f"({result['images']} images)")


if __name__ == "__main__":
    main()
