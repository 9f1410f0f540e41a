"""The loss tests' shared pieces: float64 references of the default and the official (published) recipe, the gradient tolerance, the mesh."""
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

AXES = ("data", "fsdp", "tensor")
# The trainer's layout under the default logical axis rules: rows over data and fsdp, centers over all.
BATCH_AXES = ("data", "fsdp")
CLASS_AXES = ("data", "fsdp", "tensor")


def mesh(shape=(2, 2, 2)) -> Mesh:
  return Mesh(np.array(jax.devices()[:8]).reshape(shape), AXES)


def dense_reference(emb, centers, labels, num_classes, scale, margin, thr, allowed=None):
  """Plain single-device loss in float64: every valid label of row b is a softmax of its positive
  (cosine minus margin) against all classes that are not labels of b (cos <= thr; in `allowed`)."""
  labels = np.asarray(labels)
  b = labels.shape[0]
  own = np.zeros((b, num_classes), bool)
  for i in range(b):
    for y in labels[i]:
      if y >= 0:
        own[i, y] = True
  neg_ok = ~own if allowed is None else ~own & allowed[None, :]

  def f(e, c):
    e = e / jnp.linalg.norm(e, axis=1, keepdims=True)
    c = c / jnp.linalg.norm(c, axis=1, keepdims=True)
    cos = e @ c.T
    neg = neg_ok if thr is None else neg_ok & (cos <= thr)
    z = jnp.where(neg, scale * cos, -jnp.inf)
    rows, slots = np.nonzero(labels >= 0)  # one term per valid (row, label) entry
    zp = scale * (cos[rows, labels[rows, slots]] - margin)
    terms = jax.nn.logsumexp(jnp.concatenate([zp[:, None], z[rows]], axis=1), axis=1) - zp
    return jnp.mean(terms)

  with jax.enable_x64(True):
    v, (ge, gc) = jax.value_and_grad(f, argnums=(0, 1))(
        np.asarray(emb, np.float64), np.asarray(centers[:num_classes], np.float64))
    return float(v), np.asarray(ge), np.asarray(gc)


def close_grads(got, ref):
  # float32 at s=64: a dense float32 computation of this reference is itself off the float64
  # values by a small multiple of float32 rounding times max|g|, so entries near zero need an
  # absolute floor on top of rtol.
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=3e-5 * np.abs(ref).max())


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


def official_uniforms(rng, b, l, k, n_shards, c_local, sampled):
  """The documented sampling stream (make_loss_fn's docstring), drawn here for the reference."""
  k_lab, k_pfc = jax.random.split(rng)
  label_u = np.asarray(jax.random.uniform(k_lab, (b, l)))
  if not sampled:
    return label_u, None
  slot_u = [[np.asarray(jax.random.uniform(jax.random.fold_in(jax.random.fold_in(k_pfc, j), i), (c_local,)))
             for i in range(n_shards)] for j in range(k)]
  return label_u, slot_u


def published_step(head_embeddings, centers, head_labels, heads, uniforms, *, passes):
  """One optimizer step of the published train.py, in float64: for each of `passes` backward passes,
  each head's Partial-FC loss (official_reference) times its loss weight, summed over heads and
  divided by the pass count, gradients accumulated over the passes.

  head_embeddings[p][h] [B_h, D], head_labels[p][h] [B_h, L] (ids within head h), centers[h]
  [C_pad_h, D]; heads[h]: {"weight", "num_classes", "scale", "margin", "thr", "k", "rate",
  "n_shards"}; uniforms(p, h) -> (label_u, slot_u) of that pass and head. Returns the accumulated
  loss and the centers' accumulated gradients (the backbone's gradient is not needed: the
  published run clips the backbone and each head's centers on their own)."""
  loss, grads = 0.0, [np.zeros_like(np.asarray(c, np.float64)) for c in centers]
  for p in range(passes):
    for h, head in enumerate(heads):
      label_u, slot_u = uniforms(p, h)
      value, _, g_c, _ = official_reference(
          head_embeddings[p][h], centers[h], head_labels[p][h], num_classes=head["num_classes"],
          scale=head["scale"], margin=head["margin"], thr=head["thr"], k=head["k"], label_u=label_u,
          slot_u=slot_u, n_shards=head["n_shards"], rate=head["rate"])
      loss += head["weight"] * value / passes
      grads[h] += head["weight"] * g_c / passes
  return loss, grads


def clip_shards(g, max_norm, shards):
  """torch.nn.utils.clip_grad_norm_ on each of the `shards` row blocks of g (one GPU's slice each)."""
  blocks = g.reshape(shards, -1, g.shape[-1])
  norm = np.sqrt((blocks ** 2).sum(axis=(1, 2)))
  return (blocks * np.minimum(1.0, max_norm / (norm + 1e-6))[:, None, None]).reshape(g.shape)


def adamw(param, grad, state, *, lr, b1, b2, eps, weight_decay):
  """torch.optim.AdamW's update of one tensor; state = (step, m, v) or None."""
  step, m, v = state or (0, np.zeros_like(param), np.zeros_like(param))
  step, m, v = step + 1, b1 * m + (1 - b1) * grad, b2 * v + (1 - b2) * grad ** 2
  param = param * (1 - lr * weight_decay)
  param = param - lr * (m / (1 - b1 ** step)) / (np.sqrt(v / (1 - b2 ** step)) + eps)
  return param, (step, m, v)


def published_lr(peak, warmup, total, steps, power=2.0):
  """PolynomialLRWarmup as its get_lr steps it: lr of optimizer steps 0..steps-1."""
  out, lr = [], peak
  for epoch in range(steps):
    if 0 < epoch <= warmup:
      lr = peak * epoch / warmup
    elif warmup < epoch <= total:
      r = ((1 - (epoch - warmup) / (total - warmup)) / (1 - (epoch - 1 - warmup) / (total - warmup))) ** power
      lr = lr / 2 * (1 + r)
    out.append(lr)
  return out
