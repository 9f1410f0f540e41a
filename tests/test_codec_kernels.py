"""The compiled per-frame signal (data_prep/codec/kernels.py) against the numpy path of
signals.FrameSignals on decoded frames: P-only and B-frame H.264, frames without vectors,
busy frames, quarter turns, a strided lattice, uneven patch bins, decoder line padding."""
import av
import numpy as np
import pytest

from data_prep.codec import clip, config, decode, signals
from tests.helpers import codec_clips


def _decode(path):
  """[(luma rows [H, line_size] as the decoder hands them, vectors, picture type)]."""
  out = []
  with av.open(path) as c:
    st = c.streams.video[0]
    st.thread_type = "NONE"
    st.codec_context.options = {"flags2": "+export_mvs"}
    for f in c.decode(st):
      sd = f.side_data.get("MOTION_VECTORS")
      out.append((decode.luma_rows(f).copy(), None if sd is None else decode.read_vectors(sd).copy(),
                  "?IPB"[int(f.pict_type)]))
  return out


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
  d = tmp_path_factory.mktemp("kernels")
  out = {}
  frames = codec_clips.pan_and_square(n=40, size=128)
  out["p_only"] = str(d / "p.mp4")
  codec_clips.encode(out["p_only"], frames, options={"bf": "0", "g": "20"})
  out["b_frames"] = str(d / "b.mp4")
  codec_clips.encode(out["b_frames"], frames, options={"bf": "3", "b-pyramid": "none", "refs": "1",
                                            "g": "20"})
  # 100 x 120: not a multiple of 16, so edge cells hold fewer lattice points (weighted motion
  # percentile), patch bins are uneven, and the decoder pads each line beyond 120.
  out["odd_size"] = str(d / "odd.mp4")
  codec_clips.encode(out["odd_size"], frames[:, :100, :120], options={"bf": "2", "g": "12"})
  # 256 px for a 128 px lattice: stride 2.
  big = np.repeat(np.repeat(frames[:24], 2, axis=1), 2, axis=2)
  out["stride_2"] = str(d / "big.mp4")
  codec_clips.encode(out["stride_2"], big, options={"bf": "0", "g": "12"})
  return {k: (v, _decode(v)) for k, v in out.items()}


def _pairs(frames):
  """(cur, past, vectors, future or None, zero_motion) per frame, with the references the
  IntervalScorer uses: last I/P frame for P, last I/P and next I/P for B."""
  anchors = [i for i, f in enumerate(frames) if f[2] != "B"]
  out = []
  for n in range(1, len(frames)):
    luma, mvs, kind = frames[n]
    past = max((a for a in anchors if a < n), default=n - 1)
    if kind == "B":
      nxt = min((a for a in anchors if a > n), default=None)
      out.append((luma, frames[past][0], mvs, None if nxt is None else frames[nxt][0], False))
    elif mvs is None:
      out.append((luma, frames[n - 1][0], None, None, kind == "I"))
    else:
      out.append((luma, frames[past][0], mvs, None, False))
  return out


CASES = [("p_only", 0, {}), ("b_frames", 0, {}), ("b_frames", 1, {}), ("b_frames", 2, {}),
         ("b_frames", 3, {"fusion": "sum", "motion_weight": 2.0, "residual_weight": 0.5}),
         ("p_only", 0, {"motion_weight": 0.0}), ("p_only", 1, {"residual_weight": 0.0}),
         ("odd_size", 0, {}), ("odd_size", 1, {}), ("stride_2", 0, {})]


@pytest.mark.parametrize("name,rot_k,opts", CASES)
def test_kernel_matches_numpy_path(clips, name, rot_k, opts):
  path, frames = clips[name]
  h, w = frames[0][0].shape[0], av.open(path).streams.video[0].codec_context.width
  size = 128
  cfg = config.PatchifyConfig(image_size=size if name != "odd_size" else 96, patch_size=16
                          if name != "odd_size" else 12, **opts).validate()
  fast = signals.FrameSignals(cfg, h, w, rot_k)
  ref = signals.FrameSignals(cfg, h, w, rot_k, compiled=False)
  assert fast.compiled and not ref.compiled
  assert fast.stride == (2 if name == "stride_2" else 1)
  if name == "odd_size":
    assert frames[0][0].shape[1] > w  # line padding reaches the kernel
  kinds = {"mv": 0, "future": 0, "frame_diff": 0}
  for cur, past, mvs, fut, zero in _pairs(frames):
    got, used = fast.scores(cur, past, mvs, fut, zero_motion=zero)
    want, want_used = ref.scores(cur[:, :w], past[:, :w], mvs,
                                 None if fut is None else fut[:, :w], zero_motion=zero)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert used == want_used
    kinds["mv" if mvs is not None and len(mvs) else "frame_diff"] += 1
    kinds["future"] += fut is not None and mvs is not None and bool((mvs["source"] > 0).any())
  assert kinds["mv"] >= 10 and kinds["frame_diff"] >= 1
  if name == "b_frames":
    assert kinds["future"] >= 8


def test_busy_frames_and_weighted_motion_percentile():
  """Frames where more than 5% of the residual / motion mass lies above the floor take the
  percentile paths (bisection over levels; weighted quickselect)."""
  rng = np.random.default_rng(0)
  h, w = 100, 120
  cfg = config.PatchifyConfig(image_size=96, patch_size=12).validate()
  fast, ref = signals.FrameSignals(cfg, h, w), signals.FrameSignals(cfg, h, w, compiled=False)
  cur = rng.integers(0, 256, (h, w), dtype=np.uint8)
  prev = rng.integers(0, 256, (h, w), dtype=np.uint8)
  # Random 8x8 vectors over the frame (partial cells at the bottom/right edges).
  ys, xs = np.meshgrid(np.arange(0, h, 8), np.arange(0, w, 8), indexing="ij")
  mvs = np.zeros(ys.size, decode.MV_DTYPE)
  mvs["source"], mvs["w"], mvs["h"] = -1, 8, 8
  mvs["dst_x"], mvs["dst_y"] = xs.ravel() + 4, ys.ravel() + 4
  mvs["motion_x"] = rng.integers(-40, 40, ys.size)
  mvs["motion_y"] = rng.integers(-40, 40, ys.size)
  mvs["motion_scale"] = 4
  for m in (None, mvs):
    got, _ = fast.scores(cur, prev, m)
    want, _ = ref.scores(cur, prev, m)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  assert signals.norm_scale(np.abs(cur.astype(int) - prev).astype(np.uint8), 16) > 16  # busy


def test_patchify_same_record_either_path(clips, monkeypatch):
  path = clips["b_frames"][0]
  cfg = config.PatchifyConfig(num_frames=8, image_size=128, patch_size=16).validate()
  fast = clip.patchify_file(path, cfg, with_scores=True)
  monkeypatch.setattr(signals.FrameSignals, "COMPILED", False)
  slow = clip.patchify_file(path, cfg, with_scores=True)
  np.testing.assert_array_equal(fast["positions"], slow["positions"])
  np.testing.assert_allclose(fast["scores"], slow["scores"], rtol=1e-12, atol=1e-12)
  assert fast["signal"] == slow["signal"]
