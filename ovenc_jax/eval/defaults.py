"""Defaults of the trainer's attentive probe on the held-out set (config.eval.attentive): a cheap setting, no jax import."""

ATTENTIVE_IN_TRAINING = dict(
    enabled=False,      # a MAP head trained on the held-out set's frozen tokens at every eval
    epochs=5,           # few epochs: a trend across evaluations, not the paper's number
    lr=1e-3,
    min_lr=1e-7,
    batch_size=16,      # divisible by the mesh's batch axes
    val_fraction=0.3,   # per class, this share of the held-out samples (by sample id) is validated on
)
