"""cuDNN flash attention (GPU): rows of one sample by sequence length, packed rows by a dense mask.

`jax.nn.dot_product_attention` takes padding as per-row sequence lengths, which cuDNN applies inside
its kernel: that is the path for rows that hold one sample (tokens first, padding last, as the input
pipeline writes them without packing or with one segment a row). Packed rows natively need the private
fused-attention module's q/kv offsets API, so they go the public route of a boolean [B, 1, N, N] mask:
JAX converts it to an additive bias (0 / large negative), cuDNN reads it in the forward and backward
passes and its backward writes an unused dbias of the same size, three B*N*N passes a layer.
"""
import jax
import jax.numpy as jnp

from ovenc_jax.model.attention import xla

# cuDNN's fused attention takes only half-precision inputs.
COMPUTE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def attention(q, k, v, q_segments, kv_segments, *, scale, implementation="cudnn", one_sample_rows=False, **_):
  """`implementation` is a test hook: "xla" runs the same call (same mask or lengths) through XLA's kernel.

  one_sample_rows: every row is one sample's tokens (segment 1) followed by padding (segment 0). Real
  tokens then see exactly the keys the mask would show them. Queries past a row's length get a zero
  output and zero gradients, which is how JAX defines sequence lengths (its XLA implementation,
  against which JAX tests cuDNN's, multiplies them out), where the mask would have let padding attend
  padding; no real token reads either. A row without tokens counts one, so no row is empty.
  """
  if one_sample_rows:
    lengths = jnp.maximum(jnp.sum(q_segments > 0, axis=1), 1).astype(jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                        scale=scale, implementation=implementation)
  return jax.nn.dot_product_attention(q, k, v, mask=xla.segment_mask(q_segments, kv_segments),
                                      scale=scale, implementation=implementation)
