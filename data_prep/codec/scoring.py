"""Per-video scoring: frame scores averaged per sampling interval, then K patches selected."""
import bisect

import numpy as np

from data_prep.codec import decode
from data_prep.codec.config import InputError, PatchifyConfig
from data_prep.codec.selection import select_top_k, static_selection
from data_prep.codec.signals import FrameSignals, percentile95


class IntervalScorer:
  """Scores every decoded frame against the frame(s) it references and averages the scores over
  each sampling interval: slot t collects frames (idx[t-1], idx[t]] (slot 0: [0, idx[0]]).

  Frames arrive in display order. A P-frame's vectors reference the last I/P frame; a B-frame
  waits for the next I/P frame, its future reference. The first frame has no reference and no
  score. Slots that repeat a frame (clips shorter than T) copy the score of its first slot.

  `free_between_samples` is a benchmark counterfactual, not an option of the job: every frame is
  still decoded, its vectors read and queued as by default, but only the sampled frames are
  scored, as if scoring the frames between samples cost nothing. With interval_frames 0 (the
  default) its records equal interval_frames 1's, and its speed bounds any rule that scores every
  decoded frame.
  """

  def __init__(self, cfg: PatchifyConfig, idx: np.ndarray, height: int, width: int, rot_k: int,
               free_between_samples: bool = False):
    g = cfg.grid_side
    self.idx = np.asarray(idx)
    self.idx_list = self.idx.tolist()
    self.signals = FrameSignals(cfg, height, width, rot_k)
    self.sums = np.zeros((len(idx), g, g), np.float64)
    self.counts = np.zeros(len(idx), np.int64)
    self.has_mvs = np.zeros(len(idx), bool)
    self.tokens = set()
    self.past = self.prev = None  # last I/P frame, previous displayed frame
    self.pending = []  # B-frames waiting for their future reference: (index, frame, vectors)
    self.scored = None  # None: every frame; else the frame indices that are scored
    self.sampled_only = set(self.idx_list) if free_between_samples else None
    # Frames are scored in batches after decoding them: interleaving numpy work with each
    # decode evicts the decoder's caches and slows the decode down. A batch is capped in frames
    # and in bytes.
    self.queue = []
    self.batch = int(max(1, min(32, (32 << 20) // max(1, width * height * 3 // 2))))
    if cfg.interval_frames:
      # The sampled frame and up to interval_frames - 1 more, evenly spaced back over its interval.
      lo = np.concatenate([[0], self.idx[:-1] + 1])
      self.scored = set()
      for a, b in zip(lo.tolist(), self.idx.tolist()):
        if b >= a:
          self.scored.update(np.rint(np.linspace(b, a, min(cfg.interval_frames, b - a + 1)))
                             .astype(int).tolist())

  def wants(self, n: int) -> bool:
    """Whether frame n is scored (its vectors are needed)."""
    return self.scored is None or n in self.scored

  def add(self, n: int, frame, mvs) -> None:
    """Frame n (display order) with its vectors (None: none exported)."""
    if (frame.width, frame.height) != (self.signals.width, self.signals.height):
      raise InputError(f"frame size changes mid-stream ({self.signals.width}x"
                       f"{self.signals.height} -> {frame.width}x{frame.height})")
    self.queue.append((n, frame, mvs))
    if len(self.queue) >= self.batch:
      self._drain()

  def _drain(self):
    for item in self.queue:
      self._add(*item)
    self.queue.clear()

  def _add(self, n, frame, mvs):
    kind = decode.picture_type(frame)
    wanted = self.wants(n)  # unwanted frames only serve as references of later ones
    luma = decode.luma_rows(frame)  # references are kept as their luma (a view of the frame)
    if wanted and kind == "B" and mvs is not None and (mvs["source"] > 0).any():
      self.pending.append((n, luma, mvs))
    else:
      if kind != "B":
        self._resolve(luma)
      if not wanted:
        pass
      elif mvs is None or len(mvs) == 0:
        # No vectors (I-frame, or a codec that exports none): difference to the last frame shown.
        self._score(n, luma, self.prev, None, zero_motion=kind == "I")
      else:
        self._score(n, luma, self.past if self.past is not None else self.prev, mvs)
      if kind != "B":
        self.past = luma
    self.prev = luma

  def restart(self) -> None:
    """After a seek: frames decoded next do not follow the ones before."""
    self._drain()
    self._resolve(None)
    self.past = self.prev = None

  def _resolve(self, future):
    for n, luma, mvs in self.pending:
      self._score(n, luma, self.past, mvs, future)
    self.pending.clear()

  def _score(self, n, luma, ref, mvs, future=None, zero_motion=False):
    if ref is None or (self.scored is not None and n not in self.scored):
      return
    if self.sampled_only is not None and n not in self.sampled_only:
      return
    slot = bisect.bisect_left(self.idx_list, n)
    used = self.signals.accumulate(self.sums[slot], luma, ref, mvs, future, zero_motion)
    self.counts[slot] += 1
    if "mv" in used:
      self.has_mvs[slot] = True
    self.tokens.update(used)

  def finish(self):
    """-> (scores [T, G, G], slots whose interval had vectors, signal tokens)."""
    self._drain()
    self._resolve(None)  # B-frames after the last I/P frame: past references only
    scores = self.sums / np.maximum(self.counts, 1)[:, None, None]
    has_mvs = self.has_mvs.copy()
    for t in range(1, len(self.idx)):
      if self.idx[t] == self.idx[t - 1]:
        scores[t], has_mvs[t] = scores[t - 1], has_mvs[t - 1]
    return scores, has_mvs, self.tokens


def select_patches(scores, has_mvs, cfg: PatchifyConfig, seed=0):
  """[T, G, G] slot scores -> (positions [K, 3], added signal tokens): top-K with seeded ties, or
  whole frames when the clip is static (the 95th percentile of the scores of the slots with
  vectors -- all slots if none has -- below static_threshold)."""
  k = cfg.num_keep(scores.shape[0])
  basis = scores[has_mvs] if has_mvs.any() else scores
  if cfg.static_fallback and percentile95(basis) < cfg.static_threshold:
    return static_selection(scores.shape, k, cfg.keep_first_frame), {"static_fallback"}
  return select_top_k(scores, k, cfg.keep_first_frame, seed), set()
