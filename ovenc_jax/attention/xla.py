"""XLA attention: dense segment-masked and a memory-bounded (query-chunked) variant; the CPU path."""
import jax
import jax.numpy as jnp


def segment_mask(q_segments: jnp.ndarray, kv_segments: jnp.ndarray) -> jnp.ndarray:
  """[B, 1, Nq, Nk] bool: a query sees only keys of its own segment.

  Padding (segment 0) queries see padding keys, so no row is fully masked (no NaN anywhere) and a
  real token never sees padding.
  """
  return (q_segments[:, :, None] == kv_segments[:, None, :])[:, None]


def _attend(q, k, v, q_seg, kv_seg, scale):
  return jax.nn.dot_product_attention(q, k, v, mask=segment_mask(q_seg, kv_seg), scale=scale,
                                      implementation="xla")


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
