"""Pieces shared by configs: `key=value` arg parsing, sharding rules, mesh shapes and pod presets."""
import ml_collections
from ml_collections import config_dict

from ovenc_jax.input.defaults import GEOMETRIES

# Logical axis -> mesh axes. Batch over data+fsdp; params FSDP-sharded on embed, tensor-parallel on
# heads/mlp; the cluster centers (classes) are sharded over every device.
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("patch", None),
    ("norm", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("classes", ("data", "fsdp", "tensor")),
)


def parse_arg(arg, **defaults):
  """'variant=base,frames=8' -> ConfigDict over defaults (types follow the defaults)."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep:  # a bare word is a bool flag ('runlocal') or the variant ('base')
      key, value = (key, "True") if isinstance(defaults.get(key), bool) else ("variant", key)
    if key not in defaults:
      raise ValueError(f"config arg {key!r} is unknown; known: {sorted(defaults)}")
    kind = type(defaults[key])
    out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
  return out


def allow_none(cfg, *keys) -> None:
  """Makes `section.key` fields settable to None (and lists, dicts) from the command line.

  A float field's flag parser rejects 'None'; an object-typed field parses Python literals (None,
  numbers, lists) and keeps anything else as a string.
  """
  for key in keys:
    section, _, name = key.rpartition(".")
    holder = cfg[section] if section else cfg
    holder[name] = config_dict.FieldReference(holder[name], field_type=object)


# `pod=NAME` presets for the pod shapes users book. Per variant: mesh (data, fsdp, tensor), global batch
# (rows) and remat; all run bf16 with the platform's flash kernel. TPU slice names count TensorCores on
# v5p (v5p-128 is 64 chips, one JAX device each) and chips on v5e. FSDP shards weights and Adam state
# 16 ways on the TPU slices, where pure data parallelism would all-reduce every gradient each step;
# on 8 H100s base stays data parallel and large shards over all 8, base at 64 rows of 512 tokens a GPU:
# the published run's 16 clips of 2,048 tokens a GPU. `loss` settings ride along (GPU: the center
# table padded to 256 rows a GPU, loss.center_row_multiple).
POD_PRESETS = {
    "v5e-256": dict(devices=256, platform="tpu", attention="splash", variants={
        # 16 rows per chip, as on v5p: fewer rows' tokens do not amortise a chip's weight gathers.
        "base": ((16, 16, 1), 4096, "none"),
        "large": ((16, 16, 1), 1024, "dots"),    # recompute elementwise work: large barely fits a v5e chip
    }),
    "v5p-128": dict(devices=64, platform="tpu", attention="splash", variants={
        "base": ((4, 16, 1), 1024, "none"),
        "large": ((4, 16, 1), 1024, "none"),     # 16 rows per chip
    }),
    "h100x8": dict(devices=8, platform="gpu", attention="cudnn", loss=dict(center_row_multiple=2048), variants={
        "base": ((8, 1, 1), 512, "none"),
        "large": ((1, 8, 1), 128, "dots"),
    }),
}


def apply_pod_preset(config, pod: str) -> None:
  """Sets config.mesh, input.global_batch_size and model dtype/remat/attention for `pod=NAME`."""
  if pod not in POD_PRESETS:
    raise ValueError(f"config arg pod={pod!r} is unknown; known: {sorted(POD_PRESETS)}")
  preset, variant = POD_PRESETS[pod], config.model.variant
  if variant not in preset["variants"]:
    raise ValueError(f"config arg pod={pod!r} has no preset for variant={variant!r}; it has "
                     f"{sorted(preset['variants'])}")
  (data, fsdp, tensor), batch, remat = preset["variants"][variant]
  config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
  config.input.global_batch_size = batch
  config.model.update(dtype="bfloat16", remat=remat, attention=preset["attention"])
  config.loss.update(preset.get("loss", {}))


def apply_geometry(config, name: str) -> None:
  """`geometry=NAME`: patch size, row token budget, samples per row and the 64-slot timeline together,
  plus the record grids the input checks (prep with --num_frames/--image_size as input.geometry says)."""
  if name not in GEOMETRIES:
    raise ValueError(f"config arg geometry={name!r} is unknown; known: {sorted(GEOMETRIES)}")
  g = dict(GEOMETRIES[name])
  patch, tokens, segments = g.pop("patch_size"), g.pop("tokens_per_row"), g.pop("max_segments")
  config.model.patch_size = patch
  config.input.update(patch_size=patch, tokens_per_row=tokens, max_segments=segments,
                      temporal_positions="timeline64", geometry=g)
  config.eval.tokens_per_row = tokens


def branch_split(arg: str, presets) -> dict:
  """`branches=official` (a preset) or `branches=CODEC/FRAMES[/NUM_FRAMES]` (shares; collages the rest)."""
  if arg in presets:
    return dict(presets[arg])
  parts = arg.split("/")
  try:
    codec, frames = float(parts[0]), float(parts[1])
    num_frames = int(parts[2]) if len(parts) == 3 else 8
    if len(parts) > 3:
      raise ValueError
  except (ValueError, IndexError):
    raise ValueError(f"config arg branches={arg!r}: expected one of {sorted(presets)} or "
                     f"CODEC/FRAMES[/NUM_FRAMES], e.g. 0.5/0.4/8") from None
  return dict(codec=codec, frames=frames, collage=round(1 - codec - frames, 9), num_frames=num_frames,
              period=0)


def mesh_config(data=-1, fsdp=1, tensor=1) -> ml_collections.ConfigDict:
  """Mesh shape; -1 on one axis = fill with the remaining devices. dcn_<axis>: slices that axis spans
  (multi-slice TPU, or processes on platforms without slices); 1 everywhere = one slice."""
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, dcn_data=1, dcn_fsdp=1,
                                        dcn_tensor=1))
