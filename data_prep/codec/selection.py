"""Patch selection rules besides the codec's: random, uniform whole frames, dense (the baselines)."""
import numpy as np

from data_prep.codec import signals as codec_signals

# `codec` is the codec-signal top-K (codec_signals); the others ignore the signals. Each baseline
# names itself in the record's `signal` field (records.SIGNAL_TOKENS).
CODEC = "codec"


def random_selection(grid, k: int, seed: int, keep_first_frame: bool = False) -> np.ndarray:
  """K patches uniformly at random over T x H x W, without replacement, from `seed` (one per video).

  With keep_first_frame the first frame is kept whole and the rest of K is drawn from later frames.
  """
  t, h, w = grid
  hw, n = h * w, t * h * w
  first = hw if keep_first_frame else 0
  if not first <= k <= n:
    raise ValueError(f"random_selection: k={k} outside [{first}, {n}]")
  drawn = first + np.random.default_rng(seed).choice(n - first, k - first, replace=False)
  flat = np.sort(np.concatenate([np.arange(first), drawn]))
  return codec_signals.unravel_positions(flat, grid)


def uniform_frames_selection(grid, k: int, seed: int, keep_first_frame: bool = False) -> np.ndarray:
  """K / (H*W) whole frames evenly spaced over T (frame sampling); a remainder is spread over one
  more frame. The same layout as the codec's static-video fallback, so that code places it."""
  del seed  # deterministic: the same frames for every video
  return codec_signals.static_selection(grid, k, keep_first_frame)


def dense_selection(grid, k: int, seed: int, keep_first_frame: bool = False) -> np.ndarray:
  """Every patch (k must be T*H*W)."""
  del seed, keep_first_frame
  n = int(np.prod(grid))
  if k != n:
    raise ValueError(f"dense_selection: k={k} but the grid {tuple(grid)} has {n} patches")
  return codec_signals.unravel_positions(np.arange(n), grid)


BASELINES = {
    "random": random_selection,
    "uniform_frames": uniform_frames_selection,
    "dense": dense_selection,
}
NAMES = (CODEC,) + tuple(BASELINES)


def select(name: str, grid, k: int, seed: int, keep_first_frame: bool = False) -> np.ndarray:
  """Sorted (t, h, w) int32 positions [k, 3] of a baseline rule (not `codec`: it needs scores)."""
  if name not in BASELINES:
    raise ValueError(f"selector {name!r} is not a baseline; known: {sorted(BASELINES)}")
  return BASELINES[name](tuple(int(x) for x in grid), int(k), int(seed), keep_first_frame)
