"""predict-member on a GPU: how close end-to-end prediction gets to the network's own speed.

    python -m bench.gpu [--device cuda] [--images 8] [--channels-last] [--cudnn-benchmark] [--workdir DIR]
    python -m bench.gpu --device cpu --tiny        # seconds; runs in the test suite so the script never rots

Makes a few synthetic test images (2048 px; 64 px with ``--tiny``), builds the example members (UNet++ VGG19
and UNet++ HRNet-W64 at input 1024, YOLOv8n-seg at 1024, each with hflip and 3 fold checkpoints; ``--tiny``: a
resnet18 Unet and a YOLOv8n-seg at 64 px, no warm-up runs) with random weights whose head is sharpened (smp: weights
x 8, bias -10: about 4% of the uint8 values non-zero, between a trained network's 1% and a briefly trained one's
22%; YOLO: class bias +2, so that every image has max_det = 300 instances, the slow case of soft masks), and
times per member:

(a) forward only: every fold x TTA pass on inputs already on the device (the limit; YOLO: the fused network on
    the letterboxed input, without NMS and masks);
(b) ``ens predict-member --split test`` end to end (decode, network, post-processing, compression, writes),
    per image, after a warm-up run; (b)/(a) is the overhead factor (goal on a GPU: <= 1.5);
(b0) the same with the serial path (``pipelined=False``: no overlap of decoding and writing);
(c) training images per second (AdamW, BCE on random masks) in float32 and with AMP (autocast; GradScaler on
    CUDA, bfloat16 on CPU), for the smp members;
and, on a GPU, how far the device post-processing lands from the CPU's exact path on the same logits (maximum
uint8 difference and the fraction of values that differ; smp members).

It prints one table with the device's name. ``--channels-last`` / ``--cudnn-benchmark`` set
SEGENS_CHANNELS_LAST / SEGENS_CUDNN_BENCHMARK (CUDA only) so that both can be measured on and off.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from segens.conventions.dataset import discover
from segens.members.predict import predict_member
from segens.members.registry import factory
from segens.members.spec import load_spec, sha256_of
from segens.synth import generate


@dataclass(frozen=True)
class MemberSetup:
    """A benchmarked member: name, architecture (smp class, or the ultralytics model YAML) and encoder, input
    size, decoder options, kind."""

    name: str
    architecture: str
    encoder: str
    input_size: int
    options: dict
    kind: str = "smp"


FULL = [MemberSetup("unetpp-vgg19", "UnetPlusPlus", "vgg19", 1024, {}),
        MemberSetup("unetpp-hrnet64", "UnetPlusPlus", "tu-hrnet_w64", 1024, {}),
        MemberSetup("yolov8n-seg", "yolov8n-seg.yaml", "", 1024, {}, kind="yolo")]
TINY = [MemberSetup("tiny-unet-r18", "Unet", "resnet18", 64, {"decoder_channels": [32, 16, 16, 8, 8]}),
        MemberSetup("tiny-yolov8n-seg", "yolov8n-seg.yaml", "", 64, {}, kind="yolo")]
FOLDS = 3


def build_member(setup: MemberSetup, folder: Path) -> Path:
    """Three fold checkpoints (sharpened random weights) and the member's spec; the spec's path."""
    if setup.kind == "yolo":
        return build_yolo_member(setup, folder)
    import segmentation_models_pytorch as smp

    checkpoints = {}
    for fold in range(FOLDS):
        torch.manual_seed(fold)
        model = getattr(smp, setup.architecture)(encoder_name=setup.encoder, encoder_weights=None, classes=29,
                                                 **setup.options)
        head = model.segmentation_head[0]
        with torch.no_grad():  # confident, mostly negative logits: boxes are small, as for a trained network
            head.weight.mul_(8.0)
            head.bias.fill_(-10.0)
        path = folder / f"{setup.name}-fold{fold}.pt"
        torch.save(model.state_dict(), path)
        checkpoints[fold] = {"path": path.name, "sha256": sha256_of(path)}
    spec = folder / f"{setup.name}.yaml"
    spec.write_text(yaml.safe_dump({
        "name": setup.name, "kind": "smp", "input_size": setup.input_size, "tta": ["hflip"],
        "model": {"architecture": setup.architecture, "encoder": setup.encoder, "options": setup.options},
        "checkpoints": checkpoints}))
    return spec


def build_yolo_member(setup: MemberSetup, folder: Path) -> Path:
    """Three ultralytics checkpoints of a 29-class segmentation model built from its YAML (random weights, class
    bias +2: every anchor is a confident detection, so NMS keeps max_det instances) and the member's spec."""
    from ultralytics.nn.tasks import SegmentationModel

    from segens.conventions.classes import CLASSES

    checkpoints = {}
    for fold in range(FOLDS):
        torch.manual_seed(fold)
        model = SegmentationModel(setup.architecture, nc=len(CLASSES), verbose=False)
        model.names = dict(enumerate(CLASSES))
        with torch.no_grad():
            for branch in model.model[-1].cv3:
                branch[-1].bias.fill_(2.0)
        path = folder / f"{setup.name}-fold{fold}.pt"
        torch.save({"model": model, "train_args": {"task": "segment", "imgsz": setup.input_size}}, path)
        checkpoints[fold] = {"path": path.name, "sha256": sha256_of(path)}
    spec = folder / f"{setup.name}.yaml"
    spec.write_text(yaml.safe_dump({
        "name": setup.name, "kind": "yolo", "input_size": setup.input_size, "tta": ["hflip"],
        "model": {"config": setup.architecture, "conf": 0.25}, "checkpoints": checkpoints}))
    return spec


def yolo_forward_seconds(spec_path: Path, root: Path, device: str) -> float:
    """(a) for a YOLO member: every fold x pass of the fused network on letterboxed inputs on the device."""
    import cv2

    spec = load_spec(spec_path)
    member = factory(spec.kind)(spec, device=device, trust_pickle=True)
    records = discover(root, "test", require_labels=False).records
    side = member.imgsz
    batch = torch.stack([torch.from_numpy(cv2.resize(cv2.imread(str(record.image_path)), (side, side),
                                                     interpolation=cv2.INTER_LINEAR)).permute(2, 0, 1)
                         for record in records]).float().div(255).to(device)
    networks = [member._model(spec.checkpoint(fold).path).model.fuse().to(device).eval() for fold in range(FOLDS)]

    def run() -> None:
        with torch.no_grad():
            for network in networks:
                for tta in member.passes:
                    network(batch.flip(-1) if tta.hflip else batch)

    run()
    synchronize(torch.device(device))
    started = time.perf_counter()
    run()
    synchronize(torch.device(device))
    return (time.perf_counter() - started) / len(records)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_seconds(spec_path: Path, root: Path, device: str) -> tuple[float, object, list]:
    """(a): seconds per image of every fold x pass forward on device-resident inputs; the member and images."""
    spec = load_spec(spec_path)
    member = factory(spec.kind)(spec, device=device)
    records = discover(root, "test", require_labels=False).records
    images = member.read_batch(records)
    batch_size = int(spec.train.get("predict_batch_size", 4))
    batches = [spec.input.batch(images[start:start + batch_size]).to(member.device)
               for start in range(0, len(images), batch_size)]
    models = [member.model_for(fold) for fold in range(FOLDS)]

    def run() -> None:
        with torch.no_grad(), torch.autocast(member.device.type, enabled=member.device.type == "cuda"):
            for batch in batches:
                for model in models:
                    for tta in member.passes:
                        model(batch.flip(-1) if tta.hflip else batch)

    run()  # warm-up (cuDNN autotuning, allocator)
    synchronize(member.device)
    started = time.perf_counter()
    run()
    synchronize(member.device)
    return (time.perf_counter() - started) / len(images), member, images


def end_to_end_seconds(spec_path: Path, root: Path, work: Path, device: str, pipelined: bool,
                       warm_up: bool = True) -> float:
    """(b): seconds per image of predict-member --split test into a fresh store (after a warm-up run); the
    member's checkpoints are loaded inside the timed run, as in real use."""
    seconds = []
    for run in range(2 if warm_up else 1):
        out = work / f"{spec_path.stem}-{'p' if pipelined else 's'}{run}.zarr"
        started = time.perf_counter()
        summary = predict_member(spec_path, "test", root, out, device=device, progress=False, pipelined=pipelined,
                                 trust_pickle=True)
        synchronize(torch.device(device))
        seconds.append((time.perf_counter() - started) / summary.written)
        shutil.rmtree(out)
    return seconds[-1]


def device_agreement(member, images: list) -> str:
    """On a GPU: the device post-processing vs the CPU's exact path on the same network outputs."""
    if member.device.type == "cpu":
        return "exact (CPU path)"
    folds = tuple(range(FOLDS))
    member.postprocess_on_device = False
    cpu = member.predict_uint8(images[:2], folds)
    member.postprocess_on_device = True
    gpu = member.predict_uint8(images[:2], folds)
    diffs = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for (a, _), (b, _) in zip(cpu, gpu)]
    worst = max(int(d.max()) for d in diffs)
    fraction = sum(int((d > 0).sum()) for d in diffs) / sum(d.size for d in diffs)
    return f"max {worst} level, {fraction:.2e} of values"


def training_images_per_second(setup: MemberSetup, device: torch.device, amp: bool, steps: int,
                               batch: int) -> float:
    """(c): optimizer steps on random images and masks at the input size; images per second after a warm-up."""
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    model = getattr(smp, setup.architecture)(encoder_name=setup.encoder, encoder_weights=None, classes=29,
                                             in_channels=1, **setup.options).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and device.type == "cuda")
    images = torch.rand(batch, 1, setup.input_size, setup.input_size, device=device)
    masks = (torch.rand(batch, 29, setup.input_size, setup.input_size, device=device) > 0.9).float()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images).float(), masks)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * batch / (time.perf_counter() - started)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="64 px images, resnet18 members: seconds on a CPU")
    parser.add_argument("--images", type=int, default=None, help="test images (default 8; 2 with --tiny)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--cudnn-benchmark", action="store_true")
    parser.add_argument("--no-training", action="store_true", help="skip (c)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder, removed after")
    args = parser.parse_args(argv)
    if args.channels_last:
        os.environ["SEGENS_CHANNELS_LAST"] = "1"
    if args.cudnn_benchmark:
        os.environ["SEGENS_CUDNN_BENCHMARK"] = "1"
    device = torch.device(args.device)
    images = args.images or (2 if args.tiny else 8)
    setups = TINY if args.tiny else FULL
    size = 64 if args.tiny else 2048
    work = args.workdir or Path(tempfile.mkdtemp(prefix="segens-bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        root = work / "data"
        if not root.exists():
            generate(root, n_train_patients=1, n_test_patients=-(-images // 2), size=size, seed=0)
        rows = []
        for setup in setups:
            spec_path = build_member(setup, work)
            if setup.kind == "yolo":
                forward, agreement = yolo_forward_seconds(spec_path, root, args.device), "n/a (ultralytics path)"
            else:
                forward, member, decoded = forward_seconds(spec_path, root, args.device)
                agreement = device_agreement(member, decoded)
                del member, decoded
            pipelined = end_to_end_seconds(spec_path, root, work, args.device, True, warm_up=not args.tiny)
            serial = end_to_end_seconds(spec_path, root, work, args.device, False, warm_up=not args.tiny)
            if args.no_training or setup.kind != "smp":
                train = train_amp = float("nan")
            else:
                steps, batch = (1, 2) if args.tiny else (10, 4)
                train = training_images_per_second(setup, device, False, steps, batch)
                train_amp = training_images_per_second(setup, device, True, steps, batch)
            rows.append((setup.name, forward, pipelined, serial, train, train_amp, agreement))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"device: {device_name(device)}; {images} test images of {size} px, 3 folds x hflip; "
          f"channels_last {'on' if args.channels_last else 'off'}, cudnn.benchmark "
          f"{'on' if args.cudnn_benchmark else 'off'}; load average {os.getloadavg()[0]:.2f}; "
          f"{time.perf_counter() - started:.0f} s in all")
    header = (f"{'member':<18} {'(a) forward':>12} {'(b) e2e':>10} {'(b)/(a)':>8} {'(b0) serial':>12} "
              f"{'train img/s':>12} {'AMP img/s':>10}  device vs CPU post-processing")
    print(header)
    for name, forward, pipelined, serial, train, train_amp, agreement in rows:
        print(f"{name:<18} {forward:>10.4f} s {pipelined:>8.4f} s {pipelined / forward:>7.2f}x {serial:>10.4f} s "
              f"{train:>12.1f} {train_amp:>10.1f}  {agreement}")


if __name__ == "__main__":
    main()
