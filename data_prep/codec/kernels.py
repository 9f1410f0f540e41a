"""Compiled (numba) per-frame codec signal: paint vectors on cells, warp, residual, pool, fuse."""
# The same rules as data_prep.codec.signals.FrameSignals (its numpy path is the reference these
# kernels are tested against), in one call per frame: scoring every decoded frame of a sampling
# interval costs a few hundred numpy calls per frame otherwise, more than the decode itself.
import functools
import math

import numba
import numpy as np

from data_prep.codec.decode import MV_DTYPE

_JIT = dict(cache=True, nogil=True, fastmath=False, boundscheck=False)


def as_vectors(mvs) -> np.ndarray:
  """Any array with the AVMotionVector field names as a read-only MV_DTYPE array (the kernel is
  compiled for that one type)."""
  out = np.zeros(len(mvs), MV_DTYPE)
  for name in MV_DTYPE.names:
    out[name] = mvs[name]
  out.flags.writeable = False
  return out


NO_VECTORS = as_vectors(np.zeros(0, MV_DTYPE))


@numba.njit(**_JIT)
def _lattice_count(lo, hi, size, stride):
  """Lattice points (multiples of stride below size) in [lo, hi)."""
  hi = min(hi, size)
  return max(0, (hi + stride - 1) // stride - (lo + stride - 1) // stride)


@numba.njit(**_JIT)
def _p95_weighted(values, weights, floor):
  """signals.norm_scale(values, floor, weights): max(floor, the smallest v whose values
  <= v hold 95% of the weight), by weighted quickselect. Equal weights count values, as
  percentile95's nearest rank does; integer-valued weights sum exactly in any order."""
  n = values.size
  total = 0.0
  above = 0.0
  equal = True
  for i in range(n):
    total += weights[i]
    if values[i] > floor:
      above += weights[i]
    if weights[i] != weights[0]:
      equal = False
  if above <= 0.05 * total:
    return floor
  v = values.copy()
  if equal:
    w = np.ones(n)
    need = float(min(int(math.ceil(0.95 * n)), n))
  else:
    w = weights.copy()
    need = 0.95 * total
  lo, hi, acc = 0, n, 0.0
  while True:
    pivot = v[(lo + hi) // 2]
    # Three-way partition of [lo, hi): < pivot, == pivot, > pivot.
    lt, i, gt = lo, lo, hi
    w_lt, w_eq = 0.0, 0.0
    while i < gt:
      if v[i] < pivot:
        v[lt], v[i] = v[i], v[lt]
        w[lt], w[i] = w[i], w[lt]
        w_lt += w[lt]
        lt += 1
        i += 1
      elif v[i] > pivot:
        gt -= 1
        v[gt], v[i] = v[i], v[gt]
        w[gt], w[i] = w[i], w[gt]
      else:
        w_eq += w[i]
        i += 1
    if acc + w_lt >= need:
      hi = lt
    elif acc + w_lt + w_eq >= need or gt >= hi:
      return max(pivot, floor)
    else:
      acc += w_lt + w_eq
      lo = gt


@numba.njit(**_JIT)
def _fill(src, height, width, y0, stride, nr, dy, dx, x_lo, x_hi, out):
  """out[r, xi] = src[y0 + r * stride + dy, xi * stride + dx] over the lattice columns in
  [x_lo, x_hi), coordinates clamped to the frame (edge replication, as H.264 pads).

  Indices are uint64: numba gives a signed index it cannot prove non-negative a wrap-around
  branch, which stops vectorisation of these copies.
  """
  u = np.uint64
  if stride == 1:
    # Columns left / right of the frame repeat its edge; the rest is a contiguous copy.
    a = min(max(x_lo, -dx), x_hi)
    b = max(min(x_hi, width - dx), a)
    n, ua, us = u(b - a), u(a), u(a + dx)
    for r in range(nr):
      ur = u(r)
      yy = u(min(max(y0 + r + dy, 0), height - 1))
      for x in range(u(x_lo), ua):
        out[ur, x] = src[yy, 0]
      for i in range(n):
        out[ur, ua + i] = src[yy, us + i]
      for x in range(u(b), u(x_hi)):
        out[ur, x] = src[yy, u(width - 1)]
  else:
    xi0 = (x_lo + stride - 1) // stride
    xi1 = (x_hi + stride - 1) // stride
    for r in range(nr):
      yy = u(min(max(y0 + r * stride + dy, 0), height - 1))
      for xi in range(xi0, xi1):
        out[u(r), u(xi)] = src[yy, u(min(max(xi * stride + dx, 0), width - 1))]


@numba.njit(**_JIT)
def _offset(v, lim):
  return np.int64(min(max(np.rint(v), -lim), lim))


@numba.njit(**_JIT)
def _overlaps(pids, stride, shift):
  """[(cell line, patch id, lattice lines)] over one axis: the runs of lattice lines (given
  each line's patch id) that share a cell line and a patch."""
  out = np.empty((pids.size, 3), np.int64)
  n = 0
  for i in range(pids.size):
    cell = (i * stride) >> shift
    if n and out[n - 1, 0] == cell and out[n - 1, 1] == pids[i]:
      out[n - 1, 2] += 1
    else:
      out[n, 0] = cell
      out[n, 1] = pids[i]
      out[n, 2] = 1
      n += 1
  return out[:n]


@numba.njit(**_JIT)
def frame_score(cur, past, fut, use_fut, mvs, zero_motion, out, height, width, stride, lim,
                motion_floor, residual_floor, row_pid, col_pid, col_runs, col_run_pid, g, area,
                res, motion_weight, residual_weight, fusion_sum):
  """Adds one frame's fused patch scores to out [G*G] (display order) and returns whether it had
  vectors. As signals.FrameSignals.scores with fusion "sum" or "mean": the residual pool
  over its scale clipped at 1, the motion pool (0 with zero_motion when there are no vectors,
  else absent), weighted.

  cur/past/fut: C-contiguous luma planes [height, >= width] (decoder line padding allowed); fut
  is read where use_fut and a cell has a future-reference vector. mvs: MV_DTYPE records. The
  maps live on a lattice of every `stride`-th pixel, res [Lh, Lw] (a uint8 work buffer); lattice
  point (y, x) is in display-order patch row_pid[y] + col_pid[x], col_pid constant over each
  column run [col_runs[j], col_runs[j + 1]) (= col_run_pid[j]); area [G*G] counts lattice points
  per patch.
  """
  lh, lw = res.shape
  n_mv = mvs.size
  cell = 1 << 30  # no vectors: one cell, co-located prediction
  if n_mv:
    # Largest power of two dividing every block size and corner (cf. signals.mv_cell_size).
    bits = 0
    for i in range(n_mv):
      w, h = np.int64(mvs[i].w), np.int64(mvs[i].h)
      bits |= w | h | (np.int64(mvs[i].dst_x) - (w >> 1)) | (np.int64(mvs[i].dst_y) - (h >> 1))
    cell = bits & -bits
  shift = 0
  while (1 << shift) < cell:
    shift += 1
  cells_h = (height + cell - 1) // cell
  cells_w = (width + cell - 1) // cell
  nc = cells_h * cells_w
  # Paint: each cell takes the vector of each direction that covers it (past: source < 0).
  pvx = np.zeros(nc)
  pvy = np.zeros(nc)
  fvx = np.zeros(nc)
  fvy = np.zeros(nc)
  has = np.zeros(nc, np.uint8)  # bit 0: a past vector, bit 1: a future vector
  for i in range(n_mv):
    w, h = np.int64(mvs[i].w), np.int64(mvs[i].h)
    y0 = (np.int64(mvs[i].dst_y) - (h >> 1)) >> shift
    x0 = (np.int64(mvs[i].dst_x) - (w >> 1)) >> shift
    scale = max(float(mvs[i].motion_scale), 1.0)
    vx = mvs[i].motion_x / scale
    vy = mvs[i].motion_y / scale
    fwd = mvs[i].source > 0
    for cy in range(max(y0, 0), min(y0 + (h >> shift), cells_h)):
      for cx in range(max(x0, 0), min(x0 + (w >> shift), cells_w)):
        c = cy * cells_w + cx
        if fwd:
          fvx[c] = vx
          fvy[c] = vy
          has[c] |= 2
        else:
          pvx[c] = vx
          pvy[c] = vy
          has[c] |= 1
  # Integer offsets (the exported vectors are quarter-pel; rounding keeps the warp a copy),
  # the prediction mode, |v| (the past vector where a cell has both) and lattice points per cell.
  poy = np.zeros(nc, np.int64)
  pox = np.zeros(nc, np.int64)
  foy = np.zeros(nc, np.int64)
  fox = np.zeros(nc, np.int64)
  mode = np.zeros(nc, np.uint8)  # 0: past (or co-located), 1: future only, 2: both averaged
  mag = np.zeros(nc)
  weight = np.empty(nc)
  col_count = np.empty(cells_w)
  for cx in range(cells_w):
    col_count[cx] = _lattice_count(cx * cell, cx * cell + cell, width, stride)
  for cy in range(cells_h):
    rows = _lattice_count(cy * cell, cy * cell + cell, height, stride)
    for cx in range(cells_w):
      c = cy * cells_w + cx
      weight[c] = rows * col_count[cx]
      hc = has[c]
      if hc & 1:
        poy[c] = _offset(pvy[c], lim)
        pox[c] = _offset(pvx[c], lim)
        if pvx[c] != 0.0 or pvy[c] != 0.0:
          mag[c] = math.sqrt(pvx[c] * pvx[c] + pvy[c] * pvy[c])
      if hc & 2:
        foy[c] = _offset(fvy[c], lim)
        fox[c] = _offset(fvx[c], lim)
        if use_fut:
          mode[c] = 2 if hc & 1 else 1
        if not hc & 1 and (fvx[c] != 0.0 or fvy[c] != 0.0):
          mag[c] = math.sqrt(fvx[c] * fvx[c] + fvy[c] * fvy[c])
  # Per cell row, runs of neighbouring cells that predict alike (skip blocks, big partitions).
  run_start = np.empty(nc + 1, np.int64)
  run_first = np.zeros(cells_h + 1, np.int64)
  n_runs = 0
  for cy in range(cells_h):
    run_first[cy] = n_runs
    base = cy * cells_w
    for cx in range(cells_w):
      c = base + cx
      if (cx == 0 or mode[c] != mode[c - 1] or poy[c] != poy[c - 1] or pox[c] != pox[c - 1]
          or (mode[c] != 0 and (foy[c] != foy[c - 1] or fox[c] != fox[c - 1]))):
        run_start[n_runs] = cx
        n_runs += 1
  run_first[cells_h] = n_runs
  # Residual |cur - prediction| on the lattice, one band of lattice rows per cell row: the
  # prediction is copied run by run over the band, then each row is differenced and added to
  # per-column sums (contiguous, vectorised loops), which a finished patch row spreads over its
  # column runs.
  g2 = g * g
  rsum = np.zeros(g2, np.int64)  # per patch: sum of min(r, floor), the clip at the floor
  above = 0
  band_rows = min(lh, (min(cell, height) + stride - 1) // stride + 1)
  band = np.empty((band_rows, lw), np.uint8)
  band_f = np.empty((band_rows, lw), np.uint8)
  col_r = np.zeros(lw, np.int32)
  col_a = np.zeros(lw, np.int32)
  floor8 = np.uint8(residual_floor)
  runs = col_runs.size - 1
  for cy in range(cells_h):
    yi0 = (cy * cell + stride - 1) // stride
    yi1 = min(lh, (min(cy * cell + cell, height) + stride - 1) // stride)
    nr = yi1 - yi0
    if nr <= 0:
      continue
    y0 = yi0 * stride
    base = cy * cells_w
    for q in range(run_first[cy], run_first[cy + 1]):
      cx = run_start[q]
      c = base + cx
      x_lo = cx << shift
      x_hi = width if q + 1 == run_first[cy + 1] else min(run_start[q + 1] << shift, width)
      m = mode[c]
      if m != 1:
        _fill(past, height, width, y0, stride, nr, poy[c], pox[c], x_lo, x_hi, band)
      if m != 0:
        _fill(fut, height, width, y0, stride, nr, foy[c], fox[c], x_lo, x_hi, band_f)
        xi0 = (x_lo + stride - 1) // stride
        xi1 = (x_hi + stride - 1) // stride
        for r in range(nr):
          o = band[r, xi0:xi1]
          f = band_f[r, xi0:xi1]
          if m == 1:
            for i in range(o.size):
              o[i] = f[i]
          else:
            for i in range(o.size):
              o[i] = (np.uint16(o[i]) + np.uint16(f[i]) + 1) >> 1
    for r in range(nr):
      yi = yi0 + r
      uy, ur, uc = np.uint64(yi), np.uint64(r), np.uint64(yi * stride)
      # Separate simple loops: one loop writing four arrays is not vectorised (too many
      # aliasing checks) and runs several times slower.
      if stride == 1:
        for xi in range(lw):
          a = cur[uc, xi]
          b = band[ur, xi]
          res[uy, xi] = max(a, b) - min(a, b)
      else:
        for xi in range(lw):
          a = cur[uc, xi * stride]
          b = band[ur, xi]
          res[uy, xi] = max(a, b) - min(a, b)
      for xi in range(lw):
        col_r[xi] += min(res[uy, xi], floor8)
      for xi in range(lw):
        col_a[xi] += res[uy, xi] > floor8
      if yi + 1 == lh or row_pid[yi + 1] != row_pid[yi]:
        rp = row_pid[yi]
        for j in range(runs):
          rsum[rp + col_run_pid[j]] += col_r[col_runs[j]:col_runs[j + 1]].sum()
        for xi in range(lw):
          above += col_a[xi]
          col_r[xi] = 0
          col_a[xi] = 0
  n = lh * lw
  out_r = np.empty(g2)
  if above <= 0.05 * n:
    r_scale = residual_floor
    for k in range(g2):
      out_r[k] = (rsum[k] / area[k]) / r_scale
  else:
    # Busy frame: the scale is the 95th percentile (nearest rank) of the residual, found by
    # bisection over the 256 levels with vectorised counts (a histogram would serialise).
    need = 0.95 * n
    lo, hi = 0, 255
    while lo < hi:
      mid = (lo + hi) // 2
      cnt = 0
      for yi in range(lh):
        rr = res[yi]
        for xi in range(lw):
          cnt += rr[xi] <= mid
      if cnt >= need:
        hi = mid
      else:
        lo = mid + 1
    r_scale = max(lo, residual_floor)
    cap = np.uint8(min(r_scale, 255))
    col_r[:] = 0
    rsum[:] = 0
    for yi in range(lh):
      rr = res[yi]
      for xi in range(lw):
        col_r[xi] += min(rr[xi], cap)
      if yi + 1 == lh or row_pid[yi + 1] != row_pid[yi]:
        rp = row_pid[yi]
        for j in range(runs):
          rsum[rp + col_run_pid[j]] += col_r[col_runs[j]:col_runs[j + 1]].sum()
        col_r[:] = 0
    for k in range(g2):
      out_r[k] = (rsum[k] / area[k]) / r_scale
  if not n_mv:
    if motion_weight == 0 or not zero_motion:
      f = residual_weight if fusion_sum else 1.0
      for k in range(g2):
        out[k] += out_r[k] * f
    else:
      for k in range(g2):
        t = motion_weight * 0.0 + residual_weight * out_r[k]
        out[k] += t if fusion_sum else t / (motion_weight + residual_weight)
    return False
  # Motion: |v| per cell over the frame's 95th percentile (cells weighted by their lattice
  # points), as float32 like the numpy path; pooled as the mean over each patch's lattice points
  # through the (cell row, patch row) and (cell column, patch column) overlaps.
  m_scale = _p95_weighted(mag, weight, motion_floor)
  mcell = np.empty(nc)
  for c in range(nc):
    mcell[c] = np.float32(min(mag[c] * (1.0 / m_scale), 1.0))
  ov_r = _overlaps(row_pid, stride, shift)
  ov_c = _overlaps(col_pid, stride, shift)
  n_or, n_oc = ov_r.shape[0], ov_c.shape[0]
  out_m = np.zeros(g2)
  for i in range(n_or):
    base = ov_r[i, 0] * cells_w
    rp = ov_r[i, 1]
    rc = ov_r[i, 2]
    for j in range(n_oc):
      out_m[rp + ov_c[j, 1]] += (rc * ov_c[j, 2]) * mcell[base + ov_c[j, 0]]
  for k in range(g2):
    out_m[k] /= area[k]
  for k in range(g2):
    if motion_weight == 0:
      out[k] += out_r[k] * (residual_weight if fusion_sum else 1.0)
    elif residual_weight == 0:
      out[k] += out_m[k] * (motion_weight if fusion_sum else 1.0)
    else:
      t = motion_weight * out_m[k] + residual_weight * out_r[k]
      out[k] += t if fusion_sum else t / (motion_weight + residual_weight)
  return True


# Per geometry, like the lattice cache of signals.FrameSignals: every video of a dataset shares a few shapes.
@functools.lru_cache(maxsize=32)
def patch_layout(lattice_h: int, lattice_w: int, grid_side: int, rot_k: int):
  """(row_pid, col_pid, col_runs, col_run_pid, area) of a lattice in coded orientation whose
  patches are counted in display orientation (np.rot90 by rot_k) and split as
  signals.patch_means splits: lattice point (y, x) is in patch row_pid[y] + col_pid[x];
  col_pid is col_run_pid[j] over each run x in [col_runs[j], col_runs[j + 1])."""
  g = grid_side
  dh, dw = (lattice_h, lattice_w) if rot_k % 2 == 0 else (lattice_w, lattice_h)
  by = np.searchsorted((np.arange(g) * dh) // g, np.arange(dh), side="right") - 1
  bx = np.searchsorted((np.arange(g) * dw) // g, np.arange(dw), side="right") - 1
  coded = np.rot90(by[:, None] * g + bx[None, :], -rot_k)
  row_pid = coded[:, 0].astype(np.int64)
  col_pid = (coded[0, :] - coded[0, 0]).astype(np.int64)
  assert (row_pid[:, None] + col_pid[None, :] == coded).all()
  col_runs = np.flatnonzero(np.diff(col_pid, prepend=-1, append=-1)).astype(np.int64)
  col_run_pid = col_pid[col_runs[:-1]]
  area = np.bincount(coded.reshape(-1), minlength=g * g).astype(np.float64)
  return row_pid, col_pid, col_runs, col_run_pid, area
