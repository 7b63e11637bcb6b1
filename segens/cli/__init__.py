"""The ``ens`` command: argument parsing and printing only; every command calls one segens function.

Commands live in one module per area (data, folds, members, ensemble) and register with the app in _app.
"""

from segens.cli import checkpoints, data, ensemble, folds, inspect, members  # noqa: F401  (each registers its commands)
from segens.cli._app import app, main

__all__ = ["app", "main"]
