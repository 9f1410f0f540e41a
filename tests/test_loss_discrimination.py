"""The sharded loss (discrimination, centers, positives) vs a dense float64 reference; memory, config errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ovenc_jax.loss import centers as centers_lib
from ovenc_jax.loss import discrimination as loss_lib
from ovenc_jax.loss import negatives
from ovenc_jax.loss import positives
from ovenc_jax.loss.defaults import default_loss_config
from tests.helpers import tpu_compile
from tests.helpers.loss_reference import BATCH_AXES, CLASS_AXES, close_grads, dense_reference, mesh as _mesh


def _cfg(num_classes, **kw):
  cfg = default_loss_config()
  cfg.num_classes = num_classes
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def _problem(num_classes, b=16, d=32, num_labels=4, seed=0):
  """Embeddings near their first label's center (so the margin and filter matter), padded labels."""
  rng = np.random.default_rng(seed)
  c_pad = centers_lib.padded_num_classes(num_classes, 8)
  centers = np.zeros((c_pad, d), np.float32)
  centers[:num_classes] = rng.normal(size=(num_classes, d))
  labels = rng.integers(0, num_classes, (b, num_labels)).astype(np.int32)
  labels[rng.random((b, num_labels)) < 0.3] = -1
  labels[:, 0] = rng.integers(0, num_classes, b)
  labels[3] = -1                      # a row with no label at all
  labels[5, :3] = [7, 7, num_classes - 1]  # a duplicate label, and the last real class
  emb = rng.normal(size=(b, d)).astype(np.float32)
  has = labels[:, 0] >= 0
  emb[has] = 0.4 * emb[has] + centers[labels[has, 0]] / np.linalg.norm(centers[labels[has, 0]], axis=1,
                                                                        keepdims=True) * np.sqrt(d)
  return emb, centers, labels


def _grad_fn(mesh, cfg, batch_axes=BATCH_AXES, class_axes=CLASS_AXES):
  return jax.jit(jax.value_and_grad(loss_lib.make_loss_fn(mesh, cfg, batch_axes, class_axes), argnums=(0, 1),
                                    has_aux=True))


@pytest.mark.parametrize("num_classes,thr,scale", [
    (1000, None, 64.0), (1003, None, 64.0), (1000, 0.3, 64.0), (1003, 0.3, 64.0),
    (1003, 0.3, 100.0),  # span s*(1+u) > 130: the exact row-max path instead of the fixed shift
])
def test_matches_dense_reference(num_classes, thr, scale):
  mesh = _mesh()
  cfg = _cfg(num_classes, fn_threshold=thr, scale=scale, labels_per_step=4)
  emb, centers, labels = _problem(num_classes)
  (loss, metrics), (ge, gc) = _grad_fn(mesh, cfg)(emb, centers, labels, jax.random.key(0))
  ref, ref_ge, ref_gc = dense_reference(emb, centers, labels, num_classes, scale, 0.3, thr)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  close_grads(np.asarray(ge), ref_ge)
  close_grads(np.asarray(gc)[:num_classes], ref_gc)
  assert not np.asarray(gc)[num_classes:].any(), "padding centers must get no gradient"
  assert metrics["num_valid_labels"] == (labels >= 0).sum()
  # Negatives per labelled row, counted independently.
  e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  c = centers[:num_classes] / np.linalg.norm(centers[:num_classes], axis=1, keepdims=True)
  cos = e @ c.T
  counts = []
  for i in range(len(labels)):
    if (labels[i] >= 0).any():
      ok = np.ones(num_classes, bool)
      ok[labels[i][labels[i] >= 0]] = False
      if thr is not None:
        ok &= cos[i] <= thr
      counts.append(ok.sum())
  np.testing.assert_allclose(float(metrics["negatives_per_sample"]), np.mean(counts), rtol=1e-6)
  if thr is not None:
    assert metrics["fn_filtered_per_sample"] > 0  # the filter did drop negatives here


def test_other_axis_layout_matches_reference():
  """Batch over ('data',) only, classes over ('fsdp', 'tensor'): centers replicated over data."""
  mesh = _mesh()
  cfg = _cfg(1003, fn_threshold=0.3, labels_per_step=4)
  emb, centers, labels = _problem(1003, seed=1)
  fn = _grad_fn(mesh, cfg, batch_axes=("data",), class_axes=("fsdp", "tensor"))
  c_pad = centers_lib.padded_num_classes(1003, 4)
  (loss, _), (ge, gc) = fn(emb, centers[:c_pad], labels, jax.random.key(0))
  ref, ref_ge, ref_gc = dense_reference(emb, centers, labels, 1003, 64.0, 0.3, 0.3)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  close_grads(np.asarray(ge), ref_ge)
  close_grads(np.asarray(gc)[:1003], ref_gc)


@pytest.mark.slow
def test_labels_per_step_sampling():
  mesh = _mesh()
  # More label slots (6) than labels_per_step (3), but <= 3 valid per row: every valid one is used.
  emb, centers, labels = _problem(1000, num_labels=3)
  wide = np.concatenate([labels, -np.ones((16, 3), np.int32)], axis=1)
  wide = np.take_along_axis(wide, np.random.default_rng(0).permuted(np.tile(np.arange(6), (16, 1)), axis=1), 1)
  cfg = _cfg(1000, fn_threshold=None, labels_per_step=3)
  (loss, _), (ge, gc) = _grad_fn(mesh, cfg)(emb, centers, wide, jax.random.key(4))
  ref, ref_ge, ref_gc = dense_reference(emb, centers, wide, 1000, 64.0, 0.3, None)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  close_grads(np.asarray(gc)[:1000], ref_gc)

  # Rows with 6 valid labels, 3 sampled: uniform without replacement, keyed by the seed.
  n = 4000
  lab = np.tile(np.arange(6, dtype=np.int32) + 10, (n, 1))
  lab[:, 5] = -1  # 5 valid of 6
  s1, v1 = loss_lib.sample_labels(jax.random.key(1), jnp.asarray(lab), jnp.asarray(lab >= 0), 3)
  s2, _ = loss_lib.sample_labels(jax.random.key(2), jnp.asarray(lab), jnp.asarray(lab >= 0), 3)
  s1b, _ = loss_lib.sample_labels(jax.random.key(1), jnp.asarray(lab), jnp.asarray(lab >= 0), 3)
  s1, s2, s1b = map(np.asarray, (s1, s2, s1b))
  assert np.asarray(v1).all() and (s1 >= 10).all() and (s1 < 15).all()
  assert all(len(set(r)) == 3 for r in s1.tolist())
  freq = np.bincount(s1.ravel() - 10, minlength=5) / n
  np.testing.assert_allclose(freq, 3 / 5, atol=0.03)
  np.testing.assert_array_equal(s1, s1b)
  assert (s1 != s2).any()


def _selected_rows(gc):
  return np.abs(np.asarray(gc)).sum(axis=1) > 0


@pytest.mark.slow
def test_partial_fc_sampling():
  mesh = _mesh()
  num_classes = 20003
  emb, centers, labels = _problem(num_classes, d=16)
  positives = np.unique(labels[labels >= 0])
  # A small scale keeps every selected center's gradient far from float32 underflow, so the
  # non-zero gradient rows are exactly the selected centers.
  full = _grad_fn(mesh, _cfg(num_classes, fn_threshold=None, scale=16.0))
  (loss_full, _), _ = full(emb, centers, labels, jax.random.key(0))
  ref_full, _, _ = dense_reference(emb, centers, labels, num_classes, 16.0, 0.3, None)
  np.testing.assert_allclose(float(loss_full), ref_full, rtol=1e-5)

  for rate in (0.1, 0.02):
    fn = _grad_fn(mesh, _cfg(num_classes, fn_threshold=None, scale=16.0, sample_rate=rate))
    (loss, metrics), (ge, gc) = fn(emb, centers, labels, jax.random.key(7))
    sel = _selected_rows(gc)
    assert sel[positives].all(), "every positive of the batch must be among the selected centers"
    assert not sel[num_classes:].any()
    # Each of the 8 shards keeps ceil(r * 2501) rows (its positives among them): ~ r*C in total.
    per_shard = int(np.ceil(rate * len(centers) / 8))
    assert sel.sum() == 8 * per_shard
    assert abs(sel.sum() - rate * num_classes) <= 8
    # The sampled loss is the dense loss with negatives restricted to the selected centers.
    ref, ref_ge, ref_gc = dense_reference(emb, centers, labels, num_classes, 16.0, 0.3, None,
                                          allowed=sel[:num_classes])
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    close_grads(np.asarray(ge), ref_ge)
    # Deterministic under the key; another key picks another subset.
    (loss2, _), (_, gc2) = fn(emb, centers, labels, jax.random.key(7))
    assert float(loss2) == float(loss)
    np.testing.assert_array_equal(np.asarray(gc2), np.asarray(gc))
    (_, _), (_, gc3) = fn(emb, centers, labels, jax.random.key(8))
    assert (_selected_rows(gc3) != sel).any()
    assert _selected_rows(gc3)[positives].all()
  assert float(loss_full) > float(loss)  # fewer negatives, smaller loss


def test_center_memory_is_sharded():
  mesh = _mesh((8, 1, 1))
  num_classes, d, b = 100_003, 64, 64
  c_pad = centers_lib.padded_num_classes(num_classes, 8)
  fn = jax.value_and_grad(loss_lib.make_loss_fn(mesh, _cfg(num_classes), BATCH_AXES, CLASS_AXES), argnums=(0, 1),
                          has_aux=True)
  batch = NamedSharding(mesh, P(("data", "fsdp"), None))
  args = (jax.ShapeDtypeStruct((b, d), jnp.float32, sharding=batch),
          jax.ShapeDtypeStruct((c_pad, d), jnp.float32, sharding=centers_lib.centers_sharding(mesh, CLASS_AXES)),
          jax.ShapeDtypeStruct((b, 8), jnp.int32, sharding=batch),
          jax.random.key(0))
  compiled = jax.jit(fn).lower(*args).compile()
  mem = compiled.memory_analysis()
  small = 2 * (b // 8) * d * 4 + (b // 8) * 8 * 4 + 1024  # embeddings in/grad out, labels, scalars
  centers_and_grads = mem.argument_size_in_bytes + mem.output_size_in_bytes
  unsharded = 2 * num_classes * d * 4
  assert centers_and_grads - small <= unsharded / 8 * 1.05
  assert centers_and_grads >= 2 * c_pad * d * 4 / 8
  # The unsharded centers (or their gradient) are never materialised as a temporary either.
  assert mem.temp_size_in_bytes < num_classes * d * 4
  out_sharding = compiled.output_shardings[1][1]
  assert out_sharding.is_equivalent_to(centers_lib.centers_sharding(mesh, CLASS_AXES), 2)


def test_init_centers_and_padding():
  mesh = _mesh()
  assert centers_lib.padded_num_classes(1003, 8) == 1008
  assert centers_lib.padded_num_classes(1000, 8) == 1000
  sharding = centers_lib.centers_sharding(mesh, CLASS_AXES)
  c = centers_lib.init_centers(jax.random.key(0), 1003, 16, 8, sharding=sharding)
  assert c.shape == (1008, 16) and c.sharding.is_equivalent_to(sharding, 2)
  c = np.asarray(c)
  np.testing.assert_allclose(np.linalg.norm(c[:1003], axis=1), 1.0, rtol=1e-5)
  assert not c[1003:].any()


def test_config_errors_name_the_key():
  mesh = _mesh()
  for key, value, msg in [("sample_rate", 0.0, "loss.sample_rate must be in (0, 1]"),
                          ("sample_rate", 1.5, "loss.sample_rate"),
                          ("num_classes", 0, "loss.num_classes"),
                          ("fn_threshold", 1.5, "loss.fn_threshold"),
                          ("labels_per_step", 0, "loss.labels_per_step"),
                          ("scale", -1.0, "loss.scale"),
                          ("centers_weight_decay", -0.1, "loss.centers_weight_decay")]:
    cfg = _cfg(10)
    cfg[key] = value
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace("]", r"\]")):
      loss_lib.make_loss_fn(mesh, cfg, BATCH_AXES, CLASS_AXES)
  fn = loss_lib.make_loss_fn(mesh, _cfg(1003), BATCH_AXES, CLASS_AXES)
  with pytest.raises(ValueError, match="padded_num_classes"):
    fn(jnp.ones((16, 8)), jnp.ones((1003, 8)), jnp.zeros((16, 2), jnp.int32), jax.random.key(0))
  with pytest.raises(ValueError, match="axis 'model'"):
    loss_lib.make_loss_fn(mesh, _cfg(10), BATCH_AXES, ("model",))
  with pytest.raises(ValueError, match="labels must be integer"):
    fn(jnp.ones((16, 8)), jnp.ones((1008, 8)), jnp.zeros((16, 2), jnp.float32), jax.random.key(0))
  with pytest.raises(ValueError, match="batch 10 is not divisible by the 4 batch shards"):
    fn(jnp.ones((10, 8)), jnp.ones((1008, 8)), jnp.zeros((10, 2), jnp.int32), jax.random.key(0))
  with pytest.raises(ValueError, match="centers dim 4 != embeddings dim 8"):
    fn(jnp.ones((16, 8)), jnp.ones((1008, 4)), jnp.zeros((16, 2), jnp.int32), jax.random.key(0))


def test_centers_logical_axes_shard_rows_over_every_axis():
  import flax.linen as nn
  from ovenc_jax.configs import common
  spec = nn.logical_to_mesh_axes(centers_lib.CENTERS_LOGICAL_AXES, common.LOGICAL_AXIS_RULES)
  assert spec == P(("data", "fsdp", "tensor"), None)


@pytest.mark.parametrize("chunk", [pytest.param(1, marks=pytest.mark.slow), 3, 7, 64])
def test_positive_cosines_visit_owned_positives_in_chunks(chunk):
  """The owned positives' cosines and gradients, visited `chunk` at a time (one pass or many, a
  partial last chunk), and by the gathering path, equal a float64 numpy transcription of
  cos(e_b, c_y) over every owned (b, k); a zero-norm center row takes the clamped norm, as in the
  logits."""
  rng = np.random.default_rng(3)
  b, k, n, d = 6, 4, 9, 5
  e = rng.normal(size=(b, d)).astype(np.float32)
  c = rng.normal(size=(n, d)).astype(np.float32)
  c[2] = 0.0
  pos_loc = rng.integers(-3, n + 3, (b, k)).astype(np.int32)
  pos_loc[0, :2] = 2                      # the zero row, twice
  pos_own = (pos_loc >= 0) & (pos_loc < n) & (rng.random((b, k)) < 0.8)
  g = rng.normal(size=(b, k)).astype(np.float32)

  def f(e, c):
    return jnp.sum(g * positives.positive_cosines(e, c, pos_loc, pos_own, chunk))

  cos = positives.positive_cosines(e, c, pos_loc, pos_own, chunk)
  ge, gc = jax.grad(f, argnums=(0, 1))(e, c)
  gathered = lambda e, c: jnp.sum(g * positives.gathered_positive_cosines(e, c, pos_loc, pos_own))
  g_ge, g_gc = jax.grad(gathered, argnums=(0, 1))(e, c)
  e64, c64 = e.astype(np.float64), c.astype(np.float64)
  ref = np.zeros((b, k))
  ref_ge, ref_gc = np.zeros_like(e64), np.zeros_like(c64)
  for i, j in zip(*np.nonzero(pos_own)):
    y = pos_loc[i, j]
    sq = c64[y] @ c64[y]
    r = 1 / np.sqrt(max(sq, 1e-12))
    ref[i, j] = e64[i] @ c64[y] * r
    ref_ge[i] += g[i, j] * c64[y] * r
    ref_gc[y] += g[i, j] * (e64[i] * r - (e64[i] @ c64[y] * r ** 3 if sq > 1e-12 else 0.0) * c64[y])
  assert pos_own.sum() > chunk or chunk == 64   # several passes, or one partial one
  np.testing.assert_allclose(np.asarray(cos), ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ge), ref_ge, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gc), ref_gc, rtol=1e-5, atol=1e-5)
  # The gathering path local_loss takes when the shard's table is small gives the same numbers.
  np.testing.assert_allclose(np.asarray(positives.gathered_positive_cosines(e, c, pos_loc, pos_own)),
                             ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(g_ge), ref_ge, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(g_gc), ref_gc, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_classes,thr,scale,rate", [
    (1003, 0.3, 64.0, 1.0),    # dense: padding classes leave by the column mask, not by compares
    (1003, None, 100.0, 1.0),  # the exact row-max path
    (1003, 0.3, 64.0, 0.3),    # Partial FC
])
def test_compare_mask_matches_scatter_and_reference(num_classes, thr, scale, rate):
  """loss.own_label_mask='compare' (TPU's default) gives the scatter's loss, gradients and metrics."""
  mesh = _mesh()
  emb, centers, labels = _problem(num_classes, seed=2)
  out = {}
  for mask in ("scatter", "compare"):
    cfg = _cfg(num_classes, fn_threshold=thr, scale=scale, labels_per_step=4, sample_rate=rate,
               own_label_mask=mask)
    out[mask] = jax.tree.map(np.asarray, _grad_fn(mesh, cfg)(emb, centers, labels, jax.random.key(0)))
  (loss_s, met_s), grads_s = out["scatter"]
  (loss_c, met_c), grads_c = out["compare"]
  np.testing.assert_allclose(loss_c, loss_s, rtol=1e-6)
  for got, want in zip(grads_c, grads_s):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
  assert met_c.keys() == met_s.keys()
  for k in met_s:
    np.testing.assert_allclose(met_c[k], met_s[k], rtol=1e-6, err_msg=k)
  if rate == 1.0:
    ref, ref_ge, ref_gc = dense_reference(emb, centers, labels, num_classes, scale, 0.3, thr)
    np.testing.assert_allclose(float(loss_c), ref, rtol=1e-5)
    close_grads(grads_c[0], ref_ge)
    close_grads(grads_c[1][:num_classes], ref_gc)
  assert not grads_c[1][num_classes:].any(), "padding centers must get no gradient"


@pytest.mark.parametrize("thr,shift", [(0.3, None), (None, None), (0.3, 20.0)])
def test_row_sums_reduce_matches_matvec(thr, shift):
  """negatives.shard_logits' GPU/TPU row sums (a reduction) equal CPU's matvec, values and gradients."""
  rng = np.random.default_rng(3)
  e = rng.normal(size=(6, 16)).astype(np.float32)
  e /= np.linalg.norm(e, axis=1, keepdims=True)
  c = rng.normal(size=(50, 16)).astype(np.float32) * rng.uniform(0.5, 2.0, size=(50, 1)).astype(np.float32)
  drop = rng.integers(0, 50, size=(6, 2)).astype(np.int32)
  col_ok = jnp.asarray(rng.uniform(size=50) > 0.2)

  def run(row_sums):
    def f(e, c):
      m, s, n = negatives.shard_logits(e, c, drop, col_ok, 16.0, thr, shift, "compare", row_sums)
      return jnp.sum(jnp.log(s) + m), (m, s, n)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(jnp.asarray(e), jnp.asarray(c))

  (v_r, aux_r), g_r = run("reduce")
  (v_m, aux_m), g_m = run("matvec")
  np.testing.assert_allclose(v_r, v_m, rtol=1e-6)
  for a, b in zip(aux_r, aux_m):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  for a, b in zip(g_r, g_m):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()))


def _lowered_loss(mesh, cfg, emb, centers, labels):
  fn = jax.jit(loss_lib.make_loss_fn(mesh, cfg, BATCH_AXES, CLASS_AXES))
  return fn.lower(emb, centers, labels, jax.random.key(0)).as_text()


def test_own_label_mask_auto_scatters_on_cpu():
  """'auto' lowers exactly like 'scatter' on a CPU mesh (TPU: test_own_label_mask_on_tpu); a bad value
  is an error naming the key."""
  emb, centers, labels = _problem(1003)
  text = {m: _lowered_loss(_mesh(), _cfg(1003, own_label_mask=m), emb, centers, labels)
          for m in ("auto", "scatter", "compare")}
  assert text["auto"] == text["scatter"] != text["compare"]
  with pytest.raises(ValueError, match="loss.own_label_mask"):
    loss_lib.make_loss_fn(_mesh(), _cfg(1003, own_label_mask="mask"), BATCH_AXES, CLASS_AXES)


@pytest.mark.parametrize("platform, mask, row_sums", [("cpu", "scatter", "matvec"), ("gpu", "compare", "reduce"),
                                                     ("cuda", "compare", "reduce"), ("tpu", "compare", "reduce")])
def test_platform_choices(platform, mask, row_sums):
  """What 'auto' and the row sums resolve to on each platform (the numbers are the same either way:
  test_compare_mask_matches_scatter_and_reference, test_row_sums_reduce_matches_matvec)."""
  import types
  mesh = _mesh()
  fake = types.SimpleNamespace(axis_names=mesh.axis_names, shape=mesh.shape,
                               devices=np.array([types.SimpleNamespace(platform=platform)]))
  spec = loss_lib._loss_spec(fake, _cfg(1003), BATCH_AXES, CLASS_AXES)
  assert (spec.mask, spec.row_sums) == (mask, row_sums)


_TPU_LOSS_COMPILE = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec as P
from ovenc_jax.loss import discrimination as loss_lib
from ovenc_jax.loss import negatives
from ovenc_jax.loss.defaults import default_loss_config
devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu", chip_config_name="default",
                                      chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
mesh = jax.sharding.Mesh(np.asarray(devices).reshape(2, 2, 1), ("data", "fsdp", "tensor"))
rows = NamedSharding(mesh, P(("data", "fsdp")))
emb = jax.ShapeDtypeStruct((512, 64), jnp.float32, sharding=rows)
labels = jax.ShapeDtypeStruct((512, 10), jnp.int32, sharding=rows)
centers = jax.ShapeDtypeStruct((40004, 64), jnp.float32, sharding=NamedSharding(mesh, P(("data", "fsdp", "tensor"))))
key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, P()))
out = {}
for mask in ("auto", "scatter", "compare"):
  cfg = default_loss_config()
  cfg.update(num_classes=40001, labels_per_step=8, own_label_mask=mask)
  loss_fn = loss_lib.make_loss_fn(mesh, cfg, ("data", "fsdp"), ("data", "fsdp", "tensor"))
  fn = jax.value_and_grad(lambda e, c, l, r: loss_fn(e, c, l, r)[0], argnums=(0, 1))
  with jax.set_mesh(mesh):
    lowered = jax.jit(fn).lower(emb, centers, labels, key)
  out[mask] = dict(text=lowered.as_text())
  if mask != "compare":  # the same program as auto's (checked below): compiled once
    cost = lowered.compile().cost_analysis()
    out[mask]["bytes"] = (cost[0] if isinstance(cost, (list, tuple)) else cost)["bytes accessed"]
print(json.dumps(dict(auto_is_compare=out["auto"]["text"] == out["compare"]["text"],
                      bytes={m: out[m]["bytes"] for m in ("auto", "scatter")})))
"""


@pytest.mark.slow
def test_own_label_mask_on_tpu():
  """Deviceless compile for a v5e 2x2 slice: 'auto' lowers like 'compare', and XLA's TPU cost model
  counts fewer bytes for it than for the scatter (the reason it is TPU's default)."""
  r = json.loads(tpu_compile.run(_TPU_LOSS_COMPILE).strip().splitlines()[-1])
  assert r["auto_is_compare"]
  assert r["bytes"]["auto"] < 0.8 * r["bytes"]["scatter"], r["bytes"]
