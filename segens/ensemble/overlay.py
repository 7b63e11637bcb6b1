"""Overlays of one image for people: the X-ray with ground-truth outlines (solid) and predicted outlines
(dashed), one fixed colour per class; a grid of class crops or of predictions; an error view of one class.

Predictions and labels are read in the compact per-class form of segens.ensemble.evaluate (a box and the mask
inside it), so what is drawn is exactly what ``ens evaluate`` scores. matplotlib (Agg) draws; cv2 finds the
contours. The PNG's size follows from the layout alone (see :func:`figure_pixels`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from segens.conventions.classes import CLASS_TO_INDEX, CLASSES  # noqa: E402
from segens.conventions.dataset import SPLITS, ImageRecord, discover, image_size, read_image  # noqa: E402
from segens.conventions.dice import dice_from_counts  # noqa: E402
from segens.conventions.rle import BBox  # noqa: E402
from segens.ensemble.evaluate import (
    BoxedMask,
    Prediction,
    check_threshold,
    class_counts,
    dice_of_masks,
    open_prediction,  # noqa: E402
    prediction_labels,
    truth_masks,
)
from segens.errors import SegensError  # noqa: E402

PALETTE: tuple[str, ...] = (
    # finger-1 .. finger-19
    "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#b15cff", "#42d4f4", "#f032e6", "#bfef45", "#fabed4",
    "#469990", "#dcbeff", "#c98a3c", "#fffac8", "#ff7b7b", "#aaffc3", "#b8b800", "#ffd8b1", "#7f9cff",
    # Trapezium, Trapezoid, Capitate, Hamate, Scaphoid, Lunate, Triquetrum, Pisiform, Radius, Ulna
    "#00e5a0", "#ff9f00", "#ff4fa3", "#00a0ff", "#8fd14f", "#d291ff", "#ffee58", "#ff5a36", "#a3c9ff", "#ffc0ff",
)
"""One bright colour per class (index of segens.conventions.classes.CLASSES), readable on a dark X-ray; never changes."""

MEMBER_COLOURS = ("#ffffff", "#00e5ff", "#ff4fd8", "#76ff03", "#b388ff", "#ff6b6b")
MEMBER_STYLES = ((0, (1, 1.5)), (0, (6, 1.5, 1, 1.5)), (0, (9, 3)), (0, (2, 3)), (0, (4, 1.5, 1, 1.5, 1, 1.5)), "solid")
"""Each member's outline when several members are drawn in one panel (``ens qc --overlays``): colour and dashes."""

FALSE_POSITIVE = "#ff1f8e"  # magenta: predicted, not true
FALSE_NEGATIVE = "#00c2ff"  # cyan: true, missed
TRUE_POSITIVE = "#7dff6b"  # green, drawn faint
ERROR_ALPHA, TRUE_POSITIVE_ALPHA = 0.7, 0.25
LEGEND_BACKGROUND = "#1e1e1e"

DPI = 100
FULL_PANEL_IN = 7.0  # a whole image
CROP_PANEL_IN = 4.0  # one class's region
TITLE_IN = 0.55  # above each panel: up to two title lines
HEADER_IN = 0.4  # above the grid: the image key, split and size
LEGEND_IN = 2.1  # right of the grid
PAD_IN = 0.08
MAX_COLUMNS = 4
DISPLAY_PX = 1024  # images (or crops) larger than this are downscaled for display; outlines stay exact
MARGIN = 0.2  # crop margin, as a fraction of the class region's longer side
MIN_MARGIN_PX = 6


@dataclass
class Panel:
    """One picture of the grid: a region of the image and what is drawn on it (boxed masks in class order)."""

    title: str
    crop: BBox
    channels: list[int]  # classes outlined
    truth: list[BoxedMask] | None  # None: no labels
    pred: list[BoxedMask] | None  # None: ground truth only
    error: int | None = None  # a class index: colour its FP/FN/TP instead of outlining
    members: list[BoxedMask] | None = None  # the panel's class as each member predicts it, in member_style(i)


# ---- public entry point --------------------------------------------------------------------------------------


def draw_overlay(image: str, root: str | Path, preds: Sequence[str | Path] = (), out: str | Path = "overlay.png",
                 classes: Sequence[str] | str | None = None, error: str | None = None,
                 threshold: float = 0.5) -> Path:
    """Write an overlay PNG of one image (key ``ID001/image1661130828152`` or file name, train searched first).

    Plain: the whole image (one panel per PRED), truth solid, predictions dashed. ``classes`` (names, or one
    comma-separated string): one panel per class (columns) and PRED (rows), cropped to the class's region.
    ``error`` (a class name): per PRED, its false positives, false negatives and faint true positives, Dice in
    the title. Stores are kept where p > threshold. Returns ``out``; bad names are SegensErrors listing choices.
    """
    if isinstance(classes, str):
        classes = classes.split(",")
    if classes and error is not None:
        raise SegensError("give either --classes (outlines of several classes) or --error (one class), not both")
    channels = class_indices([error] if error is not None else classes) if classes or error is not None else None
    check_threshold(threshold)
    record, split = find_image(root, image)
    size = image_size(record.image_path)
    truth = truth_masks(record, size) if record.label_path is not None else None
    predictions = [open_prediction(path) for path in preds]
    labels = prediction_labels([p.path for p in predictions])
    pred_masks = [p.masks(record, size, threshold) for p in predictions]
    if error is not None:
        panels, columns = error_panels(record, truth, pred_masks, labels, channels[0], size)
    elif channels:
        panels, columns = class_panels(truth, pred_masks, labels, channels, size)
    else:
        panels, columns = full_panels(truth, pred_masks, labels, size)
    header = f"{record.key}  ({split}, {size[1]}x{size[0]}{'' if truth is not None else ', no labels'})"
    legend = legend_handles(panels, predictions)
    return render(read_image(record.image_path), panels, columns, header, legend, out, crop_view=channels is not None)


# ---- finding things by name ----------------------------------------------------------------------------------


def find_image(root: str | Path, image: str) -> tuple[ImageRecord, str]:
    """The record and split of an image given by key (``ID001/image1661130828152``, ``.png`` optional) or file
    name (``image1661130828152.png``); train is searched before test. Unknown names list a few valid ones."""
    wanted = image.strip().replace("\\", "/").removesuffix(".png")
    listings = [discover(root, split, require_labels=False) for split in SPLITS
                if (Path(root) / split / "DCM").is_dir()]
    if not listings:
        discover(root, "train")  # raises the data-root error, naming the missing folder
    for listing in listings:
        if "/" in wanted:
            found = [record for record in listing.records if record.key == wanted]
        else:
            found = [record for record in listing.records if record.name == f"{wanted}.png"]
        if len(found) > 1:
            raise SegensError(f"{root}/{listing.split}: {image} is in {', '.join(r.patient for r in found)}; "
                              f"give the key, e.g. {found[0].key}")
        if found:
            return found[0], listing.split
    examples = [record.key for listing in listings for record in listing.records[:3]]
    raise SegensError(f"image {image!r} is not in {root} ({', '.join(l.split for l in listings)}); give a key like "
                      f"{', '.join(examples)} or a file name like {Path(examples[0]).name}.png")


def class_indices(names: Sequence[str]) -> list[int]:
    """Indices of class names (``Capitate``); an unknown one is a SegensError listing the valid names."""
    indices = []
    for name in names:
        name = name.strip()
        if name not in CLASS_TO_INDEX:
            raise SegensError(f"unknown class {name!r}; valid classes are: {', '.join(CLASSES)}")
        indices.append(CLASS_TO_INDEX[name])
    if not indices:
        raise SegensError(f"no class given; valid classes are: {', '.join(CLASSES)}")
    return indices


# ---- panels --------------------------------------------------------------------------------------------------


def full_panels(truth: list[BoxedMask] | None, preds: list[list[BoxedMask]], labels: list[str],
                size: tuple[int, int]) -> tuple[list[Panel], int]:
    """One whole-image panel per PRED (or one of the truth alone); titles carry the image's mean Dice."""
    whole = (0, size[0], 0, size[1])
    channels = list(range(len(CLASSES)))
    if not preds:
        return [Panel("ground truth" if truth is not None else "image", whole, channels, truth, None)], 1
    panels = []
    for masks, label in zip(preds, labels):
        title = label
        if truth is not None:
            title += f"\nDice {dice_of_masks(masks, truth).mean():.4f} (mean of 29 classes)"
        panels.append(Panel(title, whole, channels, truth, masks))
    return panels, min(len(panels), MAX_COLUMNS)


def class_panels(truth: list[BoxedMask] | None, preds: list[list[BoxedMask]], labels: list[str],
                 channels: list[int], size: tuple[int, int]) -> tuple[list[Panel], int]:
    """A panel per (PRED, class): rows are PREDs, columns classes, each cropped to the class's region in the
    truth and every PRED (the same crop down a column)."""
    rows = preds or [None]
    panels = []
    for masks, label in zip(rows, labels or [None]):
        for channel in channels:
            crop = class_region([truth, *preds], channel, size)
            title = CLASSES[channel]
            if masks is not None:
                title += f"\n{label}" + ("" if truth is None else f": Dice {_dice(masks[channel], truth[channel]):.4f}")
            panels.append(Panel(title, crop, [channel], truth, masks))
    columns = len(channels) if len(rows) > 1 else min(len(channels), MAX_COLUMNS)
    return panels, columns


def error_panels(record: ImageRecord, truth: list[BoxedMask] | None, preds: list[list[BoxedMask]],
                 labels: list[str], channel: int, size: tuple[int, int]) -> tuple[list[Panel], int]:
    """Per PRED, one class's errors in its region: false positives, false negatives, true positives faint."""
    if truth is None:
        raise SegensError(f"{record.image_path}: has no label file, so --error has no truth to compare with; "
                          "pick a labelled image (train, or test with test/outputs_json)")
    if not preds:
        raise SegensError("--error needs a prediction to compare: add --pred submission.csv or --pred STORE")
    crop = class_region([truth, *preds], channel, size)
    panels = []
    for masks, label in zip(preds, labels):
        overlap, pred_sum, true_sum = class_counts(masks[channel], truth[channel])
        title = (f"{label}: {CLASSES[channel]} Dice {_dice(masks[channel], truth[channel]):.4f}\n"
                 f"FP {pred_sum - overlap} px, FN {true_sum - overlap} px, TP {overlap} px")
        panels.append(Panel(title, crop, [channel], truth, masks, error=channel))
    return panels, min(len(panels), MAX_COLUMNS)


def _dice(pred: BoxedMask, truth: BoxedMask) -> float:
    return float(dice_from_counts(*class_counts(pred, truth)))


def class_region(sources: Sequence[list[BoxedMask] | None], channel: int, size: tuple[int, int]) -> BBox:
    """The union of one class's boxes over the sources, widened by a margin and clipped to the image; the whole
    image when the class is empty everywhere."""
    boxes = [masks[channel][0] for masks in sources if masks is not None and masks[channel][0] is not None]
    if not boxes:
        return 0, size[0], 0, size[1]
    row0, row1 = min(b[0] for b in boxes), max(b[1] for b in boxes)
    col0, col1 = min(b[2] for b in boxes), max(b[3] for b in boxes)
    margin = max(MIN_MARGIN_PX, int(round(MARGIN * max(row1 - row0, col1 - col0))))
    return max(0, row0 - margin), min(size[0], row1 + margin), max(0, col0 - margin), min(size[1], col1 + margin)


# ---- drawing -------------------------------------------------------------------------------------------------


def figure_pixels(panels: int, columns: int, crop_view: bool) -> tuple[int, int]:
    """(width, height) in pixels of the PNG of ``panels`` panels in ``columns`` columns."""
    width_in, height_in = _figure_inches(panels, columns, crop_view)
    return int(round(width_in * DPI)), int(round(height_in * DPI))


def _figure_inches(panels: int, columns: int, crop_view: bool) -> tuple[float, float]:
    side = CROP_PANEL_IN if crop_view else FULL_PANEL_IN
    rows = -(-panels // columns)
    return columns * side + LEGEND_IN, rows * (side + TITLE_IN) + HEADER_IN


def render(gray: np.ndarray, panels: list[Panel], columns: int, header: str, legend: list, out: str | Path,
           crop_view: bool) -> Path:
    """Draw the panels of an (H, W) uint8 image in a grid with a header and a legend on the right; write ``out``."""
    width_in, height_in = _figure_inches(len(panels), columns, crop_view)
    side = CROP_PANEL_IN if crop_view else FULL_PANEL_IN
    figure = plt.figure(figsize=(width_in, height_in), dpi=DPI)
    figure.text(PAD_IN / width_in, 1 - 0.5 * HEADER_IN / height_in, header, ha="left", va="center", fontsize=11,
                weight="bold")
    for index, panel in enumerate(panels):
        row, column = divmod(index, columns)
        left = column * side + PAD_IN
        bottom = height_in - HEADER_IN - (row + 1) * (side + TITLE_IN) + PAD_IN
        axes = figure.add_axes((left / width_in, bottom / height_in, (side - 2 * PAD_IN) / width_in,
                                (side - 2 * PAD_IN) / height_in))
        draw_panel(axes, gray, panel)
    # a dark legend, like the X-ray behind the outlines: the pale class colours stay visible
    figure.legend(handles=legend, loc="center left", bbox_to_anchor=((width_in - LEGEND_IN + 0.05) / width_in, 0.5),
                  fontsize=8, handlelength=2.4, facecolor=LEGEND_BACKGROUND, edgecolor=LEGEND_BACKGROUND,
                  framealpha=1, labelcolor="white")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=DPI)
    plt.close(figure)
    return out


def draw_panel(axes, gray: np.ndarray, panel: Panel) -> None:
    """The crop of the image (or its error colouring), outlines in original pixel coordinates, and the title."""
    row0, row1, col0, col1 = panel.crop
    region = gray[row0:row1, col0:col1]
    picture = error_colours(region, panel) if panel.error is not None else region
    zoomed_in = max(region.shape) <= DISPLAY_PX
    axes.imshow(_display(picture), cmap="gray", vmin=0, vmax=255,
                extent=(col0 - 0.5, col1 - 0.5, row1 - 0.5, row0 - 0.5),
                interpolation="nearest" if zoomed_in else "antialiased")
    if panel.error is None:
        for channel in panel.channels:
            colour = PALETTE[channel]
            if panel.truth is not None:
                _outline(axes, panel.truth[channel], colour, "solid", 1.0)
            if panel.pred is not None:
                _outline(axes, panel.pred[channel], colour, (0, (3, 2)), 1.3)
        for index, mask in enumerate(panel.members or []):
            _outline(axes, mask, *member_style(index), 1.0)
    axes.set_xlim(col0 - 0.5, col1 - 0.5)
    axes.set_ylim(row1 - 0.5, row0 - 0.5)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(panel.title, fontsize=9)


def _display(picture: np.ndarray) -> np.ndarray:
    """``picture`` (H, W[, 3]) uint8, area-downscaled so its longer side is at most DISPLAY_PX."""
    longest = max(picture.shape[:2])
    if longest <= DISPLAY_PX:
        return picture
    scale = DISPLAY_PX / longest
    size = (max(1, round(picture.shape[1] * scale)), max(1, round(picture.shape[0] * scale)))
    return cv2.resize(picture, size, interpolation=cv2.INTER_AREA)


def error_colours(region: np.ndarray, panel: Panel) -> np.ndarray:
    """(h, w, 3) uint8: the grey crop with one class's FP and FN blended strongly and TP faintly."""
    assert panel.error is not None and panel.truth is not None and panel.pred is not None
    pred = paste(panel.pred[panel.error], panel.crop)
    truth = paste(panel.truth[panel.error], panel.crop)
    rgb = np.repeat(region[..., None], 3, axis=2).astype(np.float32)
    for where, colour, alpha in ((pred & truth, TRUE_POSITIVE, TRUE_POSITIVE_ALPHA),
                                 (pred & ~truth, FALSE_POSITIVE, ERROR_ALPHA),
                                 (truth & ~pred, FALSE_NEGATIVE, ERROR_ALPHA)):
        rgb[where] = (1 - alpha) * rgb[where] + alpha * np.array(matplotlib.colors.to_rgb(colour), np.float32) * 255
    return np.rint(rgb).astype(np.uint8)


def paste(mask: BoxedMask, crop: BBox) -> np.ndarray:
    """(crop rows, crop cols) bool: a boxed mask seen through ``crop``."""
    out = np.zeros((crop[1] - crop[0], crop[3] - crop[2]), dtype=bool)
    box, sub = mask
    if box is None:
        return out
    row0, row1, col0, col1 = max(box[0], crop[0]), min(box[1], crop[1]), max(box[2], crop[2]), min(box[3], crop[3])
    if row0 < row1 and col0 < col1:
        out[row0 - crop[0]:row1 - crop[0], col0 - crop[2]:col1 - crop[2]] = \
            sub[row0 - box[0]:row1 - box[0], col0 - box[2]:col1 - box[2]]
    return out


def contours(mask: BoxedMask) -> list[np.ndarray]:
    """Closed outlines of a boxed mask as (N, 2) float (x, y) image coordinates of boundary pixel centres."""
    box, sub = mask
    if box is None:
        return []
    found, _ = cv2.findContours(sub.view(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    offset = np.array([box[2], box[0]], dtype=np.float64)
    return [np.vstack([c[:, 0], c[:1, 0]]).astype(np.float64) + offset for c in found]


def member_style(index: int) -> tuple[str, object]:
    """(colour, line style) of the ``index``-th member's outline."""
    return MEMBER_COLOURS[index % len(MEMBER_COLOURS)], MEMBER_STYLES[index % len(MEMBER_STYLES)]


def _outline(axes, mask: BoxedMask, colour: str, style, width: float) -> None:
    lines = contours(mask)
    if lines:
        axes.add_collection(LineCollection(lines, colors=colour, linestyles=style, linewidths=width))


def legend_handles(panels: list[Panel], predictions: list[Prediction]) -> list:
    """Legend entries: the line styles (or the error colours) and the colour of every class drawn."""
    if any(panel.error is not None for panel in panels):
        return [Patch(color=FALSE_POSITIVE, label="false positive\n(predicted, not true)"),
                Patch(color=FALSE_NEGATIVE, label="false negative\n(true, missed)"),
                Patch(color=TRUE_POSITIVE, alpha=0.6, label="true positive")]
    handles = []
    if any(panel.truth is not None for panel in panels):
        handles.append(Line2D([], [], color="white", linestyle="solid", label="ground truth"))
    if predictions:
        handles.append(Line2D([], [], color="white", linestyle=(0, (3, 2)), linewidth=1.3, label="prediction"))
    channels = sorted({channel for panel in panels for channel in panel.channels})
    handles += [Line2D([], [], color=PALETTE[c], linewidth=4, label=CLASSES[c]) for c in channels]
    return handles
