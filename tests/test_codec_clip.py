"""One file -> one record (data_prep.codec.clip): kept patches, exact pixels and K, images, bad
files, and the selection rule a record follows and names."""
import dataclasses

import av
import numpy as np
import pytest
from PIL import Image

from data_prep import make_demo_data as md
from data_prep.codec import clip, config, selection
from ovenc_format import records
from tests.helpers import codec_clips
from tests.helpers.codec_clips import G, P, S


def _overlaps(h, w, box, p=P):
  y0, x0, y1, x1 = box
  return h * p < y1 and (h + 1) * p > y0 and w * p < x1 and (w + 1) * p > x0


def test_square_clip_selects_the_path_and_exact_pixels(square_clip):
  path, boxes = square_clip
  cfg = config.PatchifyConfig(budget=1 / 16, num_frames=16, image_size=S, patch_size=P,
                          iframe="scored").validate()
  rec = clip.patchify_file(path, cfg)
  k = round(16 * G * G / 16)
  assert rec["positions"].shape == (k, 3) and rec["patches"].shape == (k, P, P, 3)
  assert rec["frame_types"] == "IPPPPPPPIPPPPPPP"
  assert rec["signal"] == "mv+residual+frame_diff"  # frame 8 is an I-frame: frame difference
  pos = rec["positions"]
  assert (pos >= 0).all() and (pos < [16, G, G]).all()
  flat = (pos[:, 0] * G + pos[:, 1]) * G + pos[:, 2]
  assert (np.diff(flat) > 0).all()  # unique and sorted by (t, h, w)
  idx = selection.sample_indices(16, 16)
  later = [(t, h, w) for t, h, w in pos if t > 0]
  on_path = [
      _overlaps(h, w, boxes[idx[t]]) or (idx[t] > 0 and _overlaps(h, w, boxes[idx[t] - 1]))
      for t, h, w in later]
  assert len(later) > 0.8 * k
  assert np.mean(on_path) >= 0.9, np.mean(on_path)
  frames = codec_clips.decode_rgb(path)
  for (t, h, w), patch in zip(pos, rec["patches"]):
    np.testing.assert_array_equal(patch, frames[idx[t]][h * P:(h + 1) * P, w * P:(w + 1) * P])


def test_k_equals_budget_exactly(square_clip):
  for budget, t in [(0.125, 16), (0.1, 7), (0.031, 5), (0.25, 3), (1.0, 2)]:
    cfg = config.PatchifyConfig(budget=budget, num_frames=t, image_size=S, patch_size=P).validate()
    rec = clip.patchify_file(square_clip[0], cfg)
    want = int(np.floor(budget * t * G * G + 0.5))
    assert rec["positions"].shape[0] == want == rec["patches"].shape[0], (budget, t)
    assert rec["grid"].tolist() == [t, G, G]


def test_image_whole_grid_and_saliency_budget(tmp_path):
  rng = np.random.default_rng(0)
  img = np.full((90, 120, 3), 128, np.uint8)
  img[:, 60:] = rng.integers(0, 256, (90, 60, 3))  # right half textured, left half flat
  path = str(tmp_path / "still.png")
  Image.fromarray(img).save(path)
  cfg = config.PatchifyConfig(image_size=S, patch_size=P).validate()
  rec = clip.patchify_file(path, cfg)
  assert rec["grid"].tolist() == [1, G, G] and rec["frame_types"] == "I"
  assert rec["signal"] == "image" and rec["positions"].shape == (G * G, 3)
  ref = av.VideoFrame.from_ndarray(img, format="rgb24").to_ndarray(
      format="rgb24", width=S, height=S, interpolation="AREA")
  np.testing.assert_array_equal(
      rec["patches"], ref.reshape(G, P, G, P, 3).transpose(0, 2, 1, 3, 4).reshape(-1, P, P, 3))
  rec = clip.patchify_file(path, config.PatchifyConfig(image_size=S, patch_size=P,
                                                 image_budget=0.25).validate())
  assert rec["signal"] == "image+saliency" and rec["positions"].shape[0] == 16
  assert (rec["positions"][:, 2] >= G // 2).all()  # all in the textured half


@pytest.mark.parametrize("make,reason", [
    (lambda p: open(p, "wb").close(), "empty file"),
    (lambda p: open(p, "wb").write(b"not a video at all " * 50), "cannot open as media"),
])
def test_bad_files_raise_input_error(tmp_path, make, reason):
  path = str(tmp_path / "bad.mp4")
  make(path)
  with pytest.raises(config.InputError, match=reason):
    clip.patchify_file(path, config.PatchifyConfig().validate())


def _flat(positions, grid):
  return np.ravel_multi_index(tuple(np.asarray(positions).T), grid)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
  d = tmp_path_factory.mktemp("clips")
  md.make_demo_data(str(d), num_clips=3, num_images=0, size=56, num_frames=8)
  return d


def test_patchify_records_follow_the_rule_and_carry_its_name(clips):
  paths = sorted(str(p) for p in (clips / "clips").glob("*.mp4"))
  base = dict(image_size=56, num_frames=8, budget=0.25)
  dense = {p: clip.patchify_file(p, config.PatchifyConfig(**base, selector="dense").validate()) for p in paths}
  for p in paths:
    d = dense[p]
    assert d["signal"] == "dense" and d["positions"].shape == (8 * 16, 3)
    for rule in ("random", "uniform_frames", "codec"):
      rec = clip.patchify_file(p, config.PatchifyConfig(**base, selector=rule).validate(), with_scores=True)
      assert rec["positions"].shape == (32, 3)
      if rule == "codec":  # unchanged: the codec maps' top-K, signal names the maps
        assert not set(rec["signal"].split("+")) & set(selection.BASELINES)
        assert "static_fallback" not in rec["signal"]
        # At K = 2*H*W the default --iframe keep keeps frame 0 whole; ties follow (tie_seed, id).
        want = selection.select_top_k(rec["grid_scores"], 32, True, (0, rec["sample_id"]))
        np.testing.assert_array_equal(rec["positions"], want)
      else:
        assert rec["signal"] == rule
        want = getattr(selection, f"{rule}_selection")((8, 4, 4), 32, records.sample_id_for(p))
        np.testing.assert_array_equal(rec["positions"], want)
      # Only the choice differs: the kept pixels are the dense record's pixels at those positions.
      np.testing.assert_array_equal(rec["patches"], d["patches"][_flat(rec["positions"], (8, 4, 4))])
  # Seeded per video: two videos get different random draws, one video the same draw twice.
  cfg = config.PatchifyConfig(**base, selector="random").validate()
  a, b = (clip.patchify_file(p, cfg)["positions"] for p in paths[:2])
  assert not np.array_equal(a, b)
  np.testing.assert_array_equal(a, clip.patchify_file(paths[0], cfg)["positions"])


def test_dense_frames_store_whole_sampled_frames(square_clip):
  path = square_clip[0]
  cfg = config.PatchifyConfig(budget=0.125, num_frames=16, image_size=S, patch_size=P,
                              dense_frames=4).validate()
  rec = clip.patchify_file(path, cfg)
  dense_t = rec["dense_t"]
  # One frame from each bin of 4 sampled frames, the same on a second run.
  np.testing.assert_array_equal(dense_t // 4, np.arange(4))
  np.testing.assert_array_equal(clip.patchify_file(path, cfg)["dense_t"], dense_t)
  assert rec["dense_patches"].shape == (4 * G * G, P, P, 3)
  frames, idx = codec_clips.decode_rgb(path), selection.sample_indices(16, 16)
  for j, t in enumerate(dense_t):
    want = frames[idx[t]].reshape(G, P, G, P, 3).transpose(0, 2, 1, 3, 4).reshape(G * G, P, P, 3)
    np.testing.assert_array_equal(rec["dense_patches"][j * G * G:(j + 1) * G * G], want)
  # The kept patches do not change, and the record round-trips as format 3.
  plain = clip.patchify_file(path, dataclasses.replace(cfg, dense_frames=0))
  np.testing.assert_array_equal(plain["positions"], rec["positions"])
  back = records.decode_record(records.encode_record(rec))
  np.testing.assert_array_equal(back["dense_patches"], rec["dense_patches"])
  with pytest.raises(ValueError, match="dense_frames=3.*divisor of num_frames=16"):
    config.PatchifyConfig(num_frames=16, dense_frames=3).validate()
