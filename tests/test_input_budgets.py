"""Training-time token budgets (input.max_tokens_per_sample keeps the highest-scored tokens) and
the 64-frame timeline (input.temporal_positions), on format-2 and format-1 records."""
import ml_collections
import numpy as np
import pytest

from tests.helpers import digit_shards
from ovenc_format import records
from ovenc_jax.input import defaults
from ovenc_jax.input import features
from ovenc_jax.input import pipeline
from ovenc_jax.interop import torch_layout

PATCH = 4
GRID = (8, 3, 4)


def _record(rng, index, k=40, v1=False):
  t, h, w = GRID
  flat = np.sort(rng.choice(t * h * w, k, replace=False))
  path = f"budget/{index:03d}"
  rec = dict(patches=rng.integers(0, 256, (k, PATCH, PATCH, 3), dtype=np.uint8),
             positions=np.stack(np.unravel_index(flat, GRID), -1).astype(np.int32),
             grid=np.array(GRID, np.int32), frame_types="I" * t, source=path,
             sample_id=records.sample_id_for(path), labels=np.zeros(0, np.int32),
             signal="mv+residual", class_label=-1)
  if not v1:
    # Scores with ties (few distinct values) and two patches kept whole (+inf).
    scores = rng.integers(0, 5, k).astype(np.float64) / 4
    scores[rng.choice(k, 2, replace=False)] = np.inf
    rec.update(scores=scores, frame_indices=np.asarray([2, 8, 14, 20, 26, 32, 38, 44], np.int32))
  return rec


def _features(rec, **kw):
  args = dict(patch_size=PATCH, tokens_per_row=64, max_labels=1, hflip=False)
  args.update(kw)
  return features.sample_features(records.decode_record(records.encode_record(rec)),
                                  np.random.default_rng(3), **args)


def _rows(feats, rec):
  """Indices into the record of the tokens in feats (matched by pixels, which are unique)."""
  flat = rec["patches"].reshape(len(rec["patches"]), -1)
  return sorted(int(np.flatnonzero((flat == row).all(1))[0]) for row in feats["patches"])


def test_max_tokens_keeps_the_highest_scored():
  rng = np.random.default_rng(0)
  for i in range(5):
    rec = _record(rng, i)
    got = _rows(_features(rec, max_tokens_per_sample=12), rec)
    scores = np.asarray(rec["scores"], np.float16).astype(np.float64)
    kth = np.sort(scores)[::-1][11]
    assert len(got) == 12
    assert set(np.flatnonzero(scores > kth)) <= set(got)  # everything above the cut is kept
    assert all(scores[j] >= kth for j in got)  # nothing below it
    assert set(np.flatnonzero(np.isinf(scores))) <= set(got)  # frames kept whole come first
    # Ties at the cut are drawn from the rng: reproducible for the same generator state.
    assert got == _rows(_features(rec, max_tokens_per_sample=12), rec)
  # A cap at or above K keeps everything, in (t, h, w) order.
  feats = _features(rec, max_tokens_per_sample=40)
  np.testing.assert_array_equal(feats["positions"], rec["positions"])


def test_top_scored_breaks_ties_by_the_rng():
  scores = np.zeros(100)
  a = features.top_scored(scores, 10, np.random.default_rng(1))
  b = features.top_scored(scores, 10, np.random.default_rng(2))
  assert len(set(a.tolist())) == 10 and not np.array_equal(a, b) and (np.diff(a) > 0).all()


def test_v1_records_truncate_at_random():
  rng = np.random.default_rng(1)
  rec = _record(rng, 0, v1=True)
  data = records.encode_record(rec)
  raw = records.decode_record(data)
  assert (raw["scores"] == 0).all()
  got = {tuple(_rows(features.sample_features(raw, np.random.default_rng(s), patch_size=PATCH,
                                               tokens_per_row=64, max_labels=1, hflip=False,
                                               max_tokens_per_sample=10), rec)) for s in range(6)}
  assert len(got) > 1  # every token equally likely: different draws, different subsets


def test_timeline64_positions():
  rng = np.random.default_rng(2)
  rec = _record(rng, 0)
  feats = _features(rec, temporal_positions="timeline64")
  fi = np.asarray([2, 8, 14, 20, 26, 32, 38, 44], np.float64)
  want_t = np.rint(63 * (fi - 2) / 42).astype(int)  # 0, 9, 18, ..., 63
  np.testing.assert_array_equal(feats["positions"][:, 0], want_t[rec["positions"][:, 0]])
  np.testing.assert_array_equal(feats["positions"][:, 1:], rec["positions"][:, 1:])
  assert feats["positions"][:, 0].max() < torch_layout.ROPE_TEMPORAL_SIZE
  # Format 1 (indices unknown): the sampled frames spread evenly over the timeline.
  v1 = _record(rng, 1, v1=True)
  feats = _features(v1, temporal_positions="timeline64")
  np.testing.assert_array_equal(feats["positions"][:, 0],
                                np.rint(v1["positions"][:, 0] * 63 / 7).astype(int))
  # Repeated frames (a clip shorter than T) share a slot; a single frame sits at 0.
  np.testing.assert_array_equal(features.timeline64([0, 0, 1, 2, 2, 3]), [0, 0, 21, 42, 42, 63])
  np.testing.assert_array_equal(features.timeline64([5]), [0])
  # Default: t is the sample index.
  np.testing.assert_array_equal(_features(rec)["positions"], rec["positions"])


def test_pipeline_applies_budget_and_timeline(tmp_path):
  rng = np.random.default_rng(3)
  recs = [_record(rng, i) for i in range(8)]
  d = digit_shards.write_shards(tmp_path / "s", recs, 2)
  cfg = defaults.default_input_config()
  cfg.update(sources=[{"path": d, "weight": 1.0}], global_batch_size=4, tokens_per_row=24,
             max_segments=2, patch_size=PATCH, max_labels=1, seed=0, max_tokens_per_sample=12,
             temporal_positions="timeline64")
  batch = next(pipeline.make_train_iterator(cfg, process_index=0, process_count=1))
  by_id = {r["sample_id"]: r for r in recs}
  for row in range(4):
    for seg in range(2):
      sid = int(batch["sample_id"][row, seg])
      if sid < 0:
        continue
      tok = batch["segment_ids"][row] == seg + 1
      assert tok.sum() == 12  # the cap, not the row budget, limited it
      assert batch["positions"][row][tok][:, 0].max() > GRID[0]  # timeline slots, not 0..7
      assert sid in by_id


@pytest.mark.parametrize("key,value", [("max_tokens_per_sample", 0),
                                       ("max_tokens_per_sample", 2.5),
                                       ("temporal_positions", "frames")])
def test_config_errors(tmp_path, key, value):
  d = digit_shards.write_shards(tmp_path / "s", [_record(np.random.default_rng(0), 0)], 1)
  cfg = defaults.default_input_config()
  cfg.update(sources=[{"path": d, "weight": 1.0}], global_batch_size=2, tokens_per_row=24,
             patch_size=PATCH, max_segments=2)
  cfg = ml_collections.ConfigDict(cfg.to_dict(), type_safe=False)
  cfg[key] = value
  with pytest.raises(ValueError, match=f"input.{key}"):
    pipeline.make_train_iterator(cfg, process_index=0, process_count=1)


def test_export_config_has_the_published_temporal_size():
  arch = torch_layout.Arch(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=PATCH)
  assert torch_layout.hf_config(arch)["rope_temporal_size"] == 64
  # The input's timeline spans the same grid as the exported model's temporal RoPE.
  assert features.TIMELINE_FRAMES == torch_layout.ROPE_TEMPORAL_SIZE == 64
