"""The most suspicious (image, class) pairs of ``ens qc`` drawn for people (``--overlays N DIR``): per pair one
PNG of the class's region with the ensemble's mask (dashed, the class's colour), each member's mask at its recipe
threshold (its own colour and dashes) and, where labels exist, the truth (solid): the same outlines as ``ens show``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.lines import Line2D

from segens.conventions.classes import CLASSES, NUM_CLASSES
from segens.conventions.dataset import ImageRecord, read_image
from segens.ensemble.combine import class_values
from segens.ensemble.evaluate import BoxedMask, truth_masks
from segens.ensemble.overlay import PALETTE, Panel, class_region, member_style, render
from segens.ensemble.qc import QcResult, QcRow, member_masks
from segens.voting.morphology import apply_postprocessing
from segens.voting.registry import get_strategy

EMPTY: BoxedMask = (None, np.zeros((0, 0), bool))


def overlay_name(rank: int, row: QcRow) -> str:
    """``03-ID001_image1661130828152-Capitate.png``: rank first, so the folder lists in the qc order."""
    return f"{rank:02d}-{row.image.replace('/', '_')}-{CLASSES[row.channel]}.png"


def draw_suspects(result: QcResult, stores: Sequence, settings, keys: Sequence[str], present: np.ndarray,
                  records: Mapping[str, ImageRecord], count: int, folder: str | Path) -> list[Path]:
    """Write the ``count`` most suspicious class rows of ``result`` as PNGs into ``folder``; their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index_of = {key: index for index, key in enumerate(keys)}
    written = []
    for rank, row in enumerate(result.ranked()[:count], start=1):
        here = present[index_of[row.image]]
        members = [store.member for store, there in zip(stores, here) if there]
        written.append(draw_suspect(rank, row, stores, settings, here, members, records[row.image],
                                    folder / overlay_name(rank, row)))
    return written


def draw_suspect(rank: int, row: QcRow, stores: Sequence, settings, present: np.ndarray, members: list[str],
                 record: ImageRecord, out: Path) -> Path:
    """One pair's PNG: the class's region, the ensemble, every present member and the truth if known."""
    channel = row.channel
    size = stores[int(np.flatnonzero(present)[0])].image_size(row.image)
    boxes = [store.boxes(row.image) if there else [None] * NUM_CLASSES for store, there in zip(stores, present)]
    box, values = class_values(stores, row.image, channel, present, boxes)
    if box is None:
        ensemble, member_outlines = EMPTY, [EMPTY] * len(members)
    else:
        kept = get_strategy(settings.strategy).keep(values, settings, channel, present)
        ensemble = (box, apply_postprocessing(kept, settings.postprocess[channel]))
        member_outlines = [(box, mask) for mask in member_masks(values, settings, channel, present)]
    truth = truth_masks(record, size) if record.label_path is not None else None
    predicted = [EMPTY] * NUM_CLASSES
    predicted[channel] = ensemble
    crop = class_region([truth, predicted, *([outline] * NUM_CLASSES for outline in member_outlines)], channel, size)
    signals = ", ".join(f"{name} {value:.2f}" for name, value in row.signals.items())
    title = f"#{rank} {CLASSES[channel]}: score {row.score:.2f}" + (
        "" if row.dice is None else f", true Dice {row.dice:.3f}") + f"\n{signals}"
    panel = Panel(title, crop, [channel], truth, predicted, members=member_outlines)
    legend = ([Line2D([], [], color=PALETTE[channel], label="ground truth")] if truth is not None else []) + [
        Line2D([], [], color=PALETTE[channel], linestyle=(0, (3, 2)), linewidth=1.3, label="ensemble")] + [
        Line2D([], [], color=member_style(index)[0], linestyle=member_style(index)[1], label=name)
        for index, name in enumerate(members)]
    header = f"{row.image} ({size[1]}x{size[0]}{'' if truth is not None else ', no labels'})"
    return render(read_image(record.image_path), [panel], 1, header, legend, out, crop_view=True)
