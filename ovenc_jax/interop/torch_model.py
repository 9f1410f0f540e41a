"""PyTorch OV-Encoder (imports no jax): the exported transformers model, loaded from an export directory."""
import json
import os

import torch
from safetensors.torch import load_file

from ovenc_jax.interop import torch_layout as layout_lib
# One PyTorch implementation: the code shipped in every export. It stays self-contained, so the
# dependency runs from here to it, never back.
from ovenc_jax.interop.hf.configuration_onevision_encoder import (OneVisionEncoderConfig,
                                                                  OneVisionEncoderConsistentConfig)
from ovenc_jax.interop.hf.modeling_onevision_encoder import OneVisionEncoderModel, apply_rope, video_patches

__all__ = ["OVEncoder", "apply_rope", "hf_model_config", "load", "video_patches"]

_CONFIG_CLASSES = {"official": OneVisionEncoderConfig, "consistent": OneVisionEncoderConsistentConfig}


def hf_model_config(arch: layout_lib.Arch, rope_layout: str = "official",
                    rope_theta: float = 10000.0) -> OneVisionEncoderConfig:
  """The transformers config of an export with these sizes and RoPE settings."""
  if rope_layout not in layout_lib.ROPE_LAYOUTS:
    raise ValueError(f"rope_layout={rope_layout!r}: expected one of {layout_lib.ROPE_LAYOUTS}")
  return _CONFIG_CLASSES[rope_layout](
      hidden_size=arch.width, intermediate_size=arch.mlp_dim, num_hidden_layers=arch.depth,
      num_attention_heads=arch.num_heads, patch_size=arch.patch_size, layer_norm_eps=layout_lib.NORM_EPS,
      rope_theta=float(rope_theta), rope_layout=rope_layout)


class OVEncoder(OneVisionEncoderModel):
  """PyTorch twin of ovenc_jax.model.encoder.Encoder; its state dict is the official OneVision-Encoder layout.

  model(patches, positions, segment_ids=..., mask=..., num_segments=...) returns a mapping with
  "last_hidden_state" [B, N, D] and "pooled" [B, num_segments, D]; encode_video runs one dense or
  sparse clip. Built from an Arch instead of a transformers config.
  """

  def __init__(self, arch: layout_lib.Arch, rope_layout: str = "official", rope_theta: float = 10000.0):
    super().__init__(hf_model_config(arch, rope_layout, rope_theta))
    self.arch, self.rope_layout, self.rope_theta = arch, rope_layout, float(rope_theta)

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


def load(path: str, map_location: str | torch.device = "cpu") -> OVEncoder:
  """Shorthand for OVEncoder.from_pretrained(path)."""
  return OVEncoder.from_pretrained(path, map_location)
