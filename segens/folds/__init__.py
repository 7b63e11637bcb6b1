"""Patient-grouped k-fold splits (folds.json): making, checking and reading them."""
