"""Sampling and selection rules (data_prep/codec/selection.py) against numpy expectations."""
import numpy as np
import pytest

from data_prep.codec import config, selection

GRID = (16, 8, 8)


def _flat(positions, grid):
  return np.ravel_multi_index(tuple(np.asarray(positions).T), grid)


@pytest.mark.parametrize("k", [1, 64, 128, 300, 1024])
def test_random_is_k_uniform_draws_seeded_per_video(k):
  got = selection.random_selection(GRID, k, seed=7)
  assert got.dtype == np.int32 and got.shape == (k, 3)
  want = np.sort(np.random.default_rng(7).choice(1024, k, replace=False))
  np.testing.assert_array_equal(_flat(got, GRID), want)
  np.testing.assert_array_equal(got, np.stack(np.unravel_index(want, GRID), 1))
  np.testing.assert_array_equal(got, selection.random_selection(GRID, k, seed=7))  # deterministic
  if k < 1024:
    assert not np.array_equal(got, selection.random_selection(GRID, k, seed=8))


def test_random_covers_the_grid_uniformly():
  # Over many videos every patch is picked with probability K / N (binomial spread, 6 sigma).
  k, n, videos = 128, 1024, 400
  hits = np.zeros(n)
  for seed in range(videos):
    hits[_flat(selection.random_selection(GRID, k, seed), GRID)] += 1
  p = k / n
  assert abs(hits.mean() - videos * p) < 1e-9
  assert np.abs(hits - videos * p).max() < 6 * np.sqrt(videos * p * (1 - p))
  per_frame = hits.reshape(16, 64).sum(1)
  assert np.abs(per_frame / videos - k / 16).max() < 1.0


def test_random_keep_first_frame():
  got = selection.random_selection(GRID, 100, seed=3, keep_first_frame=True)
  flat = _flat(got, GRID)
  np.testing.assert_array_equal(flat[:64], np.arange(64))
  want = 64 + np.sort(np.random.default_rng(3).choice(1024 - 64, 36, replace=False))
  np.testing.assert_array_equal(flat[64:], want)


@pytest.mark.parametrize("frames", [1, 2, 4, 8, 16])
def test_uniform_frames_are_whole_and_evenly_spaced(frames):
  t, h, w = GRID
  got = selection.uniform_frames_selection(GRID, frames * h * w, seed=0)
  chosen = np.unique(got[:, 0])
  # Independent expectation: frame centres of `frames` equal slices of T.
  want = np.floor((np.arange(frames) + 0.5) * t / frames).astype(int)
  np.testing.assert_array_equal(chosen, want)
  assert len(set(np.diff(chosen).tolist())) <= 1  # equal spacing (T divisible by frames here)
  for f in chosen:  # every chosen frame whole
    np.testing.assert_array_equal(got[got[:, 0] == f][:, 1:], np.stack(np.unravel_index(np.arange(h * w), (h, w)), 1))
  np.testing.assert_array_equal(got, selection.uniform_frames_selection(GRID, frames * h * w, seed=5))


def test_uniform_frames_remainder_goes_to_one_more_frame():
  got = selection.uniform_frames_selection(GRID, 64 + 16, seed=0)
  frames, counts = np.unique(got[:, 0], return_counts=True)
  assert counts.tolist() == [64, 16] and frames.tolist() == [4, 12]


def test_dense_is_every_patch():
  got = selection.dense_selection(GRID, 1024, seed=0)
  np.testing.assert_array_equal(got, np.indices(GRID).reshape(3, -1).T)
  with pytest.raises(ValueError, match="k=100"):
    selection.dense_selection(GRID, 100, seed=0)
  assert config.PatchifyConfig(selector="dense", budget=0.125, image_size=112).num_keep() == 1024


def test_bad_selector_names_the_key():
  with pytest.raises(ValueError, match="selector"):
    config.PatchifyConfig(selector="bogus").validate()
  with pytest.raises(ValueError, match="not a baseline"):
    selection.select("codec", GRID, 10, 0)


def test_selector_names_are_the_configs():
  assert selection.NAMES == config.SELECTORS
  assert selection.CODEC == config.CODEC and set(selection.BASELINES) == set(config.SELECTORS[1:])


def test_select_top_k_matches_brute_force_with_ties():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 4, size=(5, 3, 4)).astype(float)  # many ties
  for k, seed in [(1, 0), (7, 1), (30, (3, 2**62)), (60, 0)]:
    got = selection.select_top_k(scores, k, seed=seed)
    rank = np.random.default_rng(seed).permutation(scores.size)  # the seeded tie order
    order = sorted(range(scores.size), key=lambda i: (-scores.reshape(-1)[i], rank[i]))[:k]
    want = np.asarray(sorted(order))
    np.testing.assert_array_equal(got, np.stack([want // 12, want // 4 % 3, want % 4], 1))
  with pytest.raises(ValueError, match="k=0"):
    selection.select_top_k(scores, 0)


def test_ties_spread_by_seeded_order():
  flat = np.ones((8, 4, 4))
  a = selection.select_top_k(flat, 32, seed=(0, 123))
  assert np.bincount(a[:, 0], minlength=8).max() <= 10  # raster order would fill t=0, t=1
  np.testing.assert_array_equal(a, selection.select_top_k(flat, 32, seed=(0, 123)))  # reproducible
  assert not np.array_equal(a, selection.select_top_k(flat, 32, seed=(1, 123)))
  # Strictly higher scores always win over ties.
  flat[5, 2, 2] = 2.0
  b = selection.select_top_k(flat, 1, seed=7)
  np.testing.assert_array_equal(b, [[5, 2, 2]])
