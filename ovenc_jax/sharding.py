"""Device mesh from config and logical-axis shardings for params, created sharded via jit(init)."""
import math
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils

MESH_AXES = ("data", "fsdp", "tensor")
# mesh.dcn_<axis>: how many slices (granules: TPU slices, else processes) the axis spans; the
# axis's size within a slice is mesh.<axis> / mesh.dcn_<axis>.
DCN_KEYS = tuple(f"dcn_{a}" for a in MESH_AXES)


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


def dcn_shape(mesh_cfg, shape: tuple[int, ...]) -> tuple[int, ...]:
  """mesh.dcn_* (absent = 1); each must divide its axis's size."""
  out = []
  for axis, key, size in zip(MESH_AXES, DCN_KEYS, shape):
    v = mesh_cfg.get(key, 1)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"mesh.{key}={v!r}: must be a positive int (slices spanned by mesh.{axis})")
    if size % v:
      raise ValueError(f"mesh.{key}={v} does not divide mesh.{axis}={size}")
    out.append(int(v))
  return tuple(out)


def device_grid(mesh_cfg, devices) -> np.ndarray:
  """Devices arranged for the mesh: along the physical torus (mesh_utils), slices outermost.

  A plain reshape in id order makes mesh rows zig-zag across hosts on a pod, where ids go host by
  host; create_device_mesh follows the interconnect (splitting a physical axis only where a mesh
  size needs it), create_hybrid_device_mesh puts the mesh.dcn_*
  axes across slices (processes where the devices are all in one slice).
  """
  devices = list(devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  dcn = dcn_shape(mesh_cfg, shape)
  if math.prod(dcn) == 1:
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  ici = tuple(s // d for s, d in zip(shape, dcn))
  # Slices where the devices name more than one (multi-slice TPU), else processes (GPU hosts, CPU).
  by_process = len({getattr(d, "slice_index", None) for d in devices}) <= 1
  granules = len({getattr(d, "process_index" if by_process else "slice_index") for d in devices})
  if granules != math.prod(dcn):
    raise ValueError(f"mesh: mesh.dcn_data*mesh.dcn_fsdp*mesh.dcn_tensor = {math.prod(dcn)} != the "
                     f"{granules} {'processes' if by_process else 'slices'} the devices belong to")
  return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process,
                                              allow_split_physical_axes=True)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  return jax.sharding.Mesh(device_grid(mesh_cfg, jax.devices() if devices is None else devices), MESH_AXES)


def validate_divisibility(model_cfg, mesh: jax.sharding.Mesh) -> None:
  """Sharded widths must divide by their mesh axes; errors name both config keys."""
  checks = (("width", "fsdp"), ("num_heads", "tensor"), ("mlp_dim", "tensor"))
  for key, axis in checks:
    if model_cfg[key] % mesh.shape[axis]:
      raise ValueError(f"model.{key}={model_cfg[key]} is not divisible by mesh.{axis}={mesh.shape[axis]}")


def mesh_platform() -> str:
  """The platform of the current mesh's devices ('tpu', 'gpu', 'cpu'), else the local backend's.

  Compiling for TPU targets from a CPU host traces under a mesh of TPU devices: code that picks a
  kernel per platform (splash's Mosaic kernel, RoPE's matmul) must ask the mesh, not jax.default_backend().
  """
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()


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


def logical_mesh_axes(rules, name: str) -> tuple[str, ...]:
  """The mesh axes the logical axis `name` is sharded over under `rules`, as a tuple (() = replicated)."""
  axes = nn.logical_to_mesh_axes((name,), tuple(tuple(r) for r in rules))[0]
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, rules) -> jax.sharding.NamedSharding:
  """Sharding for an input array whose leading axis is the batch."""
  spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), tuple(rules))
  return jax.sharding.NamedSharding(mesh, spec)


def use_host_cpu_devices(count: int = 8) -> None:
  """Runs JAX on `count` host CPU devices unless the caller chose a device count or platforms.

  XLA reads the flag when JAX starts its backend, so call this before the first device is used."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "--xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
  if "JAX_PLATFORMS" not in os.environ:
    jax.config.update("jax_platforms", "cpu")
