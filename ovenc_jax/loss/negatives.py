"""One class shard's part of the softmaxes' negatives: sum-exp of the kept logits, with a custom VJP."""
import functools

import jax
import jax.numpy as jnp

from ovenc_jax.loss.mesh_ops import inv_norm

# Fixed-shift bounds: kept negatives have z = s*cos <= s*u (u = min(fn_threshold, 1)), so with the
# shift s*u - SHIFT_HEADROOM no exp overflows (a sum of up to 1e8 terms <= e^70 stays finite), and
# while s*(1 + u) <= MAX_FIXED_SPAN every kept term is >= e^-60, far above float32 underflow.
SHIFT_HEADROOM = 70.0
MAX_FIXED_SPAN = 130.0
MAX_FIXED_CLASSES = 100_000_000


def fixed_shift(scale: float, thr: float | None, num_classes: int, official: bool) -> float | None:
  """The constant softmax shift when the logit span allows it (MAX_FIXED_SPAN), else None: the
  exact row max is taken instead."""
  u = 1.0 if thr is None else min(thr, 1.0)
  if official:
    u = max(u, 0.0)  # filtered classes enter the softmax with a logit of 0
  if scale * (1.0 + u) <= MAX_FIXED_SPAN and num_classes <= MAX_FIXED_CLASSES:
    return scale * u - SHIFT_HEADROOM
  return None


def own_columns_kept(drop_col, n: int):
  """[B, n] bool: column j is none of the row's drop_col [B, L] entries (L compares per element)."""
  cols = jax.lax.broadcasted_iota(jnp.int32, (drop_col.shape[0], n), 1)
  keep = jnp.ones((drop_col.shape[0], n), bool)
  for l in range(drop_col.shape[1]):
    keep = keep & (cols != drop_col[:, l:l + 1])
  return keep


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def shard_logits(e, c, drop_col, col_ok, scale, thr, shift, mask, row_sums="matvec"):
  return _shard_logits_fwd(e, c, drop_col, col_ok, scale, thr, shift, mask, row_sums)[0]


def _shard_logits_fwd(e, c, drop_col, col_ok, scale, thr, shift, mask, row_sums="matvec"):
  """One shard's part of the softmaxes' negatives, from unit embeddings e [B, D] and raw rows c [n, D].

  Returns m [B] and sum_j exp(s*cos_bj - m) [B] over the kept negatives, and their count [B].
  Kept = not in drop_col [B, *] (the row's own labels and padding classes; n = nothing), in col_ok
  [n] when given (Partial-FC selection, or the real classes), cos <= thr. With `shift` (a float) m is
  that constant and no row max is computed; shift=None: the row max. `mask`: how drop_col is applied
  ('scatter' | 'compare', defaults.OWN_LABEL_MASKS). `row_sums`: 'matvec' takes the row sums as
  q @ (1/r) (XLA:CPU's matvec vectorises where its reductions do not), 'reduce' as a reduction that
  XLA fuses into the pass writing q on GPU and TPU (the matvec there is another pass over q).

  The centers are normalised by scaling the logit columns with r = 1/|c| instead of writing
  normalised rows: the residual is q = p * r, and q @ (1/r) (a matvec) recovers the row sums.
  """
  b = e.shape[0]
  r = inv_norm(c)                                                                    # [n]
  cos = (e @ c.T) * r[None, :]                                                       # [B, n]
  # A row's own columns are never its negatives.
  if mask == "compare":
    cos = jnp.where(own_columns_kept(drop_col, cos.shape[1]), cos, -jnp.inf)
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
  sums = q @ (1.0 / r) if row_sums == "matvec" else jnp.sum(q * (1.0 / r)[None, :], axis=1)
  return (m, sums, n_kept), (e, c, r, q, m)


def _shard_logits_bwd(scale, thr, shift, mask, row_sums, res, g):
  # With G = s * g_sum * p the gradient of the logits, u_j = sum_b G_bj e_b is the gradient w.r.t.
  # the unit center c_j / |c_j|; then dc_j = r_j (u_j - (u_j.ĉ_j) ĉ_j). Both matmuls use q = p * r
  # and the raw c, so the row weights stay on the small [B, D] side.
  # u_j.ĉ_j = sum_b G_bj cos_bj: a column sum over the [B, n] logits instead of a row sum over the
  # [n, D] table (a table-sized pass fewer), with cos recovered from q itself on the kept terms:
  # q = exp(scale * cos - m) * r.
  e, c, r, q, m = res
  _, g_sum, _ = g
  w = scale * g_sum[:, None]
  de = w * (q @ c)
  ru = q.T @ (w * e)                                                                 # r * u
  kept = q > 0
  cos = (jnp.log(jnp.where(kept, q, 1.0) / r[None, :]) + m[:, None]) / scale
  s = jnp.sum(jnp.where(kept, q * w * cos, 0.0), axis=0)                             # u.ĉ / r
  dc = ru - (r * s)[:, None] * c
  return (de, dc, None, None)


shard_logits.defvjp(_shard_logits_fwd, _shard_logits_bwd)
