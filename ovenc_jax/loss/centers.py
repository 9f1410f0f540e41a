"""The class-center table [C_pad, D]: row padding to the shard count, initialisation, sharding."""
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

# Logical axis names of the centers parameter [C_pad, D]: rows over 'classes' (the trainer's rules
# map it over every mesh axis), the embedding dim unsharded. Not 'embed': with the rules listing
# ('embed', 'fsdp') before 'classes', flax gives 'fsdp' to the second dim first and then cannot
# use it for the rows, leaving the rows unsharded (P(None, 'fsdp')).
CENTERS_LOGICAL_AXES = ("classes", None)


def padded_num_classes(num_classes: int, num_shards: int) -> int:
  """Smallest multiple of num_shards that holds num_classes rows."""
  if num_classes < 1 or num_shards < 1:
    raise ValueError(f"padded_num_classes: need num_classes >= 1 and num_shards >= 1, "
                     f"got {num_classes}, {num_shards}")
  return -(-num_classes // num_shards) * num_shards


def _init_rows(key, *, c_pad: int, num_classes: int, dim: int, std: float):
  w = jax.random.normal(key, (c_pad, dim), jnp.float32)
  w = w * (std if std > 0 else jax.lax.rsqrt(jnp.sum(w * w, axis=1, keepdims=True)))
  return jnp.where(jnp.arange(c_pad)[:, None] < num_classes, w, 0.0)


def init_centers(rng, num_classes: int, dim: int, num_shards: int, sharding=None,
                 std: float = 0.0) -> jnp.ndarray:
  """Gaussian rows [C_pad, D], unit-norm (std=0) or N(0, std^2); padding rows are zero.
  With `sharding`, built sharded."""
  c_pad = padded_num_classes(num_classes, num_shards)
  init = functools.partial(_init_rows, c_pad=c_pad, num_classes=num_classes, dim=dim, std=std)
  # jit with out_shardings: each device generates only its rows (threefry is partitionable).
  return jax.jit(init, out_shardings=sharding)(rng)


def centers_sharding(mesh, class_axes: Sequence[str]) -> NamedSharding:
  """Rows over `class_axes`, the embedding dim unsharded."""
  return NamedSharding(mesh, P(tuple(class_axes), None))
