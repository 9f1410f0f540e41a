"""Checks that a stored checkpoint and its config.json fit the configured model, before anything is written."""
from collections.abc import Mapping
from typing import Any

from ovenc_jax.eval import embed as embed_lib
from ovenc_jax.train import checkpoint as ckpt_lib

# config.model keys that decide the parameters' shapes and meaning: a checkpoint whose config.json
# records other values holds another model, also where every shape happens to agree.
SHAPE_KEYS = ("width", "depth", "num_heads", "mlp_dim", "patch_size")
# A resumed run must be the same function too; a fine-tune (init_from) may change its RoPE.
RESUME_KEYS = SHAPE_KEYS + ("rope_layout", "rope_theta")
CENTERS = "params/centers"


class ModelMismatchError(ValueError):
  """A checkpoint or config.json that does not fit the configured model."""


def leaf_shapes(tree: Any, prefix: str) -> dict[str, tuple[int, ...]]:
  """{'prefix/a/b': shape} of a nested dict/list of arrays (or ShapeDtypeStructs), in the tree's order
  but with the centers last: their shape follows model.width too, and a layer of the encoder is the
  more telling first difference."""
  out: dict[str, tuple[int, ...]] = {}

  def walk(node, path):
    if isinstance(node, Mapping):
      for k, v in sorted(node.items(), key=lambda kv: kv[0] == "centers"):
        walk(v, f"{path}/{k}")
    elif isinstance(node, (list, tuple)):
      for i, v in enumerate(node):
        walk(v, f"{path}/{i}")
    else:
      out[path] = tuple(getattr(node, "shape", ()))

  walk(tree, prefix)
  return out


def _fmt(shape) -> str:
  return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def first_difference(stored: Mapping[str, tuple], model: Mapping[str, tuple], optional=(),
                     stored_name: str = "the checkpoint") -> str | None:
  """The first parameter whose stored shape differs from the model's (or that only one side has),
  described with both shapes; None when they agree. Model entries under an `optional` prefix may be
  absent from `stored`."""
  for path, shape in model.items():
    if path not in stored:
      if any(path == o or path.startswith(o + "/") for o in optional):
        continue
      return f"{path} is missing from {stored_name}; the model's has shape {_fmt(shape)}"
    if tuple(stored[path]) != tuple(shape):
      return f"{path} has shape {_fmt(stored[path])} in {stored_name} and {_fmt(shape)} in the model"
  extra = [p for p in stored if p not in model]
  if extra:
    return f"{stored_name} holds {extra[0]} (shape {_fmt(stored[extra[0]])}), which the model lacks"
  return None


def check_model_section(workdir: str, model_cfg, keys=RESUME_KEYS) -> None:
  """ModelMismatchError when WORKDIR/config.json records other `keys` than config.model (no file: no check)."""
  path, stored = embed_lib.read_model_section(workdir)
  if stored is None:
    return
  for key in keys:
    if key in stored and stored[key] != model_cfg[key]:
      raise ModelMismatchError(f"config.model.{key}={model_cfg[key]!r} but {path} records "
                               f"model.{key}={stored[key]!r}: that workdir holds another model")


def check_resume(workdir: str, step: int, abstract_state: Mapping[str, Any], model_cfg) -> None:
  """Before restoring WORKDIR's checkpoint `step`: its parameters' shapes (read from its metadata) and
  its config.json's model section must be those of the configured model."""
  stored = ckpt_lib.state_shapes(workdir, step)
  where = f"checkpoint step {step} in {ckpt_lib.checkpoint_dir(workdir)}"
  if not any(p.startswith("opt_state") for p in stored):
    raise ModelMismatchError(f"{where} holds parameters only (an import), not a run to resume: start from "
                             f"it with --config.init_from={workdir} and a new --workdir")
  params = {p: s for p, s in stored.items() if p.startswith("params/")}
  problem = first_difference(params, leaf_shapes(abstract_state["params"], "params"))
  if problem:
    raise ModelMismatchError(f"{where} does not fit the configured model: {problem}. Resume with the "
                             f"config it was trained with, or train into a new --workdir")
  check_model_section(workdir, model_cfg, RESUME_KEYS)


def load_init_params(init_from: str, abstract_params: Mapping[str, Any], model_cfg) -> dict[str, Any]:
  """init_from's params ({"encoder", optionally "centers"}) once their shapes (from the metadata, before
  anything is read) and its config.json fit the configured model."""
  step = ckpt_lib.resolve_step(init_from, None)
  stored = {p: s for p, s in ckpt_lib.state_shapes(init_from, step).items() if p.startswith("params/")}
  problem = first_difference(stored, leaf_shapes(abstract_params, "params"), optional=(CENTERS,))
  if problem:
    raise ModelMismatchError(f"config.init_from={init_from}: checkpoint step {step} does not fit the "
                             f"configured model: {problem}")
  check_model_section(init_from, model_cfg, SHAPE_KEYS)
  _, params = ckpt_lib.load_params(init_from, step)
  return params
