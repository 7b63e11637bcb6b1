"""Combining members: voting strategies, post-processing, weight search, evaluation and RLE export."""
