"""Multi-label cluster-discrimination loss (CosFace margin, Partial-FC) with class centers sharded over the mesh."""
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ovenc_jax.loss import defaults
from ovenc_jax.loss.mesh_ops import axes_size, invariant, l2_normalize, linear_axis_index, vary
from ovenc_jax.loss.negatives import fixed_shift, shard_logits
from ovenc_jax.loss.partial_fc import selection_size, shard_columns
from ovenc_jax.loss.positives import gathered_positive_cosines, positive_capacity, positive_cosines


def _is_count(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def validate_loss_config(cfg) -> None:
  """Raises ValueError naming the `loss.*` key that is missing or out of range."""
  opt = functools.partial(defaults.option, cfg)
  for key in defaults.default_loss_config():
    if key not in cfg and key not in defaults.OPTIONAL_DEFAULTS:
      raise ValueError(f"loss.{key} is missing from the config")
  n = cfg.num_classes
  if not _is_count(n) or n < 1:
    raise ValueError(f"loss.num_classes must be a positive int (number of cluster centers), got {n!r}")
  if not cfg.scale > 0:
    raise ValueError(f"loss.scale must be > 0, got {cfg.scale!r}")
  if not 0.0 <= cfg.margin < 2.0:
    raise ValueError(f"loss.margin must be in [0, 2), got {cfg.margin!r}")
  if cfg.fn_threshold is not None and not -1.0 <= cfg.fn_threshold <= 1.0:
    raise ValueError(f"loss.fn_threshold must be in [-1, 1] or None (filter off), got {cfg.fn_threshold!r}")
  k = cfg.labels_per_step
  if not _is_count(k) or k < 1:
    raise ValueError(f"loss.labels_per_step must be a positive int, got {k!r}")
  if not 0.0 < cfg.sample_rate <= 1.0:
    raise ValueError(f"loss.sample_rate must be in (0, 1], got {cfg.sample_rate!r}")
  if not cfg.centers_lr_mult >= 0:
    raise ValueError(f"loss.centers_lr_mult must be >= 0, got {cfg.centers_lr_mult!r}")
  if not cfg.centers_weight_decay >= 0:
    raise ValueError(f"loss.centers_weight_decay must be >= 0, got {cfg.centers_weight_decay!r}")
  if opt("recipe") not in defaults.RECIPES:
    raise ValueError(f"loss.recipe must be one of {defaults.RECIPES}, got {opt('recipe')!r}")
  if not opt("pfc_positive_slack") > 0:
    raise ValueError(f"loss.pfc_positive_slack must be > 0, got {opt('pfc_positive_slack')!r}")
  if opt("own_label_mask") not in defaults.OWN_LABEL_MASKS:
    raise ValueError(f"loss.own_label_mask must be one of {defaults.OWN_LABEL_MASKS}, "
                     f"got {opt('own_label_mask')!r}")
  multiple = opt("center_row_multiple")
  if not (isinstance(multiple, int) and multiple >= 1):
    raise ValueError(f"loss.center_row_multiple must be an integer >= 1, got {multiple!r}")
  if not opt("centers_init_std") >= 0:
    raise ValueError(f"loss.centers_init_std must be >= 0 (0 = unit rows), got {opt('centers_init_std')!r}")


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


class LossSpec(NamedTuple):
  """make_loss_fn's static settings, resolved once from the config and the mesh."""
  mesh: Any
  batch_axes: tuple[str, ...]
  class_axes: tuple[str, ...]
  all_axes: tuple[str, ...]     # class axes, then the batch axes not among them
  num_classes: int
  scale: float
  margin: float
  thr: float | None             # fn_threshold
  k_labels: int
  rate: float
  official: bool
  slack: float
  mask: str                     # 'scatter' | 'compare' ('auto' resolved for the mesh's platform)
  row_sums: str                 # 'matvec' (CPU) | 'reduce' (negatives.shard_logits)
  shift: float | None           # the fixed softmax shift, or None for the exact row max
  n_batch: int
  n_class: int


class _Shard(NamedTuple):
  """One class shard's part of the table inside shard_map."""
  index: Any                    # linear index over the class axes (traced)
  offset: Any                   # global class id of its first row
  centers: Any                  # its raw rows [c_local, D]
  row_real: Any                 # [c_local] bool: a real class, not padding
  n_pad: int                    # padding rows of the whole table
  n_sel: int | None             # Partial-FC columns gathered, None = all rows
  n_rate: int


class _Negatives(NamedTuple):
  """A shard's negatives per row (default) or per (row, slot) (official), before the all-reduce."""
  m: Any                        # the softmax shift
  sum_exp: Any                  # sum of e^{z - m} over the kept negatives
  n_kept: Any                   # kept negatives
  n_usable: Any                 # negatives before the false-negative filter
  overflow: Any                 # positives that did not fit the Partial-FC selection
  n_active: Any                 # active Partial-FC columns


def _loss_spec(mesh, cfg, batch_axes, class_axes) -> LossSpec:
  batch_axes, class_axes = tuple(batch_axes), tuple(class_axes)
  for a in batch_axes + class_axes:
    if a not in mesh.axis_names:
      raise ValueError(f"make_loss_fn: axis {a!r} is not in the mesh axes {mesh.axis_names}")
  thr = None if cfg.fn_threshold is None else float(cfg.fn_threshold)
  official = defaults.option(cfg, "recipe") == "official"
  platform = mesh.devices.flat[0].platform
  mask = defaults.option(cfg, "own_label_mask")
  if mask == "auto":
    mask = "scatter" if platform == "cpu" else "compare"
  return LossSpec(
      mesh=mesh, batch_axes=batch_axes, class_axes=class_axes,
      # The custom-VJP blocks need both operands typed alike (varying over every axis in play).
      all_axes=class_axes + tuple(a for a in batch_axes if a not in class_axes),
      num_classes=int(cfg.num_classes), scale=float(cfg.scale), margin=float(cfg.margin), thr=thr,
      k_labels=int(cfg.labels_per_step), rate=float(cfg.sample_rate), official=official,
      slack=float(defaults.option(cfg, "pfc_positive_slack")), mask=mask,
      row_sums="matvec" if platform == "cpu" else "reduce",
      shift=fixed_shift(float(cfg.scale), thr, int(cfg.num_classes), official),
      n_batch=axes_size(mesh, batch_axes), n_class=axes_size(mesh, class_axes))


def make_loss_fn(mesh, cfg, batch_axes: Sequence[str], class_axes: Sequence[str]):
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
  i)) (official) over the shard's rows, the shard's positives first (see partial_fc.select_columns).
  """
  validate_loss_config(cfg)
  return functools.partial(_loss_fn, _loss_spec(mesh, cfg, batch_axes, class_axes))


def _check_inputs(spec: LossSpec, embeddings, centers, labels) -> None:
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
  if c_pad % spec.n_class or c_pad < spec.num_classes:
    raise ValueError(f"loss_fn: centers have {c_pad} rows; need a multiple of the {spec.n_class} class "
                     f"shards >= loss.num_classes={spec.num_classes} (use padded_num_classes)")
  if b % spec.n_batch:
    raise ValueError(f"loss_fn: batch {b} is not divisible by the {spec.n_batch} batch shards "
                     f"{spec.batch_axes}")


def _loss_fn(spec: LossSpec, embeddings, centers, labels, rng):
  _check_inputs(spec, embeddings, centers, labels)
  b = embeddings.shape[0]
  c_pad = centers.shape[0]
  k = min(spec.k_labels, labels.shape[1])
  # Positives one selection must hold: all picked labels (default) or one slot's (official).
  n_rate, n_sel = selection_size(c_pad // spec.n_class, spec.rate, b if spec.official else b * k,
                                 spec.n_class, spec.slack)
  fn = jax.shard_map(
      functools.partial(_local_loss, spec, n_sel=n_sel, n_rate=n_rate, c_pad=c_pad), mesh=spec.mesh,
      in_specs=(P(spec.batch_axes, None), P(spec.class_axes, None), P(spec.batch_axes, None), P()),
      out_specs=(P(), P()))
  return fn(embeddings, centers, labels.astype(jnp.int32), rng)


def _local_loss(spec: LossSpec, emb, centers, labels, rng, *, n_sel, n_rate, c_pad):
  """The shard_map body: this device's embeddings rows and center rows -> (loss, metrics), replicated."""
  c_local_n = centers.shape[0]
  index = linear_axis_index(spec.mesh, spec.class_axes)
  offset = index * c_local_n
  k_lab, k_pfc = jax.random.split(rng)

  # The whole batch on every device; the transpose of this gather reduce-scatters the
  # embedding gradients back to their batch shards.
  e = jax.lax.all_gather(l2_normalize(emb), spec.batch_axes, axis=0, tiled=True)       # [B, D]
  lab = jax.lax.all_gather(labels, spec.batch_axes, axis=0, tiled=True, to="invarying")  # [B, L]
  lab_valid = (lab >= 0) & (lab < spec.num_classes)
  out_of_range = jnp.sum((lab < -1) | (lab >= spec.num_classes))
  pos, pos_valid = sample_labels(k_lab, lab, lab_valid, spec.k_labels)                # [B, K]

  pos_loc = pos - offset
  pos_own = pos_valid & (pos_loc >= 0) & (pos_loc < c_local_n)
  cos_pos = _owned_positive_cosines(spec, e, centers, pos_loc, pos_own)
  shard = _Shard(index=index, offset=offset, centers=centers,
                 row_real=offset + jnp.arange(c_local_n) < spec.num_classes,
                 n_pad=c_pad - spec.num_classes, n_sel=n_sel, n_rate=n_rate)
  if spec.official:
    negs = _official_negatives(spec, shard, e, pos_loc, pos_own, k_pfc)
  else:
    negs = _default_negatives(spec, shard, e, lab, lab_valid, pos_loc, pos_own, k_pfc)
  return _loss_and_metrics(spec, cos_pos, pos_valid, out_of_range, negs)


def _owned_positive_cosines(spec: LossSpec, e, c, pos_loc, pos_own):
  """cos(e_b, c_y) [B, K] of the positives on this shard (0 elsewhere), from the raw rows (the
  logits normalise them as column scales)."""
  e, c = vary(e, spec.all_axes), vary(c, spec.all_axes)
  if pos_loc.size <= c.shape[0]:
    # Gathering every positive's row is smaller than the table-sized gradient buffer that the
    # chunked loop carries (a few positives against a large local table).
    return gathered_positive_cosines(e, c, pos_loc, pos_own)
  return positive_cosines(e, c, pos_loc, pos_own, positive_capacity(pos_loc.size, spec.n_class, spec.slack))


def _shard_negatives(spec: LossSpec, e, cs, drop_col, col_ok):
  """This shard's sum-exp over kept negatives [B] on the global shift m [B], and their count."""
  m_loc, s_loc, n_kept = shard_logits(vary(e, spec.all_axes), vary(cs, spec.all_axes), drop_col, col_ok,
                                      spec.scale, spec.thr, spec.shift, spec.mask, spec.row_sums)
  # The shift only stabilises: no gradient through it.
  m_loc = jax.lax.stop_gradient(m_loc)
  if spec.shift is not None:
    return m_loc, s_loc, n_kept
  m = jax.lax.pmax(m_loc, spec.class_axes)
  if spec.official and spec.thr is not None:
    m = jnp.maximum(m, 0.0)
  return m, s_loc * jnp.exp(jnp.where(jnp.isfinite(m_loc), m_loc - m, -jnp.inf)), n_kept


def _kept_columns(spec: LossSpec, shard: _Shard, col, n_cols: int, col_ok):
  """(drop_col, col_ok) for _shard_negatives: the row's own columns `col`, and the columns that may
  be negatives. Partial FC: its selection. Dense: the padding classes (global rows >= C, at most
  n_pad) leave with the own labels under 'scatter', by a per-column mask under 'compare' (one
  compare per padding class would be added to every logit)."""
  if shard.n_sel is not None:
    return col, col_ok
  if spec.mask == "compare":
    return col, (shard.row_real if shard.n_pad else None)
  pad = spec.num_classes + jnp.arange(shard.n_pad) - shard.offset
  pad = jnp.where((pad >= 0) & (pad < n_cols), pad, n_cols)
  return jnp.concatenate([col, jnp.broadcast_to(pad, (col.shape[0], shard.n_pad))], axis=1), None


def _own_columns(ids_loc, ids_own, inv, n_cols: int):
  """The column of each owned local id (n_cols for ids on other shards or left out of the columns)."""
  return jnp.where(ids_own, inv[jnp.clip(ids_loc, 0, inv.shape[0] - 1)], n_cols)


def _default_negatives(spec: LossSpec, shard: _Shard, e, lab, lab_valid, pos_loc, pos_own, k_pfc) -> _Negatives:
  """One selection for every picked positive; a sample's own labels are none of its negatives."""
  c_local_n = shard.centers.shape[0]
  cs, col_ok, inv, overflow = shard_columns(jax.random.fold_in(k_pfc, shard.index), pos_loc, pos_own,
                                            shard.row_real, shard.centers, shard.n_sel, shard.n_rate)
  n_cols = cs.shape[0]
  # Every label of a sample (sampled or not) is excluded from that sample's negatives.
  lab_loc = lab - shard.offset
  lab_own = lab_valid & (lab_loc >= 0) & (lab_loc < c_local_n)
  col = _own_columns(lab_loc, lab_own, inv, n_cols)                                   # [B, L]
  m, s_loc, n_kept = _shard_negatives(spec, e, cs, *_kept_columns(spec, shard, col, n_cols, col_ok))
  # Usable = usable columns - the sample's distinct own labels among them.
  own_ok = lab_own & (col < n_cols) & col_ok[jnp.minimum(col, n_cols - 1)]
  first = jnp.argmax(lab[:, :, None] == lab[:, None, :], axis=2) == jnp.arange(lab.shape[1])
  n_usable = (jnp.sum(col_ok) - jnp.sum(own_ok & first, axis=1)).astype(jnp.float32)
  n_active = jnp.sum(col_ok).astype(jnp.float32)
  m, s_loc, n_kept, n_usable = (x[:, None] for x in (m, s_loc, n_kept, n_usable))  # one per row
  return _Negatives(m, s_loc, n_kept, n_usable, overflow, n_active)


def _slot_negatives(spec: LossSpec, shard: _Shard, e, pos_loc_k, pos_own_k, key):
  """The official recipe's negatives of one label slot: its own selection, only its positive left out."""
  cs, col_ok, inv, overflow = shard_columns(key, pos_loc_k, pos_own_k, shard.row_real, shard.centers,
                                            shard.n_sel, shard.n_rate)
  n_cols = cs.shape[0]
  col = _own_columns(pos_loc_k, pos_own_k, inv, n_cols)                               # [B, 1]
  m, s_loc, n_kept = _shard_negatives(spec, e, cs, *_kept_columns(spec, shard, col, n_cols, col_ok))
  own_ok = pos_own_k[:, 0] & (col[:, 0] < n_cols) & col_ok[jnp.minimum(col[:, 0], n_cols - 1)]
  n_usable = (jnp.sum(col_ok) - own_ok.astype(jnp.int32)).astype(jnp.float32)
  return m, s_loc, n_kept, n_usable, overflow, jnp.sum(col_ok)


def _official_negatives(spec: LossSpec, shard: _Shard, e, pos_loc, pos_own, k_pfc) -> _Negatives:
  """Every label slot its own selection and softmax ([B, K] per field)."""
  per_slot = [
      _slot_negatives(spec, shard, e, pos_loc[:, k:k + 1], pos_own[:, k:k + 1],
                      jax.random.fold_in(jax.random.fold_in(k_pfc, k), shard.index))
      for k in range(pos_loc.shape[1])]
  m, s_loc, n_kept, n_usable, overflow, n_active = (jnp.stack(x, axis=-1) for x in zip(*per_slot))
  return _Negatives(m, s_loc, n_kept, n_usable, jnp.sum(overflow), jnp.mean(n_active.astype(jnp.float32)))


def _per_sample(spec: LossSpec, pos_valid, denom, x):
  """Mean of a count over the rows with a label (default; x [B, 1]) or over the terms (official)."""
  if spec.official:  # per (sample, slot) term: each has its own negatives
    return jnp.sum(jnp.where(pos_valid, x, 0)) / denom
  has_label = jnp.any(pos_valid, axis=1)
  n_rows = jnp.maximum(jnp.sum(has_label), 1).astype(jnp.float32)
  return jnp.sum(jnp.where(has_label, x[:, 0], 0)) / n_rows


def _loss_and_metrics(spec: LossSpec, cos_pos, pos_valid, out_of_range, negs: _Negatives):
  """The margin softmaxes from every shard's parts: mean term, and the metrics (replicated)."""
  m = negs.m
  # One all-reduce: positive cosines (each from its owner shard), sum-exp terms, counts.
  cos_pos, sum_neg, n_neg, n_usable, overflow, n_active = jax.lax.psum(
      (cos_pos, negs.sum_exp, negs.n_kept, negs.n_usable, negs.overflow, negs.n_active), spec.class_axes)
  n_filt = n_usable - n_neg
  zeroed = spec.official and spec.thr is not None
  if zeroed:
    # A filtered class stays in the softmax with cosine 0: a term e^{0 - m}, with no gradient.
    sum_neg = sum_neg + n_filt * jnp.exp(-m)
  if spec.shift is not None or zeroed:
    has_neg = sum_neg > 0
  else:
    has_neg = jnp.isfinite(m)
    m = jnp.where(has_neg, m, 0.0)

  z_pos = spec.scale * (cos_pos - spec.margin)                                        # [B, K]
  big = jax.lax.stop_gradient(jnp.where(has_neg, jnp.maximum(z_pos, m), z_pos))
  lse = big + jnp.log(jnp.exp(z_pos - big) + sum_neg * jnp.exp(m - big))
  per_label = jnp.where(pos_valid, lse - z_pos, 0.0)
  n_valid = jnp.sum(pos_valid)
  denom = jnp.maximum(n_valid, 1).astype(jnp.float32)
  loss = jnp.sum(per_label) / denom

  metrics = dict(
      num_valid_labels=n_valid.astype(jnp.float32),
      loss_count=n_valid.astype(jnp.float32),  # the loss's denominator: accumulation weights by it
      negatives_per_sample=_per_sample(spec, pos_valid, denom, n_usable if spec.official else n_neg),
      positive_cos=jnp.sum(jnp.where(pos_valid, cos_pos, 0.0)) / denom,
      positive_prob=jnp.sum(jnp.where(pos_valid, jnp.exp(z_pos - lse), 0.0)) / denom,
      labels_out_of_range=out_of_range.astype(jnp.float32),
      pfc_columns=n_active,
      pfc_overflow=overflow.astype(jnp.float32),
  )
  if spec.thr is not None:
    metrics["fn_filtered_per_sample"] = _per_sample(spec, pos_valid, denom, n_filt)
  loss = invariant(loss)
  metrics = {k: invariant(jax.lax.stop_gradient(v.astype(jnp.float32))) for k, v in metrics.items()}
  metrics["loss"] = jax.lax.stop_gradient(loss)
  return loss, metrics
