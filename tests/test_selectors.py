"""Selection rules (data_prep/codec/selection.py) against numpy expectations, and through codec_patchify."""
import json

import numpy as np
import pytest

from data_prep import codec_patchify
from data_prep.codec import signals as cs
from data_prep import make_demo_data as md
from ovenc_format import records
from data_prep.codec import selection as selectors

GRID = (16, 8, 8)
FLAGS = ["--image_size", "56", "--patch_size", "14", "--num_frames", "8", "--decode_timeout", "0"]


def _flat(positions, grid):
  return np.ravel_multi_index(tuple(np.asarray(positions).T), grid)


@pytest.mark.parametrize("k", [1, 64, 128, 300, 1024])
def test_random_is_k_uniform_draws_seeded_per_video(k):
  got = selectors.random_selection(GRID, k, seed=7)
  assert got.dtype == np.int32 and got.shape == (k, 3)
  want = np.sort(np.random.default_rng(7).choice(1024, k, replace=False))
  np.testing.assert_array_equal(_flat(got, GRID), want)
  np.testing.assert_array_equal(got, np.stack(np.unravel_index(want, GRID), 1))
  np.testing.assert_array_equal(got, selectors.random_selection(GRID, k, seed=7))  # deterministic
  if k < 1024:
    assert not np.array_equal(got, selectors.random_selection(GRID, k, seed=8))


def test_random_covers_the_grid_uniformly():
  # Over many videos every patch is picked with probability K / N (binomial spread, 6 sigma).
  k, n, videos = 128, 1024, 400
  hits = np.zeros(n)
  for seed in range(videos):
    hits[_flat(selectors.random_selection(GRID, k, seed), GRID)] += 1
  p = k / n
  assert abs(hits.mean() - videos * p) < 1e-9
  assert np.abs(hits - videos * p).max() < 6 * np.sqrt(videos * p * (1 - p))
  per_frame = hits.reshape(16, 64).sum(1)
  assert np.abs(per_frame / videos - k / 16).max() < 1.0


def test_random_keep_first_frame():
  got = selectors.random_selection(GRID, 100, seed=3, keep_first_frame=True)
  flat = _flat(got, GRID)
  np.testing.assert_array_equal(flat[:64], np.arange(64))
  want = 64 + np.sort(np.random.default_rng(3).choice(1024 - 64, 36, replace=False))
  np.testing.assert_array_equal(flat[64:], want)


@pytest.mark.parametrize("frames", [1, 2, 4, 8, 16])
def test_uniform_frames_are_whole_and_evenly_spaced(frames):
  t, h, w = GRID
  got = selectors.uniform_frames_selection(GRID, frames * h * w, seed=0)
  chosen = np.unique(got[:, 0])
  # Independent expectation: frame centres of `frames` equal slices of T.
  want = np.floor((np.arange(frames) + 0.5) * t / frames).astype(int)
  np.testing.assert_array_equal(chosen, want)
  assert len(set(np.diff(chosen).tolist())) <= 1  # equal spacing (T divisible by frames here)
  for f in chosen:  # every chosen frame whole
    np.testing.assert_array_equal(got[got[:, 0] == f][:, 1:], np.stack(np.unravel_index(np.arange(h * w), (h, w)), 1))
  np.testing.assert_array_equal(got, selectors.uniform_frames_selection(GRID, frames * h * w, seed=5))


def test_uniform_frames_remainder_goes_to_one_more_frame():
  got = selectors.uniform_frames_selection(GRID, 64 + 16, seed=0)
  frames, counts = np.unique(got[:, 0], return_counts=True)
  assert counts.tolist() == [64, 16] and frames.tolist() == [4, 12]


def test_dense_is_every_patch():
  got = selectors.dense_selection(GRID, 1024, seed=0)
  np.testing.assert_array_equal(got, np.indices(GRID).reshape(3, -1).T)
  with pytest.raises(ValueError, match="k=100"):
    selectors.dense_selection(GRID, 100, seed=0)
  assert cs.PatchifyConfig(selector="dense", budget=0.125, image_size=112).num_keep() == 1024


def test_bad_selector_names_the_key():
  with pytest.raises(ValueError, match="selector"):
    cs.PatchifyConfig(selector="bogus").validate()
  with pytest.raises(ValueError, match="not a baseline"):
    selectors.select("codec", GRID, 10, 0)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
  d = tmp_path_factory.mktemp("clips")
  md.make_demo_data(str(d), num_clips=3, num_images=0, size=56, num_frames=8)
  return d


def test_patchify_records_follow_the_rule_and_carry_its_name(clips):
  paths = sorted(str(p) for p in (clips / "clips").glob("*.mp4"))
  base = dict(image_size=56, num_frames=8, budget=0.25)
  dense = {p: cs.patchify_file(p, cs.PatchifyConfig(**base, selector="dense").validate()) for p in paths}
  for p in paths:
    d = dense[p]
    assert d["signal"] == "dense" and d["positions"].shape == (8 * 16, 3)
    for rule in ("random", "uniform_frames", "codec"):
      rec = cs.patchify_file(p, cs.PatchifyConfig(**base, selector=rule).validate(), with_scores=True)
      assert rec["positions"].shape == (32, 3)
      if rule == "codec":  # unchanged: the codec maps' top-K, signal names the maps
        assert not set(rec["signal"].split("+")) & set(selectors.BASELINES)
        assert "static_fallback" not in rec["signal"]
        # At K = 2*H*W the default --iframe keep keeps frame 0 whole; ties follow (tie_seed, id).
        want = cs.select_top_k(rec["grid_scores"], 32, True, (0, rec["sample_id"]))
        np.testing.assert_array_equal(rec["positions"], want)
      else:
        assert rec["signal"] == rule
        want = getattr(selectors, f"{rule}_selection")((8, 4, 4), 32, records.sample_id_for(p))
        np.testing.assert_array_equal(rec["positions"], want)
      # Only the choice differs: the kept pixels are the dense record's pixels at those positions.
      np.testing.assert_array_equal(rec["patches"], d["patches"][_flat(rec["positions"], (8, 4, 4))])
  # Seeded per video: two videos get different random draws, one video the same draw twice.
  cfg = cs.PatchifyConfig(**base, selector="random").validate()
  a, b = (cs.patchify_file(p, cfg)["positions"] for p in paths[:2])
  assert not np.array_equal(a, b)
  np.testing.assert_array_equal(a, cs.patchify_file(paths[0], cfg)["positions"])


def test_cli_selector_flag_reaches_records_and_manifest(clips, tmp_path):
  out = str(tmp_path / "rec")
  m = codec_patchify.run(["--input", str(clips / "list.txt"), "--output_dir", out, "--selector", "random",
                          "--budget", "0.125", *FLAGS])
  assert m["options"]["selector"] == "random" and m["signals"] == {"random": 3}
  assert m["num_keep_per_video"] == 16
  for rec in records.read_all(out):
    np.testing.assert_array_equal(
        rec["positions"], selectors.random_selection((8, 4, 4), 16, rec["sample_id"]))
  m = codec_patchify.run(["--input", str(clips / "list.txt"), "--output_dir", out, "--overwrite",
                          "--selector", "dense", *FLAGS])
  assert m["signals"] == {"dense": 3} and m["num_tokens"] == 3 * 128
  assert json.load(open(f"{out}/manifest.json"))["num_keep_per_video"] == 128
