"""The ``ens`` command: argument parsing and printing only; every command calls one segens function.

Commands live in one module per area (data, folds, members, ensemble) and register with the app in _app.
"""

from segens.cli import data  # noqa: F401  (registers commands)
from segens.cli import folds  # noqa: F401
from segens.cli import members  # noqa: F401
from segens.cli._app import app, main

__all__ = ["app", "main"]
