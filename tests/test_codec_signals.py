"""Codec signals and selection (data_prep.codec.signals) against numpy references and real clips."""
import av
import numpy as np
import pytest
from PIL import Image

from data_prep.codec import signals as cs
from data_prep import make_demo_data as md

S, P, G = 112, 14, 8  # image size, patch size, grid side used by most tests
SQ = 24  # moving square side


def _square_frames(n=16, size=S, seed=0, step=(2, 4)):
  rng = np.random.default_rng(seed)
  bg = md.textured_background(rng, size, size)
  square = rng.uniform(0, 255, size=(SQ // 4, SQ // 4, 3)).repeat(4, 0).repeat(4, 1)
  frames, boxes = [], []
  for t in range(n):
    y, x = 16 + step[0] * t, 8 + step[1] * t
    f = bg.copy()
    f[y:y + SQ, x:x + SQ] = square
    frames.append(f)
    boxes.append((y, x, y + SQ, x + SQ))
  return np.clip(np.rint(np.stack(frames)), 0, 255).astype(np.uint8), boxes


@pytest.fixture(scope="module")
def square_clip(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("sq") / "square.mp4")
  frames, boxes = _square_frames()
  md.encode_clip(path, frames, gop=8, crf=18)
  return path, boxes


@pytest.fixture(scope="module")
def static_clip(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("st") / "static.mp4")
  bg = md.textured_background(np.random.default_rng(3), S, S)
  md.encode_clip(path, np.repeat(np.rint(bg).astype(np.uint8)[None], 16, 0), gop=8)
  return path


def _decode_rgb(path, size=S):
  """Independent decode: plain PyAV (no MV export), each frame converted by PyAV itself."""
  with av.open(path) as c:
    return [f.to_ndarray(format="rgb24", width=size, height=size, interpolation="AREA")
            for f in c.decode(video=0)]


def _overlaps(h, w, box, p=P):
  y0, x0, y1, x1 = box
  return h * p < y1 and (h + 1) * p > y0 and w * p < x1 and (w + 1) * p > x0


def test_square_clip_selects_the_path_and_exact_pixels(square_clip):
  path, boxes = square_clip
  cfg = cs.PatchifyConfig(budget=1 / 16, num_frames=16, image_size=S, patch_size=P,
                          iframe="scored").validate()
  rec = cs.patchify_file(path, cfg)
  k = round(16 * G * G / 16)
  assert rec["positions"].shape == (k, 3) and rec["patches"].shape == (k, P, P, 3)
  assert rec["frame_types"] == "IPPPPPPPIPPPPPPP"
  assert rec["signal"] == "mv+residual+frame_diff"  # frame 8 is an I-frame: frame difference
  pos = rec["positions"]
  assert (pos >= 0).all() and (pos < [16, G, G]).all()
  flat = (pos[:, 0] * G + pos[:, 1]) * G + pos[:, 2]
  assert (np.diff(flat) > 0).all()  # unique and sorted by (t, h, w)
  idx = cs.sample_indices(16, 16)
  later = [(t, h, w) for t, h, w in pos if t > 0]
  on_path = [
      _overlaps(h, w, boxes[idx[t]]) or (idx[t] > 0 and _overlaps(h, w, boxes[idx[t] - 1]))
      for t, h, w in later]
  assert len(later) > 0.8 * k
  assert np.mean(on_path) >= 0.9, np.mean(on_path)
  frames = _decode_rgb(path)
  for (t, h, w), patch in zip(pos, rec["patches"]):
    np.testing.assert_array_equal(patch, frames[idx[t]][h * P:(h + 1) * P, w * P:(w + 1) * P])


def test_resized_and_odd_sized_video_patches_match_independent_decode(tmp_path):
  frames, _ = _square_frames(n=6, size=64)
  path = str(tmp_path / "odd.mp4")
  # 45x33 yuv444p: odd sides, upscaled and stretched to 56x56, uneven patch bins.
  md.encode_clip(path, frames[:, :33, :45].copy(), gop=4, pix_fmt="yuv444p")
  cfg = cs.PatchifyConfig(budget=0.5, num_frames=4, image_size=56, patch_size=14).validate()
  rec = cs.patchify_file(path, cfg)
  assert rec["positions"].shape[0] == round(0.5 * 4 * 16)
  dec = _decode_rgb(path, size=56)
  idx = cs.sample_indices(6, 4)
  for (t, h, w), patch in zip(rec["positions"], rec["patches"]):
    np.testing.assert_array_equal(patch, dec[idx[t]][h * 14:(h + 1) * 14, w * 14:(w + 1) * 14])


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


def _real_frames(path):
  """[(luma, vectors or None, pict_type int)] of every frame, decoded as the patchifier does."""
  c = av.open(path)
  st = c.streams.video[0]
  st.thread_type = "NONE"
  st.codec_context.options = {"flags2": "+export_mvs"}
  out = []
  for f in c.decode(st):
    sd = f.side_data.get("MOTION_VECTORS")
    out.append((cs.luma_plane(f).copy(), None if sd is None else sd.to_ndarray(),
                int(f.pict_type)))
  c.close()
  return out


def test_motion_compensation_matches_per_block_reference_on_real_mvs(square_clip):
  frames = _real_frames(square_clip[0])
  cfg = cs.PatchifyConfig(image_size=S, patch_size=P).validate()
  sig = cs.FrameSignals(cfg, S, S)
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
  cfg = cs.PatchifyConfig(image_size=28, patch_size=14, min_side=1).validate()
  motion_cells, residual, lat, _ = cs.FrameSignals(cfg, h, w).maps(cur, prev, mvs, future)
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


@pytest.mark.parametrize("fusion", cs.FUSIONS)
@pytest.mark.parametrize("weights", [(1.0, 1.0), (2.0, 0.5), (0.0, 1.0)])
def test_fusion_and_pooling_match_pixel_reference(square_clip, fusion, weights):
  frames = _real_frames(square_clip[0])
  cfg = cs.PatchifyConfig(image_size=S, patch_size=P, fusion=fusion, motion_weight=weights[0],
                          residual_weight=weights[1]).validate()
  sig = cs.FrameSignals(cfg, S, S, rot_k=1)
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
  np.testing.assert_allclose(cs.patch_means(m, 5), _pool_ref(m, 5), rtol=1e-6)


def test_select_top_k_matches_brute_force_with_ties():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 4, size=(5, 3, 4)).astype(float)  # many ties
  for k, seed in [(1, 0), (7, 1), (30, (3, 2**62)), (60, 0)]:
    got = cs.select_top_k(scores, k, seed=seed)
    rank = np.random.default_rng(seed).permutation(scores.size)  # the seeded tie order
    order = sorted(range(scores.size), key=lambda i: (-scores.reshape(-1)[i], rank[i]))[:k]
    want = np.asarray(sorted(order))
    np.testing.assert_array_equal(got, np.stack([want // 12, want // 4 % 3, want % 4], 1))
  with pytest.raises(ValueError, match="k=0"):
    cs.select_top_k(scores, 0)


def test_k_equals_budget_exactly(square_clip):
  for budget, t in [(0.125, 16), (0.1, 7), (0.031, 5), (0.25, 3), (1.0, 2)]:
    cfg = cs.PatchifyConfig(budget=budget, num_frames=t, image_size=S, patch_size=P).validate()
    rec = cs.patchify_file(square_clip[0], cfg)
    want = int(np.floor(budget * t * G * G + 0.5))
    assert rec["positions"].shape[0] == want == rec["patches"].shape[0], (budget, t)
    assert rec["grid"].tolist() == [t, G, G]


def test_keep_first_frame(square_clip):
  cfg = cs.PatchifyConfig(budget=0.125, num_frames=16, image_size=S, patch_size=P,
                          iframe="keep").validate()
  rec = cs.patchify_file(square_clip[0], cfg, with_scores=True)
  pos = rec["positions"]
  assert pos.shape[0] == 128
  first = pos[pos[:, 0] == 0]
  assert first.shape[0] == G * G  # the whole first frame
  # The other 64 are the top-64 of frames 1.. (brute force on the returned scores).
  rest = rec["grid_scores"][1:].reshape(-1)
  rest_scores = np.sort(rest)[::-1]
  got = sorted(((t - 1) * G + h) * G + w for t, h, w in pos if t > 0)
  assert rest_scores[63] > rest_scores[64]  # no tie at the cut: the top-64 set is unique
  assert got == sorted(np.argsort(-rest, kind="stable")[:64].tolist())
  # The record ranks the frame kept whole above everything for later token budgets.
  assert np.isinf(rec["scores"][pos[:, 0] == 0]).all() and np.isfinite(rec["scores"][64:]).all()
  # K below two frames: the rule does not apply, plain top-K.
  small = cs.PatchifyConfig(budget=0.1, num_frames=16, image_size=S, patch_size=P).validate()
  assert small.iframe == "keep" and not small.keep_first_frame


def test_static_fallback_keeps_uniform_whole_frames(static_clip):
  base = dict(num_frames=16, image_size=S, patch_size=P)
  base = dict(base, iframe="scored")
  rec = cs.patchify_file(static_clip, cs.PatchifyConfig(budget=0.125, **base).validate())
  assert rec["signal"].endswith("static_fallback")
  frames = {t: np.sum(rec["positions"][:, 0] == t) for t in np.unique(rec["positions"][:, 0])}
  assert frames == {4: 64, 12: 64}  # K = 2 frames, centred at 1/4 and 3/4 of the clip
  rec = cs.patchify_file(static_clip, cs.PatchifyConfig(budget=0.125, **dict(
      base, iframe="keep")).validate())
  frames = {t: np.sum(rec["positions"][:, 0] == t) for t in np.unique(rec["positions"][:, 0])}
  assert frames == {0: 64, 8: 64}
  rec = cs.patchify_file(static_clip, cs.PatchifyConfig(budget=0.1, **base).validate())
  pos = rec["positions"]
  assert pos.shape[0] == 102  # round(0.1 * 1024): one whole frame + 38 spread over another
  assert np.sum(pos[:, 0] == 4) == 64 and np.sum(pos[:, 0] == 12) == 38
  spread = pos[pos[:, 0] == 12]
  assert len(np.unique(spread[:, 1])) == G  # spread over every row, not the top rows
  # Without the fallback: plain top-K. Only the I-frame (t=8, frame difference = re-encoding
  # noise) scores above 0; the other picks are ties, resolved by the seeded random order.
  rec = cs.patchify_file(static_clip, cs.PatchifyConfig(budget=0.125, static_fallback=False,
                                                        **base).validate(), with_scores=True)
  assert "static_fallback" not in rec["signal"]
  sc = rec["grid_scores"].reshape(-1)
  assert np.count_nonzero(sc) == np.count_nonzero(sc[8 * 64:9 * 64]) > 0
  rank = cs.tie_order((0, rec["sample_id"]), sc.size)
  want = sorted(sorted(range(sc.size), key=lambda i: (-sc[i], rank[i]))[:128])
  got = [(t * G + h) * G + w for t, h, w in rec["positions"]]
  assert got == want and len(set(rec["positions"][:, 0].tolist())) > 8  # ties spread over T


def test_moving_clip_does_not_trigger_static_fallback(square_clip):
  rec = cs.patchify_file(square_clip[0], cs.PatchifyConfig(image_size=S, patch_size=P).validate())
  assert "static_fallback" not in rec["signal"]


def test_short_video_repeats_frames(tmp_path):
  frames, _ = _square_frames(n=5)
  path = str(tmp_path / "short.mp4")
  md.encode_clip(path, frames)
  cfg = cs.PatchifyConfig(num_frames=8, image_size=S, patch_size=P, budget=1.0).validate()
  rec = cs.patchify_file(path, cfg)
  np.testing.assert_array_equal(cs.sample_indices(5, 8), [0, 0, 1, 2, 2, 3, 4, 4])
  assert rec["grid"].tolist() == [8, G, G]
  by_t = rec["patches"].reshape(8, G * G, P, P, 3)
  for a, b in [(0, 1), (3, 4), (6, 7)]:  # repeated frames, identical pixels
    np.testing.assert_array_equal(by_t[a], by_t[b])
  assert not np.array_equal(by_t[1], by_t[2])


def test_rotated_stream_is_turned_upright(tmp_path):
  frames = np.zeros((4, 48, 64, 3), np.uint8)
  frames[:, :16, :16] = 255  # bright block at the top-left of the coded frame
  path = str(tmp_path / "rot.mp4")
  md.encode_clip(path, frames, rotation=90)
  cfg = cs.PatchifyConfig(num_frames=2, image_size=56, patch_size=14, budget=1.0).validate()
  rec = cs.patchify_file(path, cfg)
  img = rec["patches"][:16].reshape(4, 4, 14, 14, 3).transpose(0, 2, 1, 3, 4).reshape(56, 56, 3)
  # 90 degrees counter-clockwise: the coded top-left corner ends up bottom-left.
  assert img[-8:, :8].mean() > 200 and img[:8, :8].mean() < 50 and img[-8:, -8:].mean() < 50


def test_variable_frame_rate_samples_by_frame_index(tmp_path):
  frames, _ = _square_frames(n=12)
  path = str(tmp_path / "vfr.mp4")
  md.encode_clip(path, frames, pts_ms=np.cumsum([0] + [10, 80, 33, 200] * 3)[:12])
  cfg = cs.PatchifyConfig(num_frames=4, image_size=S, patch_size=P, budget=1.0).validate()
  rec = cs.patchify_file(path, cfg)
  dec = _decode_rgb(path)
  assert len(dec) == 12
  for t, i in enumerate(cs.sample_indices(12, 4)):
    np.testing.assert_array_equal(rec["patches"][t * G * G], dec[i][:P, :P])


def test_image_whole_grid_and_saliency_budget(tmp_path):
  rng = np.random.default_rng(0)
  img = np.full((90, 120, 3), 128, np.uint8)
  img[:, 60:] = rng.integers(0, 256, (90, 60, 3))  # right half textured, left half flat
  path = str(tmp_path / "still.png")
  Image.fromarray(img).save(path)
  cfg = cs.PatchifyConfig(image_size=S, patch_size=P).validate()
  rec = cs.patchify_file(path, cfg)
  assert rec["grid"].tolist() == [1, G, G] and rec["frame_types"] == "I"
  assert rec["signal"] == "image" and rec["positions"].shape == (G * G, 3)
  ref = av.VideoFrame.from_ndarray(img, format="rgb24").to_ndarray(
      format="rgb24", width=S, height=S, interpolation="AREA")
  np.testing.assert_array_equal(
      rec["patches"], ref.reshape(G, P, G, P, 3).transpose(0, 2, 1, 3, 4).reshape(-1, P, P, 3))
  rec = cs.patchify_file(path, cs.PatchifyConfig(image_size=S, patch_size=P,
                                                 image_budget=0.25).validate())
  assert rec["signal"] == "image+saliency" and rec["positions"].shape[0] == 16
  assert (rec["positions"][:, 2] >= G // 2).all()  # all in the textured half


@pytest.mark.parametrize("key,value", [
    ("budget", 0.0), ("budget", 1.5), ("num_frames", 0), ("image_size", 100),
    ("fusion", "median"), ("motion_weight", -1.0), ("residual_floor", 0),
    ("residual_floor", 2.5), ("image_budget", 2.0), ("resize_interpolation", "NOPE"),
    ("static_threshold", -1.0), ("min_side", 0)])
def test_config_errors_name_the_key(key, value):
  with pytest.raises(ValueError, match=f"config {key}="):
    cs.PatchifyConfig(**{key: value}).validate()


@pytest.mark.parametrize("make,reason", [
    (lambda p: open(p, "wb").close(), "empty file"),
    (lambda p: open(p, "wb").write(b"not a video at all " * 50), "cannot open as media"),
])
def test_bad_files_raise_input_error(tmp_path, make, reason):
  path = str(tmp_path / "bad.mp4")
  make(path)
  with pytest.raises(cs.InputError, match=reason):
    cs.patchify_file(path, cs.PatchifyConfig().validate())


def test_percentile95_is_nearest_rank():
  rng = np.random.default_rng(0)
  for n in (1, 2, 19, 20, 21, 101, 3136):
    v = rng.random(n)
    assert cs.percentile95(v) == np.percentile(v, 95, method="inverted_cdf")
    w = rng.integers(1, 5, n)
    want = np.percentile(np.repeat(v, w), 95, method="inverted_cdf")
    assert cs.percentile95(v, w.astype(float)) == want
    u = rng.integers(0, 256, n).astype(np.uint8)
    assert cs.percentile95(u) == np.percentile(u, 95, method="inverted_cdf")


@pytest.mark.parametrize("codec,ext,transcode,signal", [
    ("libx264", "mkv", "auto", "mv+residual"),  # B-frames; MKV has no frame count header
    ("libvpx-vp9", "webm", "never", "frame_diff"),  # FFmpeg exports no VP9 vectors
    ("libvpx-vp9", "webm", "auto", "transcode+mv+residual"),  # ... so they are re-encoded
])
def test_other_codecs_and_containers(tmp_path, codec, ext, transcode, signal):
  frames, _ = _square_frames(n=12, size=64, step=(1, 2))
  path = str(tmp_path / f"clip.{ext}")
  with av.open(path, "w") as c:
    s = c.add_stream(codec, rate=25)
    s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
    for f in frames:
      for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
        c.mux(pkt)
    for pkt in s.encode():
      c.mux(pkt)
  cfg = cs.PatchifyConfig(num_frames=8, image_size=56, patch_size=14, budget=0.25,
                          transcode=transcode).validate()
  rec = cs.patchify_file(path, cfg)
  assert rec["signal"] == signal and rec["positions"].shape[0] == 32
  if codec == "libx264":
    assert "B" in rec["frame_types"]
  dec = _decode_rgb(path, size=56)
  idx = cs.sample_indices(12, 8)
  for (t, h, w), patch in zip(rec["positions"], rec["patches"]):
    np.testing.assert_array_equal(patch, dec[idx[t]][h * 14:(h + 1) * 14, w * 14:(w + 1) * 14])


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
  cells, _, _, _ = cs.FrameSignals(cs.PatchifyConfig(camera_compensation=True, **base).validate(),
                                   64, 64).maps(luma, luma, mvs)
  want = np.zeros((4, 4))
  want[:2, :2] = 1.0  # |(-2-3, 2-0)| = 5.39 px, also the 95th percentile -> 1 after scaling
  want[3, 3] = np.hypot(3, 0) / np.hypot(5, 2)  # intra cell: zero motion minus the camera
  np.testing.assert_allclose(cells.reshape(4, 4), want, rtol=1e-6)
  cells, _, _, _ = cs.FrameSignals(cs.PatchifyConfig(**base).validate(), 64, 64).maps(
      luma, luma, mvs)
  want = np.ones((4, 4))  # raw |MV|: background 3 px = the 95th percentile
  want[:2, :2] = np.hypot(2, 2) / 3
  want[3, 3] = 0.0
  np.testing.assert_allclose(cells.reshape(4, 4), want, rtol=1e-6)


def test_header_over_count_is_replanned_on_the_true_count(square_clip, monkeypatch):
  cfg = cs.PatchifyConfig(budget=0.125, num_frames=8, image_size=S, patch_size=P).validate()
  want = cs.patchify_file(square_clip[0], cfg)
  real = cs._declared_frames
  monkeypatch.setattr(cs, "_declared_frames", lambda container, path: real(container, path) + 7)
  got = cs.patchify_file(square_clip[0], cfg)
  np.testing.assert_array_equal(got["positions"], want["positions"])
  np.testing.assert_array_equal(got["patches"], want["patches"])


def test_resolution_change_mid_stream_is_an_input_error(tmp_path):
  parts = []
  for i, size in enumerate((64, 48)):
    frames, _ = _square_frames(n=4, size=64)
    part = str(tmp_path / f"part{i}.h264")
    with av.open(part, "w", format="h264") as c:
      s = c.add_stream("libx264", rate=25)
      s.width = s.height = size
      s.pix_fmt = "yuv420p"
      for f in frames[:, :size, :size]:
        for pkt in s.encode(av.VideoFrame.from_ndarray(f.copy(), format="rgb24")):
          c.mux(pkt)
      for pkt in s.encode():
        c.mux(pkt)
    parts.append(open(part, "rb").read())
  path = str(tmp_path / "switch.h264")
  open(path, "wb").write(b"".join(parts))  # an Annex-B stream whose SPS changes the size
  cfg = cs.PatchifyConfig(num_frames=8, image_size=28, patch_size=14).validate()
  with pytest.raises(cs.InputError, match="frame size changes mid-stream"):
    cs.patchify_file(path, cfg)
