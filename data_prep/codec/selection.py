"""Frame sampling and patch selection: seeded top-K, static fallback, baselines (pure numpy)."""
import numpy as np

from data_prep.codec.config import CODEC


def sample_indices(num_decoded: int, num_frames: int) -> np.ndarray:
  """Centred uniform sampling over frame indices; repeats frames when the clip is short."""
  i = np.arange(num_frames, dtype=np.int64)
  return np.minimum((2 * i + 1) * num_decoded // (2 * num_frames), num_decoded - 1)


def tie_order(seed, n: int) -> np.ndarray:
  """Rank of each of n flat positions among equal scores: a permutation seeded by `seed`."""
  return np.random.default_rng(seed).permutation(n)


def select_top_k(scores: np.ndarray, k: int, keep_first_frame: bool = False,
                 seed=0) -> np.ndarray:
  """Global top-K over [T, H, W] scores -> sorted (t, h, w) int32 positions.

  Ties at the K-th score are broken by `tie_order(seed, T*H*W)` (lower rank first), so a flat
  score map spreads over the clip instead of filling the budget in raster order, and the same
  seed always gives the same selection.
  """
  t, h, w = scores.shape
  n = t * h * w
  if not 1 <= k <= n:
    raise ValueError(f"select_top_k: k={k} outside [1, {n}]")
  flat = scores.reshape(-1).astype(np.float64)
  forced = np.zeros(n, bool)
  if keep_first_frame:
    forced[: h * w] = True
    if k < h * w:
      raise ValueError(f"select_top_k: keep_first_frame needs k >= {h * w}, got {k}")
  rest = np.flatnonzero(~forced)
  need = k - int(forced.sum())
  cand = flat[rest]
  if 0 < need < cand.size:
    # Everything above the need-th largest score is in; ties at that score go by the seeded
    # order, without a full sort.
    kth = np.partition(cand, cand.size - need)[cand.size - need]
    above = rest[cand > kth]
    tied = rest[cand == kth]
    tied = tied[np.argsort(tie_order(seed, n)[tied], kind="stable")[: need - above.size]]
    order = np.concatenate([above, tied])
  else:
    order = rest[:max(need, 0)]
  chosen = np.sort(np.concatenate([np.flatnonzero(forced), order]))
  return unravel_positions(chosen, (t, h, w))


def unravel_positions(flat: np.ndarray, grid) -> np.ndarray:
  t, h, w = grid
  return np.stack([flat // (h * w), (flat // w) % h, flat % w], axis=1).astype(np.int32)


def static_selection(grid, k: int, keep_first_frame: bool = False) -> np.ndarray:
  """Static-video fallback: whole frames spread uniformly over T, exactly K patches.

  floor(K / (H*W)) whole frames; the remaining K mod (H*W) patches come from one more frame,
  spread evenly over its raster order. With keep_first_frame the first whole frame is t=0.
  """
  t, h, w = grid
  hw = h * w
  whole, extra = divmod(k, hw)
  count = whole + (1 if extra else 0)
  if keep_first_frame:
    frames = np.concatenate([[0], 1 + sample_indices(t - 1, count - 1)]) if count > 1 else [0]
    frames = np.asarray(frames, np.int64)
  else:
    frames = sample_indices(t, count)
  if len(np.unique(frames)) != count:
    raise ValueError(f"static_selection: cannot place {count} frames in T={t}")
  chosen = [f * hw + np.arange(hw) for f in frames[:whole]]
  if extra:
    chosen.append(frames[whole] * hw + (2 * np.arange(extra) + 1) * hw // (2 * extra))
  return unravel_positions(np.sort(np.concatenate(chosen)), grid)


# Each baseline names itself in the record's `signal` field (records.SIGNAL_TOKENS).

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
  return unravel_positions(flat, grid)


def uniform_frames_selection(grid, k: int, seed: int, keep_first_frame: bool = False) -> np.ndarray:
  """K / (H*W) whole frames evenly spaced over T (frame sampling); a remainder is spread over one
  more frame. The same layout as the codec's static-video fallback, so that code places it."""
  del seed  # deterministic: the same frames for every video
  return static_selection(grid, k, keep_first_frame)


def dense_selection(grid, k: int, seed: int, keep_first_frame: bool = False) -> np.ndarray:
  """Every patch (k must be T*H*W)."""
  del seed, keep_first_frame
  n = int(np.prod(grid))
  if k != n:
    raise ValueError(f"dense_selection: k={k} but the grid {tuple(grid)} has {n} patches")
  return unravel_positions(np.arange(n), grid)


BASELINES = {
    "random": random_selection,
    "uniform_frames": uniform_frames_selection,
    "dense": dense_selection,
}
NAMES = (CODEC,) + tuple(BASELINES)  # config.SELECTORS, which validation checks against


def select(name: str, grid, k: int, seed: int, keep_first_frame: bool = False) -> np.ndarray:
  """Sorted (t, h, w) int32 positions [k, 3] of a baseline rule (not `codec`: it needs scores)."""
  if name not in BASELINES:
    raise ValueError(f"selector {name!r} is not a baseline; known: {sorted(BASELINES)}")
  return BASELINES[name](tuple(int(x) for x in grid), int(k), int(seed), keep_first_frame)
