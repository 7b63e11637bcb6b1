"""predict-member's speed work: the device post-processing path (run here on CPU tensors), batches fixed by
position (a resumed store is byte-identical to an uninterrupted one) and the overlapped decode/write pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_smp_project

from segens.conventions.dataset import discover
from segens.errors import SegensError
from segens.members.decode import passes_to_uint8, passes_to_uint8_torch, reference_passes_to_uint8
from segens.members.predict import predict_member
from segens.members.registry import factory
from segens.members.spec import load_spec
from segens.store import image_boxes, open_store


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a local store by its relative path, with its bytes."""
    return {str(file.relative_to(path)): file.read_bytes() for file in sorted(path.rglob("*")) if file.is_file()}


def logit_passes(count: int, size: tuple[int, int], seed: int) -> list[torch.Tensor]:
    """Smooth-ish random logits: mostly very negative with a few positive blobs, like a segmentation head."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(29, *size, generator=generator) * 4 - 4 for _ in range(count)]


@pytest.mark.parametrize(("count", "size", "out"), [
    (1, (32, 32), (64, 64)),     # dyadic, one pass
    (2, (32, 32), (80, 96)),     # non-dyadic, hflip-like
    (3, (40, 48), (97, 131)),    # odd sizes, 3 folds
    (6, (64, 64), (64, 64)),     # same size, 3 folds x hflip
])
def test_device_code_on_cpu_tensors_equals_the_reference(count: int, size: tuple[int, int],
                                                        out: tuple[int, int]) -> None:
    passes = logit_passes(count, size, seed=count)
    expected = reference_passes_to_uint8(passes, *out)
    values, boxes = passes_to_uint8_torch(passes, *out)
    assert values.dtype == np.uint8 and values.shape == (29, *out)
    assert np.array_equal(values, expected)
    assert boxes == image_boxes(expected)
    region_values, region_boxes = passes_to_uint8(passes, *out)  # the CPU path: the same values and boxes
    assert np.array_equal(region_values, values) and region_boxes == boxes


def test_device_code_with_probabilities_and_bad_maps() -> None:
    passes = [torch.sigmoid(p) for p in logit_passes(2, (16, 16), seed=7)]
    values, _ = passes_to_uint8_torch(passes, 40, 40, probabilities=True)
    mean = sum(torch.nn.functional.interpolate(p[None], size=(40, 40), mode="bilinear", align_corners=False)[0]
               for p in passes) / np.float32(2)
    assert np.array_equal(values, np.rint(np.clip(mean.numpy(), 0, 1) * np.float32(255)).astype(np.uint8))
    bad = logit_passes(1, (8, 8), seed=1)[0]
    bad[3, 2, 2] = float("nan")
    with pytest.raises(SegensError, match="image7: the network produced NaN"):
        passes_to_uint8_torch([bad], 16, 16, where="image7")
    with pytest.raises(SegensError, match="image7: expected 29 classes"):
        passes_to_uint8_torch([torch.zeros(3, 8, 8)], 16, 16, where="image7")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_smp_project(tmp_path_factory.mktemp("speed"))


def test_member_device_path_on_cpu_equals_the_cpu_path(project: Path) -> None:
    """The whole member, fold models and hflip TTA: the device code (on CPU) gives the region path's bytes."""
    spec = load_spec(project / "unet.yaml")
    member = factory(spec.kind)(spec, device="cpu")
    records = discover(project / "data", "test", require_labels=False).records
    images = member.read_batch(records)
    cpu = member.predict_uint8(images, (0, 1, 2))
    member.postprocess_on_device = True
    device = member.predict_uint8(images, (0, 1, 2))
    for (cpu_values, cpu_boxes), (values, boxes) in zip(cpu, device, strict=True):
        assert np.array_equal(values, cpu_values) and boxes == cpu_boxes
        assert (values > 0).any()


def test_pipelined_and_resumed_stores_are_byte_identical(project: Path, tmp_path: Path) -> None:
    """Batches of 2 (the OOF images of each fold): the pipelined run writes the serial run's bytes, and a store
    whose images lost their completion marker (one per batch: a batch of 1 would convolve differently) and had
    a chunk torn is completed to the same bytes."""
    arguments = (project / "unet.yaml", "oof", project / "data")
    options = {"folds_path": project / "folds.json", "batch_size": 2, "progress": False}
    serial = predict_member(*arguments, tmp_path / "serial.zarr", pipelined=False, **options)
    pipelined = predict_member(*arguments, tmp_path / "pipelined.zarr", **options)
    assert serial.written == pipelined.written == 6
    expected = store_files(tmp_path / "serial.zarr")
    assert store_files(tmp_path / "pipelined.zarr") == expected

    killed = tmp_path / "killed.zarr"
    shutil.copytree(tmp_path / "pipelined.zarr", killed)
    keys = sorted(open_store(killed).completed())
    lost = keys[::2]  # the store sorts keys; images of one batch share a fold, so most batches lose one image
    for key in lost:
        metadata = killed / key / "zarr.json"
        document = json.loads(metadata.read_text())
        del document["attributes"]["complete"]
        metadata.write_text(json.dumps(document))
        chunk = next(path for path in (killed / key / "c").rglob("*") if path.is_file())
        chunk.write_bytes(chunk.read_bytes()[: len(chunk.read_bytes()) // 2])
    assert open_store(killed).completed() == set(keys) - set(lost)
    resumed = predict_member(*arguments, killed, **options)
    assert (resumed.written, resumed.skipped) == (len(lost), 6 - len(lost))
    assert store_files(killed) == expected


# ---- YOLO soft masks: per-instance upsampling within each box ---------------------------------------------------


def test_yolo_crops_are_exact_only_without_letterbox_and_at_dyadic_ratios() -> None:
    from segens.members.kinds.yolo_masks import crops_are_exact

    assert crops_are_exact(torch.zeros(32, 256, 256), (2048, 2048))       # imgsz 1024 on the competition's images
    assert crops_are_exact(torch.zeros(32, 64, 64), (512, 512))
    assert crops_are_exact(torch.zeros(32, 160, 160), (2048, 2048))       # imgsz 640: 12.8x = 64/5, exact in binary
    assert not crops_are_exact(torch.zeros(32, 160, 160), (2000, 2000))   # 12.5x = 25/2: full-size path
    assert not crops_are_exact(torch.zeros(32, 64, 64), (512, 384))       # letterboxed: full-size path


@pytest.mark.parametrize(("shape", "imgsz"),
                         [((512, 512), 256), ((512, 512), 320), ((384, 512), 256), ((400, 512), 256)])
def test_yolo_per_box_upsampling_equals_the_full_size_path_bit_for_bit(shape: tuple[int, int], imgsz: int) -> None:
    """Real ultralytics output (an untrained yolov8n-seg's prototypes and mask coefficients): each instance's
    values within its box, computed from a crop, equal the full-size path's bit for bit, for boxes of every size
    with fractional and out-of-image corners; and soft_predict's class maps are identical either way."""
    from ultralytics import YOLO

    from segens.members.kinds.yolo_masks import (
        SoftSegmentationPredictor,
        crops_are_exact,
        instance_probability_chunks,
        instance_probability_crops,
        soft_predict,
    )

    captured: dict[str, torch.Tensor] = {}

    class Capture(SoftSegmentationPredictor):
        def construct_result(self, pred, img, orig_img, img_path, proto):
            captured.update(pred=pred.clone(), proto=proto.clone())
            return super().construct_result(pred, img, orig_img, img_path, proto)

    torch.manual_seed(0)
    model = YOLO("yolov8n-seg.yaml")
    image = cv2_blur(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
    settings = {"imgsz": imgsz, "conf": 1e-4, "iou": 0.7, "max_det": 300}
    model.predict(source=np.stack([image] * 3, axis=-1), predictor=Capture, verbose=False, save=False, **settings)
    proto, coefficients = captured["proto"], captured["pred"][:, 6:]
    assert crops_are_exact(proto, shape) == (shape != (400, 512))  # 400 rows: letterboxed to 224 of 256 px
    height, width = shape
    rng = np.random.default_rng(1)
    corners = rng.uniform(-20, [width + 20, height + 20], size=(len(coefficients), 2, 2)).astype(np.float32)
    boxes = torch.from_numpy(np.concatenate([corners.min(1), corners.max(1)], 1))
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)  # scale_boxes clips to the image
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    boxes[0] = torch.tensor([0, 0, width, height])
    boxes[1] = torch.tensor([10.0, 20.0, 10.5, 20.25])  # narrower than a pixel
    full = torch.cat([chunk for _, chunk in instance_probability_chunks(proto, coefficients, boxes, shape)])
    seen = set()
    crops = instance_probability_crops(proto, coefficients, boxes, shape) if crops_are_exact(proto, shape) else []
    for index, (row0, row1, col0, col1), values in crops:
        expected = full[index]
        assert torch.equal(values, expected[row0:row1, col0:col1]), index
        expected[row0:row1, col0:col1] = 0
        assert not expected.any(), index  # nothing outside the crop
        seen.add(index)
    if crops_are_exact(proto, shape):  # every instance with a non-empty box was cropped
        assert all(not full[index].any() for index in set(range(len(boxes))) - seen)
        assert len(seen) >= min(len(boxes), 5)

    cropped = soft_predict(model, image, **settings)
    reference = soft_predict(model, image, crop_instances=False, **settings)
    assert len(cropped.boxes) > 0 and np.array_equal(cropped.boxes, reference.boxes)
    assert reference.class_maps.max() > 0 and np.array_equal(cropped.class_maps, reference.class_maps)


def cv2_blur(image: np.ndarray) -> np.ndarray:
    """Smooth structures rather than pixel noise."""
    import cv2

    return cv2.GaussianBlur(image, (0, 0), 6)


def test_pipelined_read_error_names_the_file_and_keeps_finished_images(project: Path, tmp_path: Path) -> None:
    """An image that fails to decode in a background thread: the error names it, and the image before it (written
    by the write pool meanwhile) is complete; resuming after the file is fixed completes the store."""
    data = tmp_path / "data"
    shutil.copytree(project / "data", data)
    records = discover(data, "test", require_labels=False).records
    broken = records[-1].image_path
    original = broken.read_bytes()
    broken.write_bytes(original[:40])  # a truncated PNG: the header reads, the pixels do not
    out = tmp_path / "test.zarr"
    with pytest.raises(SegensError, match=rf"{broken.name}: .*(not a readable image|truncated|PNG)"):
        predict_member(project / "unet.yaml", "test", data, out, batch_size=1, progress=False)
    assert open_store(out).completed() == {record.key for record in records[:-1]}
    broken.write_bytes(original)
    resumed = predict_member(project / "unet.yaml", "test", data, out, batch_size=1, progress=False)
    assert (resumed.written, resumed.skipped) == (1, len(records) - 1)
