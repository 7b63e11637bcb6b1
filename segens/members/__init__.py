"""Members: specs, one adapter module per kind (smp, yolo, csv), and the probability store."""
