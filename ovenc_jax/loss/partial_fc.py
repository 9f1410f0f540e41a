"""Partial FC: each class shard scores a random subset of its rows (its positives first) as negatives."""
import math

import jax
import jax.numpy as jnp

from ovenc_jax.loss.positives import positive_capacity


def selection_size(c_local: int, rate: float, num_terms: int, num_shards: int, slack: float):
  """(n_rate, n_sel): the Partial-FC size per shard, ceil(rate * C/n), and the static number of
  columns gathered, which also holds the positives a shard is expected to own; None = dense."""
  n_rate = math.ceil(rate * c_local)
  n_sel = min(c_local, max(n_rate, positive_capacity(num_terms, num_shards, slack)))
  return n_rate, (None if n_rate >= c_local or n_sel >= c_local else n_sel)


def select_columns(key, pos_loc, pos_own, row_real, n_rate: int, n_sel: int):
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


def shard_columns(key, pos_loc, pos_own, row_real, c, n_sel: int | None, n_rate: int):
  """(cs, col_ok, inv, overflow): the shard's columns, all its rows (n_sel None) or a Partial-FC
  selection; inv maps a local row to its column (n_sel for a row left out)."""
  c_local_n = c.shape[0]
  if n_sel is None:
    return c, row_real, jnp.arange(c_local_n, dtype=jnp.int32), jnp.int32(0)
  sel, col_ok, overflow = select_columns(key, pos_loc, pos_own, row_real, n_rate, n_sel)
  inv = jnp.full((c_local_n,), n_sel, jnp.int32).at[sel].set(jnp.arange(n_sel, dtype=jnp.int32))
  return c[sel], col_ok, inv, overflow
