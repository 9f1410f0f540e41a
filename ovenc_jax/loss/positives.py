"""The positives' cosines on the class shard that owns them: gathered, or visited in chunks (custom VJP)."""
import functools
import math

import jax
import jax.numpy as jnp

from ovenc_jax.loss.mesh_ops import NORM_EPS, inv_norm, vary, varying_axes


def positive_capacity(num_terms: int, num_shards: int, slack: float) -> int:
  """Static room for one shard's distinct positives: slack x its expected share, at least 16."""
  return max(16, math.ceil(slack * num_terms / num_shards))


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


def gathered_positive_cosines(e, c, pos_loc, pos_own):
  """positive_cosines by gathering the center row of every one of the B*K positives [B, K, D]."""
  cp = c[jnp.clip(pos_loc, 0, c.shape[0] - 1)]
  cos = jnp.einsum("bd,bkd->bk", e, cp) * inv_norm(cp)
  return jnp.where(pos_own, cos, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def positive_cosines(e, c, pos_loc, pos_own, chunk: int):
  """cos(e_b, c_y) [B, K] for the positives this shard owns (0 elsewhere), from the raw rows.

  Taken from the rows themselves rather than from the Partial-FC selection, so a positive that did
  not fit into the selection (overflow) still gets its exact term and gradient. A shard owns about
  B*K / shards of the B*K positives of the (all-gathered) batch: it visits them `chunk` at a time
  in a loop that usually runs once, so memory and traffic scale with its share, not with the
  global batch (a [B, K, D] gather of rows on every device grows with the pod's batch). Exact for
  any number of owned positives. Its gradient w.r.t. c is a table-sized loop carry, so where the
  shard's table is the larger of the two, the loss gathers instead (gathered_positive_cosines).
  """
  return _positive_cosines_fwd(e, c, pos_loc, pos_own, chunk)[0]


def _positive_cosines_fwd(e, c, pos_loc, pos_own, chunk):
  e, c, pos_loc, pos_own = (jnp.asarray(x) for x in (e, c, pos_loc, pos_own))
  order, n_chunks = _owned_chunks(pos_own, chunk)
  axes = tuple(sorted(varying_axes(e) | varying_axes(c) | varying_axes(pos_loc)))
  body = functools.partial(_cosines_chunk, e, c, pos_loc, order, chunk)
  out = jax.lax.fori_loop(0, n_chunks, body, vary(jnp.zeros((pos_own.size,), e.dtype), axes))
  return out.reshape(pos_own.shape), (e, c, pos_loc, order, n_chunks)


def _cosines_chunk(e, c, pos_loc, order, chunk, i, out):
  idx, _, ok, _, cp, eb = _chunk(e, c, pos_loc, order, i, chunk)
  cos = jnp.sum(eb * cp, axis=-1) * inv_norm(cp)
  return out.at[idx].set(jnp.where(ok, cos, 0.0), mode="drop")


def _positive_cosines_bwd(chunk, res, g):
  # cos = (e.c) r with r = 1/|c| (constant where |c|^2 is clamped at eps):
  # d e = g c r,  d c = g (e r - (e.c) r^3 c [|c|^2 > eps]).
  e, c, pos_loc, order, n_chunks = res
  body = functools.partial(_cosines_chunk_grads, e, c, pos_loc, order, chunk, g.reshape(-1))
  init = (vary(jnp.zeros_like(e), tuple(varying_axes(e))), vary(jnp.zeros_like(c), tuple(varying_axes(c))))
  de, dc = jax.lax.fori_loop(0, n_chunks, body, init)
  return de, dc, None, None


def _cosines_chunk_grads(e, c, pos_loc, order, chunk, g, i, acc):
  de, dc = acc
  k = pos_loc.shape[1]
  _, flat, ok, rows, cp, eb = _chunk(e, c, pos_loc, order, i, chunk)
  gi = jnp.where(ok, g[flat], 0.0)[:, None]
  sq = jnp.sum(cp * cp, axis=-1, keepdims=True)
  r = jax.lax.rsqrt(jnp.maximum(sq, NORM_EPS))
  dot = jnp.sum(eb * cp, axis=-1, keepdims=True)
  de = de.at[flat // k].add(gi * cp * r)
  dc = dc.at[rows].add(gi * (eb * r - jnp.where(sq > NORM_EPS, dot * r ** 3, 0.0) * cp))
  return de, dc


positive_cosines.defvjp(_positive_cosines_fwd, _positive_cosines_bwd)
