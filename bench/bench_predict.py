"""predict-member end to end on CPU: the pipelined path (decoding ahead in threads, writes in a thread pool) vs
the serial path it replaced (``pipelined=False``: decode, predict, write one batch after another, as on main).

    python -m bench.bench_predict [--images 6] [--size 2048] [--input 256] [--repeats 3] [--device cpu]

Member: a resnet18 Unet with sharpened random weights (bench/gpu.py's ``build_member``), hflip TTA, the test
split with 3 fold checkpoints averaged. The two paths alternate which runs first; medians per image; the stores
must be byte-identical (checked).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from bench.gpu import MemberSetup, build_member
from segens.members.predict import predict_member
from segens.synth import generate


def store_bytes(path: Path) -> dict[str, bytes]:
    return {str(file.relative_to(path)): file.read_bytes() for file in sorted(path.rglob("*")) if file.is_file()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--input", type=int, default=256, help="the member's input size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="segens-bench-predict-"))
    try:
        generate(work / "data", n_train_patients=1, n_test_patients=-(-args.images // 2), size=args.size, seed=0)
        spec = build_member(MemberSetup("unet-r18", "Unet", "resnet18", args.input, {}), work)
        seconds: dict[bool, list[float]] = {True: [], False: []}
        reference = None
        for repeat in range(args.repeats):
            for pipelined in ((True, False) if repeat % 2 == 0 else (False, True)):
                out = work / f"store-{pipelined}.zarr"
                summary = predict_member(spec, "test", work / "data", out, device=args.device, progress=False,
                                         pipelined=pipelined, overwrite=True)
                seconds[pipelined].append(summary.seconds / summary.written)
                written = store_bytes(out)
                if reference is None:
                    reference = written
                elif written != reference:
                    raise SystemExit("the pipelined and serial stores differ")
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ours, baseline = statistics.median(seconds[True]), statistics.median(seconds[False])
    print(f"predict-member --split test, {summary.written} images of {args.size} px, resnet18 Unet at "
          f"{args.input}, 3 folds x hflip, device {args.device}, {os.cpu_count()} cores; load average {load:.2f} "
          f"before, {os.getloadavg()[0]:.2f} after; medians of {args.repeats} runs; stores byte-identical")
    print(f"{'operation':<40} {'pipelined':>10} {'serial':>10} {'ratio':>7}")
    print(f"{'predict-member, per image':<40} {ours:>8.3f} s {baseline:>8.3f} s {baseline / ours:>6.2f}x")


if __name__ == "__main__":
    main()
