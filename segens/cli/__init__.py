"""The ``ens`` command: argument parsing and printing only; every command calls one segens function.

One module per command, named after it; ``ens --help`` lists them in the order of the workflow (the order they
are imported here): try it, make data, split folds, train and predict members, look at checkpoints, search a
recipe, combine, evaluate, judge and pseudo-label the result, and look at it.
"""

# each module registers its command with the app, in this order
from segens.cli import demo, synth, selfcheck, folds, train_member, predict_member, inspect  # noqa: F401, I001
from segens.cli import search_weights, combine, evaluate, qc, pseudo_label, show  # noqa: F401, I001
from segens.cli._app import app, main

__all__ = ["app", "main"]
