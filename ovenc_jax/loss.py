"""Multi-label cluster-discrimination loss (CosFace margin, Partial-FC) with class centers sharded over the mesh."""
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

# Logical axis names of the centers parameter [C_pad, D]: rows over 'classes' (the trainer's rules
# map it over every mesh axis), the embedding dim unsharded. Not 'embed': with the rules listing
# ('embed', 'fsdp') before 'classes', flax gives 'fsdp' to the second dim first and then cannot
# use it for the rows, leaving the rows unsharded (P(None, 'fsdp')).
CENTERS_LOGICAL_AXES = ("classes", None)

_NORM_EPS = 1e-12


def default_loss_config() -> ml_collections.ConfigDict:
  """Loss defaults; `num_classes` must be set to the number of cluster centers before use."""
  return ml_collections.ConfigDict(dict(
      num_classes=0,          # number of concept centers (rows of centers.npy)
      scale=64.0,             # s: logits are s * cos
      margin=0.3,             # m: CosFace margin subtracted from the positive's cosine
      fn_threshold=0.75,      # negatives with cos > this are dropped (likely false negatives); None = off
      labels_per_step=8,      # labels sampled per sample per step, each its own softmax
      sample_rate=1.0,        # Partial-FC fraction of centers used as negatives per shard
      centers_lr_mult=1.0,    # learning-rate multiplier of the centers (consumed by the optimizer)
      # The loss only sees normalised centers, so weight decay would merely shrink their norm and
      # thereby raise their effective learning rate; off by default.
      centers_weight_decay=0.0,
  ))


def validate_loss_config(cfg) -> None:
  """Raises ValueError naming the `loss.*` key that is missing or out of range."""
  for key in default_loss_config():
    if key not in cfg:
      raise ValueError(f"loss.{key} is missing from the config")
  n = cfg.num_classes
  if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
    raise ValueError(f"loss.num_classes must be a positive int (number of cluster centers), got {n!r}")
  if not cfg.scale > 0:
    raise ValueError(f"loss.scale must be > 0, got {cfg.scale!r}")
  if not 0.0 <= cfg.margin < 2.0:
    raise ValueError(f"loss.margin must be in [0, 2), got {cfg.margin!r}")
  if cfg.fn_threshold is not None and not -1.0 <= cfg.fn_threshold <= 1.0:
    raise ValueError(f"loss.fn_threshold must be in [-1, 1] or None (filter off), got {cfg.fn_threshold!r}")
  k = cfg.labels_per_step
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
    raise ValueError(f"loss.labels_per_step must be a positive int, got {k!r}")
  if not 0.0 < cfg.sample_rate <= 1.0:
    raise ValueError(f"loss.sample_rate must be in (0, 1], got {cfg.sample_rate!r}")
  if not cfg.centers_lr_mult >= 0:
    raise ValueError(f"loss.centers_lr_mult must be >= 0, got {cfg.centers_lr_mult!r}")
  if not cfg.centers_weight_decay >= 0:
    raise ValueError(f"loss.centers_weight_decay must be >= 0, got {cfg.centers_weight_decay!r}")


def padded_num_classes(num_classes: int, num_shards: int) -> int:
  """Smallest multiple of num_shards that holds num_classes rows."""
  if num_classes < 1 or num_shards < 1:
    raise ValueError(f"padded_num_classes: need num_classes >= 1 and num_shards >= 1, "
                     f"got {num_classes}, {num_shards}")
  return -(-num_classes // num_shards) * num_shards


def init_centers(rng, num_classes: int, dim: int, num_shards: int, sharding=None) -> jnp.ndarray:
  """Unit-norm Gaussian rows [C_pad, D]; padding rows are zero. With `sharding`, built sharded."""
  c_pad = padded_num_classes(num_classes, num_shards)

  def init(key):
    w = jax.random.normal(key, (c_pad, dim), jnp.float32)
    w = w * jax.lax.rsqrt(jnp.sum(w * w, axis=1, keepdims=True))
    return jnp.where(jnp.arange(c_pad)[:, None] < num_classes, w, 0.0)

  # jit with out_shardings: each device generates only its rows (threefry is partitionable).
  return jax.jit(init, out_shardings=sharding)(rng)


def centers_sharding(mesh, class_axes=("data", "fsdp", "tensor")) -> NamedSharding:
  return NamedSharding(mesh, P(tuple(class_axes), None))


def _l2_normalize(x):
  # max(., eps) keeps zero padding rows finite (and their gradient zero) instead of NaN.
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), _NORM_EPS))


def sample_labels(rng, labels, valid_mask, k: int):
  """Picks k of the valid labels per row uniformly without replacement; -1 fills short rows.

  labels [B, L] int32, valid_mask [B, L] bool. Returns (labels [B, k'], valid [B, k']) with
  k' = min(k, L). Rows are keyed by their position in the (global) batch.
  """
  b, l = labels.shape
  if l <= k:
    return jnp.where(valid_mask, labels, -1), valid_mask
  u = jax.random.uniform(rng, (b, l))
  u = jnp.where(valid_mask, u, 2.0)  # invalid entries sort last
  _, idx = jax.lax.top_k(-u, k)
  picked = jnp.take_along_axis(labels, idx, axis=1)
  valid = jnp.take_along_axis(valid_mask, idx, axis=1)
  return jnp.where(valid, picked, -1), valid


def _axes_size(mesh, axes) -> int:
  return int(math.prod(mesh.shape[a] for a in axes))


def _linear_axis_index(mesh, axes):
  """Index of this device's block along `axes` in the order P(axes) lays blocks out (first major)."""
  idx = jnp.int32(0)
  for a in axes:
    idx = idx * mesh.shape[a] + jax.lax.axis_index(a)
  return idx


def _varying_axes(x) -> frozenset:
  aval = jax.typeof(x)
  # JAX 0.10 keeps the varying axes in aval.manual_axis_type.varying (older releases: aval.vma).
  varying = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
  return frozenset(varying if varying is not None else getattr(aval, "vma", ()))


def _vary(x, axes):
  """Marks x as varying over `axes` (its gradient is then psum-ed over the axes it was invariant on)."""
  missing = tuple(a for a in axes if a not in _varying_axes(x))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def _invariant(x):
  """pmean over the mesh axes an (already equal-valued) result still varies over, so P() holds."""
  axes = tuple(sorted(_varying_axes(x)))
  return jax.lax.pmean(x, axes) if axes else x


# Fixed-shift bounds: kept negatives have z = s*cos <= s*u (u = min(fn_threshold, 1)), so with the
# shift s*u - _SHIFT_HEADROOM no exp overflows (a sum of up to 1e8 terms <= e^70 stays finite), and
# while s*(1 + u) <= _MAX_FIXED_SPAN every kept term is >= e^-60, far above float32 underflow.
_SHIFT_HEADROOM = 70.0
_MAX_FIXED_SPAN = 130.0
_MAX_FIXED_CLASSES = 100_000_000


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _shard_logits(e, c, drop_col, pos_col, col_ok, scale, thr, shift):
  return _shard_logits_fwd(e, c, drop_col, pos_col, col_ok, scale, thr, shift)[0]


def _shard_logits_fwd(e, c, drop_col, pos_col, col_ok, scale, thr, shift):
  """One shard's part of the softmaxes, from unit embeddings e [B, D] and raw center rows c [n, D].

  Returns m [B] and sum_j exp(s*cos_bj - m) [B] over the kept negatives, their count [B], and the
  cosines of the positives this shard holds [B, K] (0 elsewhere). Kept = not in drop_col [B, *]
  (the row's own labels and padding classes; n = nothing), in col_ok [n] when given (Partial-FC
  selection), cos <= thr. pos_col [B, K]: columns of the sampled positives (n = not here).
  With `shift` (a float) m is that constant and no row max is computed; shift=None: the row max.

  The centers are normalised by scaling the logit columns with r = 1/|c| instead of writing
  normalised rows: the residual is q = p * r, and q @ (1/r) (a matvec) recovers the row sums.
  """
  b, n = e.shape[0], c.shape[0]
  r = jax.lax.rsqrt(jnp.maximum(jnp.sum(c * c, axis=1), _NORM_EPS))                  # [n]
  cos = (e @ c.T) * r[None, :]                                                       # [B, n]
  pos_here = pos_col < n
  pc = jnp.minimum(pos_col, n - 1)
  cos_pos = jnp.where(pos_here, jnp.einsum("bd,bkd->bk", e, c[pc]) * r[pc], 0.0)
  # In-place scatter of -inf: never negatives. (A per-column mask folded into the elementwise
  # pass below is recomputed per element by XLA and costs more than this scatter.)
  cos = cos.at[jnp.arange(b)[:, None], drop_col].set(-jnp.inf, mode="drop")
  z = scale * cos
  if col_ok is not None:
    z = z + jnp.where(col_ok, 0.0, -jnp.inf)[None, :]
  if shift is not None:
    # No max pass: XLA's CPU reductions with a select inside do not vectorise, so each such pass
    # costs about as much as the matmul here; the fixed shift needs none.
    m = jnp.full((b,), shift, jnp.float32)
    q = jnp.exp(z - shift) * r[None, :]
    if thr is not None:
      q = jnp.where(cos <= thr, q, 0.0)
    # Under the span bound every kept term is >= e^-60, so min(q * 1e35, 1) is exactly 1 for it
    # (for any center norm below ~1e8) and 0 for dropped ones: a count without a compare, which
    # would not vectorise inside a reduction.
    n_kept = jnp.sum(jnp.minimum(q * 1e35, 1.0), axis=1)
  else:
    keep = jnp.isfinite(z) if thr is None else jnp.isfinite(z) & (cos <= thr)
    mx = jnp.max(jnp.where(keep, z, -jnp.inf), axis=1)
    m = jnp.where(jnp.isfinite(mx), mx, -jnp.inf)
    q = jnp.where(keep, jnp.exp(z - jnp.where(jnp.isfinite(mx), mx, 0.0)[:, None]) * r[None, :], 0.0)
    n_kept = jnp.sum(keep.astype(jnp.float32), axis=1)
  return (m, q @ (1.0 / r), n_kept, cos_pos), (e, c, r, q, pos_col)


def _shard_logits_bwd(scale, thr, shift, res, g):
  # With G = s * g_sum * p the gradient of the logits, u_j = sum_b G_bj e_b (+ the positives'
  # terms) is the gradient w.r.t. the unit center c_j / |c_j|; then dc_j = r_j (u_j - (u_j.ĉ_j) ĉ_j).
  # Both matmuls use q = p * r and the raw c, so the row weights stay on the small [B, D] side
  # and the positives are added in place (a scatter of B*K rows into the dot's output).
  e, c, r, q, pos_col = res
  _, g_sum, _, g_pos = g
  n = c.shape[0]
  pc = jnp.minimum(pos_col, n - 1)
  g_pos = jnp.where(pos_col < n, g_pos, 0.0) * r[pc]                                 # [B, K]
  w = scale * g_sum[:, None]
  de = w * (q @ c) + jnp.einsum("bk,bkd->bd", g_pos, c[pc])
  ru = (q.T @ (w * e)).at[pos_col.reshape(-1)].add(
      (g_pos[:, :, None] * e[:, None, :]).reshape(-1, e.shape[1]), mode="drop")     # r * u
  dc = ru - (r * r * jnp.sum(ru * c, axis=1))[:, None] * c
  return (de, dc, None, None, None)


_shard_logits.defvjp(_shard_logits_fwd, _shard_logits_bwd)


def make_loss_fn(mesh, cfg, batch_axes: Sequence[str] = ("data", "fsdp"),
                 class_axes: Sequence[str] = ("data", "fsdp", "tensor")):
  """Returns loss_fn(embeddings [B,D], centers [C_pad,D], labels int32 [B,L], rng) -> (loss, metrics).

  embeddings are sharded over `batch_axes` (rows), centers over `class_axes` (rows), labels like the
  embeddings; -1 in labels is padding. The softmax for sample b and one of its sampled labels y is
    -log( e^{s(cos_by - m)} / (e^{s(cos_by - m)} + sum_{j in N_b} e^{s cos_bj}) )
  where N_b = real classes that are none of b's labels, with cos_bj <= fn_threshold, and (with
  sample_rate < 1) among this step's Partial-FC selection. The loss is the mean over valid labels.
  """
  validate_loss_config(cfg)
  batch_axes, class_axes = tuple(batch_axes), tuple(class_axes)
  for a in batch_axes + class_axes:
    if a not in mesh.axis_names:
      raise ValueError(f"make_loss_fn: axis {a!r} is not in the mesh axes {mesh.axis_names}")
  num_classes = int(cfg.num_classes)
  scale = float(cfg.scale)
  margin = float(cfg.margin)
  thr = None if cfg.fn_threshold is None else float(cfg.fn_threshold)
  k_labels = int(cfg.labels_per_step)
  rate = float(cfg.sample_rate)
  n_batch = _axes_size(mesh, batch_axes)
  n_class = _axes_size(mesh, class_axes)
  # The custom-VJP block needs both operands typed alike (varying over every axis in play).
  all_axes = class_axes + tuple(a for a in batch_axes if a not in class_axes)
  u = 1.0 if thr is None else min(thr, 1.0)
  # Fixed softmax shift when the logit span allows it (see _MAX_FIXED_SPAN), else the exact row max.
  shift = None
  if scale * (1.0 + u) <= _MAX_FIXED_SPAN and num_classes <= _MAX_FIXED_CLASSES:
    shift = scale * u - _SHIFT_HEADROOM

  def local_loss(emb, centers, labels, rng, *, n_sel, c_pad):
    c_local_n = centers.shape[0]
    shard = _linear_axis_index(mesh, class_axes)
    offset = shard * c_local_n
    k_lab, k_pfc = jax.random.split(rng)

    # The whole batch on every device; the transpose of this gather reduce-scatters the
    # embedding gradients back to their batch shards.
    e = jax.lax.all_gather(_l2_normalize(emb), batch_axes, axis=0, tiled=True)       # [B, D]
    lab = jax.lax.all_gather(labels, batch_axes, axis=0, tiled=True, to="invarying")  # [B, L]
    b = lab.shape[0]
    lab_valid = (lab >= 0) & (lab < num_classes)
    out_of_range = jnp.sum((lab < -1) | (lab >= num_classes))
    pos, pos_valid = sample_labels(k_lab, lab, lab_valid, k_labels)                # [B, K]

    c = centers  # raw rows: _shard_logits normalises them as column scales of the logits
    pos_loc = pos - offset
    pos_own = pos_valid & (pos_loc >= 0) & (pos_loc < c_local_n)

    row_ids = jnp.arange(c_local_n)
    row_real = offset + row_ids < num_classes
    if n_sel is not None:
      # Partial FC: this shard's positives (score 2) first, then uniform random rows; padding last.
      score = jax.random.uniform(jax.random.fold_in(k_pfc, shard), (c_local_n,))
      score = score.at[jnp.where(pos_own, pos_loc, c_local_n).reshape(-1)].set(2.0, mode="drop")
      score = jnp.where(row_real, score, -1.0)
      top_score, sel = jax.lax.top_k(score, n_sel)
      n_pos_local = jnp.sum(top_score == 2.0)
      # Size max(ceil(r*Cn), #positives) like Partial FC; n_sel is only the static upper bound.
      n_active = jnp.maximum(math.ceil(rate * c_local_n), n_pos_local)
      col_ok = (jnp.arange(n_sel) < n_active) & row_real[sel]
      cs = c[sel]
      inv = jnp.full((c_local_n,), n_sel, jnp.int32).at[sel].set(jnp.arange(n_sel, dtype=jnp.int32))
    else:
      col_ok = row_real
      cs = c
      inv = row_ids.astype(jnp.int32)
    n_cols = cs.shape[0]
    n_pad = c_pad - num_classes

    # Every label of a sample (sampled or not) is excluded from that sample's negatives.
    lab_loc = lab - offset
    lab_own = lab_valid & (lab_loc >= 0) & (lab_loc < c_local_n)
    col = jnp.where(lab_own, inv[jnp.clip(lab_loc, 0, c_local_n - 1)], n_cols)       # [B, L]
    pos_col = jnp.where(pos_own, inv[jnp.clip(pos_loc, 0, c_local_n - 1)], n_cols)    # [B, K]
    if n_sel is None:
      # Dense: padding classes (global rows >= C, at most n_pad) are dropped like own labels.
      pad = num_classes + jnp.arange(n_pad) - offset
      pad = jnp.where((pad >= 0) & (pad < n_cols), pad, n_cols)
      drop_col, col_mask = jnp.concatenate([col, jnp.broadcast_to(pad, (b, n_pad))], axis=1), None
    else:
      drop_col, col_mask = col, col_ok
    m_loc, s_loc, n_kept, cos_pos = _shard_logits(
        _vary(e, all_axes), _vary(cs, all_axes), drop_col, pos_col, col_mask, scale, thr, shift)
    # The shift only stabilises: no gradient through it.
    m_loc = jax.lax.stop_gradient(m_loc)
    if shift is not None:
      m = m_loc
    else:
      m = jax.lax.pmax(m_loc, class_axes)                                            # [B]
      s_loc = s_loc * jnp.exp(jnp.where(jnp.isfinite(m_loc), m_loc - m, -jnp.inf))
    # Filtered = usable columns - the sample's distinct own labels among them - kept negatives.
    own_ok = lab_own & (col < n_cols) & col_ok[jnp.minimum(col, n_cols - 1)]
    first = jnp.argmax(lab[:, :, None] == lab[:, None, :], axis=2) == jnp.arange(lab.shape[1])
    n_usable = (jnp.sum(col_ok) - jnp.sum(own_ok & first, axis=1)).astype(jnp.float32)
    # One all-reduce: positive cosines (each from its owner shard), sum-exp terms, counts.
    cos_pos, sum_neg, n_neg, n_usable = jax.lax.psum((cos_pos, s_loc, n_kept, n_usable), class_axes)
    if shift is not None:
      has_neg = sum_neg > 0
    else:
      has_neg = jnp.isfinite(m)
      m = jnp.where(has_neg, m, 0.0)

    z_pos = scale * (cos_pos - margin)                                               # [B, K]
    big = jax.lax.stop_gradient(jnp.where(has_neg[:, None], jnp.maximum(z_pos, m[:, None]), z_pos))
    lse = big + jnp.log(jnp.exp(z_pos - big) + sum_neg[:, None] * jnp.exp(m[:, None] - big))
    per_label = jnp.where(pos_valid, lse - z_pos, 0.0)
    n_valid = jnp.sum(pos_valid)
    denom = jnp.maximum(n_valid, 1).astype(jnp.float32)
    loss = jnp.sum(per_label) / denom

    has_label = jnp.any(pos_valid, axis=1)
    n_rows = jnp.maximum(jnp.sum(has_label), 1).astype(jnp.float32)
    n_filt = n_usable - n_neg
    metrics = dict(
        num_valid_labels=n_valid.astype(jnp.float32),
        loss_count=n_valid.astype(jnp.float32),  # the loss's denominator: accumulation weights by it
        negatives_per_sample=jnp.sum(jnp.where(has_label, n_neg, 0)) / n_rows,
        positive_cos=jnp.sum(jnp.where(pos_valid, cos_pos, 0.0)) / denom,
        positive_prob=jnp.sum(jnp.where(pos_valid, jnp.exp(z_pos - lse), 0.0)) / denom,
        labels_out_of_range=out_of_range.astype(jnp.float32),
    )
    if thr is not None:
      metrics["fn_filtered_per_sample"] = jnp.sum(jnp.where(has_label, n_filt, 0)) / n_rows
    loss = _invariant(loss)
    metrics = {k: _invariant(jax.lax.stop_gradient(v.astype(jnp.float32))) for k, v in metrics.items()}
    metrics["loss"] = jax.lax.stop_gradient(loss)
    return loss, metrics

  def loss_fn(embeddings, centers, labels, rng):
    if embeddings.ndim != 2 or centers.ndim != 2 or labels.ndim != 2:
      raise ValueError(f"loss_fn: expected embeddings [B,D], centers [C_pad,D], labels [B,L]; got "
                       f"{embeddings.shape}, {centers.shape}, {labels.shape}")
    b, d = embeddings.shape
    c_pad = centers.shape[0]
    if centers.shape[1] != d:
      raise ValueError(f"loss_fn: centers dim {centers.shape[1]} != embeddings dim {d}")
    if labels.shape[0] != b:
      raise ValueError(f"loss_fn: labels batch {labels.shape[0]} != embeddings batch {b}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(f"loss_fn: labels must be integer (-1 = padding), got {labels.dtype}")
    if c_pad % n_class or c_pad < num_classes:
      raise ValueError(f"loss_fn: centers have {c_pad} rows; need a multiple of the {n_class} class "
                       f"shards >= loss.num_classes={num_classes} (use padded_num_classes)")
    if b % n_batch:
      raise ValueError(f"loss_fn: batch {b} is not divisible by the {n_batch} batch shards {batch_axes}")
    c_local_n = c_pad // n_class
    k = min(k_labels, labels.shape[1])
    # Static number of selected rows per shard (None = all rows, no sampling): room for every
    # positive of the batch even when they all fall on one shard.
    n_sel = None
    if math.ceil(rate * c_local_n) < c_local_n:
      n_sel = min(c_local_n, max(math.ceil(rate * c_local_n), b * k))
    fn = jax.shard_map(
        lambda e, c, l, r: local_loss(e, c, l, r, n_sel=n_sel, c_pad=c_pad), mesh=mesh,
        in_specs=(P(batch_axes, None), P(class_axes, None), P(batch_axes, None), P()),
        out_specs=(P(), P()))
    return fn(embeddings, centers, labels.astype(jnp.int32), rng)

  return loss_fn
