"""The ViT projector (tactile -> RGB embedding space): model, training core, paired data and metrics."""
