"""Evaluation: embedding records with a trained encoder and probing the embeddings."""
