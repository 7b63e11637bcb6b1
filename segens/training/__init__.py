"""Training for the member kinds: the data cache, augmentations, losses, settings, precision and the one loop of
network kinds (smp), and the YOLO fold data set. It imports no other segens folder; member kinds import it."""
