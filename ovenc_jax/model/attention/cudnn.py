"""cuDNN flash attention (GPU) with segment masking passed as a dense mask, which JAX turns into a bias.

Why a full mask and not cuDNN's native packing: `jax.nn.dot_product_attention` takes padding only as
per-row sequence lengths (one segment per row); packed segments natively need the private fused-attention
module's q/kv offsets API. A boolean [B, 1, N, N] mask is the public route: JAX converts it to an
additive bias (0 / large negative), cuDNN runs its flash kernel with that bias and its backward computes
an unused dbias. The bias costs B*N*N bytes of HBM traffic per layer, small beside the attention FLOPs
at N <= 2k.
"""
import jax
import jax.numpy as jnp

from ovenc_jax.model.attention import xla

# cuDNN's fused attention takes only half-precision inputs.
COMPUTE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def attention(q, k, v, q_segments, kv_segments, *, scale, implementation="cudnn", **_):
  """`implementation` is a test hook: "xla" runs the same call (same mask) through XLA's kernel."""
  return jax.nn.dot_product_attention(q, k, v, mask=xla.segment_mask(q_segments, kv_segments),
                                      scale=scale, implementation=implementation)
