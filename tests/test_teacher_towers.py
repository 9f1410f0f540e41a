"""data_prep.teacher on the other tower families (SigLIP, SigLIP2, DINOv2), each checked against the model."""
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from data_prep import teacher
from ovenc_format import records


def _siglip(d):
  cfg = transformers.SiglipVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, image_size=32, patch_size=8)
  transformers.SiglipVisionModel(cfg).save_pretrained(d)
  transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)
  return transformers.SiglipVisionModel, transformers.SiglipImageProcessorPil


def _siglip2(d):
  cfg = transformers.Siglip2VisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, patch_size=8, num_patches=16)
  transformers.Siglip2VisionModel(cfg).save_pretrained(d)
  transformers.Siglip2ImageProcessor(patch_size=8, max_num_patches=16).save_pretrained(d)
  return transformers.Siglip2VisionModel, transformers.Siglip2ImageProcessorPil


def _dinov2(d):
  cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, image_size=32, patch_size=8)
  transformers.Dinov2Model(cfg).save_pretrained(d)
  transformers.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                 image_mean=[0.485, 0.456, 0.406],
                                 image_std=[0.229, 0.224, 0.225]).save_pretrained(d)
  return transformers.Dinov2Model, transformers.BitImageProcessorPil


@pytest.mark.parametrize("build", [_siglip, _siglip2, _dinov2], ids=["siglip", "siglip2", "dinov2"])
def test_tower_image_embedding_matches_the_model(build, tmp_path):
  torch.manual_seed(0)
  model_dir = tmp_path / "model"
  cls, proc_cls = build(model_dir)
  pixels = np.random.default_rng(3).integers(0, 255, (40, 48, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(tmp_path / "still.png")
  out = tmp_path / "out"
  teacher.run(["--input", str(tmp_path / "still.png"), "--model", str(model_dir), "--output_dir",
               str(out), "--decode_workers", "0"])
  (emb_file,) = out.glob("embeddings-*.npy")
  (ids_file,) = out.glob("sample_ids-*.npy")
  got = np.load(emb_file)
  assert list(np.load(ids_file)) == [records.sample_id_for(str(tmp_path / "still.png"))]
  # Independent path: the checkpoint's processor and model called directly, pooled output normalised.
  model = cls.from_pretrained(model_dir).eval()
  # The PIL processors: torchvision (the default backend) is not installed.
  proc = proc_cls.from_pretrained(model_dir)
  with torch.no_grad():
    ref = model(**proc(images=pixels, return_tensors="pt")).pooler_output[0].numpy()
  assert got.shape == (1, ref.shape[-1])
  np.testing.assert_allclose(got[0], ref / np.linalg.norm(ref), atol=1e-5)
