"""Voting: how members' probability maps become one mask per class. One object per strategy (soft, weighted,
hard), shared by ``ens combine``, the search's evidence and ``ens search-weights``; the kept-pixel rules; the
per-class post-processing; and recipe.json, which records a strategy's settings per class.

- segens.voting.base: the Strategy interface, Settings (combine's) and Choice (the search's);
- segens.voting.rules: the kept-pixel rules on stored uint8 values; segens.voting.morphology: post-processing;
- segens.voting.soft / weighted / hard: the strategies; segens.voting.registry: ``register``, ``get_strategy``;
- segens.voting.recipe: recipe.json, its only reader and writer.
"""

from segens.voting import soft, weighted, hard  # noqa: F401, I001  (each registers its strategy, in this order)
from segens.voting.registry import get_strategy, names, register

__all__ = ["get_strategy", "names", "register"]
