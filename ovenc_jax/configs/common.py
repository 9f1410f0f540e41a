"""Pieces shared by configs: `key=value` arg parsing, model variants, sharding rules."""
import ml_collections
from ml_collections import config_dict

# width, depth, heads, mlp_dim
VARIANTS = {
    "tiny": (128, 2, 4, 512),
    "small": (384, 12, 6, 1536),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "huge": (1280, 32, 20, 5120),
}

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


def model_config(variant: str) -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"config arg variant={variant!r} is unknown; known: {sorted(VARIANTS)}")
  width, depth, heads, mlp = VARIANTS[variant]
  return ml_collections.ConfigDict(dict(
      variant=variant, patch_size=14, width=width, depth=depth, num_heads=heads, mlp_dim=mlp,
      rope_layout="official",  # 'official' = weights-compatible quirk; 'consistent' = textbook RoPE
      rope_theta=10000.0,
      # 'auto' (per platform: splash on TPU, cudnn on GPU in bf16, else xla) | 'xla' | 'chunked'
      # (memory-bounded on CPU) | 'splash' (Pallas flash, TPU) | 'cudnn' (flash, GPU)
      attention="auto",
      attn_chunk_size=512,
      # 'auto' (pallas on TPU unless mesh.tensor splits the MLP or its weights overflow VMEM, else
      # xla) | 'xla' | 'pallas': the LayerNorm -> MLP -> residual half of each block as one fused
      # kernel (ovenc_jax/model/fused_mlp.py; interpret mode off TPU)
      mlp_kernel="auto",
      remat="none",            # 'none' | 'block' | 'dots'
      dtype="float32",         # compute dtype; params stay fp32 (policy: ovenc_jax/model/precision.py)
      grad_reduce_dtype="float32",  # dtype of weight-gradient sums and their cross-device reduction
  ))


# `pod=NAME` presets for the pod shapes users book. Per variant: mesh (data, fsdp, tensor), global batch
# (rows) and remat; all run bf16 with the platform's flash kernel. TPU slice names count TensorCores on
# v5p (v5p-128 is 64 chips, one JAX device each) and chips on v5e. FSDP shards weights and Adam state
# 16 ways on the TPU slices (the gradient all-reduce of pure data parallelism is 359 MiB for base and
# 1.2 GiB for large per step); on 8 H100s base stays data parallel and large shards over all 8.
POD_PRESETS = {
    "v5e-256": dict(devices=256, platform="tpu", attention="splash", variants={
        # 16 rows per chip, as on v5p: with 4, a chip's 2,048-8,192 tokens did not amortise its
        # weight gathers (XLA bytes 17.0 GiB for 6.1 ms of FLOPs; 16 rows: 45.3 GiB, 24.3 ms).
        "base": ((16, 16, 1), 4096, "none"),
        "large": ((16, 16, 1), 1024, "dots"),    # recompute elementwise work: 16 GiB is tight for large
    }),
    "v5p-128": dict(devices=64, platform="tpu", attention="splash", variants={
        "base": ((4, 16, 1), 1024, "none"),
        "large": ((4, 16, 1), 1024, "none"),     # 16 rows per 95 GiB chip
    }),
    "h100x8": dict(devices=8, platform="gpu", attention="cudnn", variants={
        "base": ((8, 1, 1), 256, "none"),
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


def mesh_config(data=-1, fsdp=1, tensor=1) -> ml_collections.ConfigDict:
  """Mesh shape; -1 on one axis = fill with the remaining devices. dcn_<axis>: slices that axis spans
  (multi-slice TPU, or processes on platforms without slices); 1 everywhere = one slice."""
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, dcn_data=1, dcn_fsdp=1,
                                        dcn_tensor=1))
