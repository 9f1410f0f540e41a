"""Codec signals via PyAV (stock FFmpeg): decode, motion/residual maps, fusion, top-K selection."""
import bisect
import collections
import dataclasses
import math
import os
import socket
import subprocess
import sys
import threading
import time
from fractions import Fraction

import av
import numpy as np

from ovenc_format import records
from data_prep.codec import selection as selectors

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
FUSIONS = ("mean", "max", "sum", "geomean")
RESIZE_FILTERS = ("AREA", "BILINEAR", "BICUBIC", "FAST_BILINEAR", "POINT", "X", "BICUBLIN",
                  "GAUSS", "SINC", "LANCZOS", "SPLINE")  # swscale's scaling filters
_PICT_CHAR = {1: "I", 2: "P", 3: "B"}
# --iframe: "keep" keeps sampled frame t=0 whole and ranks the rest (the published rule);
# "scored" ranks every frame. Either way a frame without vectors is scored as a frame with zero
# motion, on the same scale as the motion-compensated frames.
IFRAME_MODES = ("keep", "scored")
# --transcode: re-encode the sampled span to P-only H.264 when the stream exports no vectors
# ("auto"), always, or never (frame differences for codecs without vectors).
TRANSCODE_MODES = ("auto", "always", "never")
# --seek: "auto" jumps to the keyframe before a sample when the gap to it is long; "never" decodes
# every frame from the start.
SEEK_MODES = ("auto", "never")
# Decoders from which FFmpeg exports motion vectors (flags2=+export_mvs); others get transcoded.
MV_CODECS = frozenset({"h264", "mpeg1video", "mpeg2video", "mpeg4", "h263", "h263p", "flv1",
                       "msmpeg4v2", "msmpeg4v3", "wmv1", "wmv2"})
# 8-bit pixel formats whose plane 0 is the luma plane at full resolution.
_LUMA_PLANE_FORMATS = frozenset({
    "yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "yuv440p", "yuvj440p",
    "yuv411p", "yuv410p", "nv12", "nv21", "nv16", "gray", "yuva420p"})


class InputError(ValueError):
  """A bad input file: the message is the reason written to failures.jsonl."""


@dataclasses.dataclass(frozen=True)
class PatchifyConfig:
  """Options of the codec patchifier (the CLI flags of data_prep.codec_patchify)."""
  budget: float = 0.125
  num_frames: int = 16
  image_size: int = 224
  patch_size: int = 14
  fusion: str = "mean"
  motion_weight: float = 1.0
  residual_weight: float = 1.0
  camera_compensation: bool = False
  iframe: str = "keep"
  tie_seed: int = 0  # ties in the top-K are broken by a random order seeded by (this, sample_id)
  transcode: str = "auto"
  seek: str = "auto"
  seek_min_gap: float = 10.0  # seconds: with --seek auto, longer gaps to a sample are skipped
  interval_frames: int = 0  # frames scored per sampling interval, evenly spaced; 0 = every frame
  static_fallback: bool = True
  static_threshold: float = 0.02
  motion_floor: float = 1.0  # pixels: the smallest divisor of the |MV| map (no noise blow-up)
  residual_floor: int = 16  # luma levels, same role; an integer keeps the uint8 clip exact
  min_side: int = 16
  max_aspect: float = 10.0
  image_budget: float = 0.0  # 0: images keep the whole grid; (0, 1]: top-K by gradient saliency
  resize_interpolation: str = "AREA"
  max_mv_pixels: int = 64  # motion vectors are clipped to this many pixels when warping
  selector: str = "codec"  # selection rule for videos: data_prep.codec.selection.NAMES

  @property
  def grid_side(self) -> int:
    return self.image_size // self.patch_size

  @property
  def keep_first_frame(self) -> bool:
    """--iframe keep applies when the frame kept whole is at most half of K (K >= 2*H*W), so
    top-K keeps at least as many patches for motion; below that every frame is ranked."""
    return self.iframe == "keep" and self.num_keep() >= 2 * self.grid_side**2

  def num_keep(self, num_frames=None) -> int:
    """K = round(budget * T*H*W), half rounded up; every patch for the dense selector."""
    t = self.num_frames if num_frames is None else num_frames
    if self.selector == "dense":
      return t * self.grid_side**2
    return int(math.floor(self.budget * t * self.grid_side**2 + 0.5))

  def validate(self) -> "PatchifyConfig":
    def bad(key, why):
      raise ValueError(f"config {key}={getattr(self, key)!r}: {why}")
    if not 0 < self.budget <= 1:
      bad("budget", "must be in (0, 1]")
    if self.num_frames < 1:
      bad("num_frames", "must be >= 1")
    if self.patch_size < 1:
      bad("patch_size", "must be >= 1")
    if self.image_size < self.patch_size or self.image_size % self.patch_size:
      bad("image_size", f"must be a positive multiple of patch_size={self.patch_size}")
    if self.num_keep() < 1:
      bad("budget", f"keeps 0 of {self.num_frames * self.grid_side**2} patches")
    if self.iframe not in IFRAME_MODES:
      bad("iframe", f"must be one of {IFRAME_MODES}")
    if self.transcode not in TRANSCODE_MODES:
      bad("transcode", f"must be one of {TRANSCODE_MODES}")
    if self.seek not in SEEK_MODES:
      bad("seek", f"must be one of {SEEK_MODES}")
    if not self.seek_min_gap > 0:
      bad("seek_min_gap", "must be > 0 seconds")
    if not isinstance(self.tie_seed, (int, np.integer)) or self.tie_seed < 0:
      bad("tie_seed", "must be an int >= 0")
    if not isinstance(self.interval_frames, (int, np.integer)) or self.interval_frames < 0:
      bad("interval_frames", "must be an int >= 0 (0 = every frame)")
    if self.fusion not in FUSIONS:
      bad("fusion", f"must be one of {FUSIONS}")
    if self.motion_weight < 0 or self.residual_weight < 0 or (
        self.motion_weight + self.residual_weight) <= 0:
      bad("motion_weight", "weights must be >= 0 and not both 0")
    if self.motion_floor <= 0:
      bad("motion_floor", "must be > 0")
    floor = self.residual_floor
    if not isinstance(floor, (int, np.integer)) or not 1 <= floor <= 255:
      bad("residual_floor", "must be an integer in [1, 255]")
    if self.static_threshold < 0:
      bad("static_threshold", "must be >= 0")
    if self.min_side < 1:
      bad("min_side", "must be >= 1")
    if self.max_aspect < 1:
      bad("max_aspect", "must be >= 1")
    if not 0 <= self.image_budget <= 1:
      bad("image_budget", "must be in [0, 1] (0 = whole grid)")
    if self.image_budget and math.floor(self.image_budget * self.grid_side**2 + 0.5) < 1:
      bad("image_budget", "keeps 0 patches")
    if self.resize_interpolation not in RESIZE_FILTERS:
      bad("resize_interpolation", f"must be one of {RESIZE_FILTERS}")
    if self.max_mv_pixels < 1:
      bad("max_mv_pixels", "must be >= 1")
    if self.selector not in selectors.NAMES:
      bad("selector", f"must be one of {selectors.NAMES}")
    return self


# ----------------------------------------------------------------------------------------------
# Sampling and selection (pure numpy).

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


# ----------------------------------------------------------------------------------------------
# Maps.

def percentile95(values: np.ndarray, weights=None) -> float:
  """Nearest-rank 95th percentile: the smallest v with (weight of values <= v) >= 95%."""
  values = np.asarray(values).reshape(-1)
  if values.size == 0:
    return 0.0
  if weights is not None and np.all(weights == weights.flat[0]):
    weights = None  # equal weights (the usual case: whole cells) need no sort
  if weights is None:
    if values.dtype == np.uint8:
      # Bisection over the 256 levels: eight counting passes beat a bincount, which widens
      # every value to intp first.
      need, lo, hi = 0.95 * values.size, 0, 255
      while lo < hi:
        mid = (lo + hi) // 2
        if np.count_nonzero(values <= mid) >= need:
          hi = mid
        else:
          lo = mid + 1
      return float(lo)
    rank = min(int(math.ceil(0.95 * values.size)), values.size) - 1
    return float(np.partition(values, rank)[rank])
  order = np.argsort(values, kind="stable")
  cum = np.cumsum(np.asarray(weights, np.float64).reshape(-1)[order])
  return float(values[order[min(np.searchsorted(cum, 0.95 * cum[-1]), values.size - 1)]])


def norm_scale(values: np.ndarray, floor: float, weights=None) -> float:
  """max(95th percentile, floor): the divisor of the per-frame normalisation.

  When at most 5% of the mass lies above the floor the percentile cannot exceed it, which one
  comparison settles; only busier frames pay for the full percentile.
  """
  if weights is None:
    above = np.count_nonzero(values > floor)
    total = values.size
  else:
    above = float(weights[values > floor].sum())
    total = float(weights.sum())
  if above <= 0.05 * total:
    return float(floor)
  return max(percentile95(values, weights), float(floor))


def normalise(values: np.ndarray, p95: float, floor: float) -> np.ndarray:
  """Divides by the frame's 95th percentile (never by less than `floor`), clipped to [0, 1]."""
  out = values.astype(np.float32) * np.float32(1.0 / max(p95, floor))
  return np.minimum(out, 1.0, out=out)


def fuse(motion, residual, cfg: PatchifyConfig) -> np.ndarray:
  """Fuses normalised maps; `motion` None means the frame has no MVs (residual alone)."""
  if motion is None or cfg.motion_weight == 0:
    return residual if cfg.fusion != "sum" else residual * np.float32(cfg.residual_weight)
  if cfg.residual_weight == 0:
    return motion if cfg.fusion != "sum" else motion * np.float32(cfg.motion_weight)
  wm, wr = np.float32(cfg.motion_weight), np.float32(cfg.residual_weight)
  if cfg.fusion == "mean":
    return (wm * motion + wr * residual) / (wm + wr)
  if cfg.fusion == "sum":
    return wm * motion + wr * residual
  if cfg.fusion == "max":
    return np.maximum(wm * motion, wr * residual)
  # Weighted geometric mean: exp of the weighted mean of logs, 0 where either map is 0.
  return np.power(motion, wm / (wm + wr)) * np.power(residual, wr / (wm + wr))


def patch_means(values: np.ndarray, grid_side: int) -> np.ndarray:
  """Mean of a [Hm, Wm] map over a grid_side x grid_side partition (rows/cols split evenly)."""
  hm, wm = values.shape
  ey = (np.arange(grid_side) * hm) // grid_side
  ex = (np.arange(grid_side) * wm) // grid_side
  sums = np.add.reduceat(np.add.reduceat(values, ey, axis=0, dtype=np.float64), ex, axis=1)
  area = np.diff(np.append(ey, hm))[:, None] * np.diff(np.append(ex, wm))[None, :]
  return sums / area


def _bin_counts(index_of: np.ndarray, n_cells: int, n_bins: int) -> np.ndarray:
  """[n_bins, n_cells]: how many lattice lines of each patch bin fall in each cell line."""
  n = index_of.size
  bins = (np.arange(n_bins + 1) * n) // n_bins
  which = np.repeat(np.arange(n_bins), np.diff(bins))
  out = np.zeros((n_bins, n_cells))
  np.add.at(out, (which, index_of), 1)
  return out


class _Lattice:
  """Index tables for one (frame size, stride, MV cell size, pad, rotation, grid) combination.

  The maps are evaluated on a lattice: every `stride`-th pixel of the decoded frame (stride 1
  unless the frame is much larger than image_size).
  """

  def __init__(self, height, width, stride, cell, pad, rot_k, grid_side):
    self.height, self.width, self.stride, self.cell, self.pad = height, width, stride, cell, pad
    self.cells_h, self.cells_w = -(-height // cell), -(-width // cell)
    ys = np.arange(0, height, stride)
    xs = np.arange(0, width, stride)
    self.shape = (len(ys), len(xs))
    self.cell_index = ((ys // cell)[:, None] * self.cells_w + (xs // cell)[None, :]).astype(np.intp)
    self.cell_count = np.bincount(self.cell_index.reshape(-1),
                                  minlength=self.cells_h * self.cells_w)
    # The padded frame is one cell wider than needed so whole-cell gathers never run off it.
    self.padded_w = width + 2 * pad + cell
    self.padded = np.empty((height + 2 * pad + cell, self.padded_w), np.uint8)
    if stride == 1:
      # A cell's row is `cell` contiguous bytes in both frames, so the warp gathers words of up
      # to 8 bytes (an unaligned view of the padded frame) instead of single pixels. Indices are
      # shaped [cells_h, cell, cells_w, words per cell row]: adding one offset per cell is a
      # broadcast, not a per-pixel lookup of the cell's vector.
      word = min(cell & -cell, 8)
      per_row = cell // word
      self.words = np.ndarray(shape=(self.padded.size - word + 1,), buffer=self.padded,
                              dtype=np.dtype(f"u{word}"), strides=(1,))
      rows = np.arange(self.cells_h * cell) + pad
      cols = np.arange(self.cells_w * per_row) * word + pad
      self.base = (rows[:, None] * self.padded_w + cols[None, :]).reshape(
          self.cells_h, cell, self.cells_w, per_row).astype(np.intp)
    else:
      self.base = ((ys + pad)[:, None] * self.padded_w + (xs + pad)[None, :]).astype(np.intp)
    # Patch pooling of a per-cell map, in display orientation: pooled = A @ rot(cells) @ B.T.
    self.rot_k = rot_k
    ids = np.rot90(np.arange(self.cells_h * self.cells_w).reshape(self.cells_h, self.cells_w),
                   rot_k)
    inv_row = np.empty(ids.size, np.intp)
    inv_col = np.empty(ids.size, np.intp)
    inv_row[ids.reshape(-1)] = np.repeat(np.arange(ids.shape[0]), ids.shape[1])
    inv_col[ids.reshape(-1)] = np.tile(np.arange(ids.shape[1]), ids.shape[0])
    shown = np.rot90(self.cell_index, rot_k)
    self.pool_rows = _bin_counts(inv_row[shown[:, 0]], ids.shape[0], grid_side)
    self.pool_cols = _bin_counts(inv_col[shown[0, :]], ids.shape[1], grid_side)
    self.pool_area = self.pool_rows.sum(1)[:, None] * self.pool_cols.sum(1)[None, :]
    # Reused work buffers: fresh multi-100-KB arrays per frame cost page faults every time.
    self._idx = np.empty(self.base.shape, np.intp)
    self._pred = np.empty(self.base.shape, np.uint8) if stride > 1 else None
    self._hi = np.empty(self.shape, np.uint8)
    self._lo = np.empty(self.shape, np.uint8)

  def pad_into(self, luma: np.ndarray) -> np.ndarray:
    """Edge-replicates `luma` into the padded buffer (what H.264 does past the frame border)."""
    p, h, w, out = self.pad, self.height, self.width, self.padded
    out[p:p + h, p:p + w] = luma
    out[p:p + h, :p] = luma[:, :1]
    out[p:p + h, p + w:] = luma[:, -1:]
    out[:p] = out[p]
    out[p + h:] = out[p + h - 1]
    return out.reshape(-1)

  def warp(self, prev_luma: np.ndarray, off: np.ndarray) -> np.ndarray:
    """Previous frame moved by one flat offset per cell, sampled on the lattice.

    May return a view of a reused buffer, valid until the next call.
    """
    flat = self.pad_into(prev_luma)
    if self.stride == 1:
      np.add(self.base, off.reshape(self.cells_h, 1, self.cells_w, 1), out=self._idx)
      # Indexing, not np.take: take would first copy the whole (non-contiguous) word view.
      pred = self.words[self._idx].view(np.uint8).reshape(
          self.cells_h * self.cell, self.cells_w * self.cell)
      return pred[: self.height, : self.width]
    np.add(self.base, off[self.cell_index], out=self._idx)
    return np.take(flat, self._idx, out=self._pred)

  def absdiff(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| for uint8 maps without widening (a view of a reused buffer)."""
    np.maximum(a, b, out=self._hi)
    np.minimum(a, b, out=self._lo)
    return np.subtract(self._hi, self._lo, out=self._hi)

  def pool_cells(self, values: np.ndarray) -> np.ndarray:
    """Patch means [G, G] (display orientation) of a map that is constant on each cell."""
    grid = np.rot90(values.reshape(self.cells_h, self.cells_w).astype(np.float64), self.rot_k)
    return (self.pool_rows @ grid @ self.pool_cols.T) / self.pool_area


def luma_rows(frame) -> np.ndarray:
  """[H, >= W] C-contiguous uint8 luma of a decoded frame: the decoder's buffer, line padding
  included, when possible (columns from W on are not picture)."""
  if frame.format.name in _LUMA_PLANE_FORMATS:
    plane = frame.planes[0]
    buf = np.frombuffer(plane, np.uint8)
    return buf[: plane.line_size * frame.height].reshape(frame.height, plane.line_size)
  return frame.to_ndarray(format="gray")


def luma_plane(frame) -> np.ndarray:
  """[H, W] uint8 luma of a decoded frame, a view of the decoder's buffer when possible."""
  return luma_rows(frame)[:, : frame.width]


def _rows(luma: np.ndarray) -> np.ndarray:
  """A C-contiguous [H, >= W] array with luma's rows (no copy for decoder planes)."""
  return luma if luma.flags.c_contiguous else np.ascontiguousarray(luma)


def mv_cell_size(mvs) -> int:
  """Largest power of two dividing every block size and corner (the lowest set bit of their OR):
  a cell grid on which each block is a whole number of cells. H.264 gives 4, 8 or 16."""
  w = mvs["w"].astype(np.intp)
  h = mvs["h"].astype(np.intp)
  bits = int(np.bitwise_or.reduce(w) | np.bitwise_or.reduce(h)
             | np.bitwise_or.reduce(mvs["dst_x"] - (w >> 1))
             | np.bitwise_or.reduce(mvs["dst_y"] - (h >> 1)))
  return bits & -bits


def motion_fields(mvs, height, width, cell=None):
  """Paints exported MVs onto a cell grid: (cell size, dx, dy, covered cell ids).

  dx, dy are in pixels per cell, [cells_h * cells_w]; `covered` lists the cells a vector paints.

  Prefers past-reference vectors where a bi-predicted block has two. Cells no vector covers
  (intra blocks) get zero motion, i.e. a co-located prediction.
  """
  cell = mv_cell_size(mvs) if cell is None else cell
  cells_h, cells_w = -(-height // cell), -(-width // cell)
  dx = np.zeros(cells_h * cells_w, np.float64)
  dy = np.zeros(cells_h * cells_w, np.float64)
  if len(mvs) == 0:
    return cell, dx, dy, np.zeros(0, np.intp)
  # Run once per decoded frame on a few hundred blocks: the cost is the number of numpy calls,
  # so every step below is one call on all blocks (cell is a power of two: shifts, not divisions).
  shift = cell.bit_length() - 1
  w = mvs["w"].astype(np.intp)
  h = mvs["h"].astype(np.intp)
  ncx = w >> shift
  n_cells = ncx * (h >> shift)
  # Block -> covered cells, fully vectorised: repeat each block id once per cell it spans; a
  # cell's rank inside its block gives its row (rank // ncx) and column (rank % ncx).
  block = np.repeat(np.arange(len(w)), n_cells)
  rank = np.arange(block.size) - np.repeat(np.cumsum(n_cells) - n_cells, n_cells)
  across = ncx[block]
  cy = ((mvs["dst_y"] - (h >> 1)) >> shift)[block] + rank // across
  cx = ((mvs["dst_x"] - (w >> 1)) >> shift)[block] + rank % across
  if (cy.min() < 0 or cx.min() < 0 or cy.max() >= cells_h or cx.max() >= cells_w):
    inside = (cy >= 0) & (cy < cells_h) & (cx >= 0) & (cx < cells_w)
    block, cy, cx = block[inside], cy[inside], cx[inside]
  flat = cy * cells_w + cx
  source = mvs["source"]
  if (source > 0).any():
    # Bi-prediction: keep one vector per cell, past references (source < 0) first.
    pref = np.lexsort((np.arange(flat.size), source[block] > 0, flat))
    flat, block = flat[pref], block[pref]
    first = np.concatenate([[True], flat[1:] != flat[:-1]])
    flat, block = flat[first], block[first]
  scale = np.maximum(mvs["motion_scale"].astype(np.float64), 1.0)
  dx[flat] = (mvs["motion_x"] / scale)[block]
  dy[flat] = (mvs["motion_y"] / scale)[block]
  return cell, dx, dy, flat


_LATTICES = threading.local()  # per thread: lattices hold work buffers


def _kernels():
  """data_prep.codec.kernels, imported on first use: numba's import (~0.25 s) then stays out of
  processes that never score a frame, such as the Beam workers that hand videos to a decoder
  child, whose start-up is on every job's critical path."""
  from data_prep.codec import kernels as signal_kernels  # noqa: PLC0415
  return signal_kernels


class FrameSignals:
  """Per-frame motion/residual patch scores for one video geometry; caches index tables."""

  COMPILED = True  # default of `compiled`; tests switch it off to reach the numpy path

  def __init__(self, cfg: PatchifyConfig, height: int, width: int, rot_k: int = 0,
               compiled: bool = None):
    self.cfg = cfg
    self.height, self.width, self.rot_k = height, width, rot_k
    self.stride = max(1, min(height, width) // cfg.image_size)
    # The compiled kernel covers the linear fusions without camera compensation (the defaults);
    # the numpy path below is the reference it is tested against and serves the other options.
    compiled = FrameSignals.COMPILED if compiled is None else compiled
    self.compiled = compiled and cfg.fusion in ("mean", "sum") and not cfg.camera_compensation
    if self.compiled:
      self._kernels = _kernels()
      lattice = (-(-height // self.stride), -(-width // self.stride))
      row_pid, col_pid, col_runs, col_run_pid, area = self._kernels.patch_layout(
          *lattice, cfg.grid_side, rot_k)
      # The kernel's arguments after (cur, past, fut, use_fut, vectors, zero_motion, out).
      self._consts = (height, width, self.stride, cfg.max_mv_pixels, float(cfg.motion_floor),
                      int(cfg.residual_floor), row_pid, col_pid, col_runs, col_run_pid,
                      cfg.grid_side, area, np.empty(lattice, np.uint8), float(cfg.motion_weight),
                      float(cfg.residual_weight), cfg.fusion == "sum")

  def _lattice(self, cell):
    key = (self.height, self.width, self.stride, cell, self.cfg.max_mv_pixels, self.rot_k,
           self.cfg.grid_side)
    cache = _LATTICES.__dict__.setdefault("cache", {})
    lat = cache.get(key)
    if lat is None:
      if len(cache) >= 32:  # bounded: inputs of many sizes must not grow memory forever
        cache.clear()
      lat = cache[key] = _Lattice(*key)
    return lat

  def _pool(self, values):
    """Patch means [G, G] in display orientation of a coded-orientation map."""
    g = self.cfg.grid_side
    hm, wm = values.shape
    if hm % g or wm % g:
      return patch_means(np.rot90(values, self.rot_k), g)
    # Equal bins: pooling commutes with the quarter turn, and reshape-sums beat reduceat.
    # uint8 sums stay exact in uint32 (and in uint16 over up to 257 rows) and are faster.
    if values.dtype == np.uint8:
      d1 = np.uint16 if hm // g <= 257 else np.uint32
      sums = values.reshape(g, hm // g, wm).sum(1, dtype=d1).reshape(g, g, wm // g).sum(
          2, dtype=np.uint64 if hm * wm // (g * g) > 2**24 else np.uint32)
    else:
      sums = values.reshape(g, hm // g, wm).sum(1, dtype=np.float64).reshape(g, g, wm // g).sum(2)
    return np.rot90(sums / ((hm // g) * (wm // g)), self.rot_k)

  def maps(self, cur_luma, prev_luma, mvs, future_luma=None):
    """(motion per cell normalised to [0, 1] float32 or None, raw residual uint8 [Hm, Wm] in
    coded orientation, the lattice or None, signal tokens).

    Each vector is applied to the frame it references: past-reference vectors (source < 0) to
    `prev_luma` (the last I/P frame), future-reference ones to `future_luma` (the next I/P frame;
    None drops them). A cell with both is predicted by their rounded average, as H.264's default
    bi-prediction does; a cell with neither (intra) from the co-located past pixel.
    """
    cfg, s = self.cfg, self.stride
    cur = cur_luma[::s, ::s]
    if mvs is None or len(mvs) == 0:
      prev = (cur_luma if prev_luma is None else prev_luma)[::s, ::s]
      residual = np.maximum(cur, prev) - np.minimum(cur, prev)
      return None, residual, None, ("frame_diff",)
    future = mvs["source"] > 0
    if not future.any():
      cell, dx, dy, covered = motion_fields(mvs, self.height, self.width)
      lat = self._lattice(cell)
      mode = None
    else:
      cell = mv_cell_size(mvs)
      lat = self._lattice(cell)
      # motion_fields puts past vectors first, so (dx, dy) is the past vector where there is one.
      _, dx, dy, covered = motion_fields(mvs, self.height, self.width, cell)
      _, dxp, dyp, past_cells = motion_fields(mvs[~future], self.height, self.width, cell)
      _, dxf, dyf, fut_cells = motion_fields(mvs[future], self.height, self.width, cell)
      mode = np.zeros(dx.size, np.uint8)  # 0: past or intra, 1: future only, 2: both
      if future_luma is not None:
        mode[fut_cells] = 1
        mode[past_cells] = np.where(mode[past_cells] == 1, 2, 0)
    if cfg.camera_compensation:
      # Camera motion ~ the area-weighted median vector of the cells vectors cover (intra
      # blocks carry no motion information); subtracting it leaves object motion.
      dxm = _weighted_median(dx[covered], lat.cell_count[covered])
      dym = _weighted_median(dy[covered], lat.cell_count[covered])
      mag = np.hypot(dx - dxm, dy - dym)
    else:
      mag = np.sqrt(dx * dx + dy * dy)  # as signal_kernels computes it (hypot is slower)
    # Warp at integer precision: the exported vectors are quarter-pel, rounding keeps it a gather.
    lim = cfg.max_mv_pixels

    def offsets(vx, vy):
      return (np.clip(np.rint(vy), -lim, lim) * lat.padded_w + np.clip(np.rint(vx), -lim, lim)
              ).astype(np.intp)

    past_ref = prev_luma if prev_luma is not None else cur_luma
    if mode is None or not mode.any():
      pred = lat.warp(past_ref, offsets(dx, dy) if mode is None else offsets(dxp, dyp))
    else:
      pred_p = lat.warp(past_ref, offsets(dxp, dyp)).astype(np.uint16)  # a copy: warp reuses
      pred_f = lat.warp(future_luma, offsets(dxf, dyf))
      by_pixel = mode[lat.cell_index]
      pred = np.where(by_pixel == 0, pred_p, np.where(
          by_pixel == 1, pred_f, (pred_p + pred_f + 1) >> 1)).astype(np.uint8)
    residual = lat.absdiff(cur, pred)
    m_scale = norm_scale(mag, cfg.motion_floor, lat.cell_count)
    motion_cells = np.minimum(mag * (1.0 / m_scale), 1.0).astype(np.float32)
    return motion_cells, residual, lat, ("mv", "residual")

  def scores(self, cur_luma, prev_luma, mvs, future_luma=None, zero_motion=False):
    """Per-patch fused score [G, G] (display orientation) and the signal tokens used.

    A frame without vectors is scored by its frame difference alone, or with `zero_motion` as a
    frame whose motion map is 0 (I-frames: the same scale as motion-compensated frames).
    """
    cfg = self.cfg
    if self.compiled:
      out = np.zeros((cfg.grid_side, cfg.grid_side))
      return out, self.accumulate(out, cur_luma, prev_luma, mvs, future_luma, zero_motion)
    w = self.width
    motion_cells, residual, lat, tokens = self.maps(
        cur_luma[:, :w], None if prev_luma is None else prev_luma[:, :w], mvs,
        None if future_luma is None else future_luma[:, :w])
    # The residual scale is an integer (uint8 percentile, integer floor), so clipping at it in
    # uint8 and dividing afterwards equals min(residual / scale, 1) exactly.
    r_scale = int(norm_scale(residual, cfg.residual_floor))
    if cfg.fusion in ("mean", "sum"):
      # Linear fusion commutes with patch pooling: pool each map, then combine G*G numbers.
      r_pool = self._pool(np.minimum(residual, min(r_scale, 255))) / r_scale
      m_pool = None if motion_cells is None else lat.pool_cells(motion_cells)
      if m_pool is None and zero_motion:
        m_pool = np.zeros_like(r_pool)
      return _combine(m_pool, r_pool, cfg), tokens
    r = normalise(residual, r_scale, 1)
    m = None if motion_cells is None else motion_cells[lat.cell_index]
    if m is None and zero_motion:
      m = np.zeros_like(r)
    return self._pool(fuse(m, r, cfg)), tokens

  def accumulate(self, out, cur_luma, prev_luma, mvs, future_luma=None, zero_motion=False):
    """out [G, G] += scores(...)[0]; returns the signal tokens. Compiled where it applies."""
    if not self.compiled:
      score, tokens = self.scores(cur_luma, prev_luma, mvs, future_luma, zero_motion)
      out += score
      return tokens
    kernels = self._kernels
    cur = _rows(cur_luma)
    past = cur if prev_luma is None else _rows(prev_luma)
    if mvs is None or len(mvs) == 0:
      mvs, future_luma = kernels.NO_VECTORS, None
    elif mvs.flags.writeable or mvs.dtype != kernels.MV_DTYPE:
      mvs = kernels.as_vectors(mvs)
    had_mvs = kernels.frame_score(
        cur, past, past if future_luma is None else _rows(future_luma), future_luma is not None,
        mvs, bool(zero_motion), out.reshape(-1), *self._consts)
    return ("mv", "residual") if had_mvs else ("frame_diff",)


def _combine(m_pool, r_pool, cfg):
  if m_pool is None or cfg.motion_weight == 0:
    return r_pool * (cfg.residual_weight if cfg.fusion == "sum" else 1.0)
  if cfg.residual_weight == 0:
    return m_pool * (cfg.motion_weight if cfg.fusion == "sum" else 1.0)
  total = cfg.motion_weight * m_pool + cfg.residual_weight * r_pool
  return total if cfg.fusion == "sum" else total / (cfg.motion_weight + cfg.residual_weight)


def _weighted_median(values, weights):
  if values.size == 0:
    return 0.0
  order = np.argsort(values, kind="stable")
  cum = np.cumsum(weights[order])
  return float(values[order[np.searchsorted(cum, 0.5 * cum[-1])]])


# ----------------------------------------------------------------------------------------------
# Files.

def _check_size(width, height, cfg):
  if width < 1 or height < 1:
    raise InputError(f"frame size {width}x{height} is empty")
  side = max(cfg.min_side, cfg.grid_side)
  if min(width, height) < side:
    raise InputError(f"frame size {width}x{height} is smaller than the minimum side {side} "
                     f"(min_side={cfg.min_side}, grid {cfg.grid_side})")
  if max(width, height) > cfg.max_aspect * min(width, height):
    raise InputError(f"frame size {width}x{height} exceeds max_aspect={cfg.max_aspect}")


def _rotation_k(rotation) -> int:
  """Quarter turns counter-clockwise that bring the coded frame upright (display matrix)."""
  rot = float(rotation or 0)
  k = int(round(rot / 90.0))
  if abs(rot - 90 * k) > 1:
    raise InputError(f"display rotation {rot} degrees is not a multiple of 90")
  return k % 4


def _patches_from(rgb: np.ndarray, hw: np.ndarray, p: int) -> np.ndarray:
  g = rgb.shape[0] // p
  tiles = rgb.reshape(g, p, g, p, 3).transpose(0, 2, 1, 3, 4)
  return tiles[hw[:, 0], hw[:, 1]]


def _open_video(path):
  try:
    container = av.open(path, metadata_errors="ignore")
  except av.error.FFmpegError as e:
    raise InputError(f"cannot open as media ({type(e).__name__}: {e.strerror or e})") from e
  if not container.streams.video:
    kinds = sorted({s.type for s in container.streams})
    container.close()
    raise InputError(f"no video stream (streams: {kinds or 'none'})")
  return container


def _declared_frames(container, path) -> int:
  """Frames in the first video stream: the header's count, else demux packets (no decoding).

  Counting uses a separate open, not a seek back: raw elementary streams (.h264) cannot seek.
  """
  n = container.streams.video[0].frames
  if n > 0:
    return n
  counter = _open_video(path)
  try:
    return sum(1 for pkt in counter.demux(counter.streams.video[0]) if pkt.size)
  except av.error.FFmpegError as e:
    raise InputError(f"cannot read packets ({type(e).__name__}: {e.strerror or e})") from e
  finally:
    counter.close()


_REFORMATTERS = threading.local()


def _reformatter():
  """One swscale context per thread: building one per frame costs more than the conversion."""
  r = getattr(_REFORMATTERS, "r", None)
  if r is None:
    r = _REFORMATTERS.r = av.video.reformatter.VideoReformatter()
  return r


def to_rgb(frame, size: int, interpolation: str) -> np.ndarray:
  """A decoded frame resized to size x size RGB (coded orientation)."""
  return _reformatter().reformat(frame, width=size, height=size, format="rgb24",
                                 interpolation=interpolation).to_ndarray()


def patchify_video(path: str, cfg: PatchifyConfig, seed=0) -> dict:
  """Decodes one video and returns its record fields (without class_label/labels).

  `seed` seeds the tie-breaking order of the top-K and the baseline selectors (patchify_file passes
  (tie_seed, sample_id); the baselines use the sample_id).
  """
  container = _open_video(path)
  try:
    declared = _declared_frames(container, path)
    if declared < 1:
      raise InputError("video stream has no frames")
    try:
      fields, decoded = _patchify_video(container, cfg, declared, seed)
      seek_failed = False
    except _SeekFailed:
      seek_failed = True
  finally:
    container.close()
  if seek_failed:
    # A seek landed where frame indices cannot be trusted: decode from the start instead.
    cfg = dataclasses.replace(cfg, seek="never")
    container = _open_video(path)
    try:
      fields, decoded = _patchify_video(container, cfg, declared, seed)
    finally:
      container.close()
  if fields is None:
    if decoded < 1:
      raise InputError("video stream decoded to 0 frames")
    # The header over-counted (edit lists, damaged index): plan again on the true count.
    container = _open_video(path)
    try:
      fields, decoded = _patchify_video(container, cfg, decoded, seed)
    finally:
      container.close()
    if fields is None:
      raise InputError(f"frame count unstable between two decodes ({decoded})")
  if (cfg.transcode == "auto" and decoded > 1
      and not {"mv", "transcode"} & set(fields["signal"].split("+"))):
    # A codec that usually exports vectors exported none here (e.g. an all-intra stream).
    return patchify_video(path, dataclasses.replace(cfg, transcode="always"), seed)
  return fields


class IntervalScorer:
  """Scores every decoded frame against the frame(s) it references and averages the scores over
  each sampling interval: slot t collects frames (idx[t-1], idx[t]] (slot 0: [0, idx[0]]).

  Frames arrive in display order. A P-frame's vectors reference the last I/P frame; a B-frame
  waits for the next I/P frame, its future reference. The first frame has no reference and no
  score. Slots that repeat a frame (clips shorter than T) copy the score of its first slot.
  """

  def __init__(self, cfg: PatchifyConfig, idx: np.ndarray, height: int, width: int, rot_k: int):
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
    # Frames are scored in batches after decoding them: interleaving numpy work with each
    # decode evicts the decoder's caches (measured: decode ~2-4x slower). About 32 MB of frames.
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
    kind = _PICT_CHAR.get(int(frame.pict_type), "?")
    wanted = self.wants(n)  # unwanted frames only serve as references of later ones
    luma = luma_rows(frame)  # references are kept as their luma (a view of the frame)
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


def _stream_info(stream):
  fps = float(stream.average_rate or stream.guessed_rate or 0)
  # The codec, not the decoder (AV1 decodes through "libdav1d")
  codec = stream.codec_context.codec.canonical_name or stream.codec_context.name or ""
  return fps if math.isfinite(fps) and fps > 0 else 0.0, codec


class _SeekFailed(Exception):
  """Frame indices after a seek are not exact (variable frame rate, missing timestamps)."""


def _seekable(container, stream, fps, num_decoded, cfg) -> bool:
  """Seeking by time finds frame n only in a constant-frame-rate stream: the declared frame count
  must match duration x fps."""
  if cfg.seek == "never" or fps <= 0 or stream.time_base is None:
    return False
  if stream.duration is not None:
    duration = float(stream.duration * stream.time_base)
  elif container.duration:
    duration = container.duration / 1e6
  else:
    return False
  return abs(duration * fps - num_decoded) <= 2


def _decoded_frames(container, stream, idx, fps, cfg, seek):
  """Yields (frame index, frame, first after a seek) up to the last sampled frame.

  Without seeking, every frame from the start. With seeking, a gap of more than seek_min_gap
  seconds to the next sample is skipped: the decoder jumps to the keyframe before (sample - 1 s)
  and the frame index is read from the timestamp (exact or _SeekFailed).
  """
  it = container.decode(stream)
  n, t0 = -1, None
  tb = float(stream.time_base or 0)  # float, not Fraction, arithmetic per frame
  gap = max(1, int(round(cfg.seek_min_gap * fps)))
  for target in sorted(set(idx.tolist())):
    if seek and n >= 0 and target - n > gap:
      start = max(n + 1, target - int(round(fps)))
      ts = int(round((t0 + start / fps) / stream.time_base))
      try:
        container.seek(ts, stream=stream, backward=True)
      except av.error.FFmpegError as e:
        raise _SeekFailed(str(e)) from e
      it, restarted = container.decode(stream), True
    else:
      restarted = False
    while n < target:
      frame = next(it, None)
      if frame is None:
        if restarted or n >= 0 and seek:
          raise _SeekFailed("stream ended after a seek")
        return
      if t0 is None:
        t0 = 0.0 if frame.pts is None else frame.pts * tb
      if seek:
        if frame.pts is None:
          raise _SeekFailed("frame without a timestamp")
        x = (frame.pts * tb - t0) * fps
        m = int(round(x))
        if abs(x - m) > 0.05 or (not restarted and m != n + 1):
          raise _SeekFailed(f"timestamp {x:.3f} frames is not the next frame index")
        if m <= n:
          continue  # the keyframe lies before frames already decoded
      else:
        m = n + 1
      yield m, frame, restarted
      restarted, n = False, m


def _patchify_video(container, cfg, num_decoded, seed=0):
  """Returns (fields, frames decoded); fields is None if the stream ended before the plan."""
  t_len, p, s = cfg.num_frames, cfg.patch_size, cfg.image_size
  idx = sample_indices(num_decoded, t_len)
  sampled = set(idx.tolist())
  last = int(idx[-1])
  stream = container.streams.video[0]
  fps, codec = _stream_info(stream)
  seek = _seekable(container, stream, fps, num_decoded, cfg)
  # Frame threading truncates exported MVs and makes them non-deterministic (shared/README.md).
  stream.thread_type = "NONE"
  stream.codec_context.options = {"flags2": "+export_mvs"}
  transcode = cfg.transcode == "always" or (cfg.transcode == "auto" and codec not in MV_CODECS)
  scorer, rot_k, encoder = None, 0, None
  held = {}  # decoded index -> sampled frame
  read_vectors = _kernels().read_vectors
  n = -1
  try:
    for n, frame, restarted in _decoded_frames(container, stream, idx, fps, cfg, seek):
      if scorer is None:
        _check_size(frame.width, frame.height, cfg)
        rot_k = _rotation_k(frame.rotation)
        size = (frame.width, frame.height)
        scorer = IntervalScorer(cfg, idx, s if transcode else frame.height,
                                s if transcode else frame.width, rot_k)
      elif transcode and (frame.width, frame.height) != size:
        raise InputError(f"frame size changes mid-stream ({size[0]}x{size[1]} -> "
                         f"{frame.width}x{frame.height})")
      if restarted:
        if encoder is not None:
          for m, coded, mvs in encoder.flush():
            scorer.add(m, coded, mvs)
          encoder = None
        scorer.restart()
      if n in sampled:
        held[n] = frame
      if transcode:
        encoder = encoder or Transcoder(s, cfg.resize_interpolation)
        for m, coded, mvs in encoder.push(frame, n):
          scorer.add(m, coded, mvs)
      else:
        sd = frame.side_data.get("MOTION_VECTORS") if scorer.wants(n) else None
        scorer.add(n, frame, read_vectors(sd) if sd is not None else None)
    if encoder is not None:
      for m, coded, mvs in encoder.flush():
        scorer.add(m, coded, mvs)
  except av.error.FFmpegError as e:
    raise InputError(f"decode error at frame {n + 1} ({type(e).__name__}: "
                     f"{e.strerror or e})") from e
  if n < last:
    return None, n + 1
  scores, has_mvs, tokens = scorer.finish()
  if transcode:
    tokens.add("transcode")
  if cfg.selector != selectors.CODEC:  # a baseline rule: the record's signal names it, not the maps
    # Seeded by the video alone (its sample_id), so every budget draws from the same stream.
    video_seed = seed[-1] if isinstance(seed, tuple) else seed
    # The baselines are the plain rules (issue 17): --iframe keep does not apply to them.
    positions = selectors.select(cfg.selector, scores.shape, cfg.num_keep(scores.shape[0]), video_seed)
    tokens = {cfg.selector}
  else:
    positions, extra = select_patches(scores, has_mvs, cfg, seed)
    tokens |= extra
  k = positions.shape[0]
  patches = np.empty((k, p, p, 3), np.uint8)
  for t in np.unique(positions[:, 0]):
    rows = np.flatnonzero(positions[:, 0] == t)
    rgb = np.rot90(to_rgb(held[int(idx[t])], s, cfg.resize_interpolation), rot_k)
    patches[rows] = _patches_from(rgb, positions[rows, 1:], p)
  frames = [held[int(i)] for i in idx]
  patch_scores = scores[positions[:, 0], positions[:, 1], positions[:, 2]]
  if cfg.keep_first_frame and "static_fallback" not in tokens:
    patch_scores[positions[:, 0] == 0] = np.inf  # kept whole by rule: first under any later cut
  return dict(patches=patches, positions=positions, grid=np.asarray(scores.shape, np.int32),
              frame_types="".join(_PICT_CHAR.get(int(f.pict_type), "?") for f in frames),
              signal=records.canonical_signal(tokens), scores=scores,
              frame_indices=idx.astype(np.int32),
              timestamps=np.asarray([np.nan if f.time is None else f.time for f in frames]),
              fps=fps, codec=codec, patch_scores=patch_scores), n + 1


class Transcoder:
  """Re-encodes decoded frames to P-only H.264 (no B-frames, one reference, one GOP, size x size)
  in memory and decodes them back with their motion vectors, one frame in, one frame out, in
  order. The published pipeline does the same with an HEVC step; here it gives vectors to codecs
  FFmpeg exports none for (HEVC, VP9, AV1) and real ones to low-bitrate B-frame streams."""

  def __init__(self, size: int, interpolation: str, crf: int = 23):
    self.size, self.interpolation = size, interpolation
    self.enc = av.CodecContext.create("libx264", "w")
    self.enc.width = self.enc.height = size
    self.enc.pix_fmt = "yuv420p"
    self.enc.time_base = Fraction(1, 25)
    self.enc.options = {"bf": "0", "refs": "1", "g": "100000", "keyint_min": "100000",
                        "sc_threshold": "0", "crf": str(crf), "preset": "veryfast",
                        "threads": "1", "rc-lookahead": "0"}
    self.dec = av.CodecContext.create("h264", "r")
    self.dec.thread_type = "NONE"
    self.dec.options = {"flags2": "+export_mvs"}
    self.pts = 0
    self.indices = collections.deque()  # source frame index of each frame in flight
    self.read_vectors = _kernels().read_vectors

  def _decode(self, packets):
    for pkt in packets:
      for frame in self.dec.decode(pkt):
        sd = frame.side_data.get("MOTION_VECTORS")
        yield (self.indices.popleft(), frame,
               self.read_vectors(sd) if sd is not None else None)

  def push(self, frame, index: int):
    """Encodes one frame; returns the (index, frame, vectors) that came out so far."""
    small = _reformatter().reformat(frame, width=self.size, height=self.size, format="yuv420p",
                                    interpolation=self.interpolation)
    small.pts, small.pict_type = self.pts, 0
    self.pts += 1
    self.indices.append(index)
    return list(self._decode(self.enc.encode(small)))

  def flush(self):
    out = list(self._decode(self.enc.encode(None)))
    out += list(self._decode([None]))
    return out


def _image_saliency(luma: np.ndarray) -> np.ndarray:
  """Gradient magnitude of luma (central differences), the saliency used for image budgets."""
  f = luma.astype(np.float32)
  gx = np.zeros_like(f)
  gy = np.zeros_like(f)
  gx[:, 1:-1] = f[:, 2:] - f[:, :-2]
  gy[1:-1] = f[2:] - f[:-2]
  return np.hypot(gx, gy)


def patchify_image(path: str, cfg: PatchifyConfig, seed=0) -> dict:
  """One still image -> t=0 record: the whole grid, or top-K by saliency if image_budget > 0."""
  from PIL import Image, ImageOps, UnidentifiedImageError
  try:
    with Image.open(path) as im:
      im = ImageOps.exif_transpose(im)  # EXIF rotation, like the display matrix for video
      _check_size(im.width, im.height, cfg)
      rgb_img = im.convert("RGB")
      codec = (im.format or "").lower()
  except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
    raise InputError(f"cannot read image ({type(e).__name__}: {e})") from e
  g, p, s = cfg.grid_side, cfg.patch_size, cfg.image_size
  # Resize through swscale too, so images and video frames are resampled the same way.
  frame = av.VideoFrame.from_ndarray(np.asarray(rgb_img, np.uint8), format="rgb24")
  rgb = to_rgb(frame, s, cfg.resize_interpolation)
  grid = (1, g, g)
  if cfg.image_budget:
    k = int(math.floor(cfg.image_budget * g * g + 0.5))
    luma = (rgb.astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32))
    sal = _image_saliency(luma)
    sal = normalise(sal, percentile95(sal), 1.0)
    scores = patch_means(sal, g)[None]
    positions = select_top_k(scores, k, seed=seed)
    signal = "image+saliency"
  else:
    positions = unravel_positions(np.arange(g * g), grid)
    scores = np.ones(grid)
    signal = "image"
  return dict(patches=_patches_from(rgb, positions[:, 1:], p), positions=positions,
              grid=np.asarray(grid, np.int32), frame_types="I", signal=signal, scores=scores,
              frame_indices=np.zeros(1, np.int32), timestamps=np.zeros(1), fps=0.0, codec=codec,
              patch_scores=scores[0][positions[:, 1], positions[:, 2]])


def is_image_path(path: str) -> bool:
  return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def patchify_file(path: str, cfg: PatchifyConfig, class_label: int = -1,
                  with_scores: bool = False, source: str = None) -> dict:
  """Any local input path -> a full record dict (validated by records). InputError if bad.

  `source` (default: path) is what the record names, e.g. the URL a local copy came from.
  """
  if os.path.isfile(path):
    size = os.path.getsize(path)
    if size == 0:
      raise InputError("empty file (0 bytes)")
  elif not os.path.exists(path):
    raise InputError("file does not exist")
  source = path if source is None else source
  sample_id = records.sample_id_for(source)
  seed = (int(cfg.tie_seed), sample_id)
  fields = (patchify_image(path, cfg, seed) if is_image_path(path)
            else patchify_video(path, cfg, seed))
  scores = fields.pop("scores")
  fields["scores"] = fields.pop("patch_scores")
  rec = dict(fields, source=source, sample_id=sample_id, labels=np.zeros([0], np.int32),
             class_label=int(class_label))
  rec = records.validate_record(rec)
  if with_scores:
    rec["grid_scores"] = scores  # [T, H, W] slot scores (not a record field)
  return rec


# ----------------------------------------------------------------------------------------------
# Decode worker: one child process per DoFn instance, so a hung or crashing decoder is cut off.

def _worker_loop(conn):
  """The decoder child's loop: a PatchifyConfig dict first, then (path, label, source) requests."""
  cfg = PatchifyConfig(**conn.recv())
  # Load the compiled signal kernel now (numba's cache, ~0.4 s), while the worker starts up,
  # not on the first video.
  FrameSignals(cfg, 16, 16).accumulate(np.zeros((cfg.grid_side, cfg.grid_side)),
                                       np.zeros((16, 16), np.uint8), None, None)
  conn.send(("ready",))  # imports are done: from here on only decoding counts against timeouts
  while True:
    try:
      msg = conn.recv()
    except EOFError:
      return
    if msg is None:
      return
    path, label, source = msg
    conn.send(("duration", media_duration(path)))  # the parent scales its timeout by it
    conn.send(process_path(path, label, cfg, source))


def child_main(fd: int):
  """Entry point of the decoder child (`python -c ... FD`): serves requests on socket FD."""
  from multiprocessing.connection import Connection
  conn = Connection(fd)
  try:
    _worker_loop(conn)
  except (BrokenPipeError, ConnectionResetError):
    pass  # the parent went away; nothing is left to answer
  finally:
    conn.close()


# The child imports only this module (av, numpy, records): neither multiprocessing's spawn, which
# re-imports the parent's __main__ (in Beam's SDK workers sdk_worker_main, about 3 s), nor fork,
# which is unsafe in threaded Beam workers.
_CHILD_CODE = ("import sys; from data_prep.codec import signals as codec_signals; "
               "codec_signals.child_main(int(sys.argv[1]))")
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def media_duration(path: str) -> float:
  """Seconds of the first video stream from the header (0 for images and unreadable files)."""
  if is_image_path(path):
    return 0.0
  try:
    with av.open(path, metadata_errors="ignore") as c:
      if not c.streams.video:
        return 0.0
      st = c.streams.video[0]
      if st.duration is not None and st.time_base is not None:
        return max(0.0, float(st.duration * st.time_base))
      return max(0.0, (c.duration or 0) / 1e6)
  except (av.error.FFmpegError, OSError, ValueError):
    return 0.0


def scaled_timeout(timeout: float, duration: float) -> float:
  """--decode_timeout covers up to a minute of video; longer videos get proportionally more."""
  return timeout * max(1.0, duration / 60.0)


def process_path(path: str, label: int, cfg, source: str = None) -> tuple:
  """-> ('ok', record bytes, stats) or ('fail', reason). Never raises for a bad input."""
  try:
    rec = patchify_file(path, cfg, label, source=source)
    data = records.encode_record(rec)
  except InputError as e:
    return ("fail", str(e))
  except Exception as e:  # a bug or an unforeseen library error must not end the run
    return ("fail", f"internal error: {type(e).__name__}: {e}")
  return ("ok", data, {"tokens": int(rec["positions"].shape[0]), "signal": rec["signal"],
                       "kind": "image" if rec["signal"].startswith("image") else "video"})


class DecodeWorker:
  """A child process that runs process_path; killed and replaced when it exceeds the timeout.

  The child is a fresh interpreter (subprocess) talking over a socket pair; `prestart()` launches
  it without waiting, so its imports overlap with the caller's own start-up.
  """

  startup_timeout = 120.0

  def __init__(self, cfg, timeout: float):
    self.cfg_dict = dataclasses.asdict(cfg)
    self.timeout = timeout
    self.proc = None
    self.conn = None
    self.ready = False

  def prestart(self):
    """Launches the child if none is running; returns at once (run() waits for it)."""
    if self.proc is None or self.proc.poll() is not None:
      self.close()
      self._launch()

  def _launch(self):
    from multiprocessing.connection import Connection
    ours, theirs = socket.socketpair()
    try:
      env = dict(os.environ)
      env["PYTHONPATH"] = os.pathsep.join(
          [_PROJECT_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
      self.proc = subprocess.Popen([sys.executable, "-c", _CHILD_CODE, str(theirs.fileno())],
                                   pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL,
                                   close_fds=True)
    except BaseException:
      ours.close()
      raise
    finally:
      theirs.close()
    self.conn = Connection(ours.detach())
    self.ready = False
    self.conn.send(self.cfg_dict)

  def _start(self):
    """Launches the child (unless prestart() did) and waits until its imports are done."""
    self.prestart()
    try:
      ready = self.conn.poll(self.startup_timeout) and self.conn.recv() == ("ready",)
    except (EOFError, OSError):
      ready = False
    if not ready:
      self.close()
      raise RuntimeError(f"decode worker did not start within {self.startup_timeout}s")
    self.ready = True

  def run(self, path: str, label: int, source: str = None) -> tuple:
    if not self.ready or self.proc.poll() is not None:
      self._start()
    try:
      self.conn.send((path, label, source))
    except OSError:  # the child died since the check above: the receive below reports it
      pass
    start = time.monotonic()
    limit = self.timeout
    while self.conn.poll(max(0.0, start + limit - time.monotonic())):
      try:
        msg = self.conn.recv()
      except (EOFError, OSError):
        try:
          code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
          code = None
        self.close()
        return ("fail", f"decoder process died (exit code {code})")
      if msg[0] != "duration":
        return msg
      limit = scaled_timeout(self.timeout, msg[1])
    self.close()
    return ("fail", f"decode timeout: no result after {limit:g}s")

  def close(self):
    """Safe in every state: never started, start failed half-way, child died, already closed."""
    proc, conn = self.proc, self.conn
    self.proc = self.conn = None
    self.ready = False
    if proc is not None:
      if proc.poll() is None:
        proc.kill()
      try:
        proc.wait(5)
      except subprocess.TimeoutExpired:
        pass
    if conn is not None:
      conn.close()
