"""Long videos: --seek auto skips long gaps between samples (exact frames, fewer decoded), and the
decode timeout grows with the video's duration."""
import av
import numpy as np
import pytest

from data_prep.codec import signals as cs
from data_prep import make_demo_data as md

N, FPS, SIZE = 400, 25, 64  # 16 s


def _frames(n=N):
  rng = np.random.default_rng(0)
  bg = md.textured_background(rng, SIZE, SIZE + n)
  sq = rng.uniform(0, 255, (4, 4, 3)).repeat(4, 0).repeat(4, 1)
  out = []
  for i in range(n):
    f = bg[:, i:i + SIZE].copy()  # a slow pan, so every frame differs
    x = 4 + (3 * i) % 40
    f[20:36, x:x + 16] = sq
    out.append(f)
  return np.clip(np.rint(np.stack(out)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("long") / "long.mp4")
  md.encode_clip(path, _frames(), fps=FPS, gop=FPS)
  return path


def _count_decoded(monkeypatch):
  seen = []
  real = cs._decoded_frames

  def spy(*a, **k):
    for item in real(*a, **k):
      seen.append(item[0])
      yield item

  monkeypatch.setattr(cs, "_decoded_frames", spy)
  return seen


def _check_pixels(path, rec, t_len):
  with av.open(path) as c:
    dec = [f.to_ndarray(format="rgb24", width=56, height=56, interpolation="AREA")
           for f in c.decode(video=0)]
  idx = cs.sample_indices(len(dec), t_len)
  np.testing.assert_array_equal(rec["frame_indices"], idx)
  for (t, h, w), patch in zip(rec["positions"], rec["patches"]):
    np.testing.assert_array_equal(patch, dec[idx[t]][h * 14:(h + 1) * 14, w * 14:(w + 1) * 14])


def test_seek_skips_long_gaps_and_keeps_exact_frames(long_clip, monkeypatch):
  base = dict(num_frames=4, image_size=56, patch_size=14, budget=0.5, seek_min_gap=2.0)
  seen = _count_decoded(monkeypatch)
  rec = cs.patchify_file(long_clip, cs.PatchifyConfig(**base).validate(), with_scores=True)
  idx = cs.sample_indices(N, 4)  # 50, 150, 250, 350
  assert set(idx.tolist()) <= set(seen)
  assert len(seen) < 0.5 * (idx[-1] + 1), len(seen)  # 1 s windows, not every frame
  assert seen == sorted(seen) and len(set(seen)) == len(seen)
  _check_pixels(long_clip, rec, 4)
  assert (rec["grid_scores"].reshape(4, -1).max(1) > 0).all()  # every slot still scored
  seen.clear()
  never = cs.patchify_file(long_clip, cs.PatchifyConfig(seek="never", **base).validate())
  assert seen == list(range(idx[-1] + 1))
  np.testing.assert_array_equal(never["frame_indices"], rec["frame_indices"])


def test_variable_frame_rate_falls_back_to_decoding_everything(tmp_path, monkeypatch):
  path = str(tmp_path / "vfr.mp4")
  pts = np.cumsum([0] + [40, 40, 80, 20] * 50)[:200]
  md.encode_clip(path, _frames(200), pts_ms=pts, gop=FPS)
  seen = _count_decoded(monkeypatch)
  cfg = cs.PatchifyConfig(num_frames=4, image_size=56, patch_size=14, budget=0.5,
                          seek_min_gap=1.0).validate()
  rec = cs.patchify_file(path, cfg)
  last = int(cs.sample_indices(200, 4)[-1])
  assert seen[-(last + 1):] == list(range(last + 1))  # the run that produced the record
  _check_pixels(path, rec, 4)


def test_decode_timeout_scales_with_duration(long_clip, tmp_path):
  assert cs.media_duration(long_clip) == pytest.approx(N / FPS, abs=0.05)
  assert cs.scaled_timeout(600, 30) == 600 and cs.scaled_timeout(600, 600) == 6000
  png = tmp_path / "x.png"
  png.write_bytes(b"not read")
  assert cs.media_duration(str(png)) == 0.0
  assert cs.media_duration(str(tmp_path / "missing.mp4")) == 0.0
