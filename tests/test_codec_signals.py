"""Per-frame codec signals (data_prep.codec.signals) against per-block and per-pixel numpy references."""
import numpy as np
import pytest

from data_prep.codec import config, signals
from tests.helpers import codec_clips
from tests.helpers.codec_clips import G, P, S


def _reference_mc_residual(prev, cur, mvs, future=None):
  """Per-block loop: each vector, rounded to whole pixels, moves the frame it references (past:
  `prev`; future: `future`, or dropped when None), edges clamped; a pixel with both is predicted
  by their rounded average; a pixel no vector covers from the co-located pixel of `prev`. Also
  returns |MV| in (quarter-pel exact) pixels per pixel, the past vector where there are two."""
  h, w = cur.shape
  fields = {}
  for side in (-1, 1):
    dy, dx, cov = np.zeros((h, w)), np.zeros((h, w)), np.zeros((h, w), bool)
    for m in mvs[np.sign(mvs["source"]) == side]:
      x0, y0 = int(m["dst_x"]) - m["w"] // 2, int(m["dst_y"]) - m["h"] // 2
      ys = slice(max(y0, 0), min(y0 + m["h"], h))
      xs = slice(max(x0, 0), min(x0 + m["w"], w))
      dx[ys, xs] = m["motion_x"] / m["motion_scale"]
      dy[ys, xs] = m["motion_y"] / m["motion_scale"]
      cov[ys, xs] = True
    fields[side] = (dy, dx, cov)
  yy, xx = np.mgrid[0:h, 0:w]

  def warp(ref, dy, dx):
    iy, ix = np.rint(dy).astype(int), np.rint(dx).astype(int)
    return ref[np.clip(yy + iy, 0, h - 1), np.clip(xx + ix, 0, w - 1)].astype(int)

  (pdy, pdx, pcov), (fdy, fdx, fcov) = fields[-1], fields[1]
  pred = warp(prev, pdy * pcov, pdx * pcov)
  if future is not None:
    pf = warp(future, fdy, fdx)
    pred = np.where(pcov & fcov, (pred + pf + 1) // 2, np.where(fcov & ~pcov, pf, pred))
  mag = np.where(pcov, np.hypot(pdx, pdy), np.where(fcov, np.hypot(fdx, fdy), 0.0))
  return np.abs(cur.astype(int) - pred), mag


def test_motion_compensation_matches_per_block_reference_on_real_mvs(square_clip):
  frames = codec_clips.real_frames(square_clip[0])
  cfg = config.PatchifyConfig(image_size=S, patch_size=P).validate()
  sig = signals.FrameSignals(cfg, S, S)
  mc_total = diff_total = 0
  for t in range(1, len(frames)):
    (prev, _, _), (cur, mvs, _) = frames[t - 1], frames[t]
    if mvs is None:
      continue
    _, residual, _, tokens = sig.maps(cur, prev, mvs)
    ref, _ = _reference_mc_residual(prev, cur, mvs)
    np.testing.assert_array_equal(residual, ref)
    assert tokens == ("mv", "residual")
    mc_total += int(residual.astype(int).sum())
    diff_total += int(np.abs(cur.astype(int) - prev.astype(int)).sum())
  # Vectors point the right way: compensating removes most of the square's frame difference.
  assert mc_total < 0.5 * diff_total, (mc_total, diff_total)


def _synthetic_mvs(rng, h, w):
  """Codec-like vectors: each 16x16 macroblock split into 16x16/16x8/8x16/8x8/4x4 blocks, each
  block past-, future- or bi-predicted (one vector per direction), some macroblocks intra (none),
  quarter-pel motion, some of it pointing past the frame border."""
  dtype = np.dtype([("source", "<i4"), ("w", "u1"), ("h", "u1"), ("src_x", "<i2"),
                    ("src_y", "<i2"), ("dst_x", "<i2"), ("dst_y", "<i2"), ("flags", "<u8"),
                    ("motion_x", "<i4"), ("motion_y", "<i4"), ("motion_scale", "<u2")])
  rows = []
  for my in range(0, h + 15, 16):
    for mx in range(0, w + 15, 16):
      if rng.random() < 0.15:
        continue  # intra macroblock: no vectors
      bw, bh = [(16, 16), (16, 8), (8, 16), (8, 8), (4, 4)][rng.integers(5)]
      for y in range(my, my + 16, bh):
        for x in range(mx, mx + 16, bw):
          for src in [[-1], [1], [-1, 1]][rng.integers(3)]:
            rows.append((src, bw, bh, 0, 0, x + bw // 2, y + bh // 2, 0,
                         rng.integers(-90, 90), rng.integers(-90, 90), 4))
  return np.array(rows, dtype)


@pytest.mark.parametrize("with_future", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_motion_compensation_matches_reference_on_synthetic_mvs(seed, with_future):
  rng = np.random.default_rng(seed)
  h, w = 40, 56
  prev = rng.integers(0, 256, (h, w), dtype=np.uint8)
  cur = rng.integers(0, 256, (h, w), dtype=np.uint8)
  future = rng.integers(0, 256, (h, w), dtype=np.uint8) if with_future else None
  mvs = _synthetic_mvs(rng, h, w)
  cfg = config.PatchifyConfig(image_size=28, patch_size=14, min_side=1).validate()
  motion_cells, residual, lat, _ = signals.FrameSignals(cfg, h, w).maps(cur, prev, mvs, future)
  ref_res, ref_mag = _reference_mc_residual(prev, cur, mvs, future)
  np.testing.assert_array_equal(residual, ref_res)
  # Motion map: |MV| normalised by its 95th percentile (floor 1 px), clipped to 1.
  scale = max(np.percentile(ref_mag, 95, method="inverted_cdf"), 1.0)
  np.testing.assert_allclose(motion_cells[lat.cell_index], np.minimum(ref_mag / scale, 1),
                             rtol=1e-6, atol=1e-6)


def _pool_ref(m, g):
  hm, wm = m.shape
  out = np.zeros((g, g))
  for i in range(g):
    for j in range(g):
      out[i, j] = m[i * hm // g:(i + 1) * hm // g, j * wm // g:(j + 1) * wm // g].mean()
  return out


@pytest.mark.parametrize("fusion", config.FUSIONS)
@pytest.mark.parametrize("weights", [(1.0, 1.0), (2.0, 0.5), (0.0, 1.0)])
def test_fusion_and_pooling_match_pixel_reference(square_clip, fusion, weights):
  frames = codec_clips.real_frames(square_clip[0])
  cfg = config.PatchifyConfig(image_size=S, patch_size=P, fusion=fusion, motion_weight=weights[0],
                          residual_weight=weights[1]).validate()
  sig = signals.FrameSignals(cfg, S, S, rot_k=1)
  for t in (3, 8):  # a P-frame (motion + residual) and an I-frame (frame difference alone)
    (prev, _, _), (cur, mvs, _) = frames[t - 1], frames[t]
    scores, _ = sig.scores(cur, prev, mvs)
    if mvs is None:
      res = np.abs(cur.astype(float) - prev)
      mag = None
    else:
      res, mag = _reference_mc_residual(prev, cur, mvs)
    r = np.minimum(res / max(np.percentile(res, 95, method="inverted_cdf"), 16), 1)
    wm, wr = weights
    if mag is None or wm == 0:
      fused = r * (wr if fusion == "sum" else 1)
    else:
      m = np.minimum(mag / max(np.percentile(mag, 95, method="inverted_cdf"), 1.0), 1)
      fused = {"mean": (wm * m + wr * r) / (wm + wr), "sum": wm * m + wr * r,
               "max": np.maximum(wm * m, wr * r),
               "geomean": m ** (wm / (wm + wr)) * r ** (wr / (wm + wr))}[fusion]
    np.testing.assert_allclose(scores, _pool_ref(np.rot90(fused, 1), G), rtol=1e-5, atol=1e-6)


def test_pooling_uneven_bins_matches_reference():
  m = np.random.default_rng(0).random((37, 53)).astype(np.float32)
  np.testing.assert_allclose(signals.patch_means(m, 5), _pool_ref(m, 5), rtol=1e-6)


def test_percentile95_is_nearest_rank():
  rng = np.random.default_rng(0)
  for n in (1, 2, 19, 20, 21, 101, 3136):
    v = rng.random(n)
    assert signals.percentile95(v) == np.percentile(v, 95, method="inverted_cdf")
    w = rng.integers(1, 5, n)
    want = np.percentile(np.repeat(v, w), 95, method="inverted_cdf")
    assert signals.percentile95(v, w.astype(float)) == want
    u = rng.integers(0, 256, n).astype(np.uint8)
    assert signals.percentile95(u) == np.percentile(u, 95, method="inverted_cdf")


def test_camera_compensation_removes_the_median_motion():
  dtype = np.dtype([("source", "<i4"), ("w", "u1"), ("h", "u1"), ("src_x", "<i2"),
                    ("src_y", "<i2"), ("dst_x", "<i2"), ("dst_y", "<i2"), ("flags", "<u8"),
                    ("motion_x", "<i4"), ("motion_y", "<i4"), ("motion_scale", "<u2")])
  rows = []
  for y in range(0, 64, 16):
    for x in range(0, 64, 16):
      obj = y < 32 and x < 32  # a 2x2-macroblock object moving (-2, +2) px; the camera pans +3 px
      if (y, x) == (48, 48):
        continue  # one intra macroblock: no vector, must not count as zero camera motion
      rows.append((-1, 16, 16, 0, 0, x + 8, y + 8, 0, -8 if obj else 12, 8 if obj else 0, 4))
  mvs = np.array(rows, dtype)
  luma = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
  base = dict(image_size=56, patch_size=14)
  cells, _, _, _ = signals.FrameSignals(config.PatchifyConfig(camera_compensation=True, **base).validate(),
                                   64, 64).maps(luma, luma, mvs)
  want = np.zeros((4, 4))
  want[:2, :2] = 1.0  # |(-2-3, 2-0)| = 5.39 px, also the 95th percentile -> 1 after scaling
  want[3, 3] = np.hypot(3, 0) / np.hypot(5, 2)  # intra cell: zero motion minus the camera
  np.testing.assert_allclose(cells.reshape(4, 4), want, rtol=1e-6)
  cells, _, _, _ = signals.FrameSignals(config.PatchifyConfig(**base).validate(), 64, 64).maps(
      luma, luma, mvs)
  want = np.ones((4, 4))  # raw |MV|: background 3 px = the 95th percentile
  want[:2, :2] = np.hypot(2, 2) / 3
  want[3, 3] = 0.0
  np.testing.assert_allclose(cells.reshape(4, 4), want, rtol=1e-6)
