"""A random tiny CLIP vision tower with its image processor, saved as a transformers folder (teacher tests)."""
PROJ = 48  # its image embedding width


def save_tiny_clip(folder) -> str:
  import torch
  import transformers
  cfg = transformers.CLIPVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, image_size=64, patch_size=16,
                                      projection_dim=PROJ)
  torch.manual_seed(0)
  transformers.CLIPVisionModelWithProjection(cfg).save_pretrained(folder)
  transformers.CLIPImageProcessor(size={"shortest_edge": 64},
                                  crop_size={"height": 64, "width": 64}).save_pretrained(folder)
  return str(folder)
