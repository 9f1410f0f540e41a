"""Multi-label cluster-discrimination loss (CosFace margin, Partial-FC) with class centers sharded over the mesh."""
import functools
import math
from typing import NamedTuple, Sequence

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


RECIPES = ("default", "official")

# Keys added after the first release: configs saved without them read these values.
_OPTIONAL_DEFAULTS = dict(
    # 'default' (this project's loss) or 'official' (OneVision-Encoder's): see make_loss_fn and
    # docs/clustering.md.
    recipe="default",
    # Partial FC gathers max(ceil(rate*C/n), slack * expected positives per shard) columns; more
    # positives than that overflow (counted in metrics["pfc_overflow"]), never a wrong gradient.
    pfc_positive_slack=2.0,
    # 0 = unit-norm Gaussian rows; > 0 = N(0, std^2) entries (the published init uses 0.01).
    centers_init_std=0.0,
    # Several center banks trained together: [{"name", "num_classes", optional "weight", "label_table"
    # and any per-bank loss key}], see bank_specs. Empty = one bank, `num_classes` centers.
    heads=[],
    # How a sample's own classes are kept out of its negatives: 'auto' | 'scatter' | 'compare'
    # (OWN_LABEL_MASKS; same result, different cost per platform).
    own_label_mask="auto",
)


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
      **_OPTIONAL_DEFAULTS,
  ))


def _opt(cfg, key):
  return cfg[key] if key in cfg else _OPTIONAL_DEFAULTS[key]


def validate_loss_config(cfg) -> None:
  """Raises ValueError naming the `loss.*` key that is missing or out of range."""
  for key in default_loss_config():
    if key not in cfg and key not in _OPTIONAL_DEFAULTS:
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
  if _opt(cfg, "recipe") not in RECIPES:
    raise ValueError(f"loss.recipe must be one of {RECIPES}, got {_opt(cfg, 'recipe')!r}")
  if not _opt(cfg, "pfc_positive_slack") > 0:
    raise ValueError(f"loss.pfc_positive_slack must be > 0, got {_opt(cfg, 'pfc_positive_slack')!r}")
  if _opt(cfg, "own_label_mask") not in OWN_LABEL_MASKS:
    raise ValueError(f"loss.own_label_mask must be one of {OWN_LABEL_MASKS}, got {_opt(cfg, 'own_label_mask')!r}")
  if not _opt(cfg, "centers_init_std") >= 0:
    raise ValueError(f"loss.centers_init_std must be >= 0 (0 = unit rows), got {_opt(cfg, 'centers_init_std')!r}")


def padded_num_classes(num_classes: int, num_shards: int) -> int:
  """Smallest multiple of num_shards that holds num_classes rows."""
  if num_classes < 1 or num_shards < 1:
    raise ValueError(f"padded_num_classes: need num_classes >= 1 and num_shards >= 1, "
                     f"got {num_classes}, {num_shards}")
  return -(-num_classes // num_shards) * num_shards


def init_centers(rng, num_classes: int, dim: int, num_shards: int, sharding=None,
                 std: float = 0.0) -> jnp.ndarray:
  """Gaussian rows [C_pad, D], unit-norm (std=0) or N(0, std^2); padding rows are zero.
  With `sharding`, built sharded."""
  c_pad = padded_num_classes(num_classes, num_shards)

  def init(key):
    w = jax.random.normal(key, (c_pad, dim), jnp.float32)
    w = w * (std if std > 0 else jax.lax.rsqrt(jnp.sum(w * w, axis=1, keepdims=True)))
    return jnp.where(jnp.arange(c_pad)[:, None] < num_classes, w, 0.0)

  # jit with out_shardings: each device generates only its rows (threefry is partitionable).
  return jax.jit(init, out_shardings=sharding)(rng)


def centers_sharding(mesh, class_axes=("data", "fsdp", "tensor")) -> NamedSharding:
  return NamedSharding(mesh, P(tuple(class_axes), None))


def _inv_norm(x, keepdims=False):
  """1 / |x| over the last axis; max(., eps) keeps zero padding rows finite (and their gradient
  zero) instead of NaN."""
  return jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=keepdims), _NORM_EPS))


def _l2_normalize(x):
  return x * _inv_norm(x, keepdims=True)


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


# How a row's own columns leave its logits (loss.own_label_mask): 'scatter' writes -inf into them
# in place; 'compare' keeps a column when it differs from each of the row's few own columns,
# compares fused into the logits' elementwise pass. XLA's TPU cost model counts the scatter as
# 8.7 GiB a step for base on v5e-256 (4,096 rows x 202 columns into [4096, 3907]; the whole loss is
# 13.9 GiB with it, 5.0 without), so 'auto' compares on TPU. On CPU the scatter is 3-4% faster
# (8 host devices, 128 x 8 labels, 1M centers of 64: 897 against 930 ms forward and backward);
# GPU keeps it too (the one measured there).
OWN_LABEL_MASKS = ("auto", "scatter", "compare")


def _own_columns_kept(drop_col, n: int):
  """[B, n] bool: column j is none of the row's drop_col [B, L] entries (L compares per element)."""
  cols = jax.lax.broadcasted_iota(jnp.int32, (drop_col.shape[0], n), 1)
  keep = jnp.ones((drop_col.shape[0], n), bool)
  for l in range(drop_col.shape[1]):
    keep = keep & (cols != drop_col[:, l:l + 1])
  return keep


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _shard_logits(e, c, drop_col, col_ok, scale, thr, shift, mask):
  return _shard_logits_fwd(e, c, drop_col, col_ok, scale, thr, shift, mask)[0]


def _shard_logits_fwd(e, c, drop_col, col_ok, scale, thr, shift, mask):
  """One shard's part of the softmaxes' negatives, from unit embeddings e [B, D] and raw rows c [n, D].

  Returns m [B] and sum_j exp(s*cos_bj - m) [B] over the kept negatives, and their count [B].
  Kept = not in drop_col [B, *] (the row's own labels and padding classes; n = nothing), in col_ok
  [n] when given (Partial-FC selection, or the real classes), cos <= thr. With `shift` (a float) m is
  that constant and no row max is computed; shift=None: the row max. `mask`: how drop_col is applied
  ('scatter' | 'compare', OWN_LABEL_MASKS).

  The centers are normalised by scaling the logit columns with r = 1/|c| instead of writing
  normalised rows: the residual is q = p * r, and q @ (1/r) (a matvec) recovers the row sums.
  """
  b = e.shape[0]
  r = _inv_norm(c)                                                                   # [n]
  cos = (e @ c.T) * r[None, :]                                                       # [B, n]
  # A row's own columns are never its negatives (which mask where: OWN_LABEL_MASKS).
  if mask == "compare":
    cos = jnp.where(_own_columns_kept(drop_col, cos.shape[1]), cos, -jnp.inf)
  else:
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
  return (m, q @ (1.0 / r), n_kept), (e, c, r, q)


def _shard_logits_bwd(scale, thr, shift, mask, res, g):
  # With G = s * g_sum * p the gradient of the logits, u_j = sum_b G_bj e_b is the gradient w.r.t.
  # the unit center c_j / |c_j|; then dc_j = r_j (u_j - (u_j.ĉ_j) ĉ_j). Both matmuls use q = p * r
  # and the raw c, so the row weights stay on the small [B, D] side.
  e, c, r, q = res
  _, g_sum, _ = g
  w = scale * g_sum[:, None]
  de = w * (q @ c)
  ru = q.T @ (w * e)                                                                 # r * u
  dc = ru - (r * r * jnp.sum(ru * c, axis=1))[:, None] * c
  return (de, dc, None, None)


_shard_logits.defvjp(_shard_logits_fwd, _shard_logits_bwd)


def _owned_chunks(pos_own, chunk: int):
  """(order [n_chunks_max * chunk], n_chunks): flat (b, k) ids of the owned positives first (then
  the out-of-range fill B*K), and how many chunks of `chunk` hold them all (a traced count)."""
  n = pos_own.size
  padded = -(-n // chunk) * chunk
  order = jnp.nonzero(pos_own.reshape(-1), size=padded, fill_value=n)[0].astype(jnp.int32)
  n_own = jnp.sum(pos_own, dtype=jnp.int32)
  return order, (n_own + chunk - 1) // chunk


def _chunk(e, c, pos_loc, order, i, chunk: int):
  """One chunk of owned positives: flat (b, k) ids (B*K past the last one) and the same clamped
  into range, whether each slot holds a positive (the tail of the last chunk does not), and their
  center rows: ids y, c_y [chunk, D]; and embeddings e_b."""
  idx = jax.lax.dynamic_slice(order, (i * chunk,), (chunk,))
  ok = idx < pos_loc.size
  flat = jnp.minimum(idx, pos_loc.size - 1)
  rows = jnp.clip(pos_loc.reshape(-1)[flat], 0, c.shape[0] - 1)
  return idx, flat, ok, rows, c[rows], e[flat // pos_loc.shape[1]]


def _gathered_positive_cosines(e, c, pos_loc, pos_own):
  """_positive_cosines by gathering the center row of every one of the B*K positives [B, K, D]."""
  cp = c[jnp.clip(pos_loc, 0, c.shape[0] - 1)]
  cos = jnp.einsum("bd,bkd->bk", e, cp) * _inv_norm(cp)
  return jnp.where(pos_own, cos, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _positive_cosines(e, c, pos_loc, pos_own, chunk: int):
  """cos(e_b, c_y) [B, K] for the positives this shard owns (0 elsewhere), from the raw rows.

  Taken from the rows themselves rather than from the Partial-FC selection, so a positive that did
  not fit into the selection (overflow) still gets its exact term and gradient. A shard owns about
  B*K / shards of the B*K positives of the (all-gathered) batch: it visits them `chunk` at a time
  in a loop that usually runs once, so memory and traffic scale with its share, not with the
  global batch (a [B, K, D] gather of rows on every device was about 1 GiB of a base step's
  23 GiB on v5e-256, and grows with the pod's batch). Exact for any number of owned positives.
  Its gradient w.r.t. c is a table-sized loop carry, so where the shard's table is the larger of
  the two, local_loss gathers instead (_gathered_positive_cosines).
  """
  return _positive_cosines_fwd(e, c, pos_loc, pos_own, chunk)[0]


def _positive_cosines_fwd(e, c, pos_loc, pos_own, chunk):
  e, c, pos_loc, pos_own = (jnp.asarray(x) for x in (e, c, pos_loc, pos_own))
  order, n_chunks = _owned_chunks(pos_own, chunk)
  axes = tuple(sorted(_varying_axes(e) | _varying_axes(c) | _varying_axes(pos_loc)))

  def body(i, out):
    idx, _, ok, _, cp, eb = _chunk(e, c, pos_loc, order, i, chunk)
    cos = jnp.sum(eb * cp, axis=-1) * _inv_norm(cp)
    return out.at[idx].set(jnp.where(ok, cos, 0.0), mode="drop")

  out = jax.lax.fori_loop(0, n_chunks, body, _vary(jnp.zeros((pos_own.size,), e.dtype), axes))
  return out.reshape(pos_own.shape), (e, c, pos_loc, order, n_chunks)


def _positive_cosines_bwd(chunk, res, g):
  # cos = (e.c) r with r = 1/|c| (constant where |c|^2 is clamped at eps):
  # d e = g c r,  d c = g (e r - (e.c) r^3 c [|c|^2 > eps]).
  e, c, pos_loc, order, n_chunks = res
  g = g.reshape(-1)
  k = pos_loc.shape[1]

  def body(i, acc):
    de, dc = acc
    _, flat, ok, rows, cp, eb = _chunk(e, c, pos_loc, order, i, chunk)
    gi = jnp.where(ok, g[flat], 0.0)[:, None]
    sq = jnp.sum(cp * cp, axis=-1, keepdims=True)
    r = jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS))
    dot = jnp.sum(eb * cp, axis=-1, keepdims=True)
    de = de.at[flat // k].add(gi * cp * r)
    dc = dc.at[rows].add(gi * (eb * r - jnp.where(sq > _NORM_EPS, dot * r ** 3, 0.0) * cp))
    return de, dc

  init = (_vary(jnp.zeros_like(e), tuple(_varying_axes(e))), _vary(jnp.zeros_like(c), tuple(_varying_axes(c))))
  de, dc = jax.lax.fori_loop(0, n_chunks, body, init)
  return de, dc, None, None


_positive_cosines.defvjp(_positive_cosines_fwd, _positive_cosines_bwd)


def positive_capacity(num_terms: int, num_shards: int, slack: float) -> int:
  """Static room for one shard's distinct positives: slack x its expected share, at least 16."""
  return max(16, math.ceil(slack * num_terms / num_shards))


def selection_size(c_local: int, rate: float, num_terms: int, num_shards: int, slack: float):
  """(n_rate, n_sel): the Partial-FC size per shard, ceil(rate * C/n), and the static number of
  columns gathered, which also holds the positives a shard is expected to own; None = dense."""
  n_rate = math.ceil(rate * c_local)
  n_sel = min(c_local, max(n_rate, positive_capacity(num_terms, num_shards, slack)))
  return n_rate, (None if n_rate >= c_local or n_sel >= c_local else n_sel)


def _select_columns(key, pos_loc, pos_own, row_real, n_rate: int, n_sel: int):
  """Partial FC on one shard: its distinct positives first (in random order among themselves), then
  uniformly random rows, never padding rows. Returns (sel [n_sel] row ids, col_ok [n_sel] = the
  active columns, max(n_rate, #positives) of them, overflow = positives that did not fit).
  A positive that does not fit is only missing as a negative of other rows; its own term is exact.
  """
  c_local_n = row_real.shape[0]
  u = jax.random.uniform(key, (c_local_n,))
  is_pos = jnp.zeros((c_local_n,), bool).at[jnp.where(pos_own, pos_loc, c_local_n).reshape(-1)].set(
      True, mode="drop")
  score = jnp.where(row_real, jnp.where(is_pos, 2.0 + u, u), -1.0)
  _, sel = jax.lax.top_k(score, n_sel)
  n_pos = jnp.sum(is_pos)
  n_active = jnp.maximum(n_rate, jnp.minimum(n_pos, n_sel))
  col_ok = (jnp.arange(n_sel) < n_active) & row_real[sel]
  return sel, col_ok, jnp.maximum(n_pos - n_sel, 0)


def make_loss_fn(mesh, cfg, batch_axes: Sequence[str] = ("data", "fsdp"),
                 class_axes: Sequence[str] = ("data", "fsdp", "tensor")):
  """Returns loss_fn(embeddings [B,D], centers [C_pad,D], labels int32 [B,L], rng) -> (loss, metrics).

  embeddings are sharded over `batch_axes` (rows), centers over `class_axes` (rows), labels like the
  embeddings; -1 in labels is padding (a row without labels, e.g. an empty segment slot, adds no
  term). Each step picks `labels_per_step` of a row's labels; each picked label y is a softmax
    -log( e^{s(cos_by - m)} / (e^{s(cos_by - m)} + sum_{j in N} e^{s cos'_bj}) )
  and the loss is the mean over these terms (metrics["loss_count"] of them).
  recipe 'default': one Partial-FC selection per step holding every picked positive; N = the
  selected real classes that are none of b's labels with cos_bj <= fn_threshold; cos' = cos.
  recipe 'official' (OneVision-Encoder's training loss): every label slot draws its own selection
  holding only that slot's positives; N = the selected real classes other than y (b's other labels
  included), and cos'_bj = 0 where cos_bj > fn_threshold (the class stays in the softmax).

  Sampling keys: k_lab, k_pfc = split(rng); labels by sample_labels(k_lab, ...); the selection of
  class shard i uses uniform(fold_in(k_pfc, i)) (default) or uniform(fold_in(fold_in(k_pfc, slot),
  i)) (official) over the shard's rows, the shard's positives first (see _select_columns).
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
  official = _opt(cfg, "recipe") == "official"
  slack = float(_opt(cfg, "pfc_positive_slack"))
  mask = _opt(cfg, "own_label_mask")
  if mask == "auto":
    mask = "compare" if mesh.devices.flat[0].platform == "tpu" else "scatter"
  n_batch = _axes_size(mesh, batch_axes)
  n_class = _axes_size(mesh, class_axes)
  # The custom-VJP block needs both operands typed alike (varying over every axis in play).
  all_axes = class_axes + tuple(a for a in batch_axes if a not in class_axes)
  u = 1.0 if thr is None else min(thr, 1.0)
  if official:
    u = max(u, 0.0)  # filtered classes enter the softmax with a logit of 0
  # Fixed softmax shift when the logit span allows it (see _MAX_FIXED_SPAN), else the exact row max.
  shift = None
  if scale * (1.0 + u) <= _MAX_FIXED_SPAN and num_classes <= _MAX_FIXED_CLASSES:
    shift = scale * u - _SHIFT_HEADROOM

  def negatives(e, cs, drop_col, col_ok):
    """This shard's sum-exp over kept negatives [B] on the global shift m [B], and their count."""
    m_loc, s_loc, n_kept = _shard_logits(_vary(e, all_axes), _vary(cs, all_axes), drop_col, col_ok,
                                         scale, thr, shift, mask)
    # The shift only stabilises: no gradient through it.
    m_loc = jax.lax.stop_gradient(m_loc)
    if shift is not None:
      return m_loc, s_loc, n_kept
    m = jax.lax.pmax(m_loc, class_axes)
    if official and thr is not None:
      m = jnp.maximum(m, 0.0)
    return m, s_loc * jnp.exp(jnp.where(jnp.isfinite(m_loc), m_loc - m, -jnp.inf)), n_kept

  def columns(key, pos_loc, pos_own, row_real, c, n_sel, n_rate):
    """(cs, col_ok, inv, overflow): the shard's columns, dense or a Partial-FC selection."""
    c_local_n = c.shape[0]
    if n_sel is None:
      return c, row_real, jnp.arange(c_local_n, dtype=jnp.int32), jnp.int32(0)
    sel, col_ok, overflow = _select_columns(key, pos_loc, pos_own, row_real, n_rate, n_sel)
    inv = jnp.full((c_local_n,), n_sel, jnp.int32).at[sel].set(jnp.arange(n_sel, dtype=jnp.int32))
    return c[sel], col_ok, inv, overflow

  def local_loss(emb, centers, labels, rng, *, n_sel, n_rate, c_pad):
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
    if pos.size <= c_local_n:
      # Gathering every positive's row is smaller than the table-sized gradient buffer that the
      # chunked loop carries (8 GPUs x 1M centers: 125k local rows against 2k positives).
      cos_pos = _gathered_positive_cosines(_vary(e, all_axes), _vary(c, all_axes), pos_loc, pos_own)
    else:
      cos_pos = _positive_cosines(_vary(e, all_axes), _vary(c, all_axes), pos_loc, pos_own,
                                  positive_capacity(pos.size, n_class, slack))
    row_real = offset + jnp.arange(c_local_n) < num_classes
    n_pad = c_pad - num_classes

    def kept_columns(col, n_cols, col_ok):
      """(drop_col, col_ok) for negatives(): the row's own columns `col`, and the columns that may be
      negatives. Partial FC: its selection. Dense: the padding classes (global rows >= C, at most
      n_pad) leave with the own labels under 'scatter', by a per-column mask under 'compare' (one
      compare per padding class would be added to every logit)."""
      if n_sel is not None:
        return col, col_ok
      if mask == "compare":
        return col, (row_real if n_pad else None)
      pad = num_classes + jnp.arange(n_pad) - offset
      pad = jnp.where((pad >= 0) & (pad < n_cols), pad, n_cols)
      return jnp.concatenate([col, jnp.broadcast_to(pad, (b, n_pad))], axis=1), None

    def own_columns(ids_loc, ids_own, inv, n_cols):
      return jnp.where(ids_own, inv[jnp.clip(ids_loc, 0, c_local_n - 1)], n_cols)

    if not official:
      cs, col_ok, inv, overflow = columns(jax.random.fold_in(k_pfc, shard), pos_loc, pos_own, row_real,
                                          c, n_sel, n_rate)
      n_cols = cs.shape[0]
      # Every label of a sample (sampled or not) is excluded from that sample's negatives.
      lab_loc = lab - offset
      lab_own = lab_valid & (lab_loc >= 0) & (lab_loc < c_local_n)
      col = own_columns(lab_loc, lab_own, inv, n_cols)                                # [B, L]
      m, s_loc, n_kept = negatives(e, cs, *kept_columns(col, n_cols, col_ok))
      # Usable = usable columns - the sample's distinct own labels among them.
      own_ok = lab_own & (col < n_cols) & col_ok[jnp.minimum(col, n_cols - 1)]
      first = jnp.argmax(lab[:, :, None] == lab[:, None, :], axis=2) == jnp.arange(lab.shape[1])
      n_usable = (jnp.sum(col_ok) - jnp.sum(own_ok & first, axis=1)).astype(jnp.float32)
      n_active = jnp.sum(col_ok).astype(jnp.float32)
      m, s_loc, n_kept, n_usable = (x[:, None] for x in (m, s_loc, n_kept, n_usable))  # one per row
    else:
      per_slot = []
      for k in range(pos.shape[1]):
        key = jax.random.fold_in(jax.random.fold_in(k_pfc, k), shard)
        cs, col_ok, inv, ovf = columns(key, pos_loc[:, k:k + 1], pos_own[:, k:k + 1], row_real, c,
                                       n_sel, n_rate)
        n_cols = cs.shape[0]
        col = own_columns(pos_loc[:, k:k + 1], pos_own[:, k:k + 1], inv, n_cols)       # [B, 1]
        mk, sk, nk = negatives(e, cs, *kept_columns(col, n_cols, col_ok))
        own_ok = pos_own[:, k] & (col[:, 0] < n_cols) & col_ok[jnp.minimum(col[:, 0], n_cols - 1)]
        nu = (jnp.sum(col_ok) - own_ok.astype(jnp.int32)).astype(jnp.float32)
        per_slot.append((mk, sk, nk, nu, ovf, jnp.sum(col_ok)))
      m, s_loc, n_kept, n_usable, overflow, n_active = (jnp.stack(x, axis=-1) for x in zip(*per_slot))
      overflow = jnp.sum(overflow)
      n_active = jnp.mean(n_active.astype(jnp.float32))
    # One all-reduce: positive cosines (each from its owner shard), sum-exp terms, counts.
    cos_pos, sum_neg, n_neg, n_usable, overflow, n_active = jax.lax.psum(
        (cos_pos, s_loc, n_kept, n_usable, overflow, n_active), class_axes)
    n_filt = n_usable - n_neg
    if official and thr is not None:
      # A filtered class stays in the softmax with cosine 0: a term e^{0 - m}, with no gradient.
      sum_neg = sum_neg + n_filt * jnp.exp(-m)
    if shift is not None or (official and thr is not None):
      has_neg = sum_neg > 0
    else:
      has_neg = jnp.isfinite(m)
      m = jnp.where(has_neg, m, 0.0)

    z_pos = scale * (cos_pos - margin)                                               # [B, K]
    big = jax.lax.stop_gradient(jnp.where(has_neg, jnp.maximum(z_pos, m), z_pos))
    lse = big + jnp.log(jnp.exp(z_pos - big) + sum_neg * jnp.exp(m - big))
    per_label = jnp.where(pos_valid, lse - z_pos, 0.0)
    n_valid = jnp.sum(pos_valid)
    denom = jnp.maximum(n_valid, 1).astype(jnp.float32)
    loss = jnp.sum(per_label) / denom

    has_label = jnp.any(pos_valid, axis=1)
    if official:  # per (sample, slot) term: each has its own negatives
      per_row = lambda x: jnp.sum(jnp.where(pos_valid, x, 0)) / denom
    else:
      n_rows = jnp.maximum(jnp.sum(has_label), 1).astype(jnp.float32)
      per_row = lambda x: jnp.sum(jnp.where(has_label, x[:, 0], 0)) / n_rows
    metrics = dict(
        num_valid_labels=n_valid.astype(jnp.float32),
        loss_count=n_valid.astype(jnp.float32),  # the loss's denominator: accumulation weights by it
        negatives_per_sample=per_row(n_usable if official else n_neg),
        positive_cos=jnp.sum(jnp.where(pos_valid, cos_pos, 0.0)) / denom,
        positive_prob=jnp.sum(jnp.where(pos_valid, jnp.exp(z_pos - lse), 0.0)) / denom,
        labels_out_of_range=out_of_range.astype(jnp.float32),
        pfc_columns=n_active,
        pfc_overflow=overflow.astype(jnp.float32),
    )
    if thr is not None:
      metrics["fn_filtered_per_sample"] = per_row(n_filt)
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
    # Positives one selection must hold: all picked labels (default) or one slot's (official).
    n_rate, n_sel = selection_size(c_local_n, rate, b if official else b * k, n_class, slack)
    fn = jax.shard_map(
        lambda e, c, l, r: local_loss(e, c, l, r, n_sel=n_sel, n_rate=n_rate, c_pad=c_pad), mesh=mesh,
        in_specs=(P(batch_axes, None), P(class_axes, None), P(batch_axes, None), P()),
        out_specs=(P(), P()))
    return fn(embeddings, centers, labels.astype(jnp.int32), rng)

  return loss_fn


# Keys a bank may set for itself; the others are shared by all banks.
_BANK_KEYS = ("num_classes", "scale", "margin", "fn_threshold", "labels_per_step", "sample_rate")


class BankSpec(NamedTuple):
  name: str
  cfg: ml_collections.ConfigDict  # the loss config of this bank alone
  weight: float
  offset: int                     # the bank's class ids are [offset, offset + num_classes) in labels
  label_table: str | None


def bank_specs(cfg) -> list[BankSpec] | None:
  """The center banks of `loss.heads` (None without heads: one bank, today's layout).

  Bank i's label ids live at [offset_i, offset_i + num_classes_i) in the batch's labels, offsets
  being the running sum of the banks' num_classes in order; the input pipeline shifts a source's
  labels by the offset of the bank the source names.
  """
  heads = _opt(cfg, "heads")
  if not heads:
    return None
  allowed = {"name", "weight", "label_table", *_BANK_KEYS}
  specs, offset = [], 0
  for i, h in enumerate(heads):
    if not hasattr(h, "keys") or "name" not in h or "num_classes" not in h:
      raise ValueError(f"loss.heads[{i}] must be a dict with at least 'name' and 'num_classes', got {h!r}")
    unknown = sorted(set(h.keys()) - allowed)
    if unknown:
      raise ValueError(f"loss.heads[{i}] has unknown keys {unknown}; known: {sorted(allowed)}")
    name = h["name"]
    if not isinstance(name, str) or not name.isidentifier() or name in {s.name for s in specs}:
      raise ValueError(f"loss.heads[{i}].name must be a unique identifier, got {name!r}")
    bank = ml_collections.ConfigDict({k: v for k, v in cfg.items() if k != "heads"})
    bank.update({k: h[k] for k in _BANK_KEYS if k in h})
    try:
      validate_loss_config(bank)
    except ValueError as e:
      raise ValueError(f"loss.heads[{i}] ({name}): {e}") from None
    weight = float(h.get("weight", 1.0))
    if not weight > 0:
      raise ValueError(f"loss.heads[{i}].weight must be > 0, got {weight!r}")
    specs.append(BankSpec(name, bank, weight, offset, h.get("label_table")))
    offset += int(bank.num_classes)
  return specs


def label_space_size(cfg) -> int:
  """Size of the batch's label id space: loss.num_classes, or the banks' classes added up."""
  specs = bank_specs(cfg)
  return int(cfg.num_classes) if specs is None else specs[-1].offset + int(specs[-1].cfg.num_classes)


def source_banks(cfg) -> dict[str, tuple[int, str | None]] | None:
  """{bank name: (label id offset, label table)} for the input pipeline; None without loss.heads."""
  specs = bank_specs(cfg)
  return None if specs is None else {s.name: (s.offset, s.label_table) for s in specs}


def init_centers_from_config(rng, cfg, dim: int, num_shards: int):
  """The centers parameter: one [C_pad, D] array, or {bank name: array} with loss.heads."""
  std = float(_opt(cfg, "centers_init_std"))
  specs = bank_specs(cfg)
  if specs is None:
    return init_centers(rng, cfg.num_classes, dim, num_shards, std=std)
  return {s.name: init_centers(jax.random.fold_in(rng, i), s.cfg.num_classes, dim, num_shards, std=std)
          for i, s in enumerate(specs)}


def loss_fn_from_config(mesh, cfg, batch_axes, class_axes):
  """make_loss_fn for one bank, make_banks_loss_fn with loss.heads."""
  make = make_loss_fn if bank_specs(cfg) is None else make_banks_loss_fn
  return make(mesh, cfg, batch_axes, class_axes)


def make_banks_loss_fn(mesh, cfg, batch_axes: Sequence[str] = ("data", "fsdp"),
                       class_axes: Sequence[str] = ("data", "fsdp", "tensor")):
  """Several center banks: loss_fn(embeddings [B,D], {name: centers [C_pad_i, D]}, labels [B,L], rng).

  Each bank is make_loss_fn on its own centers (sharded over `class_axes` like one bank) with the
  labels of its id range (shifted to 0..C_i-1, the rest -1) and rng folded with its index. The loss
  is sum_i weight_i * loss_i; metrics are per bank as '<name>/<metric>', plus the total `loss`,
  `loss_count` (terms over all banks) and `labels_out_of_range` (ids in no bank).
  """
  specs = bank_specs(cfg)
  if specs is None:
    raise ValueError("make_banks_loss_fn: loss.heads is empty; use make_loss_fn for one bank")
  fns = [make_loss_fn(mesh, s.cfg, batch_axes, class_axes) for s in specs]
  total_classes = specs[-1].offset + int(specs[-1].cfg.num_classes)

  def loss_fn(embeddings, centers, labels, rng):
    missing = sorted({s.name for s in specs} - set(centers))
    if missing:
      raise ValueError(f"loss_fn: no centers for banks {missing}; got {sorted(centers)}")
    labels = labels.astype(jnp.int32)
    total, metrics, count = 0.0, {}, 0.0
    for i, (s, fn) in enumerate(zip(specs, fns)):
      n = int(s.cfg.num_classes)
      mine = (labels >= s.offset) & (labels < s.offset + n)
      loss_i, m_i = fn(embeddings, centers[s.name], jnp.where(mine, labels - s.offset, -1),
                       jax.random.fold_in(rng, i))
      total = total + s.weight * loss_i
      count = count + m_i["loss_count"]
      metrics.update({f"{s.name}/{k}": v for k, v in m_i.items() if k != "labels_out_of_range"})
    metrics.update(loss=jax.lax.stop_gradient(total), loss_count=count,
                   labels_out_of_range=jnp.sum((labels < -1) | (labels >= total_classes)).astype(jnp.float32))
    return total, metrics

  return loss_fn
