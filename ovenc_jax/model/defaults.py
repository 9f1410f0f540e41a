"""The encoder's defaults as plain data: size variants, field values, the `config.model` section."""
import ml_collections

# width, depth, heads, mlp_dim
VARIANTS = {
    "tiny": (128, 2, 4, 512),
    "small": (384, 12, 6, 1536),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "huge": (1280, 32, 20, 5120),
}
DEFAULT_VARIANT = "base"
# Frames of the published temporal RoPE grid (config.json rope_temporal_size).
ROPE_TEMPORAL_SIZE = 64
# Pixel normalisation and LayerNorm epsilon of the published encoder; the PyTorch port reads them here too.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORM_EPS = 1e-6

FIELDS = dict(
    patch_size=14,
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
)

# Keys a saved workdir's model section may lack, with the value such a workdir was trained with: the
# fused MLP kernel did not exist (xla), and weight gradients are reduced in fp32 by policy.
SAVED_WITHOUT = dict(mlp_kernel="xla", grad_reduce_dtype="float32")


def sizes(variant: str) -> dict[str, int]:
  """{'width', 'depth', 'num_heads', 'mlp_dim'} of a variant."""
  if variant not in VARIANTS:
    raise ValueError(f"config arg variant={variant!r} is unknown; known: {sorted(VARIANTS)}")
  return dict(zip(("width", "depth", "num_heads", "mlp_dim"), VARIANTS[variant]))


def variant_of(width: int, depth: int, num_heads: int, mlp_dim: int) -> str | None:
  """The variant with exactly these sizes, else None."""
  return next((name for name, v in VARIANTS.items() if v == (width, depth, num_heads, mlp_dim)), None)


def model_config(variant: str) -> ml_collections.ConfigDict:
  """The `config.model` section of a variant."""
  fields = dict(FIELDS)
  return ml_collections.ConfigDict(dict(variant=variant, patch_size=fields.pop("patch_size"), **sizes(variant),
                                        **fields))


def field(model_cfg, key: str):
  """model_cfg[key], or for a key saved workdirs may lack, the value they were trained with."""
  return model_cfg.get(key, SAVED_WITHOUT[key]) if key in SAVED_WITHOUT else model_cfg[key]
