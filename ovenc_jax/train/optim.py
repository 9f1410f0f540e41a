"""Optimizer from config: AdamW (no decay on norms/biases), warmup + decay, clipping, centers group."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ovenc_jax.loss.banks import bank_specs
from ovenc_jax.train.defaults import CLIP_CENTERS, DECAY_MASKS, SCHEDULES


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
  if o.get("decay_mask", "kernels") not in DECAY_MASKS:
    raise ValueError(f"optim.decay_mask={o.decay_mask!r}: expected one of {DECAY_MASKS}")
  if o.get("clip_centers", "group") not in CLIP_CENTERS:
    raise ValueError(f"optim.clip_centers={o.clip_centers!r}: expected one of {CLIP_CENTERS}")


def as_run_polynomial(peak: float, warmup: int, total: int, power: float) -> np.ndarray:
  """lr at optimizer steps 0..total of the published scheduler as its code runs (not its closed
  form): step 0 at the peak, then linear warmup from peak/warmup, then each step the previous lr
  times (1 + r)/2, r the ratio of consecutive (1 - progress)^power values, so the decay is about
  half as steep in log terms and the last step halves the one before instead of reaching 0."""
  lr = np.empty(total + 1, np.float64)
  lr[0] = peak
  ramp = np.arange(1, min(warmup, total) + 1)
  lr[ramp] = peak * ramp / max(warmup, 1)
  steps = np.arange(warmup + 1, total + 1)
  if steps.size:
    span = total - warmup
    ratio = ((1.0 - (steps - warmup) / span) / (1.0 - (steps - 1 - warmup) / span)) ** power
    lr[steps] = lr[warmup] * np.cumprod((1.0 + ratio) / 2.0)
  return lr


def schedule(o, total_steps: int, lr_mult: float = 1.0) -> optax.Schedule:
  peak = o.lr * lr_mult
  if o.schedule == "polynomial_as_run":
    table = jnp.asarray(as_run_polynomial(peak, o.warmup_steps, total_steps, o.power), jnp.float32)
    return lambda count: table[jnp.clip(count, 0, total_steps)]
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


def make_optimizer(o, loss_cfg, total_steps: int, class_shards: int = 1) -> optax.GradientTransformation:
  """Params are {"encoder": ..., "centers": [C, D] or {bank: [C_i, D]}}; the centers get their own
  lr multiplier (per bank with loss.heads: a head's `centers_lr_mult`) and decay.

  optim.decay_mask "kernels" decays the encoder's kernels only; "all" every encoder parameter (the
  published run). class_shards: devices the centers' rows are split over (optim.clip_centers).
  """
  validate(o, total_steps)
  mask = (lambda p: jax.tree.map(lambda _: True, p)) if o.get("decay_mask", "kernels") == "all" else _decay_mask
  encoder_tx = optax.adamw(schedule(o, total_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay, mask=mask)

  def centers_adamw(lr_mult):
    return optax.adamw(schedule(o, total_steps, lr_mult), b1=o.b1, b2=o.b2, eps=o.eps,
                       weight_decay=loss_cfg.centers_weight_decay)
  specs = bank_specs(loss_cfg)
  # One AdamW over all banks unless their lr multipliers differ (the optimizer state of a run with
  # banks keeps its layout); then one per bank, labelled "centers/<bank>".
  if specs is None or len({float(s.cfg.centers_lr_mult) for s in specs}) == 1:
    txs = {"centers": centers_adamw(loss_cfg.centers_lr_mult if specs is None else specs[0].cfg.centers_lr_mult)}
    labels = lambda p: {k: k for k in p}
  else:
    txs = {f"centers/{s.name}": centers_adamw(s.cfg.centers_lr_mult) for s in specs}
    labels = lambda p: {k: {b: f"centers/{b}" for b in p[k]} if k == "centers" else k for k in p}
  tx = optax.multi_transform({"encoder": encoder_tx, **txs}, labels)
  if o.clip_norm:
    tx = optax.chain(clip_transform(o, class_shards), tx)
  return tx


def clip_transform(o, class_shards: int = 1) -> optax.GradientTransformation:
  """Clipping to optim.clip_norm: of all gradients together, or with optim.clip_per_group of the
  encoder's and the centers' gradients each on their own (the published recipe); there
  optim.clip_centers clips the centers as one group ("group"), each bank ("per_head"), or each
  bank's rows on each of the `class_shards` devices ("per_head_shard": the published run clips
  every head's local slice of the centers on every GPU)."""
  if not o.get("clip_per_group", False):
    return optax.clip_by_global_norm(o.clip_norm)
  how = o.get("clip_centers", "group")
  centers = optax.clip_by_global_norm(o.clip_norm)
  if how != "group":
    per = _clip_per_shard(o.clip_norm, class_shards if how == "per_head_shard" else 1)
    centers = optax.GradientTransformation(lambda _: optax.EmptyState(),
                                           lambda g, s, p=None: (jax.tree.map(per, g), s))
  return optax.multi_transform({"encoder": optax.clip_by_global_norm(o.clip_norm), "centers": centers},
                               lambda p: {k: k for k in p})


def _clip_per_shard(max_norm: float, shards: int):
  """g [C_pad, D] -> g with each of its `shards` row blocks scaled to norm <= max_norm, as
  torch.nn.utils.clip_grad_norm_ does (coefficient max_norm / (norm + 1e-6), capped at 1)."""
  def clip(g):
    blocks = g.reshape(shards, g.shape[0] // shards, *g.shape[1:])
    norm = jnp.sqrt(jnp.sum(jnp.square(blocks.astype(jnp.float32)), axis=tuple(range(1, blocks.ndim))))
    coef = jnp.minimum(1.0, max_norm / (norm + 1e-6)).astype(g.dtype)
    return (blocks * coef.reshape(shards, *([1] * (blocks.ndim - 1)))).reshape(g.shape)
  return clip
