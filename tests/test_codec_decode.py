"""Decoding (data_prep.codec.decode) through patchify_file: seeking in long videos, variable frame
rates, rotation, odd sizes, short clips, other codecs and containers, transcoding streams without
vectors, bad headers and size changes; patches always equal an independent PyAV decode."""
import av
import numpy as np
import pytest

from data_prep import make_demo_data as md
from data_prep.codec import clip, config, decode, selection, worker
from tests.helpers import codec_clips
from tests.helpers.codec_clips import G, IDX, P, S, T

N_LONG, FPS, SIZE = 400, 25, 64  # 16 s


def _frames(n=N_LONG):
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
  real = decode.decoded_frames

  def spy(*a, **k):
    for item in real(*a, **k):
      seen.append(item[0])
      yield item

  monkeypatch.setattr(decode, "decoded_frames", spy)
  return seen


def _check_pixels(path, rec, t_len):
  with av.open(path) as c:
    dec = [f.to_ndarray(format="rgb24", width=56, height=56, interpolation="AREA")
           for f in c.decode(video=0)]
  idx = selection.sample_indices(len(dec), t_len)
  np.testing.assert_array_equal(rec["frame_indices"], idx)
  for (t, h, w), patch in zip(rec["positions"], rec["patches"]):
    np.testing.assert_array_equal(patch, dec[idx[t]][h * 14:(h + 1) * 14, w * 14:(w + 1) * 14])


def test_seek_skips_long_gaps_and_keeps_exact_frames(long_clip, monkeypatch):
  base = dict(num_frames=4, image_size=56, patch_size=14, budget=0.5, seek_min_gap=2.0)
  seen = _count_decoded(monkeypatch)
  rec = clip.patchify_file(long_clip, config.PatchifyConfig(**base).validate(), with_scores=True)
  idx = selection.sample_indices(N_LONG, 4)  # 50, 150, 250, 350
  assert set(idx.tolist()) <= set(seen)
  assert len(seen) < 0.5 * (idx[-1] + 1), len(seen)  # 1 s windows, not every frame
  assert seen == sorted(seen) and len(set(seen)) == len(seen)
  _check_pixels(long_clip, rec, 4)
  assert (rec["grid_scores"].reshape(4, -1).max(1) > 0).all()  # every slot still scored
  seen.clear()
  never = clip.patchify_file(long_clip, config.PatchifyConfig(seek="never", **base).validate())
  assert seen == list(range(idx[-1] + 1))
  np.testing.assert_array_equal(never["frame_indices"], rec["frame_indices"])


def test_variable_frame_rate_falls_back_to_decoding_everything(tmp_path, monkeypatch):
  path = str(tmp_path / "vfr.mp4")
  pts = np.cumsum([0] + [40, 40, 80, 20] * 50)[:200]
  md.encode_clip(path, _frames(200), pts_ms=pts, gop=FPS)
  seen = _count_decoded(monkeypatch)
  cfg = config.PatchifyConfig(num_frames=4, image_size=56, patch_size=14, budget=0.5,
                          seek_min_gap=1.0).validate()
  rec = clip.patchify_file(path, cfg)
  last = int(selection.sample_indices(200, 4)[-1])
  assert seen[-(last + 1):] == list(range(last + 1))  # the run that produced the record
  _check_pixels(path, rec, 4)


def test_decode_timeout_scales_with_duration(long_clip, tmp_path):
  assert decode.media_duration(long_clip) == pytest.approx(N_LONG / FPS, abs=0.05)
  assert worker.scaled_timeout(600, 30) == 600 and worker.scaled_timeout(600, 600) == 6000
  png = tmp_path / "x.png"
  png.write_bytes(b"not read")
  assert decode.media_duration(str(png)) == 0.0
  assert decode.media_duration(str(tmp_path / "missing.mp4")) == 0.0


def test_resized_and_odd_sized_video_patches_match_independent_decode(tmp_path):
  frames, _ = codec_clips.square_frames(n=6, size=64)
  path = str(tmp_path / "odd.mp4")
  # 45x33 yuv444p: odd sides, upscaled and stretched to 56x56, uneven patch bins.
  md.encode_clip(path, frames[:, :33, :45].copy(), gop=4, pix_fmt="yuv444p")
  cfg = config.PatchifyConfig(budget=0.5, num_frames=4, image_size=56, patch_size=14).validate()
  rec = clip.patchify_file(path, cfg)
  assert rec["positions"].shape[0] == round(0.5 * 4 * 16)
  dec = codec_clips.decode_rgb(path, size=56)
  idx = selection.sample_indices(6, 4)
  for (t, h, w), patch in zip(rec["positions"], rec["patches"]):
    np.testing.assert_array_equal(patch, dec[idx[t]][h * 14:(h + 1) * 14, w * 14:(w + 1) * 14])


def test_short_video_repeats_frames(tmp_path):
  frames, _ = codec_clips.square_frames(n=5)
  path = str(tmp_path / "short.mp4")
  md.encode_clip(path, frames)
  cfg = config.PatchifyConfig(num_frames=8, image_size=S, patch_size=P, budget=1.0).validate()
  rec = clip.patchify_file(path, cfg)
  np.testing.assert_array_equal(selection.sample_indices(5, 8), [0, 0, 1, 2, 2, 3, 4, 4])
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
  cfg = config.PatchifyConfig(num_frames=2, image_size=56, patch_size=14, budget=1.0).validate()
  rec = clip.patchify_file(path, cfg)
  img = rec["patches"][:16].reshape(4, 4, 14, 14, 3).transpose(0, 2, 1, 3, 4).reshape(56, 56, 3)
  # 90 degrees counter-clockwise: the coded top-left corner ends up bottom-left.
  assert img[-8:, :8].mean() > 200 and img[:8, :8].mean() < 50 and img[-8:, -8:].mean() < 50


def test_variable_frame_rate_samples_by_frame_index(tmp_path):
  frames, _ = codec_clips.square_frames(n=12)
  path = str(tmp_path / "vfr.mp4")
  md.encode_clip(path, frames, pts_ms=np.cumsum([0] + [10, 80, 33, 200] * 3)[:12])
  cfg = config.PatchifyConfig(num_frames=4, image_size=S, patch_size=P, budget=1.0).validate()
  rec = clip.patchify_file(path, cfg)
  dec = codec_clips.decode_rgb(path)
  assert len(dec) == 12
  for t, i in enumerate(selection.sample_indices(12, 4)):
    np.testing.assert_array_equal(rec["patches"][t * G * G], dec[i][:P, :P])


@pytest.mark.parametrize("codec,ext,transcode,signal", [
    ("libx264", "mkv", "auto", "mv+residual"),  # B-frames; MKV has no frame count header
    ("libvpx-vp9", "webm", "never", "frame_diff"),  # FFmpeg exports no VP9 vectors
    ("libvpx-vp9", "webm", "auto", "transcode+mv+residual"),  # ... so they are re-encoded
])
def test_other_codecs_and_containers(tmp_path, codec, ext, transcode, signal):
  frames, _ = codec_clips.square_frames(n=12, size=64, step=(1, 2))
  path = str(tmp_path / f"clip.{ext}")
  with av.open(path, "w") as c:
    s = c.add_stream(codec, rate=25)
    s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
    for f in frames:
      for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
        c.mux(pkt)
    for pkt in s.encode():
      c.mux(pkt)
  cfg = config.PatchifyConfig(num_frames=8, image_size=56, patch_size=14, budget=0.25,
                          transcode=transcode).validate()
  rec = clip.patchify_file(path, cfg)
  assert rec["signal"] == signal and rec["positions"].shape[0] == 32
  if codec == "libx264":
    assert "B" in rec["frame_types"]
  dec = codec_clips.decode_rgb(path, size=56)
  idx = selection.sample_indices(12, 8)
  for (t, h, w), patch in zip(rec["positions"], rec["patches"]):
    np.testing.assert_array_equal(patch, dec[idx[t]][h * 14:(h + 1) * 14, w * 14:(w + 1) * 14])


def test_header_over_count_is_replanned_on_the_true_count(square_clip, monkeypatch):
  cfg = config.PatchifyConfig(budget=0.125, num_frames=8, image_size=S, patch_size=P).validate()
  want = clip.patchify_file(square_clip[0], cfg)
  real = decode.declared_frames
  monkeypatch.setattr(decode, "declared_frames", lambda container, path: real(container, path) + 7)
  got = clip.patchify_file(square_clip[0], cfg)
  np.testing.assert_array_equal(got["positions"], want["positions"])
  np.testing.assert_array_equal(got["patches"], want["patches"])


def test_resolution_change_mid_stream_is_an_input_error(tmp_path):
  parts = []
  for i, size in enumerate((64, 48)):
    frames, _ = codec_clips.square_frames(n=4, size=64)
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
  cfg = config.PatchifyConfig(num_frames=8, image_size=28, patch_size=14).validate()
  with pytest.raises(config.InputError, match="frame size changes mid-stream"):
    clip.patchify_file(path, cfg)


@pytest.fixture(scope="module")
def motion_clips(tmp_path_factory):
  return codec_clips.motion_clips(tmp_path_factory.mktemp("motion"), ("travel",))


@pytest.mark.parametrize("codec,ext", [("libx265", "mkv"), ("libvpx-vp9", "webm"),
                                       ("libsvtav1", "mkv")])
def test_codecs_without_vectors_are_transcoded(tmp_path, codec, ext, motion_clips):
  _, boxes = motion_clips["travel"]
  with av.open(motion_clips["travel"][0]) as c:
    frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
  path = str(tmp_path / f"clip.{ext}")
  codec_clips.encode(path, frames, codec, {"x265-params": "log-level=error"} if codec == "libx265" else {})
  base = dict(budget=0.125, num_frames=T, image_size=S, patch_size=P, iframe="scored")
  never = clip.patchify_file(path, config.PatchifyConfig(transcode="never", **base).validate())
  assert never["signal"].startswith("frame_diff")
  rec = clip.patchify_file(path, config.PatchifyConfig(**base).validate())  # --transcode auto
  assert rec["signal"] == "transcode+mv+residual"
  assert rec["codec"] == {"libx265": "hevc", "libvpx-vp9": "vp9", "libsvtav1": "av1"}[codec]
  assert codec_clips.kept_on(rec["positions"], boxes, "travel") >= 0.8 * 64
  # Patches are the source's pixels, not the re-encoded ones.
  with av.open(path) as c:
    dec = [f.to_ndarray(format="rgb24", width=S, height=S, interpolation="AREA")
           for f in c.decode(video=0)]
  for (t, h, w), patch in zip(rec["positions"], rec["patches"]):
    np.testing.assert_array_equal(patch, dec[IDX[t]][h * P:(h + 1) * P, w * P:(w + 1) * P])


def test_transcode_always_on_h264_and_config_errors(motion_clips):
  path, boxes = motion_clips["travel"]
  cfg = config.PatchifyConfig(budget=0.125, num_frames=T, image_size=S, patch_size=P,
                          iframe="scored", transcode="always").validate()
  rec = clip.patchify_file(path, cfg)
  assert rec["signal"] == "transcode+mv+residual" and rec["codec"] == "h264"
  assert codec_clips.kept_on(rec["positions"], boxes, "travel") >= 0.8 * 64
  for key, value in [("transcode", "sometimes"), ("iframe", "drop"), ("seek", "maybe"),
                     ("tie_seed", -1)]:
    with pytest.raises(ValueError, match=f"config {key}="):
      config.PatchifyConfig(**{key: value}).validate()


def test_auto_transcodes_an_h264_stream_without_vectors(tmp_path, motion_clips):
  with av.open(motion_clips["travel"][0]) as c:
    frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
  path = str(tmp_path / "intra.mp4")
  codec_clips.encode(path, frames, options={"g": "1"})  # all-intra H.264: no frame exports vectors
  base = dict(budget=0.125, num_frames=T, image_size=S, patch_size=P, iframe="scored")
  assert clip.patchify_file(path, config.PatchifyConfig(transcode="never", **base).validate())[
      "signal"].startswith("frame_diff")
  rec = clip.patchify_file(path, config.PatchifyConfig(**base).validate())
  assert rec["signal"] == "transcode+mv+residual" and rec["codec"] == "h264"
  assert codec_clips.kept_on(rec["positions"], motion_clips["travel"][1], "travel") >= 0.8 * 64
