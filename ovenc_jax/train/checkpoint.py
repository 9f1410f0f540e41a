"""Orbax checkpoints of the train state (+ grain iterator state) in WORKDIR/checkpoints.

State layout (a plain dict, so export/import need no trainer code):
  {"step": int32 [], "params": {"encoder": <Encoder 'params' collection>, "centers": [C_pad, D]},
   "opt_state": <optax state>, "rng": uint32 key data}
A params-only checkpoint (from import_torch) holds just {"step", "params"}; the trainer then starts
fresh optimizer state from those params.
"""
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
# The store orbax's own default handler for jax.Array is built with (not exported at the top level).
from orbax.checkpoint._src.metadata import array_metadata_store

CHECKPOINT_DIR = "checkpoints"
# Orbax splits the save of a replicated array across its replicas and jit-compiles one slice per
# distinct shape: 72 compiles and 4 s at a tiny model's first save on 8 CPU devices, in every new
# process. Below 1 MiB per replica the split saves less than its compile costs; larger arrays (and
# all of a pod's sharded weights, which are not split this way) are saved as before.
MIN_REPLICA_SLICE_BYTES = 1 << 20
ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
    array_metadata_store=array_metadata_store.Store(), min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES),
    override=True)
_READ_ONLY = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def make_manager(workdir: str, *, max_to_keep: int = 3, save_interval_steps: int = 1,
                 async_save: bool = True, with_data: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
      enable_async_checkpointing=async_save, create=True)
  names = ("state", "ds") if with_data else ("state",)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=names)


def latest_step(workdir: str) -> int | None:
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  with ocp.CheckpointManager(checkpoint_dir(workdir), item_names=("state",),
                             options=_READ_ONLY) as mngr:
    return mngr.latest_step()


def _resolve_step(workdir: str, step: int | None) -> int:
  if step is not None:
    path = os.path.join(checkpoint_dir(workdir), str(step))
    if not os.path.isdir(path):
      raise FileNotFoundError(f"no checkpoint for step {step} at {path}")
    return step
  found = latest_step(workdir)
  if found is None:
    raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}")
  return found


def load_state_tree(workdir: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
  """Restores the whole 'state' item as host numpy arrays (no target, no mesh needed)."""
  step = _resolve_step(workdir, step)
  with ocp.CheckpointManager(checkpoint_dir(workdir), item_names=("state",),
                             options=_READ_ONLY) as mngr:
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return step, jax.tree.map(np.asarray, dict(restored["state"]))


def load_params(workdir: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
  """(step, {"encoder": ..., optionally "centers": ...}) as numpy arrays."""
  step, state = load_state_tree(workdir, step)
  if "params" not in state or "encoder" not in state["params"]:
    raise KeyError(f"checkpoint step {step} in {checkpoint_dir(workdir)} has no params/encoder entry")
  return step, state["params"]


def write_params_checkpoint(workdir: str, params: dict[str, Any], step: int = 0) -> str:
  """Writes a params-only checkpoint the trainer can start from (resume or fine-tune)."""
  state = {"step": np.asarray(step, np.int32), "params": params}
  with make_manager(workdir, async_save=False, with_data=False) as mngr:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
    mngr.wait_until_finished()
  return os.path.join(checkpoint_dir(workdir), str(step))
