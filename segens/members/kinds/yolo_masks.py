"""Soft masks from ultralytics YOLOv8-seg: per class, the maximum over its kept instances of ``sigmoid(mask logit) *
box confidence``, at the image's original size.

Ultralytics only returns binary masks. The logits here are upsampled exactly as ultralytics 8.4's
``ops.process_mask_native`` does (``retina_masks=True``), so ``probability > 0.5`` is exactly its mask. The
stock ``construct_result`` drops instances whose binary mask is empty, which would break the alignment of masks
with boxes: every kept box keeps its instance here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

os.environ.setdefault("YOLO_OFFLINE", "1")  # before ultralytics is imported: no network checks or downloads

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from ultralytics import YOLO  # noqa: E402
from ultralytics.models.yolo.segment import SegmentationPredictor  # noqa: E402
from ultralytics.utils import ops  # noqa: E402

from segens.errors import SegensError  # noqa: E402
from segens.members.decode import dyadic_step, padded_sigmoid, upsample_region  # noqa: E402

_ABOVE_HALF = float(np.nextafter(np.float32(0.5), np.float32(1)))


@dataclass
class SoftResult:
    """One image's soft prediction: kept boxes (N, 6) float32 [x1, y1, x2, y2, conf, class] at the original size,
    class maps (29, H, W) float32, and, when asked for, instance mask probabilities (N, H, W) float32."""

    boxes: np.ndarray
    class_maps: np.ndarray
    instances: np.ndarray | None = None
    speed: dict | None = None  # set by ultralytics' predictor loop


def instance_probability_chunks(protos: torch.Tensor, coefficients: torch.Tensor, boxes: torch.Tensor,
                                shape: tuple[int, int]) -> Iterator[tuple[slice, torch.Tensor]]:
    """Mask probabilities of N instances at the original ``shape``, zero outside each box (boxes xyxy at that
    size), yielded in chunks ``(rows, (n, H, W) float32)`` so that large images with many instances fit in memory.

    The logits are upsampled exactly as ultralytics 8.4's ``ops.process_mask_native`` does (proto x f, then
    ``scale_masks`` removes the letterbox), so ``probability > 0.5`` reproduces ``retina_masks=True``."""
    channels, mask_h, mask_w = protos.shape
    height, width = shape
    logits = (coefficients @ protos.float().view(channels, -1)).view(1, -1, mask_h, mask_w)
    gain = min(4 * mask_h / height, 4 * mask_w / width)  # prototypes are at 1/4 of the letterboxed input
    pad = (4 * mask_h - max(round(height * gain), 1)) | (4 * mask_w - max(round(width * gain), 1))
    factor = 4 // math.gcd(4, pad | pad // 2)  # smallest upsampling that crops the letterbox on whole pixels
    step = max(1, 16_000_000 // (height * width + factor * factor * mask_h * mask_w))
    for start in range(0, logits.shape[1], step):
        chunk = logits[:, start:start + step]
        if factor > 1:
            chunk = F.interpolate(chunk, scale_factor=factor, mode="bilinear")
        logits_full = ops.scale_masks(chunk, shape)[0].float()
        # float32 sigmoid rounds logits in (0, 6e-8) to exactly 0.5; lift those just above it so that
        # probability > 0.5 holds exactly where ultralytics' mask (logit > 0) does
        positive = logits_full > 0
        probabilities = logits_full.sigmoid_()
        probabilities = torch.where(positive, probabilities.clamp(min=_ABOVE_HALF), probabilities)
        rows = slice(start, start + chunk.shape[1])
        yield rows, ops.crop_mask(probabilities, boxes[rows])


def instance_probability_crops(protos: torch.Tensor, coefficients: torch.Tensor, boxes: torch.Tensor,
                               shape: tuple[int, int]) -> Iterator[tuple[int, tuple[int, int, int, int], torch.Tensor]]:
    """Per instance, ``(index, (row0, row1, col0, col1), probabilities)``: the values of
    ``instance_probability_chunks`` inside the instance's box (zero outside it), computed only there.

    Only for prototypes whose upsampling to ``shape`` is one bilinear resize by a dyadic ratio (no letterbox
    padding, e.g. a square image at imgsz 1024: 256 -> 2048): a crop aligned to the ratio then has the same
    source positions and weights as the full plane (``postprocess.upsample_region``), and the sigmoid runs on a
    buffer padded to torch's vector width. The caller checks ``crops_are_exact`` first."""
    channels, mask_h, mask_w = protos.shape
    height, width = shape
    logits = (coefficients @ protos.float().view(channels, -1)).view(-1, mask_h, mask_w)
    for index, box in enumerate(boxes.tolist()):
        # crop_mask keeps column r where x1 <= r < x2 (float32 comparisons), rows likewise
        x1, y1, x2, y2 = (float(np.float32(value)) for value in box[:4])
        col0, col1 = max(0, math.ceil(x1)), min(width, max(0, math.ceil(x2)))
        row0, row1 = max(0, math.ceil(y1)), min(height, max(0, math.ceil(y2)))
        if row1 <= row0 or col1 <= col0:
            continue
        values = upsample_region(logits[index], (row0, row1), (col0, col1), height, width)
        positive = values > 0
        probabilities = padded_sigmoid(values)
        probabilities = torch.where(positive, probabilities.clamp(min=_ABOVE_HALF), probabilities)
        yield index, (row0, row1, col0, col1), probabilities


def crops_are_exact(protos: torch.Tensor, shape: tuple[int, int]) -> bool:
    """True when ``instance_probability_crops`` equals the full-size path: the letterbox adds no padding (the
    prototypes cover the image at one gain) and both sides upsample by a dyadic ratio."""
    _, mask_h, mask_w = protos.shape
    height, width = shape
    gain = min(4 * mask_h / height, 4 * mask_w / width)
    if 4 * mask_h != max(round(height * gain), 1) or 4 * mask_w != max(round(width * gain), 1):
        return False
    if (mask_h, mask_w) == (height, width):
        return True
    return dyadic_step(mask_h, height) is not None and dyadic_step(mask_w, width) is not None



class SoftSegmentationPredictor(SegmentationPredictor):
    """Ultralytics' segmentation predictor returning :class:`SoftResult` instead of binary ``Results``. Every kept
    box keeps its instance (the stock predictor drops instances whose binary mask is empty). Where exact
    (``crops_are_exact``), each instance is upsampled only within its box."""

    keep_instances = False
    crop_instances = True

    def construct_result(self, pred: torch.Tensor, img: torch.Tensor, orig_img: np.ndarray, img_path: str,
                         proto: torch.Tensor) -> SoftResult:
        """``pred``: (N, 6 + 32) boxes at the letterboxed size, confidence, class, mask coefficients."""
        height, width = orig_img.shape[:2]
        boxes = ops.scale_boxes(img.shape[2:], pred[:, :4].clone(), orig_img.shape)
        confidences, classes = pred[:, 4].float(), pred[:, 5].long()
        class_maps = torch.zeros((len(self.model.names), height, width), dtype=torch.float32, device=proto.device)
        instances = []
        if len(pred) and self.crop_instances and not self.keep_instances and crops_are_exact(proto, (height, width)):
            # max over instances is order-free and every value is >= 0: the same maps as the full-size path
            for index, (row0, row1, col0, col1), probabilities in instance_probability_crops(
                    proto, pred[:, 6:], boxes, (height, width)):
                target = class_maps[int(classes[index]), row0:row1, col0:col1]
                torch.maximum(target, probabilities.mul_(confidences[index]), out=target)
        elif len(pred):
            for rows, probabilities in instance_probability_chunks(proto, pred[:, 6:], boxes, (height, width)):
                if self.keep_instances:
                    instances.append(probabilities.clone())
                weighted = probabilities.mul_(confidences[rows, None, None])
                for cls in classes[rows].unique().tolist():
                    best = weighted[classes[rows] == cls].amax(0)
                    torch.maximum(class_maps[cls], best, out=class_maps[cls])
        kept = torch.cat([boxes, pred[:, 4:6]], 1).float().cpu().numpy()
        stacked = None
        if self.keep_instances:
            stacked = torch.cat(instances).cpu().numpy() if instances else np.zeros((0, height, width), np.float32)
        return SoftResult(kept, class_maps.cpu().numpy(), stacked)


class _FullSizePredictor(SoftSegmentationPredictor):
    crop_instances = False


class _InstancePredictor(SoftSegmentationPredictor):
    keep_instances = True


def soft_predict(model: YOLO, image: np.ndarray, *, imgsz: int, conf: float, iou: float, max_det: int = 300,
                 device: str = "cpu", keep_instances: bool = False, crop_instances: bool = True) -> SoftResult:
    """Soft prediction of one (H, W) grayscale or (H, W, 3) BGR uint8 image by a loaded YOLO segmentation model
    (see SoftResult); class maps are in the model's class order. ``crop_instances=False`` upsamples every
    instance at full size (the reference of the per-box path, which gives the same values)."""
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise SegensError(f"yolo member: expected an (H, W) grayscale or (H, W, 3) BGR uint8 image, got "
                          f"{image.dtype} {image.shape}")
    bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image
    predictor = (_InstancePredictor if keep_instances else
                 SoftSegmentationPredictor if crop_instances else _FullSizePredictor)
    (result,) = model.predict(source=bgr, predictor=predictor, imgsz=imgsz, conf=conf, iou=iou, max_det=max_det,
                              device=device, verbose=False, save=False)
    return result
