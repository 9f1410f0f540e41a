"""loss.recipe='official' vs a float64 NumPy transcription of OneVision-Encoder's published loss."""
import math

import jax
import numpy as np
import pytest

from ovenc_jax.loss import discrimination as loss_lib
from ovenc_jax.loss.centers import init_centers, padded_num_classes
from ovenc_jax.loss.defaults import default_loss_config
from tests.helpers.loss_reference import BATCH_AXES, CLASS_AXES, mesh as _mesh


def official_reference(emb, centers, labels, *, num_classes, scale, margin, thr, k, label_u, slot_u,
                       n_shards, rate):
  """The published recipe, written from its description in float64 NumPy, with hand-derived gradients.

  A sample's slots are its k valid labels with the smallest label_u (all of them when L <= k). Slot
  j is its own single-positive CosFace softmax: its positive y scores s*(cos_y - m); every other
  class the slot's Partial-FC selection holds (the sample's other labels included) scores s*cos,
  or s*0 when cos > thr (no gradient then). Selection of slot j on class shard i: the slot-j
  positives of the whole batch that lie on the shard, filled up to ceil(rate * rows per shard)
  with the shard's other real classes of highest slot_u[j][i] (all real classes when slot_u is
  None). The loss is the mean of the per-(sample, slot) terms.
  """
  emb, centers = np.asarray(emb, np.float64), np.asarray(centers, np.float64)
  labels = np.asarray(labels)
  b, l = labels.shape
  c_pad = centers.shape[0]
  c_local = c_pad // n_shards
  valid = (labels >= 0) & (labels < num_classes)
  if l <= k:
    slots = np.where(valid, labels, -1)
  else:
    order = np.argsort(np.where(valid, label_u, 2.0), axis=1, kind="stable")[:, :k]
    slots = np.where(np.take_along_axis(valid, order, 1), np.take_along_axis(labels, order, 1), -1)

  e_norm = np.linalg.norm(emb, axis=1, keepdims=True)
  c_norm = np.linalg.norm(centers[:num_classes], axis=1, keepdims=True)
  eh, ch = emb / e_norm, centers[:num_classes] / c_norm
  cos = eh @ ch.T                                                             # [B, C]
  n_terms = int((slots >= 0).sum())
  total, g_cos = 0.0, np.zeros_like(cos)                                      # g_cos = dL/dcos
  for j in range(slots.shape[1]):
    y = slots[:, j]
    selected = np.zeros(num_classes, bool)
    for i in range(n_shards):
      rows = np.arange(i * c_local, min((i + 1) * c_local, num_classes))
      positives = np.intersect1d(y[y >= 0], rows)
      selected[positives] = True
      if slot_u is None:
        selected[rows] = True
        continue
      want = math.ceil(rate * c_local) - positives.size
      others = rows[~np.isin(rows, positives)]
      if want > 0:
        selected[others[np.argsort(-slot_u[j][i][others - i * c_local], kind="stable")[:want]]] = True
    for r in np.nonzero(y >= 0)[0]:
      cols = np.nonzero(selected)[0]
      cols = cols[cols != y[r]]
      filtered = np.zeros(cols.size, bool) if thr is None else cos[r, cols] > thr
      logits = np.concatenate([[scale * (cos[r, y[r]] - margin)],
                               np.where(filtered, 0.0, scale * cos[r, cols])])
      mx = logits.max()
      p = np.exp(logits - mx)
      p /= p.sum()
      total += mx + np.log(np.exp(logits - mx).sum()) - logits[0]
      # d(term)/dlogit = p - onehot(positive); dlogit/dcos = s, or 0 for a filtered class.
      g_cos[r, y[r]] += scale * (p[0] - 1.0) / n_terms
      g_cos[r, cols] += np.where(filtered, 0.0, scale * p[1:]) / n_terms
  g_eh, g_ch = g_cos @ ch, g_cos.T @ eh
  g_emb = (g_eh - np.sum(g_eh * eh, axis=1, keepdims=True) * eh) / e_norm
  g_c = np.zeros_like(centers)
  g_c[:num_classes] = (g_ch - np.sum(g_ch * ch, axis=1, keepdims=True) * ch) / c_norm
  return total / n_terms, g_emb, g_c, n_terms


def _problem(num_classes, b=16, d=32, num_labels=10, seed=0):
  """Each embedding near the mean of its first three labels' centers: its other labels then have
  high cosines (the filter and 'other labels stay negatives' both matter); some padded labels."""
  rng = np.random.default_rng(seed)
  c_pad = padded_num_classes(num_classes, 8)
  centers = np.zeros((c_pad, d), np.float32)
  centers[:num_classes] = rng.normal(size=(num_classes, d)) * rng.uniform(0.5, 2.0, (num_classes, 1))
  labels = rng.choice(num_classes, (b, num_labels)).astype(np.int32)
  labels[rng.random((b, num_labels)) < 0.15] = -1
  labels[:, :3] = rng.choice(num_classes, (b, 3))
  labels[2, :] = -1                       # a row with no label (an empty segment slot)
  unit = centers[:num_classes] / np.linalg.norm(centers[:num_classes], axis=1, keepdims=True)
  emb = rng.normal(size=(b, d)).astype(np.float32) * 0.3
  emb += unit[np.maximum(labels[:, :3], 0)].sum(axis=1) * np.sqrt(d) / 3 * (labels[:, :1] >= 0)
  return emb, centers, labels


def _cfg(num_classes, **kw):
  cfg = default_loss_config()
  cfg.num_classes = num_classes
  cfg.recipe = "official"
  cfg.update(kw)
  return cfg


def _uniforms(rng, b, l, k, n_shards, c_local, sampled):
  """The documented sampling stream (make_loss_fn's docstring), drawn here for the reference."""
  k_lab, k_pfc = jax.random.split(rng)
  label_u = np.asarray(jax.random.uniform(k_lab, (b, l)))
  if not sampled:
    return label_u, None
  slot_u = [[np.asarray(jax.random.uniform(jax.random.fold_in(jax.random.fold_in(k_pfc, j), i), (c_local,)))
             for i in range(n_shards)] for j in range(k)]
  return label_u, slot_u


@pytest.mark.parametrize("num_classes,rate,thr,scale,mask", [
    # A small scale keeps the zeroed classes' e^0 terms visible next to e^{s cos} (at s=64 they
    # would be within the tolerance of leaving them out).
    (1003, 1.0, 0.3, 8.0, "auto"),      # dense, filter on, fixed-shift path
    pytest.param(2003, 0.1, 0.3, 8.0, "auto", marks=pytest.mark.slow),  # Partial FC: one selection per slot
    pytest.param(2003, 0.1, None, 64.0, "auto", marks=pytest.mark.slow),  # no filter
    # span s*(1+u) > 130: exact row-max path with the zeroed logits
    pytest.param(1003, 0.1, 0.3, 100.0, "auto", marks=pytest.mark.slow),
    (1003, 1.0, 0.3, 8.0, "compare"),   # TPU's own-label mask (loss.own_label_mask), dense
    (2003, 0.1, 0.3, 8.0, "compare"),   # and per slot's selection
])
def test_official_recipe_matches_numpy_transcription(num_classes, rate, thr, scale, mask):
  mesh = _mesh()
  k = 8
  cfg = _cfg(num_classes, sample_rate=rate, fn_threshold=thr, scale=scale, labels_per_step=k,
             own_label_mask=mask)
  emb, centers, labels = _problem(num_classes)
  rng = jax.random.key(3)
  loss_fn = loss_lib.make_loss_fn(mesh, cfg, BATCH_AXES, CLASS_AXES)
  fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
  (loss, metrics), (ge, gc) = fn(emb, centers, labels, rng)
  c_local = len(centers) // 8
  label_u, slot_u = _uniforms(rng, *labels.shape, k, 8, c_local, rate < 1)
  ref, ref_ge, ref_gc, n_terms = official_reference(
      emb, centers, labels, num_classes=num_classes, scale=scale, margin=0.3, thr=thr, k=k,
      label_u=label_u, slot_u=slot_u, n_shards=8, rate=rate)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  for got, want in ((ge, ref_ge), (gc, ref_gc)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=3e-5 * np.abs(want).max())
  assert float(metrics["loss_count"]) == n_terms == float(metrics["num_valid_labels"])
  assert float(metrics["pfc_overflow"]) == 0
  if thr is not None:
    assert float(metrics["fn_filtered_per_sample"]) > 0  # the zeroing filter is exercised
  if rate < 1:  # each slot's selection: ceil(rate * rows per shard) per shard here
    assert float(metrics["pfc_columns"]) == 8 * math.ceil(rate * c_local)
    # Sampling changes the loss: the dense official loss differs.
    dense_cfg = _cfg(num_classes, fn_threshold=thr, scale=scale)
    dense = jax.jit(loss_lib.make_loss_fn(mesh, dense_cfg, BATCH_AXES, CLASS_AXES))
    assert abs(float(dense(emb, centers, labels, rng)[0]) - float(loss)) > 1e-3


def test_official_differs_from_default_where_documented():
  """Same draws, two recipes: the default drops the sample's other labels and the filtered
  classes from the softmax; the official one keeps both (so its loss is larger here)."""
  mesh = _mesh()
  emb, centers, labels = _problem(1003)
  rng = jax.random.key(1)
  off = jax.jit(loss_lib.make_loss_fn(mesh, _cfg(1003), BATCH_AXES, CLASS_AXES))(emb, centers, labels, rng)
  dft = jax.jit(loss_lib.make_loss_fn(mesh, _cfg(1003, recipe="default"), BATCH_AXES, CLASS_AXES))(
      emb, centers, labels, rng)
  assert float(off[0]) > float(dft[0])
  assert float(off[1]["loss_count"]) == float(dft[1]["loss_count"])


def test_recipe_config_error_names_key():
  mesh = _mesh()
  with pytest.raises(ValueError, match="loss.recipe must be one of"):
    loss_lib.make_loss_fn(mesh, _cfg(10, recipe="published"), BATCH_AXES, CLASS_AXES)
  with pytest.raises(ValueError, match="loss.pfc_positive_slack"):
    loss_lib.make_loss_fn(mesh, _cfg(10, pfc_positive_slack=0.0), BATCH_AXES, CLASS_AXES)


def test_official_preset_config_clipping_and_init():
  from ovenc_jax.configs import pretrain
  from ovenc_jax.train import optim
  c = pretrain.get_config("tiny,recipe=official")
  assert (c.loss.recipe, c.loss.sample_rate, c.loss.centers_init_std, c.loss.centers_weight_decay) == (
      "official", 0.1, 0.01, 0.05)
  assert (c.optim.b2, c.optim.schedule, c.optim.power, c.optim.clip_norm, c.optim.clip_per_group) == (
      0.999, "polynomial", 2.0, 5.0, True)
  assert c.optim.warmup_steps == c.total_steps // 10
  assert pretrain.get_config("tiny").loss.recipe == "default"
  with pytest.raises(ValueError, match="recipe='published' is unknown"):
    pretrain.get_config("tiny,recipe=published")
  # The schedule: linear warmup to lr over 10%, then (1 - t)^2 down to 0.
  sched = optim.schedule(c.optim, c.total_steps)
  w = c.optim.warmup_steps
  np.testing.assert_allclose(float(sched(w // 2)), c.optim.lr * (w // 2) / w, rtol=1e-6)
  t = 0.5 * (c.total_steps - w)
  np.testing.assert_allclose(float(sched(w + t)), c.optim.lr * (1 - t / (c.total_steps - w)) ** 2, rtol=1e-5)

  # Per-group clipping: each group's norm capped at 5 on its own; global clipping scales both.
  grads = {"encoder": {"w": np.full((4,), 5.0, np.float32)},            # norm 10
           "centers": np.full((4, 1), 0.5, np.float32)}                 # norm 1
  def clipped(o):
    tx = optim.clip_transform(o)
    out, _ = tx.update(grads, tx.init(grads))
    return np.linalg.norm(out["encoder"]["w"]), np.linalg.norm(out["centers"])
  np.testing.assert_allclose(clipped(c.optim), (5.0, 1.0), rtol=1e-6)
  glob = pretrain.get_config("tiny").optim
  np.testing.assert_allclose(clipped(glob), (10 * 5 / np.sqrt(101), 5 / np.sqrt(101)), rtol=1e-6)

  # Centers N(0, 0.01): row norms ~ 0.01 * sqrt(D), padding rows zero.
  ctr = np.asarray(init_centers(jax.random.key(0), 1000, 256, 8, std=0.01))
  np.testing.assert_allclose(ctr.std(), 0.01, rtol=0.02)
  assert abs(ctr.mean()) < 1e-4
