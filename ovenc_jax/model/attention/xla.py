"""XLA attention: dense segment-masked and a memory-bounded (query-chunked) variant; the CPU path."""
import functools

import jax
import jax.numpy as jnp
import numpy as np


def segment_mask(q_segments: jnp.ndarray, kv_segments: jnp.ndarray) -> jnp.ndarray:
  """[B, 1, Nq, Nk] bool: a query sees only keys of its own segment.

  Padding (segment 0) queries see padding keys, so no row is fully masked (no NaN anywhere) and a
  real token never sees padding.
  """
  return (q_segments[:, :, None] == kv_segments[:, None, :])[:, None]


def large_negative(dtype):
  # What jax.nn.dot_product_attention writes into masked logits (fp32 here: logits are always fp32).
  return jnp.asarray(-0.7 * jnp.finfo(dtype).max, dtype)


def _attend(q, k, v, q_seg, kv_seg, scale):
  """softmax(where(mask, q k^T * scale, -big)) v: jax.nn.dot_product_attention(implementation="xla")'s
  math (fp32 logits and softmax, probabilities cast to v's dtype), with a hand-written backward.

  Autodiff of that function gives XLA:CPU a backward pass that copies score-sized [B, H, Nq, Nk]
  tensors into transposed layouts for its matmuls and reduces another one; `_attention_bwd` orients
  every matmul so that only [B, N, H, hd] operands get transposed and takes the softmax row sums
  from dO . O (the flash attention identity).
  """
  return _attention(scale, q, k, v, q_seg, kv_seg)


def _heads_first(x):
  return jnp.transpose(x, (0, 2, 1, 3))  # [B, N, H, hd] <-> [B, H, N, hd]


def _probabilities(qh, kh, q_seg, kv_seg, scale):
  logits = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, preferred_element_type=jnp.float32)
  # The mask as an additive bias, 0 or the large negative number jnp.where(mask, logits, big) writes:
  # |logit| is far below that number's spacing, so both give the same logits, but the add fuses into
  # XLA:CPU's (multi-threaded) softmax while a select is a separate single-threaded pass over the scores.
  bias = jnp.where(segment_mask(q_seg, kv_seg), 0.0, large_negative(jnp.float32))
  logits = logits * jnp.asarray(scale, jnp.float32) + bias
  unnormalized = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  return unnormalized / jnp.sum(unnormalized, axis=-1, keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(scale, q, k, v, q_seg, kv_seg):
  return _attention_fwd(scale, q, k, v, q_seg, kv_seg)[0]


# Every matmul below is batched over (B, H) with [B, H, N, hd] operands: XLA:CPU then runs the
# score-sized [B, H, Nq, Nk] tensors through its matmuls as stored. Written against the [B, N, H, hd]
# layout (einsum "bhqk,bkhd->bqhd"), it copies P and dS into transposed layouts.
def _attention_fwd(scale, q, k, v, q_seg, kv_seg):
  qh, kh, vh = (_heads_first(t) for t in (q, k, v))
  p = _probabilities(qh, kh, q_seg, kv_seg, scale).astype(v.dtype)
  o = _heads_first(jnp.einsum("bhqk,bhkd->bhqd", p, vh))
  return o, (qh, kh, vh, q_seg, kv_seg, p, o)


def _attention_bwd(scale, res, do):
  qh, kh, vh, q_seg, kv_seg, p, o = res
  cdt = qh.dtype
  doh = _heads_first(do)
  # dV^T = dO^T P and dK^T = Q^T dS: contracted over their row axis, P and dS are right-hand operands,
  # which XLA:CPU's matmul takes as stored (P^T dO would send P through a slower matmul kernel).
  dvt = jnp.einsum("bhqd,bhqk->bhdk", doh, p, preferred_element_type=cdt)
  dp = jnp.einsum("bhqd,bhkd->bhqk", doh, vh, preferred_element_type=jnp.float32)
  # Softmax backward: dS = P * (dP - rowsum(P * dP)), and rowsum(P * dP) = rowsum(dO * O) (one
  # [B, H, Nq, hd] product instead of a score-sized one). Taken in the [B, N, H, hd] layout dO arrives
  # in: from the head-major O, XLA:CPU recomputes P V inside the fusion that produces dS.
  rows = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
  rows = jnp.transpose(rows, (0, 2, 1))[..., None]  # [B, Nq, H] -> [B, H, Nq, 1]
  ds = p.astype(jnp.float32) * (dp - rows)
  # Masked logits get no gradient (as through jnp.where), also in a row that sees no key at all; a
  # product with the 0/1 mask, for the same reason as the bias above.
  visible = segment_mask(q_seg, kv_seg).astype(jnp.float32)
  ds = (ds * (visible * jnp.asarray(scale, jnp.float32))).astype(cdt)
  dqh = jnp.einsum("bhqk,bhkd->bhqd", ds, kh, preferred_element_type=cdt)
  dkt = jnp.einsum("bhqd,bhqk->bhdk", qh, ds, preferred_element_type=cdt)
  dk, dv = (jnp.transpose(t, (0, 3, 1, 2)) for t in (dkt, dvt))  # [B, H, hd, N] -> [B, N, H, hd]
  dq = _heads_first(dqh)
  return dq, dk, dv, _int_zeros(q_seg), _int_zeros(kv_seg)


def _int_zeros(x):
  return np.zeros(x.shape, jax.dtypes.float0)


_attention.defvjp(_attention_fwd, _attention_bwd)


def dense(q, k, v, q_segments, kv_segments, *, scale, **_):
  return _attend(q, k, v, q_segments, kv_segments, scale)


def chunked(q, k, v, q_segments, kv_segments, *, scale, chunk_size=512, **_):
  """Queries in chunks of `chunk_size`, each rematerialised in the backward pass."""
  b, n, h, d = q.shape
  if n <= chunk_size:
    return _attend(q, k, v, q_segments, kv_segments, scale)
  num_chunks = -(-n // chunk_size)
  pad = num_chunks * chunk_size - n
  # Padded query rows use segment -1: they match no key, so they never alter real outputs.
  q_p = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  seg_p = jnp.pad(q_segments, ((0, 0), (0, pad)), constant_values=-1)
  q_c = q_p.reshape(b, num_chunks, chunk_size, h, d).swapaxes(0, 1)
  seg_c = seg_p.reshape(b, num_chunks, chunk_size).swapaxes(0, 1)

  # Rematerialise each chunk's scores in the backward pass: peak memory is one chunk's
  # [B, H, chunk, Nk] scores instead of the full [B, H, N, Nk].
  @jax.checkpoint
  def one_chunk(args):
    qc, sc = args
    return _attend(qc, k, v, sc, kv_segments, scale)

  out = jax.lax.map(one_chunk, (q_c, seg_c))
  return out.swapaxes(0, 1).reshape(b, num_chunks * chunk_size, h, d)[:, :n]
