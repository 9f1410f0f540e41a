"""Glyph bootstrap teacher (data_prep.glyph_teacher): glyph extraction against numpy, and digit clusters on real codec records."""
import os

import numpy as np
import pytest

from tests.helpers import digit_shards
from data_prep import bootstrap_teacher, glyph_teacher
from data_prep.codec import clip, config
from ovenc_format import records
from data_prep import make_demo_data as md
from ovenc_jax.eval import probes as evaluate

P = 14
# A blocky '7' on a 3 px lattice: 12 rows x 8 cols of cells -> 36 x 24 px.
SEVEN = np.array([
    "########",
    "########",
    "......##",
    ".....##.",
    ".....##.",
    "....##..",
    "....##..",
    "...##...",
    "...##...",
    "..##....",
    "..##....",
    "..##....",
])
SHAPE = np.kron(np.array([[c == "#" for c in row] for row in SEVEN], float), np.ones((3, 3)))
INK = 250.0


def _otsu_brute_force(values):
  """Independent Otsu: try every cut c (dark = values <= c), keep the largest between-class variance."""
  v = np.rint(values).astype(int)
  best, cut = -1.0, None
  for c in range(255):
    lo, hi = v[v <= c], v[v > c]
    if lo.size == 0 or hi.size == 0:
      continue
    var = lo.size * hi.size * (lo.mean() - hi.mean()) ** 2
    if var > best + 1e-9:
      best, cut = var, c
  return cut + 0.5


def _paint(frame, y, x):
  sh, sw = SHAPE.shape
  frame[y:y + sh, x:x + sw][SHAPE > 0] = INK


def _touched(kept, t, y, x):
  sh, sw = SHAPE.shape
  kept[t, y // P:(y + sh - 1) // P + 1, x // P:(x + sw - 1) // P + 1] = True


def _record(frames, kept, seed=0):
  """Record of the kept (t, h, w) patches of frames [T, H*P, W*P, 3]."""
  frames = np.rint(frames).astype(np.uint8)
  pos = np.argwhere(kept).astype(np.int32)  # sorted by (t, h, w)
  patches = np.stack([frames[t, h * P:(h + 1) * P, w * P:(w + 1) * P] for t, h, w in pos])
  t_n = kept.shape[0]
  path = f"synthetic/{seed}.mp4"
  rec = dict(patches=patches, positions=pos, grid=np.asarray(kept.shape, np.int32),
             frame_types="I" + "P" * (t_n - 1), source=path, sample_id=records.sample_id_for(path),
             labels=np.zeros([0], np.int32), signal="mv+residual", class_label=7)
  return records.decode_record(records.encode_record(rec))


def _background(grid, seed):
  t_n, h_n, w_n = grid
  return np.random.default_rng(seed).uniform(20, 110, size=(t_n, h_n * P, w_n * P, 3))


def _synthetic_record(offsets, grid=(4, 6, 6), speck=None, extra_patches=6, seed=0):
  """SHAPE in near-white ink at offsets[t] (y, x) of frame t over a dark noisy background; keeps
  every patch the shape touches plus a few random background patches (a codec-like selection)."""
  rng = np.random.default_rng(seed + 100)
  frames = _background(grid, seed)
  kept = np.zeros(grid, bool)
  for t, (y, x) in enumerate(offsets):
    _paint(frames[t], y, x)
    _touched(kept, t, y, x)
  if speck is not None:  # (t, y, x): a 2x2 bright dot, far smaller than the digit
    t, y, x = speck
    frames[t, y:y + 2, x:x + 2] = INK
    kept[t, y // P, x // P] = True
  free = np.flatnonzero(~kept.ravel())
  kept.ravel()[rng.choice(free, extra_patches, replace=False)] = True
  return _record(frames, kept, seed), np.rint(frames), kept


def _expected_glyph(ink_level):
  """SHAPE's box (36 x 24) centred on a 36 x 36 square, then 3 x 3 block means -> 12 x 12."""
  sq = np.zeros((36, 36))
  sq[:, 6:30] = SHAPE * ink_level
  return sq.reshape(12, 3, 12, 3).mean(axis=(1, 3))


def test_canvases_and_glyph_match_numpy():
  offsets = [(3, 5), (20, 30), (40, 9), (29, 50)]
  rec, frames, kept = _synthetic_record(offsets, speck=(1, 70, 2))
  luma, observed = glyph_teacher.frame_canvases(rec)
  want_luma = np.rint(frames).astype(np.float64) @ np.array([0.299, 0.587, 0.114])
  want_obs = np.kron(kept, np.ones((P, P))).astype(bool)
  np.testing.assert_array_equal(observed, want_obs)
  np.testing.assert_allclose(luma, np.where(want_obs, want_luma, 0.0), atol=1e-3)

  thr = glyph_teacher.otsu_threshold(luma[observed])
  assert thr == _otsu_brute_force(luma[observed])
  ink_luma = INK  # white ink: luma of (250, 250, 250) is 250
  assert luma[observed & (luma < 200)].max() < thr < ink_luma  # the cut sits in the gap

  glyphs, areas = glyph_teacher.candidate_glyphs(rec)
  # One candidate per frame; the speck (area 4) is below MIN_COMPONENT of the digit and dropped.
  assert glyphs.shape == (4, 144)
  np.testing.assert_array_equal(areas, np.full(4, int(SHAPE.sum())))
  want = _expected_glyph((ink_luma - thr) / (255.0 - thr))
  for g in glyphs:
    np.testing.assert_allclose(g.reshape(12, 12), want, atol=1e-5)
  np.testing.assert_allclose(glyph_teacher.record_glyph(rec).reshape(12, 12), want, atol=1e-5)


def test_consensus_rejects_fused_and_partial_views():
  # Frames 0-3: the digit alone; frame 4 (fully kept): two copies overlapping, one fused component;
  # frame 5: only the patch row with the digit's top bar is kept (a sliver of a partly kept digit).
  grid = (6, 6, 6)
  frames = _background(grid, 1)
  kept = np.zeros(grid, bool)
  for t, (y, x) in enumerate([(3, 5), (20, 30), (40, 9), (29, 50)]):
    _paint(frames[t], y, x)
    _touched(kept, t, y, x)
  _paint(frames[4], 10, 10)
  _paint(frames[4], 30, 24)
  kept[4] = True
  _paint(frames[5], 42, 40)
  kept[5, 42 // P, 40 // P:(40 + SHAPE.shape[1] - 1) // P + 1] = True
  rec = _record(frames, kept, 1)
  glyphs, areas = glyph_teacher.candidate_glyphs(rec, min_component=0.1)
  assert glyphs.shape[0] == 6, areas  # 4 clean, 1 fused, 1 sliver
  clean = glyphs[0]
  np.testing.assert_allclose(glyphs[:4], np.repeat(clean[None], 4, 0), atol=1e-5)
  assert areas[4] > areas[0] > areas[5]
  assert np.abs(glyphs[4] - clean).max() > 0.2 and np.abs(glyphs[5] - clean).max() > 0.2
  np.testing.assert_allclose(glyph_teacher.consensus_glyph(glyphs, top=4, neighbours=3), clean,
                             atol=1e-5)
  # Plain averaging would let the odd views in.
  assert np.abs(glyphs.mean(0) - clean).max() > 0.05


def test_otsu_and_no_ink_edge_cases():
  assert glyph_teacher.otsu_threshold(np.full(50, 90.0)) == float("inf")
  values = np.r_[np.full(30, 40.0), np.full(10, 200.0)]
  assert glyph_teacher.otsu_threshold(values) == _otsu_brute_force(values)
  rec, _, _ = _synthetic_record([(3, 5)], grid=(1, 6, 6))
  flat = dict(rec, patches=np.full_like(rec["patches"], 90))
  np.testing.assert_array_equal(glyph_teacher.record_glyph(flat), np.zeros(144, np.float32))


@pytest.fixture(scope="module")
def digit_clip_records(tmp_path_factory):
  """Demo clips (1-3 moving copies of one digit) through the real codec patchifier: 10 per digit."""
  d = tmp_path_factory.mktemp("clips")
  rng = np.random.default_rng(0)
  cfg = config.PatchifyConfig(image_size=112).validate()
  recs = []
  for i in range(100):
    label = i % 10
    frames, _ = md.render_clip(rng, 112, 16, label, int(rng.integers(1, 4)))
    path = str(d / f"clip_{i:03d}.mp4")
    md.encode_clip(path, frames)
    recs.append(clip.patchify_file(path, cfg, class_label=label))
  shards = str(d / "shards")
  digit_shards.write_shards(shards, recs)
  return shards, recs


def test_teacher_embeddings_cluster_by_digit(digit_clip_records, tmp_path):
  shards, recs = digit_clip_records
  out = tmp_path / "teacher"
  glyph_teacher.main(["--records", shards, "--output", str(out), "--dim", "16"])
  emb, ids = np.load(out / "embeddings.npy"), np.load(out / "sample_ids.npy")
  assert emb.shape == (100, 16) and emb.dtype == np.float32 and ids.dtype == np.int64
  assert sorted(ids.tolist()) == sorted(r["sample_id"] for r in recs)
  by_id = {r["sample_id"]: r for r in recs}
  truth = np.array([by_id[i]["class_label"] for i in ids])
  acc = evaluate.knn_top1(emb, truth, k=5)
  # Chance is 0.1; the pooled-statistics teacher sits near it on these clips.
  base, _, _ = bootstrap_teacher.embed_records((by_id[i] for i in ids), dim=16)
  base_acc = evaluate.knn_top1(base, truth, k=5)
  assert acc >= 0.5 and acc >= base_acc + 0.3, (acc, base_acc)

  # teacher.npz reproduces the embeddings from a record's glyph; PCA basis is orthonormal.
  t = np.load(out / "teacher.npz")
  assert int(t["glyph_size"]) == 12
  comps = t["components"]
  np.testing.assert_allclose(comps.T @ comps, np.eye(16), atol=1e-6)
  g = glyph_teacher.record_glyph(by_id[ids[3]])
  np.testing.assert_allclose((g - t["mean"]) @ comps, emb[3], rtol=1e-4, atol=1e-4)
  # Deterministic: a second run writes the same bytes.
  first = emb.copy()
  glyph_teacher.run(shards, str(out), dim=16)
  np.testing.assert_array_equal(np.load(out / "embeddings.npy"), first)
  assert not [f for f in os.listdir(out) if f.startswith(".tmp")]

  # The projection may instead be fitted on scikit-learn's digits.
  emb_d, _, _ = glyph_teacher.embed_records((by_id[i] for i in ids), dim=16, fit="digits")
  assert evaluate.knn_top1(emb_d, truth, k=5) >= 0.45


def test_bad_arguments_name_the_option(digit_clip_records, tmp_path):
  shards, _ = digit_clip_records
  with pytest.raises(ValueError, match="--dim must be in"):
    glyph_teacher.run(shards, str(tmp_path / "x"), dim=500)
  with pytest.raises(ValueError, match="--fit must be"):
    glyph_teacher.run(shards, str(tmp_path / "x"), fit="mnist")
  with pytest.raises(ValueError, match="--glyph_size"):
    glyph_teacher.run(shards, str(tmp_path / "x"), size=1)
  with pytest.raises(ValueError, match="no data-"):
    glyph_teacher.run(str(tmp_path), str(tmp_path / "x"))
  with pytest.raises(ValueError, match="field 'patches'"):
    glyph_teacher.frame_canvases(dict(patches=np.zeros((2, 14, 14), np.uint8),
                                      positions=np.zeros((2, 3), np.int32), grid=[1, 1, 1]))
