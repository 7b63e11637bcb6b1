"""segens: reproducible ensembles of multi-label segmentation checkpoints for hand-bone X-rays."""

__version__ = "0.1.0"
