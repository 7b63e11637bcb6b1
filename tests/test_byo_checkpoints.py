"""Bring your own checkpoints: models trained by scripts written the way competition baselines write them (outside
segens' training code, in real subprocesses) predict through ``ens predict-member`` exactly as the scripts' own
inference does, class by class; a wrong normalize, color or class order gives different maps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from segens.cli import app
from segens.conventions.classes import CLASSES
from segens.conventions.dataset import discover
from segens.errors import SegensError
from segens.members.predict import predict_member
from segens.members.spec import sha256_of
from segens.store import open_store, quantize
from segens.synth import generate

SHUFFLED = [CLASSES[i] for i in np.random.default_rng(7).permutation(len(CLASSES))]
REVERSED = list(reversed(CLASSES))

COMMON = f'''
import glob, json, os, sys
import cv2, numpy as np, torch, torch.nn.functional as F
CLASSES = {list(CLASSES)!r}
root, out = sys.argv[1], sys.argv[2]
SIZE = 64

def load_masks(json_path, shape, order):
    masks = np.zeros((len(order), *shape), np.uint8)
    for ann in json.load(open(json_path))["annotations"]:
        cv2.fillPoly(masks[order.index(ann["label"])], [np.array(ann["points"], np.int32)], 1)
    return masks

def pairs():
    for image_path in sorted(glob.glob(os.path.join(root, "train/DCM/*/*.png"))):
        yield image_path, image_path.replace("/DCM/", "/outputs_json/")[:-4] + ".json"

def save_inference(model, preprocess, forward):
    model.eval()
    for image_path in sorted(glob.glob(os.path.join(root, "test/DCM/*/*.png"))):
        height, width = cv2.imread(image_path).shape[:2]
        with torch.no_grad():
            logits = forward(model, preprocess(image_path)[None])
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            probabilities = torch.sigmoid(logits)[0].numpy()
        key = os.path.relpath(image_path, os.path.join(root, "test/DCM"))[:-4]
        os.makedirs(os.path.dirname(os.path.join(out, key)), exist_ok=True)
        np.save(os.path.join(out, key + ".npy"), probabilities)

def train(model, preprocess, forward, order, steps=3):
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = [(preprocess(i), torch.from_numpy(cv2.resize(load_masks(j, cv2.imread(i).shape[:2], order).transpose(1, 2, 0),
             (SIZE, SIZE), interpolation=cv2.INTER_NEAREST).transpose(2, 0, 1)).float()) for i, j in pairs()]
    model.train()
    for step in range(steps):
        images = torch.stack([x for x, _ in data]); masks = torch.stack([y for _, y in data])
        loss = F.binary_cross_entropy_with_logits(forward(model, images), masks)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
'''

SMP_SCRIPT = COMMON + '''
import segmentation_models_pytorch as smp
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)   # albumentations Normalize() defaults
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

def preprocess(path):
    image = cv2.imread(path)                                   # BGR, as cv2 reads it
    image = cv2.resize(image, (SIZE, SIZE))                     # bilinear
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    return (x - MEAN) / STD

forward = lambda model, x: model(x)
torch.manual_seed(0)
model = smp.UnetPlusPlus("resnet18", encoder_weights=None, classes=29, decoder_channels=(32, 16, 16, 8, 8))
train(model, preprocess, forward, CLASSES)
torch.save(model, os.path.join(out, "model.pt"))               # the whole model, pickled
save_inference(model, preprocess, forward)
'''

TORCHVISION_MODULE = '''
import torch

class TinySeg(torch.nn.Module):
    """A torchvision-style segmentation model: forward returns {"out": logits}."""

    def __init__(self, num_classes=21):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.classifier = torch.nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        return {"out": self.classifier(torch.relu(self.stem(x))), "aux": None}

def build(num_classes=21):
    return TinySeg(num_classes)

def not_a_model(num_classes=21):
    return {"num_classes": num_classes}
'''

TORCHVISION_SCRIPT = COMMON + '''
from tinyseg import build
MEAN = torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)
STD = torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1)
ORDER = json.load(open(sys.argv[3]))                           # this project's own class order

def preprocess(path):
    image = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
    image = cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    return (x - MEAN) / STD

forward = lambda model, x: model(x)["out"]
torch.manual_seed(0)
model = build(num_classes=29)
train(model, preprocess, forward, ORDER, steps=5)
torch.save(model.state_dict(), os.path.join(out, "weights.pth"))
save_inference(model, preprocess, forward)
'''


def _colour_data(root: Path) -> Path:
    """A synthetic data root whose PNGs are in colour (channels differ), so that color and normalize matter."""
    generate(root, n_train_patients=2, n_test_patients=1, size=96, seed=3)
    for path in sorted(root.glob("*/DCM/*/*.png")):
        gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).astype(np.float32)
        bgr = np.stack([gray, 0.5 * gray + 60, 255 - gray], axis=-1)
        assert cv2.imwrite(str(path), np.clip(bgr, 0, 255).astype(np.uint8))
    return root


def _run_script(source: str, folder: Path, root: Path, *args: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "baseline.py"
    script.write_text(source)
    env = {**os.environ, "PYTHONPATH": str(folder), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script), str(root), str(folder), *args], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def _script_maps(folder: Path, root: Path, order: list[str] = CLASSES) -> dict[str, np.ndarray]:
    """The script's own inference (channels in the script's class ``order``), quantized as a store holds it and
    put in the competition's class order by name: image key -> (29, H, W) uint8."""
    records = discover(root, "test", require_labels=False).records
    channels = [order.index(name) for name in CLASSES]
    return {record.key: quantize(np.load(folder / f"{record.key}.npy")[channels]) for record in records}


def _write_spec(path: Path, document: dict) -> Path:
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _predict(spec: Path, root: Path, out: Path) -> dict[str, np.ndarray]:
    predict_member(spec, "test", root, out, trust_pickle=True, trust_code=True, batch_size=1, progress=False,
                   overwrite=True)
    store = open_store(out)
    return {key: store.read(key) for key in store.keys()}


@pytest.fixture(autouse=True)
def one_thread():
    """The scripts infer with one thread (OMP_NUM_THREADS=1); segens must too, in this process, for bit-equal float
    results: a convolution's summation order depends on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def colour_root(tmp_path_factory) -> Path:
    return _colour_data(tmp_path_factory.mktemp("byo") / "data")


@pytest.fixture(scope="module")
def smp_baseline(colour_root: Path, tmp_path_factory) -> Path:
    return _run_script(SMP_SCRIPT, tmp_path_factory.mktemp("smp_baseline"), colour_root)


@pytest.fixture(scope="module")
def torchvision_baseline(colour_root: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tv_baseline")
    (folder / "tinyseg.py").write_text(TORCHVISION_MODULE)
    order = folder / "order.json"
    order.write_text(json.dumps(REVERSED))
    return _run_script(TORCHVISION_SCRIPT, folder, colour_root, str(order))


def _smp_spec(folder: Path, **input_changes) -> dict:
    checkpoint = folder / "model.pt"
    return {"version": 2, "name": "unetpp-byo", "kind": "smp",
            "input": {"size": [64, 64], "channels": 3, "color": "bgr", "scale": 255, "normalize": "imagenet",
                      "resize": "bilinear", **input_changes},
            "model": {"architecture": "UnetPlusPlus", "encoder": "resnet18"},
            "checkpoints": {0: {"path": checkpoint.name, "sha256": sha256_of(checkpoint)}}}


def test_smp_unetpp_saved_whole_with_bgr_imagenet_input(smp_baseline: Path, colour_root: Path) -> None:
    expected = _script_maps(smp_baseline, colour_root)
    spec = _write_spec(smp_baseline / "member.yaml", _smp_spec(smp_baseline))
    result = CliRunner().invoke(app, ["predict-member", str(spec), "--split", "test", "--data", str(colour_root),
                                      "--out", str(smp_baseline / "ok.zarr"), "--trust-pickle", "--batch-size", "1"])
    assert result.exit_code == 0, result.output
    store = open_store(smp_baseline / "ok.zarr")
    assert sorted(store.keys()) == sorted(expected)
    for key, wanted in expected.items():
        got = store.read(key)
        for channel, name in enumerate(CLASSES):
            assert np.array_equal(got[channel], wanted[channel]), f"{key} {name}"
    assert store.spec["input"] == _smp_spec(smp_baseline)["input"]


@pytest.mark.parametrize("change", [{"normalize": "none"}, {"color": "rgb"}, {"color": "gray"}])
def test_smp_wrong_input_settings_give_different_maps(smp_baseline: Path, colour_root: Path, change: dict) -> None:
    expected = _script_maps(smp_baseline, colour_root)
    spec = _write_spec(smp_baseline / f"wrong-{next(iter(change.values()))}.yaml", _smp_spec(smp_baseline, **change))
    got = _predict(spec, colour_root, smp_baseline / f"wrong-{next(iter(change.values()))}.zarr")
    assert any(not np.array_equal(got[key], expected[key]) for key in expected)


def _torch_spec(folder: Path, factory: str = "tinyseg:build", **changes) -> dict:
    checkpoint = folder / "weights.pth"
    document = {"version": 2, "name": "tinyseg", "kind": "torch",
                "input": {"size": [64, 64], "color": "rgb", "normalize": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]},
                          "resize": "area"},
                "classes": REVERSED,
                "model": {"factory": factory, "kwargs": {"num_classes": 29}, "output": {"type": "logits", "key": "out"}},
                "checkpoints": {0: {"path": checkpoint.name, "sha256": sha256_of(checkpoint)}}}
    for key, value in changes.items():
        if key in ("color", "normalize"):
            document["input"][key] = value
        elif value is None:
            document.pop(key)
        else:
            document[key] = value
    return document


def test_torchvision_style_state_dict_through_a_factory(torchvision_baseline: Path, colour_root: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(torchvision_baseline))
    expected = _script_maps(torchvision_baseline, colour_root, REVERSED)
    spec = _write_spec(torchvision_baseline / "member.yaml", _torch_spec(torchvision_baseline))
    result = CliRunner().invoke(app, ["predict-member", str(spec), "--split", "test", "--data", str(colour_root),
                                      "--out", str(torchvision_baseline / "ok.zarr"), "--batch-size", "1", "--trust-code"])
    assert result.exit_code == 0, result.output
    store = open_store(torchvision_baseline / "ok.zarr")
    for key, wanted in expected.items():
        got = store.read(key)
        for channel, name in enumerate(CLASSES):
            assert np.array_equal(got[channel], wanted[channel]), f"{key} {name}"
    # a factory given as a file next to the spec loads the same model
    by_file = _write_spec(torchvision_baseline / "by-file.yaml", _torch_spec(torchvision_baseline, "tinyseg.py:build"))
    got = _predict(by_file, colour_root, torchvision_baseline / "by-file.zarr")
    assert all(np.array_equal(got[key], expected[key]) for key in expected)


@pytest.mark.parametrize("change", [{"classes": None}, {"color": "bgr"}, {"normalize": "imagenet"}],
                         ids=["no-class-order", "bgr", "imagenet"])
def test_torch_wrong_settings_give_different_maps(torchvision_baseline: Path, colour_root: Path, change: dict,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(torchvision_baseline))
    expected = _script_maps(torchvision_baseline, colour_root, REVERSED)
    name = next(iter(change))
    spec = _write_spec(torchvision_baseline / f"wrong-{name}.yaml", _torch_spec(torchvision_baseline, **change))
    got = _predict(spec, colour_root, torchvision_baseline / f"wrong-{name}.zarr")
    assert any(not np.array_equal(got[key], expected[key]) for key in expected)


def test_torch_kind_errors_name_the_problem(torchvision_baseline: Path, colour_root: Path,
                                            monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.syspath_prepend(str(torchvision_baseline))

    def predict(document: dict, name: str) -> None:
        spec = _write_spec(torchvision_baseline / f"{name}.yaml", document)
        _predict(spec, colour_root, tmp_path / f"{name}.zarr")

    document = _torch_spec(torchvision_baseline)
    document["model"]["output"]["key"] = "logits"
    with pytest.raises(SegensError, match="without key 'logits' \\(keys: out, aux\\)"):
        predict(document, "bad-key")
    with pytest.raises(SegensError, match="'no_such_package.models:build' does not import"):
        predict(_torch_spec(torchvision_baseline, "no_such_package.models:build"), "bad-import")
    with pytest.raises(SegensError, match="'tinyseg:not_a_model' returns dict, not a torch.nn.Module"):
        predict(_torch_spec(torchvision_baseline, "tinyseg:not_a_model"), "no-module")
    with pytest.raises(SegensError, match="tinyseg:missing.*has no function 'missing'"):
        predict(_torch_spec(torchvision_baseline, "tinyseg:missing"), "no-function")
    document = _torch_spec(torchvision_baseline)
    document["model"]["format"] = "torchscript"
    with pytest.raises(SegensError, match="weights.pth: not a TorchScript file"):
        predict(document, "not-script")
    shuffled = _torch_spec(torchvision_baseline, classes=[*CLASSES[:-1], "finger-1"])
    with pytest.raises(SegensError, match="class name 'finger-1' appears more than once"):
        predict(shuffled, "repeated")
    document = _torch_spec(torchvision_baseline)
    document["model"]["kwargs"]["num_classes"] = 28  # the factory builds a head that the weights do not fit
    with pytest.raises(SegensError, match=r"weights\.pth: the state_dict does not fit the module of model\.factory "
                                          r"'tinyseg:build' \(Error\(s\) in loading state_dict"):
        predict(document, "wrong-head")


@pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning")  # users still have TorchScript files
def test_torchscript_and_trusted_pickle_load_the_same_model(torchvision_baseline: Path, colour_root: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(torchvision_baseline))
    from tinyseg import build

    expected = _script_maps(torchvision_baseline, colour_root, REVERSED)
    model = build(num_classes=29)
    model.load_state_dict(torch.load(torchvision_baseline / "weights.pth", weights_only=True))
    model.eval()

    class Traceable(torch.nn.Module):  # a dict of tensors only: keep "out"
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"out": self.inner(x)["out"]}

    traced = torch.jit.trace(Traceable(model), torch.zeros(1, 3, 64, 64), strict=False)
    torch.jit.save(traced, torchvision_baseline / "scripted.pt")
    torch.save(model, torchvision_baseline / "whole.pt")
    for checkpoint in ("scripted.pt", "whole.pt"):
        document = _torch_spec(torchvision_baseline)
        document["model"] = {"output": {"type": "logits", "key": "out"}}
        document["checkpoints"] = {0: {"path": checkpoint, "sha256": sha256_of(torchvision_baseline / checkpoint)}}
        spec = _write_spec(torchvision_baseline / f"{checkpoint}.yaml", document)
        got = _predict(spec, colour_root, torchvision_baseline / f"{checkpoint}.zarr")
        assert all(np.array_equal(got[key], expected[key]) for key in expected), checkpoint
    with pytest.raises(SegensError, match="whole.pt: holds a whole pickled model.*--trust-pickle"):
        predict_member(torchvision_baseline / "whole.pt.yaml", "test", colour_root, torchvision_baseline / "x.zarr",
                       progress=False, overwrite=True)


YOLO_SCRIPT = COMMON + '''
from ultralytics import YOLO
NAMES = json.load(open(sys.argv[3]))                           # the data YAML's class order
data = os.path.join(out, "dataset")
for folder in ("images/train", "labels/train"):
    os.makedirs(os.path.join(data, folder), exist_ok=True)
for number, (image_path, json_path) in enumerate(pairs()):
    image = cv2.imread(image_path)
    height, width = image.shape[:2]
    cv2.imwrite(os.path.join(data, "images/train", f"{number}.png"), image)
    with open(os.path.join(data, "labels/train", f"{number}.txt"), "w") as labels:
        for ann in json.load(open(json_path))["annotations"]:
            points = " ".join(f"{x / width:.6f} {y / height:.6f}" for x, y in ann["points"])
            labels.write(f"{NAMES.index(ann['label'])} {points}\\n")
with open(os.path.join(out, "data.yaml"), "w") as handle:
    json.dump({"path": data, "train": "images/train", "val": "images/train", "names": NAMES}, handle)
model = YOLO("yolov8n-seg.yaml")
model.train(data=os.path.join(out, "data.yaml"), epochs=2, imgsz=64, batch=2, plots=False, amp=False, device="cpu",
            workers=0, overlap_mask=False, project=out, name="train", exist_ok=True, pretrained=False, val=False,
            verbose=False, seed=0, deterministic=True, nbs=2, warmup_epochs=0, optimizer="AdamW", lr0=0.002)
# Two epochs from scratch leave every confidence near 4e-4, which quantizes to 0: stand in for a long run by
# lifting the class logits of the detection head, so that detections (and the maps) are not empty.
path = os.path.join(out, "train", "weights", "last.pt")
checkpoint = torch.load(path, map_location="cpu", weights_only=False)
for key in ("model", "ema"):
    if checkpoint.get(key) is not None:
        for branch in checkpoint[key].model[-1].cv3:
            branch[-1].bias.data += 6
torch.save(checkpoint, path)
'''


@pytest.mark.slow
def test_yolov8_seg_trained_with_shuffled_class_order(colour_root: Path, tmp_path_factory) -> None:
    from ultralytics import YOLO

    from segens.members.kinds.yolo_masks import soft_predict

    folder = tmp_path_factory.mktemp("yolo_baseline")
    names = folder / "names.json"
    names.write_text(json.dumps(SHUFFLED))
    _run_script(YOLO_SCRIPT, folder, colour_root, str(names))
    checkpoint = folder / "train" / "weights" / "last.pt"
    document = {"version": 2, "name": "yolo-byo", "kind": "yolo", "input": {"size": 64, "color": "bgr"},
                "model": {"conf": 0.001}, "checkpoints": {0: {"path": str(checkpoint), "sha256": sha256_of(checkpoint)}}}
    got = _predict(_write_spec(folder / "member.yaml", document), colour_root, folder / "ok.zarr")
    model = YOLO(str(checkpoint))
    assert [model.names[i] for i in range(len(model.names))] == SHUFFLED
    channels = [SHUFFLED.index(name) for name in CLASSES]
    records = discover(colour_root, "test", require_labels=False).records
    unmapped_differs = False
    for record in records:
        # the script's model, run on the image as ultralytics reads it (BGR), its classes put in order by name
        raw = soft_predict(model, cv2.imread(str(record.image_path)), imgsz=64, conf=0.001, iou=0.7).class_maps
        expected = quantize(raw[channels])
        assert expected.any()
        for channel, name in enumerate(CLASSES):
            assert np.array_equal(got[record.key][channel], expected[channel]), f"{record.key} {name}"
        unmapped_differs |= not np.array_equal(got[record.key], quantize(raw))
    assert unmapped_differs  # taken in the model's own order, the maps would be other classes'
    document["classes"] = list(CLASSES)
    with pytest.raises(SegensError, match="classes .* contradict the class names recorded in .*last.pt"):
        _predict(_write_spec(folder / "wrong.yaml", document), colour_root, folder / "wrong.zarr")
