"""Training: the trainer, its optimizer, and orbax checkpoints."""
