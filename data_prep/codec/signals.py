"""Per-frame codec signals: motion fields, compensated residuals, fusion, patch pooling."""
import math
import threading

import numpy as np

from data_prep.codec.config import PatchifyConfig


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
    # Reused work buffers: fresh large arrays per frame cost page faults every time.
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
  """data_prep.codec.kernels, imported on first use: numba's import then stays out of processes
  that never score a frame, such as the Beam workers that hand videos to a decoder child, whose
  start-up is on every job's critical path."""
  from data_prep.codec import kernels
  return kernels


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
      mag = np.sqrt(dx * dx + dy * dy)  # as the compiled kernel computes it (hypot is slower)
    lim = cfg.max_mv_pixels
    past_ref = prev_luma if prev_luma is not None else cur_luma
    if mode is None or not mode.any():
      pred = lat.warp(past_ref, _offsets(dx, dy, lim, lat.padded_w) if mode is None
                      else _offsets(dxp, dyp, lim, lat.padded_w))
    else:
      # A copy: warp reuses its buffer.
      pred_p = lat.warp(past_ref, _offsets(dxp, dyp, lim, lat.padded_w)).astype(np.uint16)
      pred_f = lat.warp(future_luma, _offsets(dxf, dyf, lim, lat.padded_w))
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


def _offsets(vx, vy, lim, padded_w):
  """Flat offsets into the padded frame of per-cell vectors, clipped to lim pixels.

  The warp is at integer precision: the exported vectors are quarter-pel, and rounding keeps the
  warp a gather.
  """
  return (np.clip(np.rint(vy), -lim, lim) * padded_w + np.clip(np.rint(vx), -lim, lim)
          ).astype(np.intp)


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


