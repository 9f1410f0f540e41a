"""Device mesh from config and logical-axis shardings for params, created sharded via jit(init)."""
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Resolves -1 and checks the product; errors name the `mesh.*` key."""
  sizes = {}
  for axis in MESH_AXES:
    if axis not in mesh_cfg:
      raise ValueError(f"mesh.{axis} is missing from the config")
    v = int(mesh_cfg[axis])
    if v == 0 or v < -1:
      raise ValueError(f"mesh.{axis}={v}: must be a positive size or -1 (fill)")
    sizes[axis] = v
  fill = [a for a, v in sizes.items() if v == -1]
  if len(fill) > 1:
    raise ValueError(f"mesh: only one axis may be -1, got {', '.join('mesh.' + a for a in fill)}")
  known = math.prod(v for v in sizes.values() if v != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"mesh.{fill[0]}=-1 cannot fill: {num_devices} devices are not divisible by "
                       f"the other axes' product {known}")
    sizes[fill[0]] = num_devices // known
  total = math.prod(sizes.values())
  if total != num_devices:
    raise ValueError(f"mesh: mesh.data*mesh.fsdp*mesh.tensor = {sizes['data']}*{sizes['fsdp']}*"
                     f"{sizes['tensor']} = {total} != {num_devices} available devices")
  return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  devices = np.asarray(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, devices.size)
  return jax.sharding.Mesh(devices.reshape(shape), MESH_AXES)


def validate_divisibility(model_cfg, mesh: jax.sharding.Mesh) -> None:
  """Sharded widths must divide by their mesh axes; errors name both config keys."""
  checks = (("width", "fsdp"), ("num_heads", "tensor"), ("mlp_dim", "tensor"))
  for key, axis in checks:
    if model_cfg[key] % mesh.shape[axis]:
      raise ValueError(f"model.{key}={model_cfg[key]} is not divisible by mesh.{axis}={mesh.shape[axis]}")


def logical_shardings(abstract_tree: Any, mesh: jax.sharding.Mesh, rules) -> Any:
  """NamedShardings for a (boxed, abstract) tree carrying nn.LogicallyPartitioned leaves."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, tuple(rules))


def create_sharded(init_fn: Callable[..., Any], mesh: jax.sharding.Mesh, rules, *args) -> tuple[Any, Any]:
  """eval_shape -> shardings from the rules -> jit(init, out_shardings). Returns (unboxed tree, shardings)."""
  abstract = jax.eval_shape(init_fn, *args)
  shardings = logical_shardings(abstract, mesh, rules)
  boxed = jax.jit(init_fn, out_shardings=shardings)(*args)
  return nn.meta.unbox(boxed), nn.meta.unbox(shardings)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, rules) -> jax.sharding.NamedSharding:
  """Sharding for an input array whose leading axis is the batch."""
  spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), tuple(rules))
  return jax.sharding.NamedSharding(mesh, spec)
