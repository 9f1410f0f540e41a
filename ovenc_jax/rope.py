"""Shared 3D rotary position embedding over (t, h, w) token positions."""
from typing import Literal

import jax.numpy as jnp
import numpy as np

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


def apply_rope(x: jnp.ndarray, angles: jnp.ndarray, layout: RopeLayout = "official") -> jnp.ndarray:
  """Rotates x [B, N, H, hd] by angles [B, N, hd]; math in fp32, result in x.dtype."""
  if layout == "official":
    rotate = _rotate_half_interleaved
  elif layout == "consistent":
    rotate = _rotate_half_split
  else:
    raise ValueError(f"model.rope_layout={layout!r}: expected 'official' or 'consistent'")
  cos = jnp.cos(angles)[..., None, :]
  sin = jnp.sin(angles)[..., None, :]
  xf = x.astype(jnp.float32)
  return (xf * cos + rotate(xf) * sin).astype(x.dtype)
