"""Small pieces the loss's shard_map bodies share: mesh-axis arithmetic, varying-axis typing, norms."""
import math

import jax
import jax.numpy as jnp

NORM_EPS = 1e-12


def axes_size(mesh, axes) -> int:
  return int(math.prod(mesh.shape[a] for a in axes))


def linear_axis_index(mesh, axes):
  """Index of this device's block along `axes` in the order P(axes) lays blocks out (first major)."""
  idx = jnp.int32(0)
  for a in axes:
    idx = idx * mesh.shape[a] + jax.lax.axis_index(a)
  return idx


def varying_axes(x) -> frozenset:
  aval = jax.typeof(x)
  # Newer JAX keeps the varying axes in aval.manual_axis_type.varying, older releases in aval.vma.
  varying = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
  return frozenset(varying if varying is not None else getattr(aval, "vma", ()))


def vary(x, axes):
  """Marks x as varying over `axes` (its gradient is then psum-ed over the axes it was invariant on)."""
  missing = tuple(a for a in axes if a not in varying_axes(x))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def invariant(x):
  """pmean over the mesh axes an (already equal-valued) result still varies over, so P() holds."""
  axes = tuple(sorted(varying_axes(x)))
  return jax.lax.pmean(x, axes) if axes else x


def inv_norm(x, keepdims=False):
  """1 / |x| over the last axis; max(., eps) keeps zero padding rows finite (and their gradient
  zero) instead of NaN."""
  return jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=keepdims), NORM_EPS))


def l2_normalize(x):
  return x * inv_norm(x, keepdims=True)
