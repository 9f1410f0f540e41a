"""The one JAX <-> PyTorch (official OneVision-Encoder) parameter name and shape mapping (numpy only, no jax)."""
import dataclasses
import math
from typing import Any, Mapping

import numpy as np

# model.defaults imports no jax, so the PyTorch side shares the encoder's constants without it.
from ovenc_jax.model.defaults import CLIP_MEAN, CLIP_STD, NORM_EPS, ROPE_TEMPORAL_SIZE  # noqa: F401

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CENTERS_FILE = "centers.safetensors"
CENTERS_KEY = "centers"
CARD_FILE = "README.md"
# The transformers code written beside the weights (sources in ovenc_jax/interop/hf/), loaded through
# config.json's auto_map with trust_remote_code=True.
HF_CONFIG_MODULE = "configuration_onevision_encoder"
HF_MODEL_MODULE = "modeling_onevision_encoder"
# A consistent-layout export gets its own model_type and config class: code that knows only the
# published model (official RoPE pairing) must not take it for one.
HF_MODEL_TYPES = {"official": "onevision_encoder", "consistent": "onevision_encoder_consistent"}
HF_CONFIG_CLASSES = {"official": "OneVisionEncoderConfig", "consistent": "OneVisionEncoderConsistentConfig"}
HF_MODEL_CLASSES = {"official": "OneVisionEncoderModel", "consistent": "OneVisionEncoderConsistentModel"}

ROPE_LAYOUTS = ("official", "consistent")


class LayoutError(ValueError):
  """A parameter or config field does not fit the layout; the message names it."""


@dataclasses.dataclass(frozen=True)
class Arch:
  """The sizes that fix every parameter shape."""
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads


@dataclasses.dataclass(frozen=True)
class Entry:
  """One PyTorch tensor and the Flax leaves it is built from (several only for the packed head q/k/v)."""
  torch_key: str
  torch_shape: tuple[int, ...]
  flax_paths: tuple[tuple[str, ...], ...]
  flax_shapes: tuple[tuple[int, ...], ...]
  kind: str


# ---- exact transforms (reshapes, transposes and concatenations only, so round trips are bitwise) ----

def _to_torch(kind: str, arrays: list[np.ndarray], arch: Arch) -> np.ndarray:
  d, p = arch.width, arch.patch_size
  if kind == "same":
    return arrays[0]
  if kind == "linear":  # [in, out] -> [out, in]
    return arrays[0].T
  if kind == "patch":  # [(row, col, channel), D] -> Conv2d [D, channel, row, col]
    return arrays[0].reshape(p, p, 3, d).transpose(3, 2, 0, 1)
  if kind == "heads_in":  # [D, H, hd] -> [H*hd, D]; output index h*hd + k as in .view(B, N, H, hd)
    return arrays[0].reshape(d, -1).T
  if kind == "heads_bias":  # [H, hd] -> [H*hd]
    return arrays[0].reshape(-1)
  if kind == "heads_out":  # [H, hd, D] -> [D, H*hd]
    return arrays[0].reshape(-1, d).T
  if kind == "qkv_in":  # 3 x [D, H, hd] -> nn.MultiheadAttention.in_proj_weight [3D, D] (q, k, v stacked)
    return np.concatenate([a.reshape(d, -1).T for a in arrays], axis=0)
  if kind == "qkv_bias":
    return np.concatenate([a.reshape(-1) for a in arrays], axis=0)
  raise AssertionError(kind)


def _from_torch(kind: str, t: np.ndarray, arch: Arch) -> list[np.ndarray]:
  d, h, hd, p = arch.width, arch.num_heads, arch.head_dim, arch.patch_size
  if kind == "same":
    return [t]
  if kind == "linear":
    return [t.T]
  if kind == "patch":
    return [t.transpose(2, 3, 1, 0).reshape(p * p * 3, d)]
  if kind == "heads_in":
    return [t.T.reshape(d, h, hd)]
  if kind == "heads_bias":
    return [t.reshape(h, hd)]
  if kind == "heads_out":
    return [t.T.reshape(h, hd, d)]
  if kind == "qkv_in":
    return [part.T.reshape(d, h, hd) for part in np.split(t, 3, axis=0)]
  if kind == "qkv_bias":
    return [part.reshape(h, hd) for part in np.split(t, 3, axis=0)]
  raise AssertionError(kind)


def layout(arch: Arch) -> list[Entry]:
  """Every tensor of the official state dict, in a fixed order, with its Flax source leaves."""
  d, m, h, hd, p = arch.width, arch.mlp_dim, arch.num_heads, arch.head_dim, arch.patch_size
  out: list[Entry] = []

  def add(key, shape, kind, *paths_shapes):
    out.append(Entry(key, tuple(shape), tuple(tuple(ps[0]) for ps in paths_shapes),
                     tuple(tuple(ps[1]) for ps in paths_shapes), kind))

  def norm(torch_prefix, flax_prefix, with_bias=True):
    add(f"{torch_prefix}.weight", (d,), "same", (flax_prefix + ("scale",), (d,)))
    if with_bias:
      add(f"{torch_prefix}.bias", (d,), "same", (flax_prefix + ("bias",), (d,)))

  def mlp(torch_prefix, flax_prefix):
    add(f"{torch_prefix}.fc1.weight", (m, d), "linear", (flax_prefix + ("fc1", "kernel"), (d, m)))
    add(f"{torch_prefix}.fc1.bias", (m,), "same", (flax_prefix + ("fc1", "bias"), (m,)))
    add(f"{torch_prefix}.fc2.weight", (d, m), "linear", (flax_prefix + ("fc2", "kernel"), (m, d)))
    add(f"{torch_prefix}.fc2.bias", (d,), "same", (flax_prefix + ("fc2", "bias"), (d,)))

  add("embeddings.patch_embedding.weight", (d, 3, p, p), "patch",
      (("patch_embedding", "kernel"), (p * p * 3, d)))
  norm("layernorm_pre", ("layernorm_pre",))
  for i in range(arch.depth):
    tp, fp = f"encoder.layers.{i}", (f"layers_{i}",)
    norm(f"{tp}.layer_norm1", fp + ("layer_norm1",))
    for proj in ("q_proj", "k_proj", "v_proj"):
      add(f"{tp}.self_attn.{proj}.weight", (d, d), "heads_in",
          (fp + ("self_attn", proj, "kernel"), (d, h, hd)))
      add(f"{tp}.self_attn.{proj}.bias", (d,), "heads_bias", (fp + ("self_attn", proj, "bias"), (h, hd)))
    add(f"{tp}.self_attn.out_proj.weight", (d, d), "heads_out",
        (fp + ("self_attn", "out_proj", "kernel"), (h, hd, d)))
    add(f"{tp}.self_attn.out_proj.bias", (d,), "same", (fp + ("self_attn", "out_proj", "bias"), (d,)))
    norm(f"{tp}.layer_norm2", fp + ("layer_norm2",))
    mlp(f"{tp}.mlp", fp + ("mlp",))
  norm("layernorm_post", ("layernorm_post",))
  add("head.probe", (1, 1, d), "same", (("head", "probe"), (1, 1, d)))
  qkv = [(("head", "attention", proj, "kernel"), (d, h, hd)) for proj in ("q_proj", "k_proj", "v_proj")]
  add("head.attention.in_proj_weight", (3 * d, d), "qkv_in", *qkv)
  qkv_b = [(("head", "attention", proj, "bias"), (h, hd)) for proj in ("q_proj", "k_proj", "v_proj")]
  add("head.attention.in_proj_bias", (3 * d,), "qkv_bias", *qkv_b)
  add("head.attention.out_proj.weight", (d, d), "heads_out",
      (("head", "attention", "out_proj", "kernel"), (h, hd, d)))
  add("head.attention.out_proj.bias", (d,), "same", (("head", "attention", "out_proj", "bias"), (d,)))
  norm("head.norm", ("head", "norm"), with_bias=False)  # RMSNorm: weight only
  mlp("head.mlp", ("head", "mlp"))
  return out


# ---- Flax params side ----

def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """Nested params -> {path tuple: leaf}."""
  flat = {}
  for k, v in tree.items():
    if hasattr(v, "unbox"):  # flax nn.LogicallyPartitioned leaves straight from Module.init
      v = v.unbox()
    if isinstance(v, Mapping):
      flat.update(flatten(v, prefix + (str(k),)))
    else:
      flat[prefix + (str(k),)] = v
  return flat


def _name(path: tuple[str, ...]) -> str:
  return "/".join(path)


def _leaf_shape(flat, path) -> tuple[int, ...]:
  if path not in flat:
    raise LayoutError(f"Flax params have no '{_name(path)}'")
  return tuple(np.shape(flat[path]))


def arch_from_flax(params: Mapping[str, Any]) -> Arch:
  """Infers the sizes from the Encoder 'params' collection (shapes only)."""
  flat = flatten(params)
  rows, width = _leaf_shape(flat, ("patch_embedding", "kernel"))
  p = math.isqrt(rows // 3)
  if p * p * 3 != rows:
    raise LayoutError(f"Flax 'patch_embedding/kernel' has {rows} rows, not p*p*3 for any patch size p")
  depth = len({path[0] for path in flat if path[0].startswith("layers_")})
  if depth == 0:
    raise LayoutError("Flax params have no 'layers_0': no encoder layers")
  _, heads, _ = _leaf_shape(flat, ("layers_0", "self_attn", "q_proj", "kernel"))
  _, mlp_dim = _leaf_shape(flat, ("layers_0", "mlp", "fc1", "kernel"))
  return Arch(width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim, patch_size=p)


def flax_to_torch(params: Mapping[str, Any], arch: Arch | None = None) -> dict[str, np.ndarray]:
  """Encoder 'params' collection -> {official state-dict key: contiguous numpy array}.

  Every Flax leaf must be used exactly once: a missing, surplus or mis-shaped leaf is an error naming it.
  """
  flat = {path: np.asarray(v) for path, v in flatten(params).items()}
  arch = arch or arch_from_flax(params)
  used: set[tuple[str, ...]] = set()
  state = {}
  for e in layout(arch):
    arrays = []
    for path, shape in zip(e.flax_paths, e.flax_shapes):
      got = _leaf_shape(flat, path)
      if got != shape:
        raise LayoutError(f"Flax '{_name(path)}' has shape {got}, expected {shape} (for {e.torch_key})")
      arrays.append(flat[path])
      used.add(path)
    state[e.torch_key] = np.ascontiguousarray(_to_torch(e.kind, arrays, arch))
  surplus = sorted(_name(p) for p in set(flat) - used)
  if surplus:
    raise LayoutError(f"Flax params have leaves the official layout has no place for: {surplus}")
  return state


def check_state_dict(state: Mapping[str, Any], arch: Arch, source: str = "state dict") -> None:
  """Raises LayoutError naming every missing or unexpected key, else the first wrong shape or dtype."""
  entries = layout(arch)
  expected = {e.torch_key: e for e in entries}
  missing = [k for k in expected if k not in state]
  unexpected = sorted(k for k in state if k not in expected)
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing keys {missing}")
    if unexpected:
      parts.append(f"unexpected keys {unexpected}")
    raise LayoutError(f"{source}: " + "; ".join(parts))
  for key, e in expected.items():
    shape = tuple(state[key].shape)
    if shape != e.torch_shape:
      raise LayoutError(f"{source}: '{key}' has shape {shape}, expected {e.torch_shape}")
    dtype = state[key].dtype
    if not _is_float(dtype):
      raise LayoutError(f"{source}: '{key}' has dtype {dtype}, expected a floating dtype")


def _is_float(dtype) -> bool:
  # numpy dtypes have .kind; torch dtypes (from the PyTorch loader) have .is_floating_point.
  if hasattr(dtype, "is_floating_point"):
    return bool(dtype.is_floating_point)
  return np.dtype(dtype).kind == "f"


def torch_to_flax(state: Mapping[str, np.ndarray], arch: Arch, source: str = "state dict") -> dict[str, Any]:
  """{official key: numpy array} -> nested Encoder 'params' collection (validated first)."""
  check_state_dict(state, arch, source)
  params: dict[str, Any] = {}
  for e in layout(arch):
    for path, arr in zip(e.flax_paths, _from_torch(e.kind, np.asarray(state[e.torch_key]), arch)):
      node = params
      for k in path[:-1]:
        node = node.setdefault(k, {})
      node[path[-1]] = np.ascontiguousarray(arr)
  return params


# ---- config.json (the official OneVisionEncoderConfig fields, plus ovenc's rope_layout and auto_map) ----

def hf_config(arch: Arch, *, rope_layout: str = "official", rope_theta: float = 10000.0,
              image_size: int = 224, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """config.json for OneVisionEncoderModel.from_pretrained and transformers' AutoModel (trust_remote_code);
  'rope_layout' is ours (absent = official), read by the code shipped beside the weights."""
  if rope_layout not in ROPE_LAYOUTS:
    raise LayoutError(f"rope_layout={rope_layout!r}: expected one of {ROPE_LAYOUTS}")
  cfg = {
      "architectures": [HF_MODEL_CLASSES[rope_layout]],
      "model_type": HF_MODEL_TYPES[rope_layout],
      "auto_map": {"AutoConfig": f"{HF_CONFIG_MODULE}.{HF_CONFIG_CLASSES[rope_layout]}",
                   "AutoModel": f"{HF_MODEL_MODULE}.{HF_MODEL_CLASSES[rope_layout]}"},
      "hidden_size": arch.width,
      "intermediate_size": arch.mlp_dim,
      "num_hidden_layers": arch.depth,
      "num_attention_heads": arch.num_heads,
      "num_channels": 3,
      "image_size": int(image_size),
      "patch_size": arch.patch_size,
      "hidden_act": "gelu",  # exact (erf) GELU, as nn.gelu(approximate=False)
      "layer_norm_eps": NORM_EPS,
      "layer_norm_type": "layer_norm",
      "attention_dropout": 0.0,
      "initializer_range": 0.02,
      "rope_theta": float(rope_theta),
      # The published default: RoPE over a 64-frame grid. visible_indices index it as
      # t*H*W + h*W + w with t on the 64-frame timeline (input.temporal_positions="timeline64");
      # a dense 5-D clip without visible_indices still takes t = 0..T-1 (T <= 64). With None the
      # packed-frames call fails with an index error.
      "rope_temporal_size": ROPE_TEMPORAL_SIZE,
      "use_head": True,
      "torch_dtype": "float32",
      "dtype": "float32",  # transformers 5's name for torch_dtype
      "rope_layout": rope_layout,
  }
  if extra:
    cfg["ovenc_jax"] = dict(extra)
  return cfg


def _field(cfg: Mapping[str, Any], key: str, source: str, default: Any = None, required: bool = True):
  if key not in cfg:
    if required:
      raise LayoutError(f"{source}: field '{key}' is missing")
    return default
  return cfg[key]


def parse_hf_config(cfg: Mapping[str, Any], source: str = CONFIG_FILE) -> tuple[Arch, str, float]:
  """(Arch, rope_layout, rope_theta) from a config.json dict; an unsupported field is an error naming it."""
  ints = {}
  for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size"):
    value = _field(cfg, key, source)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise LayoutError(f"{source}: field '{key}'={value!r} must be a positive integer")
    ints[key] = value
  checks = [("num_channels", 3), ("hidden_act", "gelu"), ("layer_norm_type", "layer_norm"),
            ("layer_norm_eps", NORM_EPS), ("use_head", True)]
  for key, want in checks:
    value = _field(cfg, key, source, default=want, required=False)
    if value != want:
      raise LayoutError(f"{source}: field '{key}'={value!r} is not supported; the encoder uses {want!r}")
  rope_layout = _field(cfg, "rope_layout", source, default="official", required=False)
  if rope_layout not in ROPE_LAYOUTS:
    raise LayoutError(f"{source}: field 'rope_layout'={rope_layout!r}: expected one of {ROPE_LAYOUTS}")
  model_type = cfg.get("model_type", HF_MODEL_TYPES[rope_layout])
  if model_type != HF_MODEL_TYPES[rope_layout]:
    raise LayoutError(f"{source}: field 'model_type'={model_type!r} does not match rope_layout={rope_layout!r} "
                      f"(expected {HF_MODEL_TYPES[rope_layout]!r})")
  rope_theta = float(_field(cfg, "rope_theta", source, default=10000.0, required=False))
  arch = Arch(width=ints["hidden_size"], depth=ints["num_hidden_layers"],
              num_heads=ints["num_attention_heads"], mlp_dim=ints["intermediate_size"],
              patch_size=ints["patch_size"])
  if arch.width % arch.num_heads:
    raise LayoutError(f"{source}: field 'hidden_size'={arch.width} is not divisible by "
                      f"'num_attention_heads'={arch.num_heads}")
  if arch.head_dim % 32:
    raise LayoutError(f"{source}: head_dim={arch.head_dim} (hidden_size / num_attention_heads) must be a "
                      "multiple of 32 for the 4:6:6 3D RoPE split")
  return arch, rope_layout, rope_theta


def rope_inverse_frequencies(head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, ...]:
  """Per-axis (t, h, w) inverse frequencies, float64: head_dim/2 split 4:6:6 (as ovenc_jax.model.rope)."""
  if head_dim <= 0 or head_dim % 32:
    raise LayoutError(f"head_dim={head_dim}: head_dim/2 must be a multiple of 16 for the 4:6:6 3D RoPE split")
  unit = head_dim // 32
  return tuple(1.0 / theta ** (np.arange(u * unit, dtype=np.float64) / (u * unit)) for u in (4, 6, 6))

