"""input.image_augment: the published random resized crop and flip of stills, against NumPy and torch references."""
import math

import numpy as np
import pytest
import torch

from ovenc_format import records
from ovenc_jax.configs import pretrain
from ovenc_jax.input import augment
from ovenc_jax.input import features
from ovenc_jax.input import pipeline
from ovenc_jax.input.validation import validate_input_config
from tests.helpers.digit_shards import write_digit_shards

SCALE, RATIO = (0.7, 1.0), (0.8, 1.25)


def _reference_box(seed, height, width, scale, ratio):
  """The crop as the published loader's docs state it: up to 100 tries of (area uniform in
  scale * H*W, log aspect uniform in log(ratio)), offsets uniform; else the centre crop at the
  clamped aspect."""
  g = np.random.default_rng(seed)
  for _ in range(100):
    a = height * width * g.uniform(*scale)
    r = np.exp(g.uniform(np.log(ratio[0]), np.log(ratio[1])))
    size = np.rint(np.sqrt([a / r, a * r])).astype(int)  # (h, w)
    if (size > 0).all() and size[0] <= height and size[1] <= width:
      return int(g.integers(height - size[0] + 1)), int(g.integers(width - size[1] + 1)), *map(int, size)
  r = np.clip(width / height, *ratio)
  h, w = (height, int(np.rint(height * r))) if r < width / height else (int(np.rint(width / r)), width)
  return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("shape", [(448, 448), (224, 448), (70, 70), (14, 140)])
def test_crop_box_matches_numpy_reference(shape):
  h_img, w_img = shape
  boxes = np.array([augment.crop_box(np.random.default_rng(s), h_img, w_img, SCALE, RATIO) for s in range(300)])
  ref = np.array([_reference_box(s, h_img, w_img, SCALE, RATIO) for s in range(300)])
  np.testing.assert_array_equal(boxes, ref)
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all() and (top + h <= h_img).all() and (left + w <= w_img).all()
  if shape == (448, 448):  # the sampled law: area fraction and log aspect spread over their ranges
    frac, log_r = h * w / (h_img * w_img), np.log(w / h)
    assert frac.min() >= 0.69 and frac.max() <= 1.0 and np.ptp(frac) > 0.25
    assert log_r.min() >= math.log(0.8) - 0.01 and log_r.max() <= math.log(1.25) + 0.01
  if shape == (14, 140):  # no try fits a 1:10 strip: the centre crop at ratio 1.25
    assert {tuple(b) for b in boxes} == {(0, 61, 14, 18)}


def _still(rng, grid=(1, 8, 8), keep=None):
  g = grid[1] * grid[2]
  keep = np.arange(g) if keep is None else keep
  hh, ww = np.divmod(keep, grid[2])
  rec = dict(patches=rng.integers(0, 256, (len(keep), 14, 14, 3), dtype=np.uint8),
             positions=np.stack([np.zeros_like(hh), hh, ww], -1).astype(np.int32),
             grid=np.array(grid, np.int32), frame_types="I", source="still.png", sample_id=7,
             labels=np.array([1], np.int32), signal="image", class_label=1,
             scores=rng.random(len(keep)).astype(np.float16))
  return records.decode_record(records.encode_record(rec))


def test_crop_still_pixels_match_torch_antialiased_resize():
  rng = np.random.default_rng(0)
  # A smooth image, so the triangle filters of PIL and torch agree to rounding.
  y, x = np.mgrid[0:112, 0:112]
  img = np.stack([128 + 100 * np.sin(x / 9.0), 128 + 100 * np.cos(y / 7.0), (x + y) % 256 * 0 + 90], -1)
  patches = img.astype(np.uint8).reshape(8, 14, 8, 14, 3).transpose(0, 2, 1, 3, 4).reshape(64, 14, 14, 3)
  rec = dict(_still(rng), patches=patches)
  out = augment.crop_still(rec, np.random.default_rng(3), SCALE, RATIO)
  top, left, h, w = augment.crop_box(np.random.default_rng(3), 112, 112, SCALE, RATIO)
  assert (h, w) != (112, 112)
  crop = torch.from_numpy(img[top:top + h, left:left + w].astype(np.float32)).permute(2, 0, 1)[None]
  ref = torch.nn.functional.interpolate(crop, size=(112, 112), mode="bilinear", antialias=True,
                                        align_corners=False)[0].permute(1, 2, 0).numpy()
  got = out["patches"].reshape(8, 8, 14, 14, 3).transpose(0, 2, 1, 3, 4).reshape(112, 112, 3)
  np.testing.assert_array_equal(out["positions"][:, 1] * 8 + out["positions"][:, 2], np.arange(64))
  assert np.abs(got.astype(np.float32) - ref).max() <= 2.0


def test_crop_still_partial_grid_keeps_patches_under_held_centres():
  rng = np.random.default_rng(1)
  keep = np.array([0, 1, 8, 9, 27, 36, 63])
  rec = _still(rng, keep=keep)
  out = augment.crop_still(rec, np.random.default_rng(5), SCALE, RATIO)
  top, left, h, w = augment.crop_box(np.random.default_rng(5), 112, 112, SCALE, RATIO)
  for (_, ph, pw), score in zip(out["positions"], out["scores"]):
    sy, sx = int((top + (ph + 0.5) * h / 8) // 14), int((left + (pw + 0.5) * w / 8) // 14)
    src = np.flatnonzero(keep == sy * 8 + sx)
    assert src.size == 1 and score == rec["scores"][src[0]]
  assert 0 < len(out["positions"]) <= 12


def test_sample_features_flip_and_crop_seeded_per_sample():
  rec = _still(np.random.default_rng(2))
  kw = dict(patch_size=14, tokens_per_row=256, max_labels=2, hflip=False,
            image_augment=dict(scale=SCALE, ratio=RATIO, hflip=True))
  a = features.sample_features(rec, np.random.default_rng(11), **kw)
  b = features.sample_features(rec, np.random.default_rng(11), **kw)
  np.testing.assert_array_equal(a["patches"], b["patches"])
  # The reference: the same coin, then the crop seeded by the next draw, then the mirror.
  g = np.random.default_rng(11)
  flip = g.random() < 0.5
  cropped = augment.crop_still(rec, np.random.default_rng(g.integers(2**63)), SCALE, RATIO)
  img = cropped["patches"].reshape(8, 8, 14, 14, 3).transpose(0, 2, 1, 3, 4).reshape(112, 112, 3)
  img = img[:, ::-1] if flip else img
  np.testing.assert_array_equal(a["patches"].reshape(8, 8, 14, 14, 3).transpose(0, 2, 1, 3, 4).reshape(112, 112, 3),
                                img)
  flips = [features.sample_features(rec, np.random.default_rng(s), **kw)["patches"] for s in range(12)]
  assert len({f.tobytes() for f in flips}) == 12
  clip = dict(rec, grid=np.array([2, 8, 8], np.int32), frame_types="IP", frame_indices=np.array([0, 1]),
              timestamps=None)
  out = features.sample_features(records.decode_record(records.encode_record(clip)), np.random.default_rng(11), **kw)
  np.testing.assert_array_equal(out["patches"], rec["patches"].reshape(64, -1))  # clips are never augmented


def test_official_recipe_augments_stills_in_the_pipeline(tmp_path):
  data = write_digit_shards(str(tmp_path / "d"), 0, 64)
  c = pretrain.get_config(f"variant=tiny,recipe=official,data={data}")
  assert dict(c.input.image_augment) == augment.PUBLISHED
  validate_input_config(c.input)
  batches = [next(pipeline.make_train_iterator(c.input, process_count=1, process_index=0)) for _ in range(2)]
  np.testing.assert_array_equal(batches[0]["patches"], batches[1]["patches"])  # a restart is bitwise
  plain = c.input.copy_and_resolve_references()
  plain.image_augment = None
  base = next(pipeline.make_train_iterator(plain, process_count=1, process_index=0))
  np.testing.assert_array_equal(base["sample_id"], batches[0]["sample_id"])
  assert not np.array_equal(base["patches"], batches[0]["patches"])
  bad = c.input.copy_and_resolve_references()
  bad.image_augment = dict(scale=[0.7, 1.5], ratio=[0.8, 1.25], hflip=True)
  with pytest.raises(ValueError, match=r"input.image_augment.scale must be \[lo, hi\]"):
    validate_input_config(bad)
