"""Per-video scoring (data_prep.codec.scoring) on generated clips: B-frame references, motion
between samples, I-frame rules, ties, --interval_frames, the static fallback, --iframe keep."""
import dataclasses

import av
import numpy as np
import pytest

from data_prep import make_demo_data as md
from data_prep.codec import clip, config, decode, scoring, selection, signals
from tests.helpers import codec_clips
from tests.helpers.codec_clips import G, IDX, N, P, S, T


@pytest.fixture(scope="module")
def static_clip(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("st") / "static.mp4")
  bg = md.textured_background(np.random.default_rng(3), S, S)
  md.encode_clip(path, np.repeat(np.rint(bg).astype(np.uint8)[None], 16, 0), gop=8)
  return path


@pytest.fixture(scope="module")
def motion_clips(tmp_path_factory):
  return codec_clips.motion_clips(tmp_path_factory.mktemp("motion"))


def test_b_frame_vectors_are_warped_from_their_reference(tmp_path, monkeypatch):
  path = str(tmp_path / "bframes.mp4")
  codec_clips.encode(path, codec_clips.pan_and_square(), options={"bf": "3", "b-pyramid": "none", "refs": "1",
                                            "g": "24"})
  # Independent decode: display-order luma and picture types.
  with av.open(path) as c:
    frames = [(decode.luma_plane(f).copy(), "?IPB"[int(f.pict_type)]) for f in c.decode(video=0)]
  types = "".join(t for _, t in frames)
  assert types.count("B") >= 15 and types.count("P") >= 15, types
  seen = {}
  real_maps = signals.FrameSignals.maps

  def spy(self, cur, prev, mvs, future=None):
    out = real_maps(self, cur, prev, mvs, future)
    if mvs is not None:
      seen[cur.tobytes()] = float(out[1].mean())
    return out

  monkeypatch.setattr(signals.FrameSignals, "maps", spy)
  monkeypatch.setattr(signals.FrameSignals, "COMPILED", False)  # the maps of the numpy path
  cfg = config.PatchifyConfig(num_frames=8, image_size=S, patch_size=P).validate()
  rec = clip.patchify_file(path, cfg)
  assert rec["signal"] == "mv+residual+frame_diff"  # the I-frame at 24: frame difference
  wins = {"P": [], "B": []}
  for n in range(1, int(selection.sample_indices(len(frames), 8)[-1]) + 1):  # decoded up to the last sample
    luma, kind = frames[n]
    if kind in wins:
      assert luma.tobytes() in seen, f"frame {n} ({kind}) was not scored"
      diff = np.abs(luma.astype(int) - frames[n - 1][0]).mean()
      wins[kind].append(seen[luma.tobytes()] < diff)
  for kind, w in wins.items():
    assert np.mean(w) >= 0.9, (kind, np.mean(w), len(w))


def test_motion_between_samples_is_seen(motion_clips):
  cfg = config.PatchifyConfig(budget=0.125, num_frames=T, image_size=S, patch_size=P,
                          iframe="scored").validate()
  k = cfg.num_keep()
  path, boxes = motion_clips["travel"]
  rec = clip.patchify_file(path, cfg)
  # Every sampled frame has zero motion: scoring the sampled frames alone would fall back to static.
  assert "static_fallback" not in rec["signal"]
  assert codec_clips.kept_on(rec["positions"], boxes, "travel") >= 0.9 * k
  path, boxes = motion_clips["jitter"]
  rec = clip.patchify_file(path, cfg)
  assert codec_clips.kept_on(rec["positions"], boxes, "jitter") >= 0.7 * k  # alone, it is still seen
  # Both in one clip: the object that really travels wins.
  path, boxes = motion_clips["both"]
  rec = clip.patchify_file(path, cfg)
  travel, jitter = (codec_clips.kept_on(rec["positions"], boxes, w) for w in ("travel", "jitter"))
  assert travel >= 2 * jitter and travel >= 0.6 * k, (travel, jitter)


def test_interval_scores_are_means_of_per_frame_scores(motion_clips):
  """IntervalScorer against a direct loop: per-frame FrameSignals.scores (P-only clip: the
  reference is the previous frame), averaged over (idx[t-1], idx[t]]."""
  path, _ = motion_clips["both"]
  cfg = config.PatchifyConfig(budget=0.125, num_frames=T, image_size=S, patch_size=P,
                          iframe="scored").validate()
  rec = clip.patchify_file(path, cfg, with_scores=True)
  decoded = codec_clips.real_frames(path)
  sig = signals.FrameSignals(cfg, S, S)
  per_frame = [None] + [sig.scores(decoded[n][0], decoded[n - 1][0], decoded[n][1],
                                   zero_motion=decoded[n][2] == 1)[0] for n in range(1, N)]
  for t in range(T):
    lo = IDX[t - 1] + 1 if t else 1
    want = np.mean([per_frame[n] for n in range(lo, IDX[t] + 1)], axis=0)
    np.testing.assert_allclose(rec["grid_scores"][t], want, rtol=1e-12, atol=1e-12)
  np.testing.assert_array_equal(rec["frame_indices"], IDX)
  np.testing.assert_allclose(rec["timestamps"], IDX / 25.0)
  assert rec["fps"] == 25.0 and rec["codec"] == "h264"
  pos = rec["positions"]
  np.testing.assert_array_equal(rec["scores"], rec["grid_scores"][pos[:, 0], pos[:, 1],
                                                                  pos[:, 2]].astype(np.float16))


def test_scene_cut_i_frame_is_scored_as_zero_motion(tmp_path):
  rng = np.random.default_rng(0)
  bgs = [md.textured_background(rng, S, S), md.textured_background(rng, S, S)[::-1] * 0.6 + 80]
  sq = rng.uniform(0, 255, (6, 6, 3)).repeat(4, 0).repeat(4, 1)
  frames = []
  for n in range(N):
    f = bgs[n >= 27].copy()
    f[40:64, 8 + 2 * (n % 24):32 + 2 * (n % 24)] = sq
    frames.append(f)
  path = str(tmp_path / "cut.mp4")
  md.encode_clip(path, np.clip(np.rint(np.stack(frames)), 0, 255).astype(np.uint8), gop=27)
  cfg = config.PatchifyConfig(budget=0.125, num_frames=T, image_size=S, patch_size=P,
                          iframe="scored").validate()
  rec = clip.patchify_file(path, cfg)
  assert rec["frame_types"][4] == "I"  # the cut (frame 27) is the sampled frame of slot 4
  # Scored by its frame difference alone the cut would take most of K; as zero motion it gets its
  # share.
  assert np.sum(rec["positions"][:, 0] == 4) <= 0.3 * 64
  # Same scale: under mean fusion the I-frame scores half its normalised frame difference.
  with av.open(path) as c:
    lumas = [decode.luma_plane(f).copy() for f in c.decode(video=0)]
  sig = signals.FrameSignals(cfg, S, S)
  alone, _ = sig.scores(lumas[27], lumas[26], None)
  scaled, _ = sig.scores(lumas[27], lumas[26], None, zero_motion=True)
  np.testing.assert_allclose(scaled, alone / 2, rtol=1e-12)
  # --iframe keep: t=0 whole (K = 2 frames here), the rest by score.
  keep = clip.patchify_file(path, config.PatchifyConfig(budget=0.25, num_frames=T, image_size=S,
                                                  patch_size=P).validate())
  assert np.sum(keep["positions"][:, 0] == 0) == G * G
  assert np.sum(keep["positions"][:, 0] == 4) <= 0.3 * 64


def test_flat_pan_ties_do_not_fill_the_first_frame(tmp_path):
  big = md.textured_background(np.random.default_rng(5), S, S + 4 * N)
  frames = np.stack([big[:, 4 * n:4 * n + S] for n in range(N)])  # exactly 4 px per frame
  path = str(tmp_path / "pan.mp4")
  md.encode_clip(path, np.clip(np.rint(frames), 0, 255).astype(np.uint8), gop=N, crf=0)
  cfg = config.PatchifyConfig(budget=0.25, num_frames=T, image_size=S, patch_size=P,
                          iframe="scored").validate()
  rec = clip.patchify_file(path, cfg, with_scores=True)
  sc = rec["grid_scores"]
  kth = np.sort(sc.reshape(-1))[::-1][cfg.num_keep() - 1]
  tied_frames = {int(t) for t in np.nonzero(sc == kth)[0]}
  assert len(tied_frames) >= 2  # the tie at the cut spans several frames...
  per_t = np.bincount(rec["positions"][:, 0], minlength=T)
  assert per_t[0] < G * G, per_t  # ...and does not fill t=0 in raster order
  again = clip.patchify_file(path, cfg)
  np.testing.assert_array_equal(again["positions"], rec["positions"])


def test_interval_frames_limits_the_frames_scored(motion_clips, monkeypatch):
  path, boxes = motion_clips["both"]
  base = dict(budget=0.125, num_frames=T, image_size=S, patch_size=P, iframe="scored")
  scored = []
  real = scoring.IntervalScorer._score

  def spy(self, n, *a, **k):
    before = self.counts.sum()
    real(self, n, *a, **k)
    if self.counts.sum() > before:
      scored.append(n)

  monkeypatch.setattr(scoring.IntervalScorer, "_score", spy)
  one = clip.patchify_file(path, config.PatchifyConfig(interval_frames=1, **base).validate(),
                         with_scores=True)
  assert sorted(scored) == IDX.tolist()  # only the sampled frames
  # The jittering square moves exactly at the sampled frames, so it wins when only they count.
  travel, jitter = (codec_clips.kept_on(one["positions"], boxes, w) for w in ("travel", "jitter"))
  assert jitter > travel
  scored.clear()
  clip.patchify_file(path, config.PatchifyConfig(interval_frames=3, **base).validate())
  want = sorted({int(v) for a, b in zip([0] + (IDX[:-1] + 1).tolist(), IDX.tolist())
                 for v in np.rint(np.linspace(b, a, 3))} - {0})  # frame 0 has no reference
  assert sorted(scored) == want
  with pytest.raises(ValueError, match="config interval_frames="):
    config.PatchifyConfig(interval_frames=-1).validate()


@pytest.mark.parametrize("options", [{"bf": "0", "g": "12"},
                                     {"bf": "3", "b-pyramid": "none", "refs": "1", "g": "12"}])
def test_free_between_samples_scores_only_the_sampled_frames(tmp_path, options):
  """The benchmark counterfactual free_between_samples (bench_codec's (c0)) reads every frame as the
  default does but scores only the sampled ones: its records are --interval_frames 1's, and not the
  default's."""
  path = str(tmp_path / "c.mp4")
  codec_clips.encode(path, codec_clips.pan_and_square(n=40, size=128), options=options)
  cfg = config.PatchifyConfig(image_size=128, patch_size=16, num_frames=4, budget=0.25).validate()
  free = clip.process_path(path, -1, cfg, free_between_samples=True)
  assert free[0] == "ok"
  assert free[1] == clip.process_path(path, -1, dataclasses.replace(cfg, interval_frames=1))[1]
  assert free[1] != clip.process_path(path, -1, cfg)[1]


def test_keep_first_frame(square_clip):
  cfg = config.PatchifyConfig(budget=0.125, num_frames=16, image_size=S, patch_size=P,
                          iframe="keep").validate()
  rec = clip.patchify_file(square_clip[0], cfg, with_scores=True)
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
  small = config.PatchifyConfig(budget=0.1, num_frames=16, image_size=S, patch_size=P).validate()
  assert small.iframe == "keep" and not small.keep_first_frame


def test_static_fallback_keeps_uniform_whole_frames(static_clip):
  base = dict(num_frames=16, image_size=S, patch_size=P)
  base = dict(base, iframe="scored")
  rec = clip.patchify_file(static_clip, config.PatchifyConfig(budget=0.125, **base).validate())
  assert rec["signal"].endswith("static_fallback")
  frames = {t: np.sum(rec["positions"][:, 0] == t) for t in np.unique(rec["positions"][:, 0])}
  assert frames == {4: 64, 12: 64}  # K = 2 frames, centred at 1/4 and 3/4 of the clip
  rec = clip.patchify_file(static_clip, config.PatchifyConfig(budget=0.125, **dict(
      base, iframe="keep")).validate())
  frames = {t: np.sum(rec["positions"][:, 0] == t) for t in np.unique(rec["positions"][:, 0])}
  assert frames == {0: 64, 8: 64}
  rec = clip.patchify_file(static_clip, config.PatchifyConfig(budget=0.1, **base).validate())
  pos = rec["positions"]
  assert pos.shape[0] == 102  # round(0.1 * 1024): one whole frame + 38 spread over another
  assert np.sum(pos[:, 0] == 4) == 64 and np.sum(pos[:, 0] == 12) == 38
  spread = pos[pos[:, 0] == 12]
  assert len(np.unique(spread[:, 1])) == G  # spread over every row, not the top rows
  # Without the fallback: plain top-K. Only the I-frame (t=8, frame difference = re-encoding
  # noise) scores above 0; the other picks are ties, resolved by the seeded random order.
  rec = clip.patchify_file(static_clip, config.PatchifyConfig(budget=0.125, static_fallback=False,
                                                        **base).validate(), with_scores=True)
  assert "static_fallback" not in rec["signal"]
  sc = rec["grid_scores"].reshape(-1)
  assert np.count_nonzero(sc) == np.count_nonzero(sc[8 * 64:9 * 64]) > 0
  rank = selection.tie_order((0, rec["sample_id"]), sc.size)
  want = sorted(sorted(range(sc.size), key=lambda i: (-sc[i], rank[i]))[:128])
  got = [(t * G + h) * G + w for t, h, w in rec["positions"]]
  assert got == want and len(set(rec["positions"][:, 0].tolist())) > 8  # ties spread over T


def test_moving_clip_does_not_trigger_static_fallback(square_clip):
  rec = clip.patchify_file(square_clip[0], config.PatchifyConfig(image_size=S, patch_size=P).validate())
  assert "static_fallback" not in rec["signal"]
