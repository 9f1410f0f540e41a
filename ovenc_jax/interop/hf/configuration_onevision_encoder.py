"""OneVision-Encoder configuration for transformers (shipped beside exported weights; needs only transformers)."""
from transformers import PretrainedConfig

ROPE_LAYOUTS = ("official", "consistent")


class OneVisionEncoderConfig(PretrainedConfig):
  """The sizes and RoPE settings of an ovenc-jax OneVision-Encoder export.

  rope_layout "official" pairs rotary channels (2i, 2i+1) as the published release does; "consistent"
  rotates channel i with i + head_dim/2 (the other pairing the JAX encoder can be trained with).
  """
  model_type = "onevision_encoder"

  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 14
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-6
  layer_norm_type: str = "layer_norm"
  attention_dropout: float = 0.0
  initializer_range: float = 0.02
  rope_theta: float = 10000.0
  rope_temporal_size: int = 64
  use_head: bool = True
  rope_layout: str = "official"

  def __post_init__(self, **kwargs):
    if self.rope_layout not in ROPE_LAYOUTS:
      raise ValueError(f"rope_layout={self.rope_layout!r}: expected one of {ROPE_LAYOUTS}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                       f"num_attention_heads={self.num_attention_heads}")
    if (self.hidden_size // self.num_attention_heads) % 32:
      raise ValueError(f"head_dim={self.hidden_size // self.num_attention_heads} must be a multiple of 32 "
                       "for the 4:6:6 3D RoPE split")
    for key, want in (("num_channels", 3), ("hidden_act", "gelu"), ("layer_norm_type", "layer_norm"),
                      ("use_head", True)):
      if getattr(self, key) != want:
        raise ValueError(f"{key}={getattr(self, key)!r} is not supported; the encoder uses {want!r}")
    super().__post_init__(**kwargs)


class OneVisionEncoderConsistentConfig(OneVisionEncoderConfig):
  """An export trained with rope_layout="consistent": its own model_type, so code that knows only the
  published (official-pairing) model does not load it by that name and compute other positions."""
  model_type = "onevision_encoder_consistent"

  rope_layout: str = "consistent"


__all__ = ["OneVisionEncoderConfig", "OneVisionEncoderConsistentConfig"]
