"""Datasets: the offline sample generator and the prepare step (join, quarantine, augment, split)."""
