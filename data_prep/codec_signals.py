"""Codec signals via PyAV (stock FFmpeg): decode, motion/residual maps, fusion, top-K selection."""
import dataclasses
import math
import multiprocessing
import os
import threading

import av
import numpy as np

from data_prep import records
from data_prep import selectors

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
FUSIONS = ("mean", "max", "sum", "geomean")
RESIZE_FILTERS = ("AREA", "BILINEAR", "BICUBIC", "FAST_BILINEAR", "POINT", "X", "BICUBLIN",
                  "GAUSS", "SINC", "LANCZOS", "SPLINE")  # swscale's scaling filters
_PICT_CHAR = {1: "I", 2: "P", 3: "B"}
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
  keep_first_frame: bool = False
  static_fallback: bool = True
  static_threshold: float = 0.02
  motion_floor: float = 1.0  # pixels: the smallest divisor of the |MV| map (no noise blow-up)
  residual_floor: int = 16  # luma levels, same role; an integer keeps the uint8 clip exact
  min_side: int = 16
  max_aspect: float = 10.0
  image_budget: float = 0.0  # 0: images keep the whole grid; (0, 1]: top-K by gradient saliency
  resize_interpolation: str = "AREA"
  max_mv_pixels: int = 64  # motion vectors are clipped to this many pixels when warping
  selector: str = "codec"  # selection rule for videos: data_prep.selectors.NAMES

  @property
  def grid_side(self) -> int:
    return self.image_size // self.patch_size

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
    if self.keep_first_frame and self.num_keep() < self.grid_side**2:
      bad("keep_first_frame", f"budget {self.budget} keeps {self.num_keep()} patches, fewer than "
          f"one frame ({self.grid_side**2})")
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


def select_top_k(scores: np.ndarray, k: int, keep_first_frame: bool = False) -> np.ndarray:
  """Global top-K over [T, H, W] scores -> sorted (t, h, w) int32 positions.

  Ties go to the lower flat (t, h, w) index, so equal scores resolve identically everywhere.
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
    # Everything above the need-th largest score is in; ties at that score go to the lowest
    # flat (t, h, w) indices -- the deterministic tie break, without a full sort.
    kth = np.partition(cand, cand.size - need)[cand.size - need]
    above = rest[cand > kth]
    tied = rest[cand == kth][: need - above.size]
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
      cum = np.cumsum(np.bincount(values, minlength=256))
      return float(np.searchsorted(cum, 0.95 * cum[-1]))
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
      # Gather indices shaped [cells_h, cell, cells_w, cell]: adding one offset per cell is a
      # broadcast, not a per-pixel lookup of the cell's vector.
      rows = np.arange(self.cells_h * cell) + pad
      cols = np.arange(self.cells_w * cell) + pad
      self.base = (rows[:, None] * self.padded_w + cols[None, :]).reshape(
          self.cells_h, cell, self.cells_w, cell).astype(np.intp)
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
    self._pred = np.empty(self.base.shape, np.uint8)
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

    Returns a view of a reused buffer, valid until the next call.
    """
    flat = self.pad_into(prev_luma)
    if self.stride == 1:
      np.add(self.base, off.reshape(self.cells_h, 1, self.cells_w, 1), out=self._idx)
      np.take(flat, self._idx, out=self._pred)
      pred = self._pred.reshape(self.cells_h * self.cell, self.cells_w * self.cell)
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


def luma_plane(frame) -> np.ndarray:
  """[H, W] uint8 luma of a decoded frame, a view of the decoder's buffer when possible."""
  if frame.format.name in _LUMA_PLANE_FORMATS:
    plane = frame.planes[0]
    buf = np.frombuffer(plane, np.uint8)
    return buf[: plane.line_size * frame.height].reshape(frame.height, plane.line_size)[
        :, : frame.width]
  return frame.to_ndarray(format="gray")


def motion_fields(mvs, height, width):
  """Paints exported MVs onto a cell grid: (cell size, dx, dy, covered cell ids).

  dx, dy are in pixels per cell, [cells_h * cells_w]; `covered` lists the cells a vector paints.

  Prefers past-reference vectors where a bi-predicted block has two. Cells no vector covers
  (intra blocks) get zero motion, i.e. a co-located prediction.
  """
  w = mvs["w"].astype(np.intp)
  h = mvs["h"].astype(np.intp)
  x0 = mvs["dst_x"] - (w >> 1)
  y0 = mvs["dst_y"] - (h >> 1)
  # Largest power of two dividing every size and corner (the lowest set bit of their OR): a
  # cell grid on which each block is a whole number of cells. H.264 gives 4, 8 or 16.
  bits = int(np.bitwise_or.reduce(w) | np.bitwise_or.reduce(h) | np.bitwise_or.reduce(x0)
             | np.bitwise_or.reduce(y0))
  cell = bits & -bits
  scale = np.maximum(mvs["motion_scale"].astype(np.float64), 1.0)
  mx = mvs["motion_x"] / scale
  my = mvs["motion_y"] / scale
  # Block -> covered cells, fully vectorised: repeat each block id once per cell it spans.
  ncx, ncy = w // cell, h // cell
  n_cells = ncx * ncy
  block = np.repeat(np.arange(len(w)), n_cells)
  offset = np.arange(block.size) - np.repeat(np.cumsum(n_cells) - n_cells, n_cells)
  cy = y0[block] // cell + offset // ncx[block]
  cx = x0[block] // cell + offset % ncx[block]
  cells_h, cells_w = -(-height // cell), -(-width // cell)
  inside = (cy >= 0) & (cy < cells_h) & (cx >= 0) & (cx < cells_w)
  block, flat = block[inside], (cy * cells_w + cx)[inside]
  if (mvs["source"] > 0).any():
    # Bi-prediction: keep one vector per cell, past references (source < 0) first.
    pref = np.lexsort((np.arange(flat.size), mvs["source"][block] > 0, flat))
    flat, block = flat[pref], block[pref]
    first = np.concatenate([[True], flat[1:] != flat[:-1]])
    flat, block = flat[first], block[first]
  dx = np.zeros(cells_h * cells_w, np.float64)
  dy = np.zeros(cells_h * cells_w, np.float64)
  dx[flat] = mx[block]
  dy[flat] = my[block]
  return cell, dx, dy, flat


_LATTICES = threading.local()  # per thread: lattices hold work buffers


class FrameSignals:
  """Per-frame motion/residual patch scores for one video geometry; caches index tables."""

  def __init__(self, cfg: PatchifyConfig, height: int, width: int, rot_k: int = 0):
    self.cfg = cfg
    self.height, self.width, self.rot_k = height, width, rot_k
    self.stride = max(1, min(height, width) // cfg.image_size)

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

  def maps(self, cur_luma, prev_luma, mvs):
    """(motion per cell normalised to [0, 1] float32 or None, raw residual uint8 [Hm, Wm] in
    coded orientation, the lattice or None, signal tokens)."""
    cfg, s = self.cfg, self.stride
    cur = cur_luma[::s, ::s]
    if mvs is None or len(mvs) == 0:
      prev = (cur_luma if prev_luma is None else prev_luma)[::s, ::s]
      residual = np.maximum(cur, prev) - np.minimum(cur, prev)
      return None, residual, None, ("frame_diff",)
    cell, dx, dy, covered = motion_fields(mvs, self.height, self.width)
    lat = self._lattice(cell)
    if cfg.camera_compensation:
      # Camera motion ~ the area-weighted median vector of the cells vectors cover (intra
      # blocks carry no motion information); subtracting it leaves object motion.
      dxm = _weighted_median(dx[covered], lat.cell_count[covered])
      dym = _weighted_median(dy[covered], lat.cell_count[covered])
      mag = np.hypot(dx - dxm, dy - dym)
    else:
      mag = np.hypot(dx, dy)
    # Warp at integer precision: the exported vectors are quarter-pel, rounding keeps it a gather.
    lim = cfg.max_mv_pixels
    off = (np.clip(np.rint(dy), -lim, lim) * lat.padded_w + np.clip(np.rint(dx), -lim, lim))
    off = off.astype(np.intp)
    pred = lat.warp(prev_luma if prev_luma is not None else cur_luma, off)
    residual = lat.absdiff(cur, pred)
    m_scale = norm_scale(mag, cfg.motion_floor, lat.cell_count)
    motion_cells = np.minimum(mag * (1.0 / m_scale), 1.0).astype(np.float32)
    return motion_cells, residual, lat, ("mv", "residual")

  def scores(self, cur_luma, prev_luma, mvs):
    """Per-patch fused score [G, G] (display orientation) and the signal tokens used."""
    cfg = self.cfg
    motion_cells, residual, lat, tokens = self.maps(cur_luma, prev_luma, mvs)
    # The residual scale is an integer (uint8 percentile, integer floor), so clipping at it in
    # uint8 and dividing afterwards equals min(residual / scale, 1) exactly.
    r_scale = int(norm_scale(residual, cfg.residual_floor))
    if cfg.fusion in ("mean", "sum"):
      # Linear fusion commutes with patch pooling: pool each map, then combine G*G numbers.
      r_pool = self._pool(np.minimum(residual, min(r_scale, 255))) / r_scale
      m_pool = None if motion_cells is None else lat.pool_cells(motion_cells)
      return _combine(m_pool, r_pool, cfg), tokens
    r = normalise(residual, r_scale, 1)
    m = None if motion_cells is None else motion_cells[lat.cell_index]
    return self._pool(fuse(m, r, cfg)), tokens


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


def patchify_video(path: str, cfg: PatchifyConfig, seed: int = 0) -> dict:
  """Decodes one video and returns its record fields (without class_label/labels).

  `seed` seeds the random selector (one per video: patchify_file passes the sample_id)."""
  container = _open_video(path)
  try:
    declared = _declared_frames(container, path)
    if declared < 1:
      raise InputError("video stream has no frames")
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
  return fields


def _patchify_video(container, cfg, num_decoded, seed=0):
  """Returns (fields, frames decoded); fields is None if the stream ended before the plan."""
  t_len, g, p, s = cfg.num_frames, cfg.grid_side, cfg.patch_size, cfg.image_size
  idx = sample_indices(num_decoded, t_len)
  wanted = {}
  for slot, i in enumerate(idx.tolist()):
    wanted.setdefault(i, []).append(slot)
  last = int(idx[-1])
  scores = np.zeros((t_len, g, g), np.float64)
  frame_types = ["?"] * t_len
  kept_frames = [None] * t_len
  has_mvs = np.zeros(t_len, bool)
  tokens = set()
  stream = container.streams.video[0]
  # Frame threading truncates exported MVs and makes them non-deterministic (shared/README.md).
  stream.thread_type = "NONE"
  stream.codec_context.options = {"flags2": "+export_mvs"}
  signals, rot_k = None, 0
  prev_frame = None
  held = []  # (decoded index, frame, previous frame, vectors) of each sampled frame
  n = -1
  try:
    for n, frame in enumerate(container.decode(stream)):
      if n in wanted:
        if signals is None:
          _check_size(frame.width, frame.height, cfg)
          rot_k = _rotation_k(frame.rotation)
          signals = FrameSignals(cfg, frame.height, frame.width, rot_k)
        elif (frame.width, frame.height) != (signals.width, signals.height):
          raise InputError(f"frame size changes mid-stream ({signals.width}x{signals.height} -> "
                           f"{frame.width}x{frame.height})")
        sd = frame.side_data.get("MOTION_VECTORS")
        held.append((n, frame, prev_frame, sd.to_ndarray() if sd is not None else None))
      if n >= last:
        break
      prev_frame = frame
  except av.error.FFmpegError as e:
    raise InputError(f"decode error at frame {n + 1} ({type(e).__name__}: "
                     f"{e.strerror or e})") from e
  if n < last:
    return None, n + 1

  # Signals after decoding, from the held (reference-counted, never reused) frames: one tight
  # pass keeps caches warm; interleaved with decoding the same work ran about 2x slower.
  for i, frame, prev_frame, mvs in held:
    prev_luma = None
    if prev_frame is not None and (prev_frame.width, prev_frame.height) == (
        frame.width, frame.height):
      prev_luma = luma_plane(prev_frame)
    frame_score, used = signals.scores(luma_plane(frame), prev_luma, mvs)
    tokens.update(used)
    for slot in wanted[i]:
      scores[slot] = frame_score
      frame_types[slot] = _PICT_CHAR.get(int(frame.pict_type), "?")
      kept_frames[slot] = frame
      has_mvs[slot] = "mv" in used
  del held

  k = cfg.num_keep()
  grid = (t_len, g, g)
  # Static test on motion-compensated frames only when there are any: an I-frame's difference
  # to its predecessor is mostly re-encoding noise, not content change.
  basis = scores[has_mvs] if has_mvs.any() else scores
  static = cfg.static_fallback and percentile95(basis) < cfg.static_threshold
  if cfg.selector != selectors.CODEC:  # a baseline rule: the record's signal names it, not the maps
    positions = selectors.select(cfg.selector, grid, k, seed, cfg.keep_first_frame)
    tokens = {cfg.selector}
  elif static:
    positions = static_selection(grid, k, cfg.keep_first_frame)
    tokens.add("static_fallback")
  else:
    positions = select_top_k(scores, k, cfg.keep_first_frame)
  patches = np.empty((k, p, p, 3), np.uint8)
  for t in np.unique(positions[:, 0]):
    rows = np.flatnonzero(positions[:, 0] == t)
    rgb = np.rot90(to_rgb(kept_frames[t], s, cfg.resize_interpolation), rot_k)
    patches[rows] = _patches_from(rgb, positions[rows, 1:], p)
  return dict(patches=patches, positions=positions, grid=np.asarray(grid, np.int32),
              frame_types="".join(frame_types), signal=records.canonical_signal(tokens),
              scores=scores), n + 1


def _image_saliency(luma: np.ndarray) -> np.ndarray:
  """Gradient magnitude of luma (central differences), the saliency used for image budgets."""
  f = luma.astype(np.float32)
  gx = np.zeros_like(f)
  gy = np.zeros_like(f)
  gx[:, 1:-1] = f[:, 2:] - f[:, :-2]
  gy[1:-1] = f[2:] - f[:-2]
  return np.hypot(gx, gy)


def patchify_image(path: str, cfg: PatchifyConfig) -> dict:
  """One still image -> t=0 record: the whole grid, or top-K by saliency if image_budget > 0."""
  from PIL import Image, ImageOps, UnidentifiedImageError
  try:
    with Image.open(path) as im:
      im = ImageOps.exif_transpose(im)  # EXIF rotation, like the display matrix for video
      _check_size(im.width, im.height, cfg)
      rgb_img = im.convert("RGB")
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
    positions = select_top_k(scores, k)
    signal = "image+saliency"
  else:
    positions = unravel_positions(np.arange(g * g), grid)
    scores = np.ones(grid)
    signal = "image"
  return dict(patches=_patches_from(rgb, positions[:, 1:], p), positions=positions,
              grid=np.asarray(grid, np.int32), frame_types="I", signal=signal, scores=scores)


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
  fields = (patchify_image(path, cfg) if is_image_path(path)
            else patchify_video(path, cfg, records.sample_id_for(source)))
  scores = fields.pop("scores")
  rec = dict(fields, source=source, sample_id=records.sample_id_for(source),
             labels=np.zeros([0], np.int32), class_label=int(class_label))
  rec = records.validate_record(rec)
  if with_scores:
    rec["scores"] = scores
  return rec


# ----------------------------------------------------------------------------------------------
# Decode worker: one child process per DoFn instance, so a hung or crashing decoder is cut off.

def _worker_loop(conn, cfg_dict):
  cfg = PatchifyConfig(**cfg_dict)
  conn.send(("ready",))  # imports are done: from here on only decoding counts against timeouts
  while True:
    try:
      msg = conn.recv()
    except EOFError:
      return
    if msg is None:
      return
    path, label, source = msg
    conn.send(process_path(path, label, cfg, source))


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
  """A child process that runs process_path; killed and replaced when it exceeds the timeout."""

  startup_timeout = 120.0

  def __init__(self, cfg, timeout: float):
    self.cfg_dict = dataclasses.asdict(cfg)
    self.timeout = timeout
    self.proc = None
    self.conn = None

  def _start(self):
    ctx = multiprocessing.get_context("spawn")  # fork is unsafe in threaded Beam workers
    parent, child = ctx.Pipe()
    self.proc = ctx.Process(target=_worker_loop, args=(child, self.cfg_dict), daemon=True)
    self.proc.start()
    child.close()
    self.conn = parent
    try:
      ready = parent.poll(self.startup_timeout) and parent.recv() == ("ready",)
    except (EOFError, OSError):
      ready = False
    if not ready:
      self.close()
      raise RuntimeError(f"decode worker did not start within {self.startup_timeout}s")

  def run(self, path: str, label: int, source: str = None) -> tuple:
    if self.proc is None or not self.proc.is_alive():
      self._start()
    self.conn.send((path, label, source))
    if self.conn.poll(self.timeout):
      try:
        return self.conn.recv()
      except (EOFError, OSError):
        pass
      self.proc.join(5)
      code = self.proc.exitcode
      self.close()
      return ("fail", f"decoder process died (exit code {code})")
    self.close()
    return ("fail", f"decode timeout: no result after {self.timeout:g}s")

  def close(self):
    if self.proc is not None:
      if self.proc.is_alive():
        self.proc.kill()
      if self.proc.pid is not None:
        self.proc.join(5)
      self.conn.close()
    self.proc = self.conn = None
