"""OneVision-Encoder model for transformers (shipped beside exported weights; needs only torch and transformers).

AutoModel.from_pretrained(export_dir, trust_remote_code=True) loads it. The forward takes token sets
as the JAX encoder does: patches [B, N, p*p*3], (t, h, w) positions [B, N, 3] and segment ids [B, N]
(0 = padding, k = the k-th sample packed into the row); ovenc_jax's OVEncoder is this model, built from this file.
"""
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_onevision_encoder import OneVisionEncoderConfig, OneVisionEncoderConsistentConfig

# The pixel normalisation the encoder was trained with (CLIP mean/std, RGB in [0, 1]).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass
class OneVisionEncoderOutput(ModelOutput):
  """last_hidden_state [B, N, D]; pooled [B, num_segments, D]: the probe embedding of each packed sample."""
  last_hidden_state: torch.Tensor | None = None
  pooled: torch.Tensor | None = None


def _large_negative(dtype):
  # The value jax.nn.dot_product_attention writes into masked logits: a query with no visible key then
  # averages over all keys instead of producing NaN.
  return -0.7 * min(torch.finfo(dtype).max, torch.finfo(torch.float32).max)


def rope_inverse_frequencies(head_dim, theta):
  """Per-axis (t, h, w) inverse frequencies in float64: head_dim/2 split 4:6:6."""
  unit = head_dim // 32
  return tuple(1.0 / theta ** (torch.arange(u * unit, dtype=torch.float64) / (u * unit)) for u in (4, 6, 6))


def rotate_half(x, layout):
  if layout == "official":  # (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the release's pairing
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((-odd, even), dim=-1).flatten(-2)
  first, second = x.chunk(2, dim=-1)  # consistent: channel i pairs with i + head_dim/2
  return torch.cat((-second, first), dim=-1)


def apply_rope(x, cos, sin, layout):
  """x [B, H, N, hd] rotated by cos/sin [B, 1, N, hd]; math in fp32, result in x.dtype."""
  xf = x.float()
  return (xf * cos + rotate_half(xf, layout) * sin).to(x.dtype)


def _check_frames(frames, p):
  if frames.dim() != 4 or frames.shape[-1] != 3:
    raise ValueError(f"frames has shape {tuple(frames.shape)}, expected [T, H, W, 3]")
  h, w = frames.shape[1:3]
  if h % p or w % p:
    raise ValueError(f"frames are {h}x{w}: height and width must be multiples of patch_size={p}")


def video_patches(frames, positions, patch_size):
  """frames [T, H, W, 3], positions [N, 3] -> patches [N, p*p*3], each flattened (row, col, channel)."""
  frames = torch.as_tensor(frames)
  positions = torch.as_tensor(positions).long()
  p = patch_size
  _check_frames(frames, p)
  t, h, w, _ = frames.shape
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


class OneVisionEncoderMlp(nn.Module):
  def __init__(self, width, mlp_dim):
    super().__init__()
    self.fc1 = nn.Linear(width, mlp_dim)
    self.fc2 = nn.Linear(mlp_dim, width)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class OneVisionEncoderAttention(nn.Module):
  def __init__(self, config):
    super().__init__()
    width = config.hidden_size
    self.num_heads, self.head_dim = config.num_attention_heads, width // config.num_attention_heads
    self.rope_layout = config.rope_layout
    self.q_proj = nn.Linear(width, width)
    self.k_proj = nn.Linear(width, width)
    self.v_proj = nn.Linear(width, width)
    self.out_proj = nn.Linear(width, width)

  def forward(self, x, cos, sin, mask):
    b, n, d = x.shape
    # Heads are contiguous blocks of the projection output: channel h*hd + k.
    q, k, v = (proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
               for proj in (self.q_proj, self.k_proj, self.v_proj))
    q = apply_rope(q, cos, sin, self.rope_layout)
    k = apply_rope(k, cos, sin, self.rope_layout)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim ** -0.5)
    return self.out_proj(o.transpose(1, 2).reshape(b, n, d))


class OneVisionEncoderLayer(nn.Module):
  def __init__(self, config):
    super().__init__()
    self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    self.self_attn = OneVisionEncoderAttention(config)
    self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    self.mlp = OneVisionEncoderMlp(config.hidden_size, config.intermediate_size)

  def forward(self, x, cos, sin, mask):
    x = x + self.self_attn(self.layer_norm1(x), cos, sin, mask)
    return x + self.mlp(self.layer_norm2(x))


class OneVisionEncoderStack(nn.Module):
  def __init__(self, config):
    super().__init__()
    self.layers = nn.ModuleList(OneVisionEncoderLayer(config) for _ in range(config.num_hidden_layers))

  def forward(self, x, cos, sin, mask):
    for layer in self.layers:
      x = layer(x, cos, sin, mask)
    return x


class OneVisionEncoderEmbeddings(nn.Module):
  """A Conv2d (kernel = stride = p, no bias) applied to each token's own p x p patch."""

  def __init__(self, config):
    super().__init__()
    self.patch_size = config.patch_size
    self.patch_embedding = nn.Conv2d(3, config.hidden_size, kernel_size=config.patch_size,
                                     stride=config.patch_size, bias=False)

  def forward(self, patches):  # [B, N, p*p*3] flattened (row, col, channel) -> [B, N, D]
    b, n, _ = patches.shape
    p = self.patch_size
    x = patches.reshape(b * n, p, p, 3).permute(0, 3, 1, 2)
    return self.patch_embedding(x).reshape(b, n, -1)


class OneVisionEncoderPoolingHead(nn.Module):
  """Probe pooling: probe k attends only to tokens of segment k; a slot with no token returns zeros."""

  def __init__(self, config):
    super().__init__()
    width = config.hidden_size
    self.num_heads = config.num_attention_heads
    self.probe = nn.Parameter(torch.zeros(1, 1, width))
    self.attention = nn.MultiheadAttention(width, config.num_attention_heads, batch_first=True)
    self.norm = nn.RMSNorm(width, eps=config.layer_norm_eps)
    self.mlp = OneVisionEncoderMlp(width, config.intermediate_size)

  def forward(self, x, segment_ids, num_segments):
    b, _, d = x.shape
    queries = self.probe.to(x.dtype).expand(b, num_segments, d)
    wanted = torch.arange(1, num_segments + 1, device=x.device)
    visible = wanted[None, :, None] == segment_ids[:, None, :]  # [B, S, N]
    bias = torch.zeros(visible.shape, dtype=x.dtype, device=x.device)
    bias = bias.masked_fill(~visible, _large_negative(x.dtype))
    bias = bias.repeat_interleave(self.num_heads, dim=0)  # nn.MultiheadAttention wants [B*H, S, N]
    h, _ = self.attention(queries, x, x, attn_mask=bias, need_weights=False)
    return (h + self.mlp(self.norm(h))) * visible.any(-1, keepdim=True).to(h.dtype)


class OneVisionEncoderPreTrainedModel(PreTrainedModel):
  config_class = OneVisionEncoderConfig
  base_model_prefix = "onevision_encoder"
  main_input_name = "patches"
  _no_split_modules = ["OneVisionEncoderLayer"]

  @torch.no_grad()
  def _init_weights(self, module):
    if isinstance(module, OneVisionEncoderPoolingHead):
      if not getattr(module.probe, "_is_hf_initialized", False):
        nn.init.normal_(module.probe, std=self.config.initializer_range)
    elif isinstance(module, OneVisionEncoderModel):
      # Non-persistent buffers are not in model.safetensors: recompute them after loading.
      module.reset_buffers()
    else:
      super()._init_weights(module)


class OneVisionEncoderModel(OneVisionEncoderPreTrainedModel):
  """Token-set OneVision-Encoder; its state dict is the official OneVision-Encoder layout."""

  def __init__(self, config: OneVisionEncoderConfig):
    super().__init__(config)
    self.embeddings = OneVisionEncoderEmbeddings(config)
    self.layernorm_pre = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    self.encoder = OneVisionEncoderStack(config)
    self.layernorm_post = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    self.head = OneVisionEncoderPoolingHead(config)
    head_dim = config.hidden_size // config.num_attention_heads
    for name, size in zip(("inv_freq_t", "inv_freq_h", "inv_freq_w"), (4, 6, 6)):
      self.register_buffer(name, torch.empty(size * head_dim // 32, dtype=torch.float32), persistent=False)
    self.register_buffer("pixel_mean", torch.empty(3, dtype=torch.float32), persistent=False)
    self.register_buffer("pixel_std", torch.empty(3, dtype=torch.float32), persistent=False)
    self.reset_buffers()
    self.post_init()

  @torch.no_grad()
  def reset_buffers(self):
    if self.inv_freq_t.is_meta:
      return  # built on the meta device: filled once the model is materialised
    head_dim = self.config.hidden_size // self.config.num_attention_heads
    freqs = rope_inverse_frequencies(head_dim, float(self.config.rope_theta))
    for buf, f in zip((self.inv_freq_t, self.inv_freq_h, self.inv_freq_w), freqs):
      buf.copy_(f.to(torch.float32))
    self.pixel_mean.copy_(torch.tensor(CLIP_MEAN))
    self.pixel_std.copy_(torch.tensor(CLIP_STD))

  def normalize(self, patches):
    """uint8 [..., p*p*3] -> CLIP-normalised float32; float input is taken as already normalised."""
    if patches.dtype != torch.uint8:
      return patches.float()
    x = patches.float().reshape(*patches.shape[:-1], -1, 3) / 255.0
    return ((x - self.pixel_mean) / self.pixel_std).reshape(patches.shape)

  def rope(self, positions):
    """cos, sin [B, 1, N, hd] of angles concat(t*inv_t, h*inv_h, w*inv_w) duplicated to [f, f]."""
    pos = positions.float()
    freqs = torch.cat([pos[..., 0:1] * self.inv_freq_t, pos[..., 1:2] * self.inv_freq_h,
                       pos[..., 2:3] * self.inv_freq_w], dim=-1)
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]
    return angles.cos(), angles.sin()

  def forward(self, patches, positions, segment_ids=None, mask=None, num_segments: int = 1,
              return_dict=None):
    """patches [B, N, p*p*3] (uint8 or CLIP-normalised float), positions int [B, N, 3] = (t, h, w),
    segment_ids int [B, N] (0 = padding, k = k-th packed sample) or mask bool [B, N] (True = real)."""
    p = self.config.patch_size
    device = self.inv_freq_t.device
    patches = torch.as_tensor(patches, device=device)
    positions = torch.as_tensor(positions, device=device)
    if patches.dim() != 3 or patches.shape[-1] != p * p * 3:
      raise ValueError(f"patches has shape {tuple(patches.shape)}, expected [B, N, {p * p * 3}] (p={p})")
    b, n = patches.shape[:2]
    if tuple(positions.shape) != (b, n, 3):
      raise ValueError(f"positions has shape {tuple(positions.shape)}, expected {(b, n, 3)}")
    if segment_ids is not None and mask is not None:
      raise ValueError("pass segment_ids or mask, not both")
    if mask is not None:
      mask = torch.as_tensor(mask, device=device)
      if mask.dtype != torch.bool or tuple(mask.shape) != (b, n):
        raise ValueError(f"mask must be bool [B, N] = {(b, n)}, got {mask.dtype} {tuple(mask.shape)}")
      segment_ids = mask.long()
    elif segment_ids is None:
      segment_ids = torch.ones((b, n), dtype=torch.long, device=device)
    else:
      segment_ids = torch.as_tensor(segment_ids, device=device).long()
      if tuple(segment_ids.shape) != (b, n):
        raise ValueError(f"segment_ids has shape {tuple(segment_ids.shape)}, expected {(b, n)}")
    if num_segments < 1:
      raise ValueError(f"num_segments={num_segments} must be >= 1")

    x = self.embeddings(self.normalize(patches).to(self.layernorm_pre.weight.dtype))
    x = self.layernorm_pre(x)
    cos, sin = self.rope(positions)
    # A token attends only to its own segment; padding (0) attends only to padding.
    attn_mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    x = self.layernorm_post(self.encoder(x, cos, sin, attn_mask))
    pooled = self.head(x, segment_ids, num_segments)
    out = OneVisionEncoderOutput(last_hidden_state=x, pooled=pooled)
    return out if return_dict is not False else out.to_tuple()

  def encode_video(self, frames, positions=None):
    """frames [T, H, W, 3] pixels (uint8, or CLIP-normalised float); positions int [N, 3] = the kept
    patches' (t, h, w) on the patch grid, None = every patch. One sample (B = 1, one segment).

    Returns last_hidden_state [1, N, D], pooled [1, 1, D] and positions [N, 3]."""
    p = self.config.patch_size
    frames = torch.as_tensor(frames, device=self.inv_freq_t.device)
    _check_frames(frames, p)
    if positions is None:
      t, h, w, _ = frames.shape
      grid = torch.meshgrid(torch.arange(t), torch.arange(h // p), torch.arange(w // p), indexing="ij")
      positions = torch.stack(grid, dim=-1).reshape(-1, 3)
    positions = torch.as_tensor(positions, device=frames.device).long()
    patches = video_patches(frames, positions, p)
    out = self.forward(patches[None], positions[None])
    out["positions"] = positions
    return out


class OneVisionEncoderConsistentModel(OneVisionEncoderModel):
  """The same model for a rope_layout="consistent" export (its own config class and model_type)."""
  config_class = OneVisionEncoderConsistentConfig


__all__ = ["OneVisionEncoderModel", "OneVisionEncoderConsistentModel", "OneVisionEncoderPreTrainedModel",
           "OneVisionEncoderOutput", "video_patches"]
