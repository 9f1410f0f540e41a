"""Attentive probe: a MAP head (learned query, cross-attention, MLP, linear classifier) trained on cached frozen tokens."""
import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

# The published protocol's settings (AdamW, decay to min_lr, clip 5, smoothing 0.1, batch 32).
DEFAULTS = dict(lr=1e-4, min_lr=1e-7, schedule="cosine", weight_decay=0.0, clip_norm=5.0,
                label_smoothing=0.1, batch_size=32, epochs=10, small_set_epochs=30, small_set_size=10_000,
                seed=0, init_scale=1e-3)
SCHEDULES = ("cosine", "linear")


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
  lr: float = DEFAULTS["lr"]
  min_lr: float = DEFAULTS["min_lr"]
  schedule: str = DEFAULTS["schedule"]
  weight_decay: float = DEFAULTS["weight_decay"]
  clip_norm: float = DEFAULTS["clip_norm"]
  label_smoothing: float = DEFAULTS["label_smoothing"]
  batch_size: int = DEFAULTS["batch_size"]
  epochs: int = 0  # 0: `epochs` of DEFAULTS, or `small_set_epochs` below `small_set_size` clips
  seed: int = DEFAULTS["seed"]
  init_scale: float = DEFAULTS["init_scale"]

  def resolved_epochs(self, num_train: int) -> int:
    if self.epochs:
      return int(self.epochs)
    return DEFAULTS["small_set_epochs"] if num_train < DEFAULTS["small_set_size"] else DEFAULTS["epochs"]

  def validate(self, prefix: str = "probe") -> None:
    if self.schedule not in SCHEDULES:
      raise ValueError(f"{prefix}.schedule={self.schedule!r}: one of {SCHEDULES}")
    for key in ("lr", "batch_size"):
      if not getattr(self, key) > 0:
        raise ValueError(f"{prefix}.{key}={getattr(self, key)} must be > 0")
    if self.epochs < 0:
      raise ValueError(f"{prefix}.epochs={self.epochs} must be >= 0 (0 = the protocol's default)")


# The published head's Linear init, timm's trunc_normal_(std=0.02): its cut is at +-2 absolute, so at
# this std it cuts nothing and is a plain normal.
_TRUNC = nn.initializers.normal(0.02)


def _fused_xavier(key, shape, dtype=jnp.float32):
  """Xavier-uniform of the fused [3D, D] query/key/value projection of torch's MultiheadAttention,
  applied to each of flax's [D, heads, head_dim] kernels: the published head's starting scale."""
  d = shape[0]
  bound = math.sqrt(6.0 / (d + 3 * d))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class MAPHead(nn.Module):
  """Multihead attention pooling (SigLIP2 style, as the published probe) then LayerNorm and a linear classifier.

  One learned query attends over the clip's tokens (padding masked out); an RMSNorm + MLP block with
  a residual follows; the classifier starts `init_scale` times smaller so first logits are near 0.
  The query starts at unit scale and the query/key/value projections Xavier-uniform, as in the
  published head: at 0.02 both, the query's logits start near 0 and it barely moves, so the head
  stays a mean-pool behind an MLP.
  """
  num_classes: int
  num_heads: int
  mlp_ratio: int = 4
  init_scale: float = DEFAULTS["init_scale"]

  @nn.compact
  def __call__(self, tokens, mask):
    b, _, d = tokens.shape
    tokens = tokens.astype(jnp.float32)
    probe = self.param("probe", nn.initializers.normal(1.0), (1, 1, d))
    attn_mask = mask[:, None, None, :].astype(bool)
    x = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, kernel_init=_fused_xavier, out_kernel_init=_TRUNC,
                                        name="attention")(jnp.broadcast_to(probe, (b, 1, d)), tokens, mask=attn_mask)
    y = nn.RMSNorm(epsilon=1e-6, name="mlp_norm")(x)
    y = nn.Dense(d * self.mlp_ratio, kernel_init=_TRUNC, name="fc1")(y)
    y = nn.Dense(d, kernel_init=_TRUNC, name="fc2")(nn.gelu(y, approximate=False))
    x = (x + y)[:, 0]
    x = nn.LayerNorm(epsilon=1e-5, name="norm")(x)
    scaled = lambda key, shape, dtype=jnp.float32: _TRUNC(key, shape, dtype) * self.init_scale
    return nn.Dense(self.num_classes, kernel_init=scaled, name="classifier")(x)


def head_for(width: int, num_classes: int, settings: ProbeSettings) -> MAPHead:
  return MAPHead(num_classes=num_classes, num_heads=max(1, width // 64), init_scale=settings.init_scale)


def make_optimizer(settings: ProbeSettings, total_steps: int) -> optax.GradientTransformation:
  end = min(settings.min_lr, settings.lr)
  if settings.schedule == "cosine":
    lr = optax.cosine_decay_schedule(settings.lr, max(total_steps, 1), alpha=end / settings.lr)
  else:
    lr = optax.linear_schedule(settings.lr, end, max(total_steps, 1))
  return optax.chain(optax.clip_by_global_norm(settings.clip_norm),
                     optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=settings.weight_decay))


def smoothed_loss(logits, labels, weights, num_classes: int, smoothing: float):
  """Weighted mean of label-smoothed cross-entropy; rows of weight 0 are padding."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
  per = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
  return jnp.sum(per * weights) / jnp.maximum(jnp.sum(weights), 1.0)


class _Rows:
  """Rows `rows` of an array-like (a memory-mapped cache stays on disk), indexed like one array."""

  def __init__(self, base, rows: np.ndarray):
    self.base, self.rows = base, rows
    self.shape = (len(rows),) + tuple(base.shape[1:])

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, idx):
    return self.base[self.rows[np.asarray(idx)]]


@dataclasses.dataclass
class Features:
  """Frozen encoder outputs of a labelled clip set: tokens [N, T, D], mask [N, T], labels [N]."""
  tokens: Any
  mask: Any
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def subset(self, rows: np.ndarray) -> "Features":
    return Features(_Rows(self.tokens, rows), _Rows(self.mask, rows), np.asarray(self.labels)[rows])


def _batch_shards(mesh, batch_axes) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes)


def check_batch_size(batch_size: int, mesh, batch_axes, key: str) -> None:
  n = _batch_shards(mesh, batch_axes)
  if batch_size % n:
    raise ValueError(f"{key}={batch_size} is not divisible by the {n} devices of mesh axes "
                     f"{'*'.join('mesh.' + a for a in batch_axes)}")


def _gather(feats: Features, idx: np.ndarray, size: int) -> dict[str, np.ndarray]:
  """Rows `idx` padded to `size` rows of weight 0."""
  n = len(idx)
  pad = size - n
  take = np.concatenate([idx, np.zeros(pad, idx.dtype)]) if pad else idx
  order = np.argsort(take, kind="stable")  # memory-mapped shards read fastest in file order
  tokens = np.empty((size,) + feats.tokens.shape[1:], np.float32)
  tokens[order] = np.asarray(feats.tokens[take[order]], np.float32)
  mask = np.asarray(feats.mask[take], bool)
  weights = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  mask[n:] = False
  mask[n:, 0] = True  # a padding row attends to one token so its softmax stays finite
  return dict(tokens=tokens, mask=mask, labels=np.asarray(feats.labels[take], np.int32), weights=weights)


class ProbeTrainer:
  """Trains one MAP head with the batch axis sharded over `batch_axes` of `mesh`, params replicated."""

  def __init__(self, width: int, num_classes: int, settings: ProbeSettings, mesh=None,
               batch_axes=("data",), batch_key: str = "probe.batch_size"):
    settings.validate(batch_key.rpartition(".")[0] or "probe")
    if num_classes < 2:
      raise ValueError(f"attentive probe: the training set has {num_classes} class(es); it needs at least 2")
    self.settings, self.num_classes = settings, num_classes
    self.mesh = mesh if mesh is not None else jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    self.batch_axes = tuple(batch_axes)
    check_batch_size(settings.batch_size, self.mesh, self.batch_axes, batch_key)
    self.head = head_for(width, num_classes, settings)
    self.data_sharding = NamedSharding(self.mesh, P(self.batch_axes))
    self.replicated = NamedSharding(self.mesh, P())

  def _put(self, batch):
    return {k: jax.device_put(v, self.data_sharding) for k, v in batch.items()}

  def init(self, width: int, tokens_per_clip: int):
    init, _, _ = _functions(self.head, self.settings, self.num_classes, 1)
    with jax.set_mesh(self.mesh):
      params = init(jax.random.key(self.settings.seed), jnp.zeros((1, tokens_per_clip, width), jnp.float32),
                    jnp.ones((1, tokens_per_clip), bool))
    return jax.device_put(params, self.replicated)

  def train(self, feats: Features) -> tuple[Any, dict[str, float]]:
    """Trained head params and {'probe_train_loss'} over `resolved_epochs` epochs of shuffled batches."""
    s = self.settings
    n = len(feats)
    if n == 0:
      raise ValueError("attentive probe: the training set has no labelled clips")
    epochs = s.resolved_epochs(n)
    steps_per_epoch = -(-n // s.batch_size)
    params = self.init(feats.tokens.shape[-1], feats.tokens.shape[1])
    _, opt_init, step = _functions(self.head, s, self.num_classes, epochs * steps_per_epoch)
    with jax.set_mesh(self.mesh):
      opt_state = jax.device_put(opt_init(params), self.replicated)
    rng = np.random.default_rng(s.seed)
    losses = []
    with jax.set_mesh(self.mesh):
      for _ in range(epochs):
        perm = rng.permutation(n)
        for i in range(steps_per_epoch):
          batch = self._put(_gather(feats, perm[i * s.batch_size:(i + 1) * s.batch_size], s.batch_size))
          params, opt_state, loss = step(params, opt_state, batch)
          if losses:  # two steps in flight at most: many queued collectives can hang XLA's CPU rendezvous
            losses[-1].block_until_ready()
          losses.append(loss)
    return params, {"probe_train_loss": float(np.mean(jax.device_get(losses[-steps_per_epoch:])))}

  def logits(self, params, feats: Features) -> np.ndarray:
    s = self.settings
    fn = _apply(self.head)
    out = []
    with jax.set_mesh(self.mesh):
      for i in range(0, len(feats), s.batch_size):
        idx = np.arange(i, min(i + s.batch_size, len(feats)))
        out.append(np.asarray(jax.device_get(fn(params, self._put(
            {k: v for k, v in _gather(feats, idx, s.batch_size).items() if k in ("tokens", "mask")}))))[:len(idx)])
    return np.concatenate(out) if out else np.zeros((0, self.num_classes), np.float32)


@functools.lru_cache(maxsize=16)
def _functions(head: MAPHead, settings: ProbeSettings, num_classes: int, total_steps: int):
  """(init, optimizer init, update step), jitted once per head and schedule: a sweep or a repeated
  evaluation reuses the compiled step."""
  tx = make_optimizer(settings, total_steps)
  init = jax.jit(lambda key, x, m: head.init(key, x, m)["params"])
  step = jax.jit(make_step(head, tx, num_classes, settings.label_smoothing), donate_argnums=(0, 1))
  return init, jax.jit(tx.init), step


@functools.lru_cache(maxsize=16)
def _apply(head: MAPHead):
  return jax.jit(lambda p, b: head.apply({"params": p}, b["tokens"], b["mask"]))


def make_step(head, tx, num_classes: int, smoothing: float):
  """The jitted update: loss over a padded batch, gradients, clipped AdamW."""

  def step(params, opt_state, batch):
    def loss_fn(p):
      logits = head.apply({"params": p}, batch["tokens"], batch["mask"])
      return smoothed_loss(logits, batch["labels"], batch["weights"], num_classes, smoothing)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  if len(labels) == 0:
    return float("nan")
  k = min(k, logits.shape[1])
  top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
  return float(np.mean((top == np.asarray(labels)[:, None]).any(1)))


def run_probe(train: Features, val: Features, num_classes: int, settings: ProbeSettings, mesh=None,
              batch_axes=("data",), batch_key: str = "probe.batch_size") -> dict[str, float]:
  """Trains on `train`, returns {'top1', 'top5', 'probe_train_loss'} on `val`."""
  if len(val) == 0:
    raise ValueError("attentive probe: the validation set has no labelled clips")
  trainer = ProbeTrainer(train.tokens.shape[-1], num_classes, settings, mesh, batch_axes, batch_key)
  params, info = trainer.train(train)
  logits = trainer.logits(params, val)
  return dict(top1=topk_accuracy(logits, val.labels, 1), top5=topk_accuracy(logits, val.labels, 5), **info)


def per_class_split(labels: np.ndarray, fraction: float, order) -> np.ndarray:
  """Boolean mask: per class, the first `fraction` of its clips as `order(idx)` ranks them (at least
  one, never all); a class with a single clip stays out of the mask."""
  held = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    if len(idx) < 2:
      continue
    k = min(len(idx) - 1, max(1, int(round(fraction * len(idx)))))
    held[order(idx)[:k]] = True
  return held


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Boolean holdout mask: per class a seeded random `fraction` of its clips (per_class_split)."""
  return per_class_split(labels, fraction, np.random.default_rng(seed).permutation)


def select_lr(train: Features, num_classes: int, settings: ProbeSettings, lrs, mesh=None, batch_axes=("data",),
              batch_key: str = "probe.batch_size", holdout: float = 0.2) -> tuple[float, dict[float, float]]:
  """The lr of `lrs` whose head, fit on the train split less a per-class holdout, scores best top-1 on
  that holdout (ties: the first listed), and each lr's holdout top-1. The validation split is never seen."""
  if not 0 < holdout < 1:
    raise ValueError(f"holdout={holdout} must be in (0, 1)")
  held = holdout_split(np.asarray(train.labels), holdout, settings.seed)
  fit, check = train.subset(np.flatnonzero(~held)), train.subset(np.flatnonzero(held))
  if len(check) == 0:
    raise ValueError("attentive probe lr selection: no class of the training set has two clips to hold one out")
  scores = {}
  for lr in lrs:
    # The epoch count of the full split (the small-set rule reads its size), as the final fit uses.
    s = dataclasses.replace(settings, lr=float(lr), epochs=settings.resolved_epochs(len(train)))
    scores[float(lr)] = run_probe(fit, check, num_classes, s, mesh, batch_axes, batch_key)["top1"]
  best = max(scores, key=lambda lr: (scores[lr], -list(scores).index(lr)))
  return best, scores
