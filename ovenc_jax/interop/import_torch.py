"""Import safetensors in the official OneVision-Encoder layout into a JAX params-only checkpoint.

python -m ovenc_jax.interop.import_torch --input DIR --workdir OUT [--step 0]
DIR holds config.json + model.safetensors (+ optional centers.safetensors), as export_torch writes them.
OUT gets checkpoints/<step> (params only) and config.json ("model" section); train from it with
--config.init_from=OUT.
"""
import argparse
import json
import os
import contextlib
import shutil
import tempfile
import uuid
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch
from safetensors import safe_open

from ovenc_format import atomic_io
from ovenc_format import paths as pathio
from ovenc_jax.interop import torch_layout as layout_lib
from ovenc_jax.model import defaults as model_defaults
from ovenc_jax.model import encoder as model_lib
from ovenc_jax.train import checkpoint as ckpt_lib
from ovenc_jax.train import compat


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found")
  with safe_open(path, framework="pt") as f:
    return {k: f.get_tensor(k) for k in f.keys()}


def _to_numpy_f32(t: torch.Tensor) -> np.ndarray:
  # float32 stays bit-identical; bf16/fp16 widen to float32 exactly.
  return t.detach().cpu().to(torch.float32).numpy()


def model_config_for(arch: layout_lib.Arch, rope_layout: str, rope_theta: float) -> ml_collections.ConfigDict:
  """A `config.model` for these sizes: the named variant when the sizes match one, else 'custom'."""
  variant = model_defaults.variant_of(arch.width, arch.depth, arch.num_heads, arch.mlp_dim)
  cfg = model_defaults.model_config(variant or model_defaults.DEFAULT_VARIANT)
  cfg.update(dict(variant=variant or "custom", width=arch.width, depth=arch.depth, num_heads=arch.num_heads,
                  mlp_dim=arch.mlp_dim, patch_size=arch.patch_size, rope_layout=rope_layout,
                  rope_theta=rope_theta))
  model_lib.validate_model_config(cfg)
  return cfg


@contextlib.contextmanager
def _local_export(input_dir: str):
  """A local folder with the export's files: INPUT_DIR itself, or for a remote one (gs://) a temp copy
  of its config.json and safetensors files (safetensors reads local files)."""
  if not pathio.is_remote(input_dir):
    yield input_dir
    return
  with tempfile.TemporaryDirectory(prefix="ovenc-import-") as tmp:
    for name in (layout_lib.CONFIG_FILE, layout_lib.MODEL_FILE, layout_lib.CENTERS_FILE):
      if pathio.is_file(pathio.join(input_dir, name)):
        pathio.download(pathio.join(input_dir, name), os.path.join(tmp, name))
    yield tmp


def read_export(input_dir: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """(model config, {"encoder": params[, "centers": [C, D]]}) from an export directory, fully validated."""
  if pathio.is_remote(input_dir):
    with _local_export(input_dir) as local:
      try:
        return _read_export(local)
      except (FileNotFoundError, layout_lib.LayoutError) as e:  # name the remote folder, not the copy
        raise type(e)(str(e).replace(local, input_dir)) from None
  return _read_export(input_dir)


def _read_export(input_dir: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  cfg_path = os.path.join(input_dir, layout_lib.CONFIG_FILE)
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{cfg_path} not found: --input must hold config.json and model.safetensors")
  with open(cfg_path) as f:
    hf_cfg = json.load(f)
  arch, rope_layout, rope_theta = layout_lib.parse_hf_config(hf_cfg, source=cfg_path)
  weights_path = os.path.join(input_dir, layout_lib.MODEL_FILE)
  state = _load_safetensors(weights_path)
  layout_lib.check_state_dict(state, arch, source=weights_path)
  encoder = layout_lib.torch_to_flax({k: _to_numpy_f32(v) for k, v in state.items()}, arch, source=weights_path)
  params: dict[str, Any] = {"encoder": encoder}
  centers_path = os.path.join(input_dir, layout_lib.CENTERS_FILE)
  if os.path.isfile(centers_path):
    tensors = _load_safetensors(centers_path)
    prefix = layout_lib.CENTERS_KEY + "."
    banks = set(tensors) != {layout_lib.CENTERS_KEY}  # several banks: one 'centers.<bank>' key each
    if banks and not (tensors and all(k.startswith(prefix) and len(k) > len(prefix) for k in tensors)):
      raise layout_lib.LayoutError(f"{centers_path}: expected exactly the key '{layout_lib.CENTERS_KEY}' or "
                                   f"'{prefix}<bank>' keys, found {sorted(tensors)}")
    for key, c in tensors.items():
      if c.dim() != 2 or c.shape[1] != arch.width or not c.dtype.is_floating_point:
        raise layout_lib.LayoutError(f"{centers_path}: '{key}' has shape {tuple(c.shape)} "
                                     f"dtype {c.dtype}, expected float [num_classes, {arch.width}]")
    params["centers"] = ({k[len(prefix):]: _to_numpy_f32(c) for k, c in tensors.items()} if banks
                         else _to_numpy_f32(tensors[layout_lib.CENTERS_KEY]))
  return model_config_for(arch, rope_layout, rope_theta), params


def check_against_model(model_cfg: ml_collections.ConfigDict, encoder_params: dict[str, Any], source: str) -> None:
  """LayoutError naming the first encoder parameter whose shape is not the one the JAX encoder of
  `model_cfg` creates (both shapes), or that only one side has."""
  encoder = model_lib.encoder_from_config(model_cfg, platform="cpu")
  n, p = 4, int(model_cfg.patch_size)  # parameter shapes do not depend on the token count
  abstract = nn.meta.unbox(jax.eval_shape(lambda: encoder.init(
      jax.random.key(0), jnp.zeros((1, n, p * p * 3), jnp.uint8), jnp.zeros((1, n, 3), jnp.int32),
      jnp.ones((1, n), jnp.int32))["params"]))
  problem = compat.first_difference(compat.leaf_shapes(encoder_params, "encoder"),
                                    compat.leaf_shapes(abstract, "encoder"), stored_name=source)
  if problem:
    raise layout_lib.LayoutError(f"{source} does not fit the encoder its config.json describes: {problem}")


def import_dir(input_dir: str, workdir: str, step: int = 0) -> str:
  """Writes WORKDIR/checkpoints/STEP (params only) and WORKDIR/config.json; returns the checkpoint path.

  Both are written into a staging folder beside WORKDIR and moved in once complete: a failed import
  leaves WORKDIR as it was."""
  model_cfg, params = read_export(input_dir)
  check_against_model(model_cfg, params["encoder"], pathio.join(input_dir, layout_lib.MODEL_FILE))
  if pathio.is_remote(workdir):
    return _import_remote(input_dir, workdir, model_cfg, params, step)
  workdir = os.path.abspath(workdir)
  existing = ckpt_lib.latest_step(workdir)
  if existing is not None:
    raise FileExistsError(f"{ckpt_lib.checkpoint_dir(workdir)} already holds checkpoints (latest step "
                          f"{existing}); import into an empty --workdir")
  target = ckpt_lib.checkpoint_dir(workdir)
  if os.path.isdir(target) and os.listdir(target):
    raise FileExistsError(f"{target} holds unfinished checkpoint files ({sorted(os.listdir(target))[0]}, ...); "
                          f"import into an empty --workdir")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"--workdir {workdir} is not a folder")
  parent = os.path.dirname(workdir)
  os.makedirs(parent, exist_ok=True)
  # os.mkdir, not mkdtemp: the folder may become WORKDIR itself, with the permissions the umask gives.
  staging = os.path.join(parent, f".{os.path.basename(workdir)}.import-{uuid.uuid4().hex[:12]}")
  os.mkdir(staging)
  try:
    ckpt_lib.write_params_checkpoint(staging, params, step)
    # The model section lets export_torch / embed rebuild the encoder from this workdir alone.
    atomic_io.save_json(os.path.join(staging, layout_lib.CONFIG_FILE),
                        {"model": model_cfg.to_dict(), "imported_from": os.path.abspath(input_dir)})
    if not os.path.exists(workdir):
      os.rename(staging, workdir)
    else:
      if os.path.isdir(target):
        os.rmdir(target)  # empty (checked above)
      os.rename(ckpt_lib.checkpoint_dir(staging), target)
      os.replace(os.path.join(staging, layout_lib.CONFIG_FILE), os.path.join(workdir, layout_lib.CONFIG_FILE))
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return os.path.join(target, str(step))


def _import_remote(input_dir, workdir, model_cfg, params, step) -> str:
  """A gs:// WORKDIR: orbax commits the checkpoint atomically in place (its own temp folder and
  finalize); config.json follows, uploaded atomically."""
  existing = ckpt_lib.latest_step(workdir)
  if existing is not None:
    raise FileExistsError(f"{ckpt_lib.checkpoint_dir(workdir)} already holds checkpoints (latest step "
                          f"{existing}); import into an empty --workdir")
  pathio.check_writable(workdir, "--workdir")
  path = ckpt_lib.write_params_checkpoint(workdir, params, step)
  atomic_io.save_json(pathio.join(workdir, layout_lib.CONFIG_FILE),
                      {"model": model_cfg.to_dict(), "imported_from": input_dir})
  return path


def main(argv=None) -> str:
  ap = argparse.ArgumentParser(prog="python -m ovenc_jax.interop.import_torch", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--input", required=True, help="directory with config.json + model.safetensors")
  ap.add_argument("--workdir", required=True, help="output JAX workdir (must hold no checkpoints yet)")
  ap.add_argument("--step", type=int, default=0, help="step number of the written checkpoint")
  args = ap.parse_args(argv)
  try:
    path = import_dir(args.input, args.workdir, args.step)
  except (layout_lib.LayoutError, FileNotFoundError, FileExistsError, NotADirectoryError, KeyError,
          ValueError) as e:
    raise SystemExit(f"{ap.prog}: error: {e.args[0] if isinstance(e, KeyError) else e}") from e
  print(f"wrote {path}")
  return path


if __name__ == "__main__":
  main()
