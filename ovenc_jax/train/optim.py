"""Optimizer from config: AdamW (no decay on norms/biases), warmup + decay, clipping, centers group."""
import jax
import optax

from ovenc_jax.train.defaults import SCHEDULES


def validate(o, total_steps: int) -> None:
  if o.schedule not in SCHEDULES:
    raise ValueError(f"optim.schedule={o.schedule!r}: expected one of {SCHEDULES}")
  if o.lr <= 0:
    raise ValueError(f"optim.lr={o.lr} must be > 0")
  if not 0 <= o.warmup_steps <= total_steps:
    raise ValueError(f"optim.warmup_steps={o.warmup_steps} must be in [0, total_steps={total_steps}]")
  if o.weight_decay < 0:
    raise ValueError(f"optim.weight_decay={o.weight_decay} must be >= 0")
  if o.clip_norm is not None and o.clip_norm <= 0:
    raise ValueError(f"optim.clip_norm={o.clip_norm} must be > 0 (or None for no clipping)")
  if int(o.grad_accum_steps) < 1:
    raise ValueError(f"optim.grad_accum_steps={o.grad_accum_steps} must be >= 1")


def schedule(o, total_steps: int, lr_mult: float = 1.0) -> optax.Schedule:
  peak = o.lr * lr_mult
  decay_steps = max(1, total_steps - o.warmup_steps)
  if o.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=o.end_lr_ratio)
  else:
    decay = optax.polynomial_schedule(peak, peak * o.end_lr_ratio, o.power, decay_steps)
  warmup = optax.linear_schedule(0.0, peak, max(1, o.warmup_steps))
  return optax.join_schedules([warmup, decay], [o.warmup_steps])


DECAYED_LEAVES = ("kernel",)


def _decay_mask(params):
  # By name, not by rank: the q/k/v biases are [heads, head_dim] matrices, yet biases; norms and
  # the pooling probe are not decayed either. Only the layers' kernels are.
  # The last dict key names the leaf (a boxed, logically partitioned leaf adds a `.value` step).
  def decayed(path, _):
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return bool(keys) and keys[-1] in DECAYED_LEAVES
  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(o, loss_cfg, total_steps: int) -> optax.GradientTransformation:
  """Params are {"encoder": ..., "centers": [C, D]}; the centers get their own lr multiplier and decay."""
  validate(o, total_steps)
  encoder_tx = optax.adamw(schedule(o, total_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay, mask=_decay_mask)
  centers_tx = optax.adamw(schedule(o, total_steps, loss_cfg.centers_lr_mult), b1=o.b1, b2=o.b2,
                           eps=o.eps, weight_decay=loss_cfg.centers_weight_decay)
  tx = optax.multi_transform({"encoder": encoder_tx, "centers": centers_tx},
                             lambda p: {k: k for k in p})
  if o.clip_norm:
    tx = optax.chain(clip_transform(o), tx)
  return tx


def clip_transform(o) -> optax.GradientTransformation:
  """Clipping to optim.clip_norm: of all gradients together, or with optim.clip_per_group of the
  encoder's and the centers' gradients each on their own (the published recipe)."""
  if not o.get("clip_per_group", False):
    return optax.clip_by_global_norm(o.clip_norm)
  return optax.multi_transform({"encoder": optax.clip_by_global_norm(o.clip_norm),
                                "centers": optax.clip_by_global_norm(o.clip_norm)},
                               lambda p: {k: k for k in p})
