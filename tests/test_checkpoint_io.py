"""Checkpoint writes on 8 devices: replicated arrays below and above the replica-split size, and a sharded one."""
import logging

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ovenc_jax.train import checkpoint


def test_replicated_and_sharded_arrays_round_trip_and_small_ones_compile_nothing(tmp_path, caplog):
  mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(0)
  small = rng.standard_normal((64, 96), np.float32)          # 24 KiB: one replica writes it
  big = rng.standard_normal((2048, 1024), np.float32)         # 8 MiB: 8 replicas write 1 MiB each
  sharded = rng.standard_normal((1024, 16), np.float32)
  assert small.nbytes < checkpoint.MIN_REPLICA_SLICE_BYTES <= big.nbytes // 8
  state = {"step": np.asarray(3, np.int32),
           "params": {"small": jax.device_put(small, NamedSharding(mesh, P())),
                      "big": jax.device_put(big, NamedSharding(mesh, P())),
                      "sharded": jax.device_put(sharded, NamedSharding(mesh, P("d")))}}
  # Warm the slice program for the big array's shard shape, so any compile logged below is a small array's.
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    checkpoint.write_params_checkpoint(str(tmp_path / "warm"), state["params"], step=1)
    caplog.clear()
    checkpoint.write_params_checkpoint(str(tmp_path / "ckpt"), {"small2": state["params"]["small"][:32]},
                                       step=2)
  assert not [r for r in caplog.records if "jit(slice)" in r.getMessage()], caplog.text
  step, tree = checkpoint.load_state_tree(str(tmp_path / "warm"))
  assert step == 1
  params = tree["params"]
  for name, want in (("small", small), ("big", big), ("sharded", sharded)):
    np.testing.assert_array_equal(params[name], want)
