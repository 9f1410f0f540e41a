"""Per-host batches -> global jax.Arrays sharded over the mesh's batch axes."""
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

_INT32_MASK = np.int64(0x7FFFFFFF)


def device_sample_ids(sample_id: np.ndarray) -> np.ndarray:
  """int64 ids -> int32 for a device without x64: low 31 bits of real ids, -1 stays -1.

  Plain int32 conversion keeps the low 32 bits, turning about half of the ids negative, which the
  step would count as empty slots.
  """
  sample_id = np.asarray(sample_id, np.int64)
  return np.where(sample_id >= 0, sample_id & _INT32_MASK, -1).astype(np.int32)


def global_batch(host_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh,
                 batch_axes: Sequence[str] = ("data", "fsdp")) -> dict[str, jax.Array]:
  """Per-host rows -> global jax.Arrays whose leading axis is sharded over `batch_axes`."""
  batch_axes = tuple(batch_axes)
  shards = math.prod(mesh.shape[a] for a in batch_axes)
  sharding = NamedSharding(mesh, P(batch_axes))
  out = {}
  for key, value in host_batch.items():
    value = np.asarray(value)
    if value.shape[0] * jax.process_count() % shards:
      raise ValueError(f"global_batch: {key!r} has {value.shape[0]} rows per host x "
                       f"{jax.process_count()} processes, not divisible by the {shards} shards of "
                       f"mesh axes {batch_axes}")
    if value.dtype == np.int64 and not jax.config.jax_enable_x64:
      value = device_sample_ids(value)
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out
