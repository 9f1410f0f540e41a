"""Partial FC sized from the positives a shard holds: sparse at large batches, exact on overflow."""
import math

import jax
import numpy as np
import pytest

from ovenc_jax.loss import discrimination as loss_lib
from ovenc_jax.loss import partial_fc
from ovenc_jax.loss.centers import padded_num_classes
from ovenc_jax.loss.defaults import default_loss_config
from tests.helpers.loss_reference import BATCH_AXES, CLASS_AXES, close_grads, dense_reference, mesh as _mesh


def _cfg(num_classes, **kw):
  cfg = default_loss_config()
  cfg.num_classes = num_classes
  cfg.update(dict(fn_threshold=None, scale=16.0), **kw)
  return cfg


def _grad_fn(mesh, cfg):
  fn = loss_lib.make_loss_fn(mesh, cfg, BATCH_AXES, CLASS_AXES)
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))


def _unit_rows(rng, n, d):
  x = rng.normal(size=(n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_selection_stays_sparse_when_batch_positives_exceed_a_shard():
  """B*K = 512 labels >= 501 rows per shard: a selection sized by B*K would be dense. Each shard
  takes max(ceil(rate*C/n), its distinct positives) columns instead, which the loss then matches."""
  num_classes, b, k, d = 4003, 64, 8, 16
  c_pad = padded_num_classes(num_classes, 8)
  c_local = c_pad // 8
  n_rate, n_sel = partial_fc.selection_size(c_local, 0.1, b * k, 8, 2.0)
  assert (n_rate, n_sel) == (51, 128)
  rng = np.random.default_rng(0)
  centers = np.zeros((c_pad, d), np.float32)
  centers[:num_classes] = rng.normal(size=(num_classes, d))
  labels = rng.integers(0, num_classes, (b, k)).astype(np.int32)
  labels[rng.random((b, k)) < 0.2] = -1
  labels[[4, 9]] = -1  # empty segment slots: no terms, no gradient
  emb = rng.normal(size=(b, d)).astype(np.float32)
  (loss, metrics), (ge, gc) = _grad_fn(_mesh(), _cfg(num_classes, sample_rate=0.1, labels_per_step=k))(
      emb, centers, labels, jax.random.key(2))
  selected = np.abs(np.asarray(gc)).sum(axis=1) > 0
  expect = 0
  for i in range(8):
    rows = np.arange(i * c_local, (i + 1) * c_local)
    n_pos = np.isin(rows, labels[labels >= 0]).sum()
    expect += max(n_rate, n_pos)
    assert selected[rows].sum() == max(n_rate, n_pos)
  assert float(metrics["pfc_columns"]) == expect < num_classes / 4
  assert float(metrics["pfc_overflow"]) == 0
  assert float(metrics["loss_count"]) == (labels >= 0).sum()
  assert not np.asarray(ge)[[4, 9]].any()
  ref, ref_ge, ref_gc = dense_reference(emb, centers, labels, num_classes, 16.0, 0.3, None,
                                        allowed=selected[:num_classes])
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  close_grads(np.asarray(ge), ref_ge)
  close_grads(np.asarray(gc)[:num_classes], ref_gc)


@pytest.mark.slow
def test_overflow_keeps_every_term_exact_and_is_counted():
  """48 distinct positives on shard 0, room for 16: the 32 left out are no one's negatives (every
  row has the same labels), each still has its own exact term, and the overflow is reported."""
  num_classes, b, n_lab, d = 2003, 16, 48, 16
  c_pad = padded_num_classes(num_classes, 8)
  c_local = c_pad // 8
  cfg = _cfg(num_classes, sample_rate=0.02, labels_per_step=n_lab, pfc_positive_slack=0.1)
  n_rate, n_sel = partial_fc.selection_size(c_local, 0.02, b * n_lab, 8, 0.1)
  assert (n_rate, n_sel) == (math.ceil(0.02 * c_local), 16)
  rng = np.random.default_rng(1)
  centers = np.zeros((c_pad, d), np.float32)
  centers[:num_classes] = _unit_rows(rng, num_classes, d)
  labels = np.tile(rng.permutation(c_local)[:n_lab].astype(np.int32), (b, 1))
  emb = rng.normal(size=(b, d)).astype(np.float32)
  (loss, metrics), (ge, gc) = _grad_fn(_mesh(), cfg)(emb, centers, labels, jax.random.key(0))
  assert float(metrics["pfc_overflow"]) == n_lab - n_sel
  assert float(metrics["pfc_columns"]) == n_sel + 7 * n_rate
  selected = np.abs(np.asarray(gc)).sum(axis=1) > 0
  assert selected[labels[0]].all()  # every positive has its term, in or out of the selection
  assert not selected[:c_local][~np.isin(np.arange(c_local), labels[0])].any()
  ref, ref_ge, ref_gc = dense_reference(emb, centers, labels, num_classes, 16.0, 0.3, None,
                                        allowed=selected[:num_classes])
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  close_grads(np.asarray(ge), ref_ge)
  close_grads(np.asarray(gc)[:num_classes], ref_gc)
