"""Patient-grouped k-fold splits and per-fold training of members."""
