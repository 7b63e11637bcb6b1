"""The one exception type that segens raises for bad input; the CLI prints it without a traceback."""

from __future__ import annotations


class SegensError(Exception):
    """Bad input or a broken contract: the message names the file (image, class, member) and what to do."""
