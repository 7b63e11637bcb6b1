"""RLE encode/decode against the competition's reference on random and adversarial masks."""

from __future__ import annotations

import numpy as np
import pytest

from segens.conventions import rle
from segens.errors import SegensError
from segens.reference import reference_decode, reference_encode


def adversarial_masks() -> list[np.ndarray]:
    shapes = [(1, 1), (1, 7), (7, 1), (5, 8), (8, 5), (13, 17)]
    masks = []
    for height, width in shapes:
        masks.append(np.zeros((height, width), bool))
        masks.append(np.ones((height, width), bool))
        first = np.zeros((height, width), bool)
        first.flat[0] = True
        masks.append(first)
        last = np.zeros((height, width), bool)
        last.flat[-1] = True
        masks.append(last)
        checker = (np.add.outer(np.arange(height), np.arange(width)) % 2).astype(bool)
        masks.extend([checker, ~checker])
        right_edge = np.zeros((height, width), bool)
        right_edge[:, -1] = True  # runs that touch the right edge of one row and the left of the next
        right_edge[1:, 0] = True
        masks.append(right_edge)
        left_column = np.zeros((height, width), bool)
        left_column[:, 0] = True
        masks.append(left_column)
        band = np.zeros((height, width), bool)
        band[height // 2 :, :] = True
        masks.append(band)
    return masks


def random_masks(seed: int = 0, count: int = 200) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = []
    for _ in range(count):
        height, width = rng.integers(1, 40, size=2)
        density = rng.choice([0.01, 0.2, 0.5, 0.9, 0.99])
        mask = rng.random((height, width)) < density
        if rng.random() < 0.3:  # blobs confined to a box, sometimes touching edges
            mask[:] = False
            r0, c0 = rng.integers(0, height), rng.integers(0, width)
            mask[r0 : rng.integers(r0, height) + 1, c0 : rng.integers(c0, width) + 1] = True
        masks.append(mask)
    return masks


@pytest.mark.parametrize("mask", adversarial_masks() + random_masks(), ids=lambda m: f"{m.shape}-{int(m.sum())}")
def test_encode_and_decode_match_reference(mask: np.ndarray) -> None:
    expected = reference_encode(mask)
    assert rle.encode(mask) == expected
    assert rle.encode(mask.astype(np.uint8) * 255) == expected  # any non-zero value is foreground
    height, width = mask.shape
    assert np.array_equal(rle.decode(expected, height, width), reference_decode(expected, height, width).astype(bool))
    box, sub = rle.decode_box(expected, height, width)
    assert box == rle.bbox(mask)
    if box is not None:
        assert np.array_equal(sub, mask[box[0] : box[1], box[2] : box[3]])


def test_empty_mask_is_empty_string() -> None:
    assert rle.encode(np.zeros((4, 6), bool)) == ""
    assert not rle.decode("", 4, 6).any()
    assert rle.decode_box("", 4, 6)[0] is None


def test_known_values() -> None:
    mask = np.zeros((3, 4), bool)
    mask[0, 0] = True  # pixel 1
    mask[0, 3] = mask[1, 0] = mask[1, 1] = True  # pixels 4..6: a run across the row boundary
    mask[2, 3] = True  # last pixel, 12
    assert rle.encode(mask) == "1 1 4 3 12 1"


def test_encode_stack_with_known_boxes() -> None:
    masks = np.stack(random_masks(seed=3, count=1) * 3)
    boxes = [rle.bbox(m) for m in masks]
    assert rle.encode_stack(masks, boxes) == [reference_encode(m) for m in masks]
    decoded = rle.decode_stack(rle.encode_stack(masks), *masks.shape[1:])
    assert np.array_equal(decoded, masks)


def test_large_non_square_image() -> None:
    rng = np.random.default_rng(7)
    mask = np.zeros((300, 517), bool)
    for _ in range(20):
        r, c = rng.integers(0, 290), rng.integers(0, 500)
        mask[r : r + rng.integers(1, 40), c : c + rng.integers(1, 60)] = True
    text = rle.encode(mask)
    assert text == reference_encode(mask)
    assert np.array_equal(rle.decode(text, 300, 517), mask)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 2 3", "odd count"),
        ("1 x", "other than integers"),
        ("1.5 2", "other than integers"),
        ("0 2", "starts must be >= 1"),
        ("1 0", "lengths >= 1"),
        ("5 2 1 2", "overlap or are out of order"),
        ("1 3 2 2", "overlap or are out of order"),
        ("11 3", "runs past the end"),
    ],
)
def test_bad_rle_is_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(SegensError, match=message) as caught:
        rle.decode(text, 3, 4, where="sub.csv image1.png finger-1")
    assert "sub.csv image1.png finger-1" in str(caught.value)


def test_whitespace_variants_parse() -> None:
    assert np.array_equal(rle.decode("  1 2\t5  1 ", 3, 4), rle.decode("1 2 5 1", 3, 4))


@pytest.mark.parametrize("mask", adversarial_masks()[::3] + random_masks(seed=5, count=40), ids=lambda m: f"{m.shape}")
def test_encode_box_of_a_larger_box(mask: np.ndarray) -> None:
    height, width = mask.shape
    for box in [(0, height, 0, width), rle.bbox(mask)]:
        if box is None:
            assert rle.encode_box(np.zeros((0, 0), bool), None, width) == ""
            continue
        sub = mask[box[0] : box[1], box[2] : box[3]]
        assert rle.encode_box(sub, box, width) == reference_encode(mask)
