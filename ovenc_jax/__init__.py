"""OneVision-Encoder pretraining in JAX/Flax: model, loss, input, training, evaluation, export."""
