"""ovenc_jax.train.checkpoint on 8 devices: the replica-split size in effect for its saves only, round trips."""
import json
import logging
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ovenc_jax.train import checkpoint


def test_replicated_and_sharded_arrays_round_trip_and_small_ones_compile_nothing(tmp_path, caplog):
  mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(0)
  small = rng.standard_normal((64, 96), np.float32)          # below the split size: one replica writes it
  big = rng.standard_normal((2048, 1024), np.float32)         # 8 replicas write the split size each
  sharded = rng.standard_normal((1024, 16), np.float32)
  assert small.nbytes < checkpoint.MIN_REPLICA_SLICE_BYTES <= big.nbytes // 8
  state = {"step": np.asarray(3, np.int32),
           "params": {"small": jax.device_put(small, NamedSharding(mesh, P())),
                      "big": jax.device_put(big, NamedSharding(mesh, P())),
                      "sharded": jax.device_put(sharded, NamedSharding(mesh, P("d")))}}
  global_handler = ocp.type_handlers.get_type_handler(jax.Array)
  # Warm the slice program for the big array's shard shape, so any compile logged below is a small array's.
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    checkpoint.write_params_checkpoint(str(tmp_path / "warm"), state["params"], step=1)
    caplog.clear()
    checkpoint.write_params_checkpoint(str(tmp_path / "ckpt"), {"small2": state["params"]["small"][:32]},
                                       step=2)
  assert not [r for r in caplog.records if "jit(slice)" in r.getMessage()], caplog.text
  # The handler came with the manager: orbax's global one is the same object as before the saves.
  assert ocp.type_handlers.get_type_handler(jax.Array) is global_handler
  step, tree = checkpoint.load_state_tree(str(tmp_path / "warm"))
  assert step == 1
  params = tree["params"]
  for name, want in (("small", small), ("big", big), ("sharded", sharded)):
    np.testing.assert_array_equal(params[name], want)
  # Written like orbax's own handler writes: its per-process array metadata, and the standard
  # handler named for the state item (readers without this module take it as such).
  state_dir = tmp_path / "warm" / checkpoint.CHECKPOINT_DIR / "1" / checkpoint.STATE_ITEM
  assert (state_dir / "array_metadatas" / "process_0").is_file()
  with open(tmp_path / "warm" / checkpoint.CHECKPOINT_DIR / "1" / "_CHECKPOINT_METADATA") as f:
    handlers = json.load(f)["item_handlers"]
  assert handlers[checkpoint.STATE_ITEM] == ocp.handlers.StandardCheckpointHandler.typestr()
  with ocp.CheckpointManager(tmp_path / "warm" / checkpoint.CHECKPOINT_DIR, item_names=("state",)) as mngr:
    plain = mngr.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  np.testing.assert_array_equal(np.asarray(plain["params"]["big"]), big)


def test_small_arrays_split_over_replicas_without_the_handler(tmp_path, caplog):
  """The control: orbax's default handler does split the small replicated array (so the check above
  tells the handlers apart)."""
  mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  small = jax.device_put(np.ones((64, 96), np.float32), NamedSharding(mesh, P()))
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    with ocp.CheckpointManager(tmp_path, item_names=("state",)) as mngr:
      mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({"small": small})), force=True)
      mngr.wait_until_finished()
  assert [r for r in caplog.records if "jit(slice)" in r.getMessage()], caplog.text


_IMPORT_CHANGES_NOTHING = """
import jax, orbax.checkpoint as ocp
before = ocp.type_handlers.get_type_handler(jax.Array)
entries = [(ty, ocp.type_handlers.get_type_handler(ty)) for ty in ocp.type_handlers.supported_types()]
from ovenc_jax.train import checkpoint
print(ocp.type_handlers.get_type_handler(jax.Array) is before
      and all(ocp.type_handlers.get_type_handler(ty) is h for ty, h in entries))
"""


def test_import_leaves_orbax_global_handlers_alone():
  out = subprocess.run([sys.executable, "-c", _IMPORT_CHANGES_NOTHING], capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip().splitlines()[-1] == "True", out.stderr


def test_stored_shapes_and_latest_step_read_without_restoring_or_creating(tmp_path):
  work = str(tmp_path / "w")
  enc = {"embed": {"kernel": np.zeros((588, 16), np.float32)}, "norm": {"scale": np.ones((16,), np.float32)}}
  checkpoint.write_params_checkpoint(work, {"encoder": enc, "centers": np.zeros((128, 16), np.float32)}, step=1)
  checkpoint.write_params_checkpoint(work, {"encoder": enc}, step=3)
  assert checkpoint.latest_step(work) == 3
  assert checkpoint.state_shapes(work, 1) == {"params/centers": (128, 16), "params/encoder/embed/kernel": (588, 16),
                                              "params/encoder/norm/scale": (16,), "step": ()}
  assert "params/centers" not in checkpoint.state_shapes(work, 3)
  missing = tmp_path / "none"
  assert checkpoint.latest_step(str(missing)) is None and not missing.exists()
  with pytest.raises(FileNotFoundError, match="no checkpoint for step 2 at .*checkpoints/2"):
    checkpoint.resolve_step(work, 2)
