"""Network logits at model resolution -> uint8 probabilities at the image's original size, the step every
adapter ends with. The values equal the straightforward float32 path (bilinear upsampling of all classes,
``align_corners=False``, sigmoid, ``quantize``) while computing only where a class can be non-zero.

Why it is exact: a bilinear output pixel is a convex combination of 4 input pixels, so it is below
``logit(0.5 / 255)`` (quantized value 0) wherever those 4 are all below it; only the region around the input
pixels above that threshold is computed. When the size ratio is dyadic (e.g. 512 -> 2048, 1024 -> 2048, equal
sizes), a crop of the input aligned to the ratio maps to output pixels with exactly the same source positions
and weights, so the crop is upsampled with the same kernel; otherwise one full-size plane per non-empty class
is upsampled and cropped. The sigmoid runs on a buffer padded to a multiple of 64 elements so that every value
goes through torch's vectorized kernel, like the values of a full-size tensor do.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from segens.conventions.classes import NUM_CLASSES
from segens.conventions.rle import BBox, bbox
from segens.errors import SegensError
from segens.store import SCALE, quantize, quantize_torch

ZERO_LOGIT = math.log(0.5 / (SCALE - 0.5)) - 1e-3
"""An output pixel whose 4 source logits are below this quantizes to 0 (sigmoid(x) * 255 < 0.5); the 1e-3
margin absorbs float rounding."""

_MARGIN = 2  # input pixels kept around the region beyond the 1 that bilinear reaches, so crops never clamp
_SIGMOID_BLOCK = 64  # sigmoid buffers are padded to a multiple of this so no element takes the scalar tail


def logits_to_uint8(logits: torch.Tensor, height: int, width: int,
                    where: str = "logits") -> tuple[np.ndarray, list[BBox | None]]:
    """(C, h, w) float logits -> ((C, height, width) uint8 probabilities, per-class box of non-zero values).

    Equal to ``reference_logits_to_uint8``; ``where`` names the image in errors (non-finite logits).
    """
    logits = _check_logits(logits, where)
    out = np.zeros((logits.shape[0], height, width), dtype=np.uint8)  # pages outside the boxes stay untouched
    boxes: list[BBox | None] = []
    for channel, region in enumerate(_active_regions(logits)):
        box, values = _class_values(logits[channel], region, height, width)
        if box is not None:
            out[channel, box[0]:box[1], box[2]:box[3]] = values
        boxes.append(box)
    return out, boxes


def passes_to_uint8(passes: list[torch.Tensor], height: int, width: int,
                    where: str = "logits") -> tuple[np.ndarray, list[BBox | None]]:
    """Several (C, h, w) logit maps (folds, flipped passes) -> uint8 of the mean of their sigmoids, and boxes.

    Equal to ``reference_passes_to_uint8``: per pass bilinear upsampling and sigmoid in float32, summed in
    pass order, divided by the pass count, quantized; computed only where some pass can be non-zero. Passes may
    have different sizes (scaled TTA); each is upsampled straight to (height, width).
    """
    if len(passes) == 1:
        return logits_to_uint8(passes[0], height, width, where)
    checked = [_check_logits(logits, where) for logits in passes]
    out = np.zeros((checked[0].shape[0], height, width), dtype=np.uint8)
    boxes: list[BBox | None] = []
    regions = [_active_regions(logits) for logits in checked]
    for channel in range(checked[0].shape[0]):
        present = [region[channel] for region in regions if region[channel] is not None]
        if not present:
            boxes.append(None)
            continue
        # passes may differ in size (scaled TTA): the union of each active pass's output span
        spans = [(_output_span(region[channel][0], region[channel][1], logits.shape[1], height),
                  _output_span(region[channel][2], region[channel][3], logits.shape[2], width))
                 for logits, region in zip(checked, regions) if region[channel] is not None]
        rows = (min(span[0][0] for span in spans), max(span[0][1] for span in spans))
        cols = (min(span[1][0] for span in spans), max(span[1][1] for span in spans))
        total = None
        for logits in checked:
            term = _sigmoid(upsample_region(logits[channel], rows, cols, height, width))
            total = term if total is None else total + term
        values = quantize(total / np.float32(len(checked)))
        inner = bbox(values)
        if inner is None:
            boxes.append(None)
            continue
        box = (rows[0] + inner[0], rows[0] + inner[1], cols[0] + inner[2], cols[0] + inner[3])
        out[channel, box[0]:box[1], box[2]:box[3]] = values[inner[0]:inner[1], inner[2]:inner[3]]
        boxes.append(box)
    return out, boxes


def reference_passes_to_uint8(passes: list[torch.Tensor], height: int, width: int) -> np.ndarray:
    """The straightforward float32 path for several passes: sum of full-size sigmoids in order, / count."""
    total = None
    for logits in passes:
        full = F.interpolate(logits.float()[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        term = torch.sigmoid(full).numpy()
        total = term if total is None else total + term
    return quantize(total / np.float32(len(passes)))


def _class_values(plane: torch.Tensor, region: BBox | None, height: int,
                  width: int) -> tuple[BBox | None, np.ndarray | None]:
    """One class: (box of its non-zero output values, the uint8 values in it), from its (h, w) logits."""
    if region is None:
        return None, None
    rows = _output_span(region[0], region[1], plane.shape[0], height)
    cols = _output_span(region[2], region[3], plane.shape[1], width)
    values = quantize(_sigmoid(upsample_region(plane, rows, cols, height, width)))
    inner = bbox(values)
    if inner is None:
        return None, None
    box = (rows[0] + inner[0], rows[0] + inner[1], cols[0] + inner[2], cols[0] + inner[3])
    return box, values[inner[0]:inner[1], inner[2]:inner[3]]


def reference_logits_to_uint8(logits: torch.Tensor, height: int, width: int) -> np.ndarray:
    """The straightforward float32 path (the definition ``logits_to_uint8`` must match): (C, H, W) uint8."""
    full = F.interpolate(logits.float()[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return quantize(torch.sigmoid(full).numpy())


def _check_logits(logits: torch.Tensor, where: str, on_device: bool = False) -> torch.Tensor:
    """A (29, h, w) map as contiguous float32, on the CPU or (``on_device``) where it is; a SegensError for a wrong
    shape or non-finite values."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
        shape = getattr(logits, "shape", type(logits).__name__)
        raise SegensError(f"{where}: expected logits of shape (classes, h, w), got {shape}")
    if logits.shape[0] != NUM_CLASSES:
        raise SegensError(f"{where}: expected {NUM_CLASSES} classes of logits, got {logits.shape[0]}")
    logits = logits.detach().to(logits.device if on_device else "cpu", torch.float32).contiguous()
    low, high = torch.aminmax(logits)  # both NaN if any value is NaN; one pass instead of isfinite's two
    if not (math.isfinite(low) and math.isfinite(high)):
        raise SegensError(f"{where}: the network produced NaN or infinite logits; check the checkpoint and input")
    return logits


def _active_regions(logits: torch.Tensor) -> list[BBox | None]:
    """Per class, the box (at model resolution) of the pixels whose logit may give a non-zero output, or None."""
    rows = (logits.amax(dim=2) > ZERO_LOGIT).numpy()  # a row holds an active pixel iff its max is above
    cols = (logits.amax(dim=1) > ZERO_LOGIT).numpy()
    regions: list[BBox | None] = []
    for row_mask, col_mask in zip(rows, cols):
        row_index, col_index = np.flatnonzero(row_mask), np.flatnonzero(col_mask)
        regions.append(None if row_index.size == 0 else
                       (int(row_index[0]), int(row_index[-1]) + 1, int(col_index[0]), int(col_index[-1]) + 1))
    return regions


def _output_span(start: int, stop: int, size_in: int, size_out: int) -> tuple[int, int]:
    """Output pixels [a, b) that input pixels [start, stop) can reach with bilinear weights, with pixels to spare."""
    scale = size_out / size_in
    return max(0, math.floor((start - 1) * scale) - 1), min(size_out, math.ceil((stop + 1) * scale) + 1)


def dyadic_step(size_in: int, size_out: int) -> tuple[int, int] | None:
    """(input step, output step) of an exactly croppable ratio (output >= input, dyadic scale), else None."""
    gcd = math.gcd(size_in, size_out)
    step_in, step_out = size_in // gcd, size_out // gcd
    if size_out < size_in or step_out & (step_out - 1):
        return None
    return step_in, step_out


def upsample_region(plane: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int],
                     height: int, width: int) -> torch.Tensor:
    """Float32 bilinear values of output rows x cols of one (h, w) plane upsampled to (height, width)."""
    steps = dyadic_step(plane.shape[0], height), dyadic_step(plane.shape[1], width)
    if steps[0] is None or steps[1] is None:  # exact only at full size
        full = F.interpolate(plane[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        return full[rows[0]:rows[1], cols[0]:cols[1]]
    (in_r0, in_r1, out_r0), (in_c0, in_c1, out_c0) = (_crop(rows, plane.shape[0], *steps[0]),
                                                      _crop(cols, plane.shape[1], *steps[1]))
    crop = plane[in_r0:in_r1, in_c0:in_c1]
    size = ((in_r1 - in_r0) // steps[0][0] * steps[0][1], (in_c1 - in_c0) // steps[1][0] * steps[1][1])
    up = F.interpolate(crop[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return up[rows[0] - out_r0:rows[1] - out_r0, cols[0] - out_c0:cols[1] - out_c0]


def _crop(span: tuple[int, int], size_in: int, step_in: int, step_out: int) -> tuple[int, int, int]:
    """Input crop [i0, i1) aligned to ``step_in`` covering output ``span`` with margin, and its output start."""
    first = span[0] * step_in // step_out - _MARGIN
    last = -(-span[1] * step_in // step_out) + _MARGIN
    i0 = max(0, first // step_in * step_in)
    i1 = min(size_in, -(-last // step_in) * step_in)
    return i0, i1, i0 // step_in * step_out


def padded_sigmoid(values: torch.Tensor) -> torch.Tensor:
    """float32 sigmoid of a tensor, every element through torch's vectorized kernel as in a full-size plane (the
    buffer is padded to a multiple of 64 elements, so that no element takes the scalar tail's rounding)."""
    count = values.numel()
    buffer = values.new_zeros(-(-count // _SIGMOID_BLOCK) * _SIGMOID_BLOCK)
    buffer[:count] = values.reshape(-1)
    return buffer.sigmoid_()[:count].view(values.shape)


def _sigmoid(values: torch.Tensor) -> np.ndarray:
    """``padded_sigmoid`` of a 2-D float32 CPU tensor, as numpy."""
    return padded_sigmoid(values).numpy()


# ---- the device path: the same torch code on CUDA or (for tests) CPU tensors ----------------------------------


def passes_to_uint8_torch(passes: list[torch.Tensor], height: int, width: int, where: str = "logits",
                          probabilities: bool = False) -> tuple[np.ndarray, list[BBox | None]]:
    """Several (C, h, w) maps on any device -> ((C, height, width) uint8 numpy, per-class boxes), computed where
    the maps are: whole-plane bilinear upsampling, sigmoid (unless ``probabilities``), sum in pass order,
    / count, quantization and boxes; only the uint8 values inside the boxes are copied to the host.

    On CPU tensors it equals ``reference_passes_to_uint8`` bit for bit (the same float32 torch operations in
    the same order as the reference, with the quantization of ``store.quantize``: clip to [0, 1], x 255 in
    float32, round half to even); on CUDA the float kernels may round differently (see the README).
    """
    planes = [_check_logits(output, where, on_device=True) for output in passes]
    total = None
    for output in planes:
        term = F.interpolate(output[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        term = term if probabilities else torch.sigmoid(term)
        total = term if total is None else total.add_(term)
    if len(planes) > 1:  # a device tensor divisor: CUDA would multiply by the reciprocal of a host scalar
        total = total / torch.tensor(len(planes), dtype=torch.float32, device=total.device)
    values = quantize_torch(total)  # finite: every pass was checked by _check_logits
    del total
    return copy_boxes(values)


def copy_boxes(values: torch.Tensor) -> tuple[np.ndarray, list[BBox | None]]:
    """(C, H, W) uint8 on any device -> (host numpy copy holding only each class's box of non-zero values, the
    boxes); one small transfer for the boxes, then one per non-empty class."""
    nonzero = values > 0
    rows, cols = nonzero.any(dim=2).cpu().numpy(), nonzero.any(dim=1).cpu().numpy()
    out = np.zeros(tuple(values.shape), dtype=np.uint8)  # pages outside the boxes stay untouched
    boxes: list[BBox | None] = []
    for channel in range(values.shape[0]):
        ys, xs = np.flatnonzero(rows[channel]), np.flatnonzero(cols[channel])
        if ys.size == 0:
            boxes.append(None)
            continue
        box = (int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1)
        out[channel, box[0]:box[1], box[2]:box[3]] = values[channel, box[0]:box[1], box[2]:box[3]].cpu().numpy()
        boxes.append(box)
    return out, boxes
