"""Import safetensors in the official OneVision-Encoder layout into a JAX params-only checkpoint.

python -m ovenc_jax.interop.import_torch --input DIR --workdir OUT [--step 0]
DIR holds config.json + model.safetensors (+ optional centers.safetensors), as export_torch writes them.
OUT gets checkpoints/<step> (params only) and config.json ("model" section); train from it with
--config.init_from=OUT.
"""
import argparse
import json
import os
from typing import Any

import ml_collections
import numpy as np
import torch
from safetensors import safe_open

from ovenc_format import atomic_io
from ovenc_jax.interop import torch_layout as layout_lib
from ovenc_jax.model import defaults as model_defaults
from ovenc_jax.model import encoder as model_lib
from ovenc_jax.train import checkpoint as ckpt_lib


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


def read_export(input_dir: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """(model config, {"encoder": params[, "centers": [C, D]]}) from an export directory, fully validated."""
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


def import_dir(input_dir: str, workdir: str, step: int = 0) -> str:
  """Writes WORKDIR/checkpoints/STEP (params only) and WORKDIR/config.json; returns the checkpoint path."""
  model_cfg, params = read_export(input_dir)
  existing = ckpt_lib.latest_step(workdir)
  if existing is not None:
    raise FileExistsError(f"{ckpt_lib.checkpoint_dir(workdir)} already holds checkpoints (latest step "
                          f"{existing}); import into an empty --workdir")
  path = ckpt_lib.write_params_checkpoint(workdir, params, step)
  # The model section lets export_torch / embed rebuild the encoder from this workdir alone.
  atomic_io.save_json(os.path.join(os.path.abspath(workdir), layout_lib.CONFIG_FILE),
                      {"model": model_cfg.to_dict(), "imported_from": os.path.abspath(input_dir)})
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
  except (layout_lib.LayoutError, FileNotFoundError, FileExistsError, KeyError) as e:
    raise SystemExit(f"{ap.prog}: error: {e.args[0] if isinstance(e, KeyError) else e}") from e
  print(f"wrote {path}")
  return path


if __name__ == "__main__":
  main()
