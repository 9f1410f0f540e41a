"""transformers code and model-card template written into PyTorch exports (OneVision-Encoder on the Hub)."""
