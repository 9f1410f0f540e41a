"""Self-contained PyTorch OV-Encoder (imports no jax): loads an export directory, runs sparse token sets."""
import json
import os
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ovenc_jax.interop import torch_layout as layout_lib


def _large_negative(dtype: torch.dtype) -> float:
  # The value jax.nn.dot_product_attention writes into masked logits: a query with no visible key then
  # averages over all keys in both frameworks instead of producing NaN.
  return -0.7 * min(torch.finfo(dtype).max, torch.finfo(torch.float32).max)


def _rotate_half_interleaved(x: torch.Tensor) -> torch.Tensor:
  # (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the official release's pairing.
  even, odd = x[..., 0::2], x[..., 1::2]
  return torch.stack((-odd, even), dim=-1).flatten(-2)


def _rotate_half_split(x: torch.Tensor) -> torch.Tensor:
  first, second = x.chunk(2, dim=-1)
  return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
  """x [B, H, N, hd] rotated by cos/sin [B, 1, N, hd]; math in fp32, result in x.dtype."""
  rotate = _rotate_half_interleaved if layout == "official" else _rotate_half_split
  xf = x.float()
  return (xf * cos + rotate(xf) * sin).to(x.dtype)


class Mlp(nn.Module):
  def __init__(self, width: int, mlp_dim: int):
    super().__init__()
    self.fc1 = nn.Linear(width, mlp_dim)
    self.fc2 = nn.Linear(mlp_dim, width)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class SelfAttention(nn.Module):
  """q/k/v/out projections with bias; RoPE on q and k; scale head_dim^-0.5; a boolean [B,1,N,N] mask."""

  def __init__(self, width: int, num_heads: int, rope_layout: str):
    super().__init__()
    self.num_heads, self.head_dim, self.rope_layout = num_heads, width // num_heads, rope_layout
    self.q_proj = nn.Linear(width, width)
    self.k_proj = nn.Linear(width, width)
    self.v_proj = nn.Linear(width, width)
    self.out_proj = nn.Linear(width, width)

  def forward(self, x, cos, sin, mask):
    b, n, d = x.shape
    # Heads are contiguous blocks of the projection output: channel h*hd + k, as in the release.
    q, k, v = (proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
               for proj in (self.q_proj, self.k_proj, self.v_proj))
    q = apply_rope(q, cos, sin, self.rope_layout)
    k = apply_rope(k, cos, sin, self.rope_layout)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim ** -0.5)
    return self.out_proj(o.transpose(1, 2).reshape(b, n, d))


class EncoderLayer(nn.Module):
  def __init__(self, width, num_heads, mlp_dim, rope_layout):
    super().__init__()
    self.layer_norm1 = nn.LayerNorm(width, eps=layout_lib.NORM_EPS)
    self.self_attn = SelfAttention(width, num_heads, rope_layout)
    self.layer_norm2 = nn.LayerNorm(width, eps=layout_lib.NORM_EPS)
    self.mlp = Mlp(width, mlp_dim)

  def forward(self, x, cos, sin, mask):
    x = x + self.self_attn(self.layer_norm1(x), cos, sin, mask)
    return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
  def __init__(self, arch: layout_lib.Arch, rope_layout: str):
    super().__init__()
    self.layers = nn.ModuleList(
        EncoderLayer(arch.width, arch.num_heads, arch.mlp_dim, rope_layout) for _ in range(arch.depth))

  def forward(self, x, cos, sin, mask):
    for layer in self.layers:
      x = layer(x, cos, sin, mask)
    return x


class Embeddings(nn.Module):
  """The release's Conv2d (kernel = stride = p, no bias), applied to each token's own p x p patch."""

  def __init__(self, width: int, patch_size: int):
    super().__init__()
    self.patch_size = patch_size
    self.patch_embedding = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)

  def forward(self, patches):  # [B, N, p*p*3] flattened (row, col, channel) -> [B, N, D]
    b, n, _ = patches.shape
    p = self.patch_size
    x = patches.reshape(b * n, p, p, 3).permute(0, 3, 1, 2)
    return self.patch_embedding(x).reshape(b, n, -1)


class PoolingHead(nn.Module):
  """SigLIP2-style probe pooling with the release's modules: nn.MultiheadAttention, nn.RMSNorm, MLP.

  One probe query per segment; probe k attends only to tokens with segment id k; a slot with no
  token returns zeros.
  """

  def __init__(self, width, num_heads, mlp_dim):
    super().__init__()
    self.num_heads = num_heads
    self.probe = nn.Parameter(torch.zeros(1, 1, width))
    self.attention = nn.MultiheadAttention(width, num_heads, batch_first=True)
    self.norm = nn.RMSNorm(width, eps=layout_lib.NORM_EPS)
    self.mlp = Mlp(width, mlp_dim)

  def forward(self, x, segment_ids, num_segments: int):
    b, _, d = x.shape
    queries = self.probe.to(x.dtype).expand(b, num_segments, d)
    wanted = torch.arange(1, num_segments + 1, device=x.device)
    visible = wanted[None, :, None] == segment_ids[:, None, :]  # [B, S, N]
    bias = torch.zeros(visible.shape, dtype=x.dtype, device=x.device)
    bias = bias.masked_fill(~visible, _large_negative(x.dtype))
    # nn.MultiheadAttention takes a per-(batch, head) additive mask [B*H, S, N].
    bias = bias.repeat_interleave(self.num_heads, dim=0)
    h, _ = self.attention(queries, x, x, attn_mask=bias, need_weights=False)
    # An empty slot (no token of that segment) pools to zeros, as in the JAX model.
    return (h + self.mlp(self.norm(h))) * visible.any(-1, keepdim=True).to(h.dtype)


class OVEncoder(nn.Module):
  """PyTorch twin of ovenc_jax.model.encoder.Encoder; its state dict is the official OneVision-Encoder layout."""

  def __init__(self, arch: layout_lib.Arch, rope_layout: str = "official", rope_theta: float = 10000.0):
    super().__init__()
    if rope_layout not in layout_lib.ROPE_LAYOUTS:
      raise ValueError(f"rope_layout={rope_layout!r}: expected one of {layout_lib.ROPE_LAYOUTS}")
    self.arch, self.rope_layout, self.rope_theta = arch, rope_layout, rope_theta
    self.embeddings = Embeddings(arch.width, arch.patch_size)
    self.layernorm_pre = nn.LayerNorm(arch.width, eps=layout_lib.NORM_EPS)
    self.encoder = Encoder(arch, rope_layout)
    self.layernorm_post = nn.LayerNorm(arch.width, eps=layout_lib.NORM_EPS)
    self.head = PoolingHead(arch.width, arch.num_heads, arch.mlp_dim)
    inv = layout_lib.rope_inverse_frequencies(arch.head_dim, rope_theta)
    for name, f in zip(("inv_freq_t", "inv_freq_h", "inv_freq_w"), inv):
      self.register_buffer(name, torch.tensor(f, dtype=torch.float32), persistent=False)
    self.register_buffer("pixel_mean", torch.tensor(layout_lib.CLIP_MEAN, dtype=torch.float32), persistent=False)
    self.register_buffer("pixel_std", torch.tensor(layout_lib.CLIP_STD, dtype=torch.float32), persistent=False)

  # ---- loading -----------------------------------------------------------------------------
  @classmethod
  def from_pretrained(cls, path: str, map_location: str | torch.device = "cpu") -> "OVEncoder":
    """Loads DIR/config.json + DIR/model.safetensors (as written by ovenc_jax.interop.export_torch)."""
    cfg_path = os.path.join(path, layout_lib.CONFIG_FILE)
    weights_path = os.path.join(path, layout_lib.MODEL_FILE)
    for required in (cfg_path, weights_path):
      if not os.path.isfile(required):
        raise FileNotFoundError(f"{required} not found: is {path} an ovenc_jax.interop.export_torch output?")
    with open(cfg_path) as f:
      cfg = json.load(f)
    arch, rope_layout, rope_theta = layout_lib.parse_hf_config(cfg, source=cfg_path)
    state = load_file(weights_path, device=str(map_location))
    layout_lib.check_state_dict(state, arch, source=weights_path)
    model = cls(arch, rope_layout, rope_theta).to(map_location)
    model.load_state_dict(state, strict=True)
    return model.eval()

  # ---- forward -----------------------------------------------------------------------------
  def _as_tensor(self, x, dtype=None):
    return torch.as_tensor(x, device=self.inv_freq_t.device, dtype=dtype)

  def normalize(self, patches: torch.Tensor) -> torch.Tensor:
    """uint8 [..., p*p*3] -> CLIP-normalised float32; float input is taken as already normalised."""
    if patches.dtype != torch.uint8:
      return patches.float()
    x = patches.float().reshape(*patches.shape[:-1], -1, 3) / 255.0
    return ((x - self.pixel_mean) / self.pixel_std).reshape(patches.shape)

  def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, N, hd] of angles concat(t*inv_t, h*inv_h, w*inv_w) duplicated to [f, f]."""
    pos = positions.float()
    freqs = torch.cat([pos[..., 0:1] * self.inv_freq_t, pos[..., 1:2] * self.inv_freq_h,
                       pos[..., 2:3] * self.inv_freq_w], dim=-1)
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]
    return angles.cos(), angles.sin()

  def forward(self, patches, positions, segment_ids=None, mask=None, num_segments: int = 1) -> dict[str, Any]:
    """patches [B, N, p*p*3] (uint8 or CLIP-normalised float), positions int [B, N, 3] = (t, h, w),
    segment_ids int [B, N] (0 = padding, k = k-th packed sample) or mask bool [B, N] (True = real).

    Returns {"last_hidden_state": [B, N, D], "pooled": [B, num_segments, D]}.
    """
    p = self.arch.patch_size
    patches = self._as_tensor(patches)
    positions = self._as_tensor(positions)
    if patches.dim() != 3 or patches.shape[-1] != p * p * 3:
      raise ValueError(f"patches has shape {tuple(patches.shape)}, expected [B, N, {p * p * 3}] (p={p})")
    b, n = patches.shape[:2]
    if tuple(positions.shape) != (b, n, 3):
      raise ValueError(f"positions has shape {tuple(positions.shape)}, expected {(b, n, 3)}")
    if segment_ids is not None and mask is not None:
      raise ValueError("pass segment_ids or mask, not both")
    if mask is not None:
      mask = self._as_tensor(mask)
      if mask.dtype != torch.bool or tuple(mask.shape) != (b, n):
        raise ValueError(f"mask must be bool [B, N] = {(b, n)}, got {mask.dtype} {tuple(mask.shape)}")
      segment_ids = mask.long()
    elif segment_ids is None:
      segment_ids = torch.ones((b, n), dtype=torch.long, device=patches.device)
    else:
      segment_ids = self._as_tensor(segment_ids).long()
      if tuple(segment_ids.shape) != (b, n):
        raise ValueError(f"segment_ids has shape {tuple(segment_ids.shape)}, expected {(b, n)}")
    if num_segments < 1:
      raise ValueError(f"num_segments={num_segments} must be >= 1")

    dtype = self.layernorm_pre.weight.dtype
    x = self.embeddings(self.normalize(patches).to(dtype))
    x = self.layernorm_pre(x)
    cos, sin = self.rope(positions)
    # A token attends only to its own segment; padding (0) attends only to padding, never to real tokens.
    attn_mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    x = self.encoder(x, cos, sin, attn_mask)
    x = self.layernorm_post(x)
    pooled = self.head(x, segment_ids, num_segments)
    return {"last_hidden_state": x, "pooled": pooled}

  # ---- dense video convenience -------------------------------------------------------------
  def encode_video(self, frames, positions=None) -> dict[str, Any]:
    """frames [T, H, W, 3] pixels (uint8, or CLIP-normalised float); positions int [N, 3] = the kept
    patches' (t, h, w) on the patch grid, None = every patch. Runs one sample (B = 1, one segment).

    Returns {"last_hidden_state": [1, N, D], "pooled": [1, 1, D], "positions": [N, 3]}.
    """
    frames = self._as_tensor(frames)
    if positions is None:
      t, h, w = frames.shape[0], frames.shape[1] // self.arch.patch_size, frames.shape[2] // self.arch.patch_size
      grid = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
      positions = torch.stack(grid, dim=-1).reshape(-1, 3)
    positions = self._as_tensor(positions).long()
    patches = video_patches(frames, positions, self.arch.patch_size)
    out = self.forward(patches[None], positions[None])
    out["positions"] = positions
    return out


def video_patches(frames: torch.Tensor, positions: torch.Tensor, patch_size: int) -> torch.Tensor:
  """frames [T, H, W, 3], positions [N, 3] -> patches [N, p*p*3], each flattened (row, col, channel)."""
  frames = torch.as_tensor(frames)
  positions = torch.as_tensor(positions).long()
  p = patch_size
  if frames.dim() != 4 or frames.shape[-1] != 3:
    raise ValueError(f"frames has shape {tuple(frames.shape)}, expected [T, H, W, 3]")
  t, h, w, _ = frames.shape
  if h % p or w % p:
    raise ValueError(f"frames are {h}x{w}: height and width must be multiples of patch_size={p}")
  if positions.dim() != 2 or positions.shape[-1] != 3:
    raise ValueError(f"positions has shape {tuple(positions.shape)}, expected [N, 3] = (t, h, w)")
  limits = torch.tensor([t, h // p, w // p], device=positions.device)
  bad = ((positions < 0) | (positions >= limits)).any(-1)
  if bad.any():
    i = int(bad.nonzero()[0, 0])
    raise ValueError(f"positions[{i}]={positions[i].tolist()} is outside the patch grid (t, h, w) < "
                     f"{limits.tolist()}")
  grid = frames.reshape(t, h // p, p, w // p, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(t, h // p, w // p, -1)
  return grid[positions[:, 0], positions[:, 1], positions[:, 2]]


def load(path: str, map_location: str | torch.device = "cpu") -> OVEncoder:
  """Shorthand for OVEncoder.from_pretrained(path)."""
  return OVEncoder.from_pretrained(path, map_location)
