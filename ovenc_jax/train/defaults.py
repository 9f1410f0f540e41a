"""The optimizer's `config.optim` defaults as plain data (no jax, so configs import it cheaply)."""
import ml_collections

# "polynomial_as_run": the published scheduler's curve as its code steps it (optim.as_run_polynomial).
SCHEDULES = ("cosine", "polynomial", "polynomial_as_run")
# optim.decay_mask: weight decay on the encoder's kernels only, or on every encoder parameter.
DECAY_MASKS = ("kernels", "all")
# optim.clip_centers (with clip_per_group): the centers clipped as one group, per bank, or per bank
# and per device holding a slice of its rows.
CLIP_CENTERS = ("group", "per_head", "per_head_shard")


def default_optim_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=100, schedule="cosine", end_lr_ratio=0.0, power=1.0,
      weight_decay=0.05, b1=0.9, b2=0.98, eps=1e-8, clip_norm=5.0, grad_accum_steps=1,
      decay_mask="kernels", clip_centers="group"))
