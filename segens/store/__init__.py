"""The probability store: one zarr v3 group per member and split, each image a (29, H, W) uint8 array at its
original size (p = v / 255), compressed, verified on every read. The only reader and writer of the format.

- segens.store.format: the layout, group attributes, identity and keys (what a version number covers);
- segens.store.quantize: probability <-> stored level, for numpy and torch (the one formula);
- segens.store.image: one image's verified metadata and chunk encoding;
- segens.store.store: an opened store (write, read, verify); segens.store.open: open, create, resume;
- segens.store.location: local folders and fsspec URLs.
"""

from segens.store.format import FORMAT, SPLITS, VERSION
from segens.store.image import image_boxes
from segens.store.open import create_mask_store, create_store, open_store
from segens.store.quantize import LEVELS, QUANTIZATION, SCALE, dequantize, quantize, quantize_torch
from segens.store.store import ProbabilityStore

__all__ = ["FORMAT", "LEVELS", "QUANTIZATION", "SCALE", "SPLITS", "VERSION", "ProbabilityStore", "create_mask_store",
           "create_store", "dequantize", "image_boxes", "open_store", "quantize", "quantize_torch"]
