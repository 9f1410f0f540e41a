"""--score_on reencode: score a fresh P-only encode of just the sampled frames (GOP 16), keyframes zeroed."""
import numpy as np

from data_prep.codec import decode
from data_prep.codec.config import PatchifyConfig
from data_prep.codec.scoring import IntervalScorer

# The published pipeline's re-encode: a keyframe every 16 frames, P-frames between, crf 23.
GOP, CRF = 16, 23


def reencode_scores(frames, cfg: PatchifyConfig, rot_k: int):
  """The T sampled frames (display order) -> (scores [T, G, G], slots with vectors, signal tokens).

  The frames are resized to the grid's side and encoded anew as P-only H.264 with a keyframe every
  GOP frames; each re-encoded frame is scored against the one before it from that encode's motion
  vectors and residuals, and keyframes score 0, so the top-K is global over the P-frames. H.264,
  not HEVC: FFmpeg exports motion vectors of H.264 but not of HEVC.
  """
  t = len(frames)
  s = cfg.image_size
  scorer = IntervalScorer(cfg, np.arange(t), s, s, rot_k)
  encoder = decode.Transcoder(s, cfg.resize_interpolation, crf=CRF, gop=GOP)
  keyframes = []
  for i, frame in enumerate(frames):
    out = encoder.push(frame, i)
    out += encoder.flush() if i == t - 1 else []
    for m, coded, mvs in out:
      if decode.picture_type(coded) == "I":
        keyframes.append(m)
      scorer.add(m, coded, mvs)
  scores, has_mvs, tokens = scorer.finish()
  scores[keyframes] = 0.0
  return scores, has_mvs, tokens | {"transcode"}
