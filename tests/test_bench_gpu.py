"""bench/gpu.py runs end to end on CPU at tiny sizes (so the GPU benchmark never rots) and prints its table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_tiny_on_cpu_prints_its_table(tmp_path: Path) -> None:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "YOLO_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "bench.gpu", "--device", "cpu", "--tiny",
                             "--workdir", str(tmp_path / "work")],
                            capture_output=True, text=True, env=environment, timeout=300, check=False, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    lines = lines[next(index for index, line in enumerate(lines) if line.startswith("device: ")):]  # after ultralytics' log
    assert lines[0].startswith("device: CPU") and "3 folds x hflip" in lines[0]
    assert "(a) forward" in lines[1] and "(b)/(a)" in lines[1] and "AMP img/s" in lines[1]
    row = re.fullmatch(r"tiny-unet-r18 +([\d.]+) s +([\d.]+) s +([\d.]+)x +([\d.]+) s +([\d.]+) +([\d.]+) "
                       r" exact \(CPU path\)", lines[2])
    assert row is not None, lines[2]
    forward, end_to_end, ratio = (float(row.group(index)) for index in (1, 2, 3))
    assert forward > 0 and end_to_end > 0 and abs(ratio - end_to_end / forward) <= 0.01 * ratio + 0.01
    yolo = re.fullmatch(r"tiny-yolov8n-seg +([\d.]+) s +([\d.]+) s +([\d.]+)x +([\d.]+) s +nan +nan "
                        r" n/a \(ultralytics path\)", lines[3])
    assert yolo is not None, lines[3]
    assert float(yolo.group(1)) > 0 and float(yolo.group(2)) > 0
    for name in ("tiny-unet-r18", "tiny-yolov8n-seg"):  # the members it built
        assert len(list((tmp_path / "work").glob(f"{name}-fold*.pt"))) == 3
