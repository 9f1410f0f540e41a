"""data_prep.visualize re-decodes only the sampled frames, streaming, for format-1 and -2 records."""
import av
import numpy as np

from data_prep.codec import clip, config, decode
from data_prep.codec.selection import sample_indices
from data_prep import make_demo_data as md
from data_prep import visualize


def test_source_frames_stream_v1_and_v2(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  frames = np.clip(rng.normal(128, 40, (30, 48, 64, 3)), 0, 255).astype(np.uint8)
  path = str(tmp_path / "clip.mp4")
  md.encode_clip(path, frames, rotation=90)
  cfg = config.PatchifyConfig(num_frames=6, image_size=56, patch_size=14, budget=0.5).validate()
  rec = clip.patchify_file(path, cfg)
  with av.open(path) as c:  # independent: every frame decoded, then indexed
    dec = [np.rot90(f.to_ndarray(format="rgb24", width=56, height=56, interpolation="AREA"), 1)
           for f in c.decode(video=0)]
  want = np.stack([dec[i] for i in sample_indices(30, 6)])
  calls = []
  real = decode.to_rgb
  monkeypatch.setattr(decode, "to_rgb", lambda *a: calls.append(1) or real(*a))
  np.testing.assert_array_equal(visualize.source_frames(rec), want)
  assert len(calls) == 6  # only the sampled frames are converted and held
  v1 = {k: v for k, v in rec.items() if k != "frame_indices"}  # format 1: indices unknown
  np.testing.assert_array_equal(visualize.source_frames(v1), want)
  # Kept patches line up with the re-decoded frames.
  for (t, h, w), patch in zip(rec["positions"], rec["patches"]):
    np.testing.assert_array_equal(patch, want[t, h * 14:(h + 1) * 14, w * 14:(w + 1) * 14])
  # Indices past the end of the stream: unreadable, not an error.
  late = dict(rec, frame_indices=np.asarray([0, 5, 10, 15, 20, 99], np.int32))
  assert visualize.source_frames(late) is None
