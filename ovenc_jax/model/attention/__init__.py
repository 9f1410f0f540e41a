"""Segment-masked attention with one implementation per platform: `model.attention` picks it (`auto`)."""
from typing import Callable

import jax
import jax.numpy as jnp

from ovenc_jax.model.attention import cudnn, splash, xla
from ovenc_jax.model.attention.xla import segment_mask  # noqa: F401  (re-exported)

KERNELS: dict[str, Callable[..., jnp.ndarray]] = {
    "xla": xla.dense,
    "chunked": xla.chunked,
    "splash": splash.attention,
    "cudnn": cudnn.attention,
}
IMPLEMENTATIONS = ("auto",) + tuple(KERNELS)
# Kernels that take q, k, v and give o as [B, H, N, hd] (heads_first=True; the others [B, N, H, hd]).
HEADS_FIRST = frozenset({"splash"})

# What `auto` picks on each platform, and why: splash is the flash kernel TPUs run (segment ids native,
# O(N) memory); cuDNN's flash attention is NVIDIA's fused kernel (half precision only, so fp32 models
# stay on XLA); on CPU, XLA's dense path is the fastest at our row lengths.
AUTO = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "rocm": "xla", "cpu": "xla"}


def resolve(impl: str, platform: str, dtype=jnp.float32) -> str:
  """`model.attention` -> a key of KERNELS for this platform and compute dtype."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention={impl!r}: expected one of {IMPLEMENTATIONS}")
  half = jnp.dtype(dtype) in cudnn.COMPUTE_DTYPES
  if impl == "cudnn" and not half:
    raise ValueError(f"model.attention='cudnn' needs model.dtype bfloat16 or float16, got {jnp.dtype(dtype)}")
  if impl != "auto":
    return impl
  picked = AUTO.get(platform, "xla")
  return "xla" if picked == "cudnn" and not half else picked


def dot_product_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                          q_segments: jnp.ndarray, kv_segments: jnp.ndarray, *,
                          impl: str = "xla", chunk_size: int = 512, axis_rules=(),
                          heads_first: bool = False, one_sample_rows: bool = False) -> jnp.ndarray:
  """q [B, Nq, H, hd], k/v [B, Nk, H, hd] -> [B, Nq, H, hd], scale hd^-0.5. heads_first: all four
  [B, H, N, hd], for the kernels in HEADS_FIRST. one_sample_rows: each row is one sample followed by
  padding, which a kernel may use (cudnn: sequence lengths instead of a mask)."""
  if impl not in KERNELS:  # 'auto' outside encoder_from_config: the local backend decides
    impl = resolve(impl, jax.default_backend(), q.dtype)
  if heads_first and impl not in HEADS_FIRST:
    raise ValueError(f"attention {impl!r} takes [B, N, H, hd], not heads first")
  layout = dict(heads_first=True) if heads_first else {}  # only HEADS_FIRST kernels take the flag
  return KERNELS[impl](q, k, v, q_segments, kv_segments, scale=q.shape[-1] ** -0.5,
                       chunk_size=chunk_size, axis_rules=axis_rules, one_sample_rows=one_sample_rows,
                       **layout)
