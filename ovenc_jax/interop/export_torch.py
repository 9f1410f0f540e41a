"""Export a JAX checkpoint to PyTorch: OUT/config.json + OUT/model.safetensors in the official OneVision-Encoder layout.

python -m ovenc_jax.interop.export_torch --workdir DIR [--step N] --output OUT [--with_centers]
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Callable, Mapping

import numpy as np
from safetensors.numpy import save_file

from ovenc_jax.interop import torch_layout as layout_lib

_EXPORT_FILES = {layout_lib.MODEL_FILE, layout_lib.CONFIG_FILE, layout_lib.CENTERS_FILE}
# The keys of a workdir's config.json "model" section that fix parameter shapes, with the Arch field.
_SIZE_KEYS = {"width": "width", "depth": "depth", "num_heads": "num_heads", "mlp_dim": "mlp_dim",
              "patch_size": "patch_size"}


def _write_dir_atomically(output: str, fill: Callable[[str], None]) -> None:
  """Fills a temp dir beside OUTPUT, then renames it into place (replacing an earlier export only)."""
  output = os.path.abspath(output)
  parent = os.path.dirname(output)
  os.makedirs(parent, exist_ok=True)
  if os.path.exists(output):
    if not os.path.isdir(output):
      raise FileExistsError(f"--output {output} exists and is not a directory")
    foreign = sorted(set(os.listdir(output)) - _EXPORT_FILES)
    if foreign:
      raise FileExistsError(f"--output {output} holds files that are not from an export ({foreign[:5]}); "
                            "refusing to replace it")
  tmp = tempfile.mkdtemp(prefix=os.path.basename(output) + ".tmp-", dir=parent)
  try:
    fill(tmp)
    if os.path.exists(output):
      # A directory cannot be renamed over a non-empty one: move the old export aside first, so a
      # reader sees either the old or the new complete directory, never a half-written one.
      old = tmp + ".old"
      os.rename(output, old)
      os.rename(tmp, output)
      shutil.rmtree(old)
    else:
      os.rename(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def export_params(params: Mapping[str, Any], output: str, *, rope_layout: str = "official",
                  rope_theta: float = 10000.0, centers: Any = None, image_size: int = 224,
                  extra: Mapping[str, Any] | None = None) -> dict[str, str]:
  """Writes OUTPUT/{config.json, model.safetensors[, centers.safetensors]} from the Encoder 'params'
  collection (or {"params": ...}); returns the written paths by file name."""
  if set(params) == {"params"}:
    params = params["params"]
  arch = layout_lib.arch_from_flax(params)
  state = layout_lib.flax_to_torch(params, arch)
  cfg = layout_lib.hf_config(arch, rope_layout=rope_layout, rope_theta=rope_theta, image_size=image_size,
                             extra=extra)
  centers_arr = None  # {safetensors key: array}: 'centers', or 'centers.<bank>' per bank of loss.heads
  if centers is not None:
    banks = centers if isinstance(centers, Mapping) else {None: centers}
    centers_arr = {}
    for name, c in banks.items():
      key = layout_lib.CENTERS_KEY if name is None else f"{layout_lib.CENTERS_KEY}.{name}"
      centers_arr[key] = np.ascontiguousarray(np.asarray(c))
      if centers_arr[key].ndim != 2 or centers_arr[key].shape[1] != arch.width or centers_arr[key].dtype.kind != "f":
        raise layout_lib.LayoutError(f"{key} has shape {centers_arr[key].shape} dtype {centers_arr[key].dtype}, "
                                     f"expected float [num_classes, {arch.width}]")

  def fill(tmp):
    # metadata format=pt: transformers' from_pretrained refuses safetensors without it.
    save_file(state, os.path.join(tmp, layout_lib.MODEL_FILE), metadata={"format": "pt"})
    if centers_arr is not None:
      save_file(centers_arr, os.path.join(tmp, layout_lib.CENTERS_FILE),
                metadata={"format": "pt"})
    with open(os.path.join(tmp, layout_lib.CONFIG_FILE), "w") as f:
      json.dump(cfg, f, indent=2)
      f.write("\n")

  _write_dir_atomically(output, fill)
  names = [layout_lib.CONFIG_FILE, layout_lib.MODEL_FILE] + ([layout_lib.CENTERS_FILE] if centers_arr is not None else [])
  return {name: os.path.join(os.path.abspath(output), name) for name in names}


def export_workdir(workdir: str, output: str, *, step: int | None = None, with_centers: bool = False,
                   rope_layout: str | None = None, image_size: int = 224) -> dict[str, str]:
  """Loads WORKDIR's checkpoint (latest or STEP) and exports it; the model config comes from
  WORKDIR/config.json when present, else the sizes are read off the parameter shapes."""
  from ovenc_jax.train import checkpoint as ckpt_lib  # jax/orbax only for the checkpoint path
  from ovenc_jax.eval import embed

  step, params = ckpt_lib.load_params(workdir, step)
  arch = layout_lib.arch_from_flax(params["encoder"])
  cfg_path, model_cfg = embed.read_model_section(workdir)
  rope_theta = 10000.0
  if model_cfg is not None:
    for key, field in _SIZE_KEYS.items():
      if key in model_cfg and int(model_cfg[key]) != getattr(arch, field):
        raise layout_lib.LayoutError(f"{cfg_path}: model.{key}={model_cfg[key]} but the checkpoint of step "
                                     f"{step} has {field}={getattr(arch, field)}")
    cfg_layout = model_cfg.get("rope_layout", "official")
    if rope_layout is not None and rope_layout != cfg_layout:
      raise layout_lib.LayoutError(f"--rope_layout={rope_layout} contradicts model.rope_layout={cfg_layout!r} "
                                   f"in {cfg_path}")
    rope_layout = cfg_layout
    rope_theta = float(model_cfg.get("rope_theta", rope_theta))
  elif rope_layout is None:
    rope_layout = "official"
    print(f"note: {cfg_path} not found; sizes read from the parameter shapes, rope_layout='official' "
          "(pass --rope_layout to change)", file=sys.stderr)
  centers = None
  if with_centers:
    if "centers" not in params:
      raise KeyError(f"--with_centers: the checkpoint of step {step} in {workdir} has no params/centers")
    centers = params["centers"]
  extra = {"step": int(step)}  # provenance only; no local paths in a file meant for sharing
  if model_cfg is not None and "variant" in model_cfg:
    extra["variant"] = model_cfg["variant"]
  return export_params(params["encoder"], output, rope_layout=rope_layout, rope_theta=rope_theta,
                       centers=centers, image_size=image_size, extra=extra)


def main(argv=None) -> dict[str, str]:
  ap = argparse.ArgumentParser(prog="python -m ovenc_jax.interop.export_torch", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True, help="training workdir (its checkpoints/ and config.json)")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  ap.add_argument("--output", required=True, help="export directory (created or replaced)")
  ap.add_argument("--with_centers", action="store_true", help="also write centers.safetensors")
  ap.add_argument("--rope_layout", choices=layout_lib.ROPE_LAYOUTS, default=None,
                  help="only for a workdir without config.json (default official)")
  ap.add_argument("--image_size", type=int, default=224, help="config.json image_size (informational)")
  args = ap.parse_args(argv)
  try:
    paths = export_workdir(args.workdir, args.output, step=args.step, with_centers=args.with_centers,
                           rope_layout=args.rope_layout, image_size=args.image_size)
  except (layout_lib.LayoutError, FileNotFoundError, FileExistsError, KeyError) as e:
    raise SystemExit(f"{ap.prog}: error: {e.args[0] if isinstance(e, KeyError) else e}") from e
  for path in paths.values():
    print(f"wrote {path}")
  return paths


if __name__ == "__main__":
  main()
