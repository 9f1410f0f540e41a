"""Orbax checkpoints of the train state (+ grain iterator state) in WORKDIR/checkpoints."""
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.experimental.v1 import options as ocp_options

from ovenc_format import paths

# The state is a plain dict, so export/import need no trainer code:
#   {"step": int32 [], "params": {"encoder": <Encoder 'params' collection>, "centers": [C_pad, D]},
#    "opt_state": <optax state>, "rng": uint32 key data}
# A params-only checkpoint (from import_torch) holds just {"step", "params"}; the trainer then starts
# fresh optimizer state from those params.
CHECKPOINT_DIR = "checkpoints"
# Orbax splits the save of a replicated array across its replicas and jit-compiles one slice per
# distinct shape, in every new process. Below this many bytes per replica the split saves less than
# its compiles cost; larger arrays (and all of a pod's sharded weights, which are not split this
# way) are saved as orbax would.
MIN_REPLICA_SLICE_BYTES = 1 << 20
STATE_ITEM = "state"
_READ_ONLY = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)


def array_handler() -> ocp.type_handlers.ArrayHandler:
  """Orbax's jax.Array handler with MIN_REPLICA_SLICE_BYTES, writing the same array metadata."""
  # The array-metadata store orbax's default handler writes with; orbax exports it only as this
  # option's default.
  store = ocp_options.ArrayOptions.Saving().array_metadata_store
  return ocp.type_handlers.ArrayHandler(array_metadata_store=store,
                                        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)


def type_handler_registry() -> ocp.type_handlers.TypeHandlerRegistry:
  """Orbax's standard type handlers, in their order, with array_handler() for jax.Array."""
  handler = array_handler()
  return ocp.type_handlers.create_type_handler_registry(*[
      (ty, handler if ty is jax.Array else ocp.type_handlers.get_type_handler(ty))
      for ty in ocp.type_handlers.supported_types()])


class StateHandler(ocp.handlers.StandardCheckpointHandler):
  """StandardSave/StandardRestore of the state item, its saves through type_handler_registry().

  Restores read what orbax's own handler would, and the checkpoint records this handler as the
  standard one (typestr): the files are the standard handler's, so any reader takes them as such.
  """

  def __init__(self):
    super().__init__()
    # StandardCheckpointHandler's own PyTree settings, with the registry.
    self._saver = ocp.handlers.PyTreeCheckpointHandler(
        save_concurrent_gb=96, restore_concurrent_gb=96, type_handler_registry=type_handler_registry())

  @classmethod
  def typestr(cls) -> str:
    return ocp.handlers.StandardCheckpointHandler.typestr()

  async def async_save(self, directory, item=None, save_args=None, args=None):
    if args is None:
      args = ocp.args.StandardSave(item, save_args)
    item = self._validate_save_state(args.item, save_args=args.save_args)
    return await self._saver.async_save(directory, args=ocp.args.PyTreeSave(
        item=item, save_args=args.save_args, custom_metadata=args.custom_metadata))

  def finalize(self, directory) -> None:
    self._saver.finalize(directory)

  def close(self):
    self._saver.close()
    super().close()


def _handlers() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """The state item's handler, for its saves and restores."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  handler = StateHandler()
  registry.add(STATE_ITEM, ocp.args.StandardSave, handler)
  registry.add(STATE_ITEM, ocp.args.StandardRestore, handler)
  return registry


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints; a gs:// workdir stays a bucket path (orbax writes it through TensorStore)."""
  return paths.join(paths.absolute(workdir), CHECKPOINT_DIR)


def make_manager(workdir: str, *, max_to_keep: int = 3, save_interval_steps: int = 1,
                 async_save: bool = True) -> ocp.CheckpointManager:
  """The writing manager: 'state' saved through StateHandler; other items (the trainer's data
  iterator, 'ds') take the handler orbax registers for the args they are saved with."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
      enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, handler_registry=_handlers())


def _reader(workdir: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=_READ_ONLY, handler_registry=_handlers())


def latest_step(workdir: str) -> int | None:
  """The newest finalized step under WORKDIR/checkpoints, or None; reads the listing only (no manager,
  so nothing is created and orbax logs nothing)."""
  if not paths.is_dir(checkpoint_dir(workdir)):
    return None
  return max(ocp.utils.checkpoint_steps(checkpoint_dir(workdir)), default=None)


def resolve_step(workdir: str, step: int | None) -> int:
  """`step` when its checkpoint exists, else the latest; FileNotFoundError naming the folder."""
  if step is not None:
    path = paths.join(checkpoint_dir(workdir), str(step))
    if not paths.is_dir(path):
      raise FileNotFoundError(f"no checkpoint for step {step} at {path}")
    return step
  found = latest_step(workdir)
  if found is None:
    raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}")
  return found


def load_state_tree(workdir: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
  """Restores the whole 'state' item as host numpy arrays (no target, no mesh needed)."""
  step = resolve_step(workdir, step)
  with _reader(workdir) as mngr:
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return step, jax.tree.map(np.asarray, dict(restored[STATE_ITEM]))


def load_params(workdir: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
  """(step, {"encoder": ..., optionally "centers": ...}) as numpy arrays."""
  step, state = load_state_tree(workdir, step)
  if "params" not in state or "encoder" not in state["params"]:
    raise KeyError(f"checkpoint step {step} in {checkpoint_dir(workdir)} has no params/encoder entry")
  return step, state["params"]


def state_shapes(workdir: str, step: int) -> dict[str, tuple[int, ...]]:
  """{'params/encoder/...': shape} of every array in a checkpoint's state item, from its metadata:
  nothing is restored, so a checkpoint of another model size is read as cheaply as a matching one."""
  path = epath.Path(checkpoint_dir(workdir)) / str(step) / STATE_ITEM
  if not path.is_dir():
    raise FileNotFoundError(f"no state item at {path}")
  handler = ocp.handlers.StandardCheckpointHandler()
  try:
    meta = handler.metadata(path)
  finally:
    handler.close()
  leaves = jax.tree_util.tree_flatten_with_path(meta)[0]
  return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(getattr(m, "shape", ()) or ())
          for p, m in leaves}


def write_params_checkpoint(workdir: str, params: dict[str, Any], step: int = 0) -> str:
  """Writes a params-only checkpoint the trainer can start from (resume or fine-tune)."""
  state = {"step": np.asarray(step, np.int32), "params": params}
  with make_manager(workdir, async_save=False) as mngr:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
    mngr.wait_until_finished()
  return paths.join(checkpoint_dir(workdir), str(step))
