"""Mesh device order (the torus layout of mesh_utils, slices outermost, config keys kept) and logical axes."""
import dataclasses
import itertools

import jax
import numpy as np
import pytest

from ovenc_jax.configs import common
from ovenc_jax import sharding as sharding_lib


@dataclasses.dataclass(frozen=True)
class FakeTpu:
  """What mesh_utils reads of a TPU v4 device (one core per chip)."""
  id: int
  coords: tuple
  process_index: int
  slice_index: int = 0
  core_on_chip: int = 0
  device_kind: str = "TPU v4"
  platform: str = "tpu"


def pod(shape=(4, 2, 2), slices=1):
  """Ids go host by host as on a pod; a host holds a 2x2x1 block of chips."""
  out = []
  for s in range(slices):
    for z, hy, hx in itertools.product(range(shape[2]), range(shape[1] // 2), range(shape[0] // 2)):
      host = len(out) // 4
      for y, x in itertools.product(range(2), range(2)):
        out.append(FakeTpu(id=len(out), coords=(2 * hx + x, 2 * hy + y, z), process_index=host,
                           slice_index=s))
  return out


def _whole_axes(row, dims):
  """The row's chips are a sub-torus: each coordinate is fixed or runs over its whole axis."""
  coords = np.array([d.coords for d in row])
  return all(len(set(coords[:, k])) in (1, dims[k]) for k in range(3))


def test_rows_follow_the_torus_not_the_id_order():
  devices = pod()
  cfg = common.mesh_config(data=4, fsdp=1, tensor=4)
  grid = sharding_lib.device_grid(cfg, devices)
  assert grid.shape == (4, 1, 4)
  assert sorted(d.id for d in grid.ravel()) == list(range(16))
  assert all(_whole_axes(row, (4, 2, 2)) for row in grid.reshape(4, 4))
  # The id-order reshape makes each row one host's 2x2 block, half of the x ring.
  assert not any(_whole_axes(row, (4, 2, 2)) for row in np.asarray(devices).reshape(4, 4))
  # A mesh that needs a physical axis split still builds (as the id-order reshape always did).
  split = sharding_lib.device_grid(common.mesh_config(data=2, fsdp=2, tensor=4), devices)
  assert sorted(d.id for d in split.ravel()) == list(range(16))


def test_dcn_axis_spans_slices_and_keeps_rows_inside_one():
  devices = pod(shape=(2, 2, 2), slices=2)
  # Slices listed interleaved must still come out grouped: dcn axis outermost.
  mixed = [d for pair in zip(devices[:8], devices[8:]) for d in pair]
  cfg = common.mesh_config(data=4, fsdp=2, tensor=2)
  cfg.dcn_data = 2
  grid = sharding_lib.device_grid(cfg, mixed)
  assert grid.shape == (4, 2, 2)
  for half, s in ((grid[:2], 0), (grid[2:], 1)):
    assert {d.slice_index for d in half.ravel()} == {s}
  assert sorted(d.id for d in grid.ravel()) == list(range(16))
  with pytest.raises(ValueError, match=r"mesh.dcn_data\*mesh.dcn_fsdp\*mesh.dcn_tensor = 4 != the 2 slices"):
    cfg.dcn_data, cfg.dcn_fsdp = 2, 2
    sharding_lib.device_grid(cfg, mixed)
  with pytest.raises(ValueError, match="mesh.dcn_tensor=3 does not divide mesh.tensor=2"):
    cfg.dcn_data, cfg.dcn_fsdp, cfg.dcn_tensor = 1, 1, 3
    sharding_lib.device_grid(cfg, mixed)


def test_host_devices_keep_config_keys_and_match_a_sharded_sum():
  cfg = common.mesh_config(data=-1, fsdp=2, tensor=2)
  mesh = sharding_lib.make_mesh(cfg)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert sorted(d.id for d in mesh.devices.ravel()) == list(range(8))
  # With one slice the dcn axes go over processes: one process here, so only dcn=1 fits.
  cfg.dcn_fsdp = 2
  with pytest.raises(ValueError, match="!= the 1 processes"):
    sharding_lib.make_mesh(cfg)
  x = np.arange(64.0).reshape(8, 8)
  spec = jax.sharding.PartitionSpec(("data", "fsdp"), "tensor")
  y = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda a: a.sum(0))(y)), x.sum(0))


def test_logical_axes_name_their_mesh_axes_from_the_rules():
  rules = common.LOGICAL_AXIS_RULES
  assert sharding_lib.logical_mesh_axes(rules, "batch") == ("data", "fsdp")
  assert sharding_lib.logical_mesh_axes(rules, "classes") == ("data", "fsdp", "tensor")
  assert sharding_lib.logical_mesh_axes(rules, "embed") == ("fsdp",)
  assert sharding_lib.logical_mesh_axes(rules, "length") == ()
  # As a config read back from JSON holds them: lists; the first rule naming an axis decides.
  assert sharding_lib.logical_mesh_axes([["classes", ["data"]], ["classes", "tensor"]], "classes") == ("data",)
