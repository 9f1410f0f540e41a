"""Shared 3D rotary position embedding over (t, h, w) token positions."""
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from ovenc_jax import sharding

RopeLayout = Literal["official", "consistent"]
# head_dim / 2 is split into 16 units, t:h:w = 4:6:6 (the OneVision-Encoder split).
_UNITS = (4, 6, 6)


def axis_frequencies(head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Inverse frequencies per axis: inv = 1 / theta^(arange(n)/n), n = (4, 6, 6) * head_dim / 32."""
  half = head_dim // 2
  if head_dim % 2 or half % sum(_UNITS):
    raise ValueError(f"model head_dim={head_dim}: head_dim/2 must be a multiple of 16 for the 4:6:6 3D RoPE split")
  unit = half // sum(_UNITS)
  return tuple(1.0 / theta ** (np.arange(u * unit, dtype=np.float64) / (u * unit)) for u in _UNITS)


def rope_angles(positions: jnp.ndarray, head_dim: int, theta: float = 10000.0) -> jnp.ndarray:
  """Angles [..., head_dim]: concat(t*inv_t, h*inv_h, w*inv_w) duplicated as [freqs, freqs]."""
  inv_t, inv_h, inv_w = (jnp.asarray(f, jnp.float32) for f in axis_frequencies(head_dim, theta))
  pos = positions.astype(jnp.float32)
  freqs = jnp.concatenate(
      [pos[..., 0:1] * inv_t, pos[..., 1:2] * inv_h, pos[..., 2:3] * inv_w], axis=-1)
  return jnp.concatenate([freqs, freqs], axis=-1)


def _rotate_half_interleaved(x: jnp.ndarray) -> jnp.ndarray:
  # (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the official release's pairing.
  even, odd = x[..., 0::2], x[..., 1::2]
  return jnp.stack([-odd, even], axis=-1).reshape(x.shape)


def _rotate_half_split(x: jnp.ndarray) -> jnp.ndarray:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _materialized(*tables: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
  """The tables, passed through an exact identity matmul (x * 1 + 0 * ... in fp32 at HIGHEST precision).

  A matmul's output is computed once. XLA:CPU otherwise fuses cos and sin of the [B, N, hd] angles
  into every consumer, which broadcasts them over the heads: each fusion that rotates (or
  back-propagates through) q or k evaluates H times as many cosines and sines as there are angles,
  on one thread. Used on CPU only.
  """
  stacked = jnp.stack(tables)
  eye = jnp.eye(stacked.shape[-1], dtype=stacked.dtype)
  out = jnp.einsum("...k,kj->...j", stacked, eye, precision=jax.lax.Precision.HIGHEST)
  return tuple(out)


def apply_rope(x: jnp.ndarray, angles: jnp.ndarray, layout: RopeLayout = "official",
               heads_first: bool = False) -> jnp.ndarray:
  """Rotates x [B, N, H, hd] (heads_first: [B, H, N, hd]) by angles [B, N, hd]; math in fp32, result
  in x.dtype."""
  if layout == "official":
    rotate = _rotate_half_interleaved
  elif layout == "consistent":
    rotate = _rotate_half_split
  else:
    raise ValueError(f"model.rope_layout={layout!r}: expected 'official' or 'consistent'")
  platform = sharding.mesh_platform()
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  if platform == "cpu":
    cos, sin = _materialized(cos, sin)
  cos, sin = (cos[:, None], sin[:, None]) if heads_first else (cos[..., None, :], sin[..., None, :])
  xf = x.astype(jnp.float32)
  rotated = _rotate_by_matmul(x, layout) if platform == "tpu" else rotate(xf)
  return (xf * cos + rotated * sin).astype(x.dtype)


def rotation_matrix(head_dim: int, layout: RopeLayout) -> np.ndarray:
  """The signed permutation R [hd, hd] with x @ R == rotate_half(x) for the layout."""
  r = np.zeros((head_dim, head_dim), np.float32)
  j = np.arange(head_dim // 2)
  src, dst = (2 * j + 1, 2 * j) if layout == "official" else (j + head_dim // 2, j)
  r[src, dst] = -1.0  # out[dst] = -x[src], out[src] = x[dst]
  r[dst, src] = 1.0
  return r


def _rotate_by_matmul(x: jnp.ndarray, layout: RopeLayout) -> jnp.ndarray:
  """rotate_half(x) in fp32 as x @ R: exact (one +-1 product per output, fp32 accumulation; HIGHEST
  keeps fp32 inputs whole). On TPU the pair swap of the interleaved layout is a lane relayout that XLA
  materialises several times per layer (stack, reshape, copies); the MXU does it in place. On CPU the
  shuffle is cheaper than the matmul, so other platforms keep it."""
  r = jnp.asarray(rotation_matrix(x.shape[-1], layout), x.dtype)
  return jnp.einsum("...d,de->...e", x, r, precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32)

