"""No-download bootstrap teacher for the moving-digits demo: a record's bright-ink glyph shape, PCA-projected."""
import argparse

import numpy as np
from PIL import Image
from scipy import ndimage

from ovenc_format import atomic_io
from ovenc_format import paths as pathio
from ovenc_format import records

# Luminance weights (ITU-R BT.601): ink is found by brightness, whatever its tint.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# 8-connectivity, so diagonal stroke steps stay in one component.
_CONNECT = np.ones((3, 3), bool)
GLYPH_SIZE = 12        # glyphs are GLYPH_SIZE x GLYPH_SIZE ink maps
MIN_COMPONENT = 0.3    # components smaller than this fraction of the record's largest are specks
NEIGHBOURS = 5         # a candidate's consensus score: mean similarity to its this many closest
TOP_GLYPHS = 8         # the glyph of a record averages this many best-agreeing candidates


def frame_canvases(rec: dict):
  """(luma float32 [T, H*p, W*p] in 0..255, observed bool [T, H*p, W*p]): kept patches pasted
  at their (t, h, w) grid positions; pixels of dropped patches are 0 and unobserved."""
  patches, pos, grid = rec["patches"], np.asarray(rec["positions"]), np.asarray(rec["grid"])
  if patches.ndim != 4 or patches.shape[-1] != 3 or patches.shape[1] != patches.shape[2]:
    raise ValueError(f"field 'patches': expected [K, p, p, 3], got {patches.shape}")
  if pos.shape != (patches.shape[0], 3):
    raise ValueError(f"field 'positions': expected [{patches.shape[0]}, 3], got {pos.shape}")
  t, h, w = (int(x) for x in grid)
  p = patches.shape[1]
  # [T, H, W, p, p] then interleave to [T, H*p, W*p]; a scatter over whole patches, no Python loop.
  luma = np.zeros((t, h, w, p, p), np.float32)
  seen = np.zeros((t, h, w), bool)
  luma[pos[:, 0], pos[:, 1], pos[:, 2]] = patches.astype(np.float32) @ _LUMA
  seen[pos[:, 0], pos[:, 1], pos[:, 2]] = True
  luma = luma.transpose(0, 1, 3, 2, 4).reshape(t, h * p, w * p)
  observed = np.repeat(np.repeat(seen, p, axis=1), p, axis=2)
  return luma, observed


def otsu_threshold(values: np.ndarray) -> float:
  """Otsu's threshold over 0..255 levels (integer histogram): the cut maximising between-class
  variance, returned as level + 0.5 so `values > t` puts the cut level in the dark class. Returns
  +inf when all values are equal (nothing to separate, so no pixel counts as ink)."""
  v = np.clip(np.rint(np.asarray(values, np.float64)), 0, 255).astype(np.int64).ravel()
  if v.size == 0 or v.min() == v.max():
    return float("inf")
  hist = np.bincount(v, minlength=256).astype(np.float64)
  w0 = np.cumsum(hist)
  w1 = w0[-1] - w0
  m0 = np.cumsum(hist * np.arange(256))
  with np.errstate(divide="ignore", invalid="ignore"):
    between = (m0[-1] * w0 / w0[-1] - m0) ** 2 / (w0 * w1)
  between[~np.isfinite(between)] = -1.0
  return float(np.argmax(between)) + 0.5


def square_glyph(crop: np.ndarray, size: int = GLYPH_SIZE) -> np.ndarray:
  """Ink crop [h, w] -> centred on a zero square of side max(h, w) (keeps the aspect, so a '1'
  stays narrow) -> box-averaged to [size, size] float32."""
  h, w = crop.shape
  s = max(h, w)
  sq = np.zeros((s, s), np.float32)
  y0, x0 = (s - h) // 2, (s - w) // 2
  sq[y0:y0 + h, x0:x0 + w] = crop
  return np.asarray(Image.fromarray(sq, mode="F").resize((size, size), Image.BOX), np.float32)


def candidate_glyphs(rec: dict, size: int = GLYPH_SIZE, min_component: float = MIN_COMPONENT):
  """Glyphs of the ink components of every frame: (glyphs float32 [M, size*size], areas [M]).

  Ink = observed pixels brighter than the record's Otsu threshold, weighted by how far above it
  they are; each 8-connected component of a frame is cropped to its box (other components masked
  out) and squared. Components below `min_component` x the largest area are dropped. M may be 0.
  """
  luma, observed = frame_canvases(rec)
  thr = otsu_threshold(luma[observed])
  if not np.isfinite(thr):
    return np.zeros((0, size * size), np.float32), np.zeros((0,), np.int64)
  ink = np.clip((luma - thr) / max(255.0 - thr, 1.0), 0.0, 1.0) * observed
  mask = (luma > thr) & observed
  glyphs, areas = [], []
  for t in range(luma.shape[0]):
    if not mask[t].any():
      continue
    lab, _ = ndimage.label(mask[t], structure=_CONNECT)
    sizes = np.bincount(lab.ravel())
    for k, box in enumerate(ndimage.find_objects(lab), start=1):
      glyphs.append(square_glyph(ink[t][box] * (lab[box] == k), size).reshape(-1))
      areas.append(int(sizes[k]))
  if not glyphs:
    return np.zeros((0, size * size), np.float32), np.zeros((0,), np.int64)
  areas = np.asarray(areas, np.int64)
  keep = areas >= min_component * areas.max()
  return np.stack(glyphs)[keep], areas[keep]


def consensus_glyph(glyphs: np.ndarray, top: int = TOP_GLYPHS,
                    neighbours: int = NEIGHBOURS) -> np.ndarray:
  """Mean of the `top` candidates that agree best with the others (mean correlation with their
  `neighbours` most similar candidates). A record's digits are one class, so clean views of them
  agree, while two digits fused by an overlap, or a sliver of a partly kept digit, stand alone."""
  if glyphs.shape[0] <= 2:
    return glyphs.mean(0)
  z = glyphs - glyphs.mean(1, keepdims=True)
  z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-6)
  sim = z @ z.T
  np.fill_diagonal(sim, -np.inf)
  n = min(neighbours, glyphs.shape[0] - 1)
  score = np.sort(sim, axis=1)[:, -n:].mean(1)
  best = np.argsort(-score, kind="stable")[:top]
  return glyphs[best].mean(0)


def record_glyph(rec: dict, size: int = GLYPH_SIZE) -> np.ndarray:
  """The record's glyph [size*size] float32 (all zeros when it shows no ink)."""
  glyphs, _ = candidate_glyphs(rec, size)
  if glyphs.shape[0] == 0:
    return np.zeros((size * size,), np.float32)
  return consensus_glyph(glyphs).astype(np.float32)


def digits_glyphs(size: int = GLYPH_SIZE) -> np.ndarray:
  """scikit-learn's bundled handwritten digits (labels unused) through the same crop-and-square
  normalisation: [1797, size*size], an alternative set to fit the projection on."""
  from sklearn.datasets import load_digits
  out = []
  for img in load_digits().images.astype(np.float32) / 16.0:
    m = img > 0.3
    ys, xs = np.nonzero(m)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    out.append(square_glyph(img[box] * m[box], size).reshape(-1))
  return np.stack(out)


def fit_pca(x: np.ndarray, dim: int):
  """(mean [F], components [F, dim]): top right-singular vectors of the centred rows, sign fixed
  so each component's largest-magnitude loading is positive (deterministic output)."""
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"glyph teacher: need at least 2 glyphs to fit a projection, got {x.shape}")
  if not 1 <= dim <= min(x.shape):
    raise ValueError(f"--dim must be in [1, {min(x.shape)}], got {dim}")
  mean = x.astype(np.float64).mean(0)
  _, _, vt = np.linalg.svd(x.astype(np.float64) - mean, full_matrices=False)
  comps = vt[:dim].T
  flip = np.sign(comps[np.argmax(np.abs(comps), axis=0), np.arange(dim)])
  return mean, comps * flip[None, :]


def embed_records(record_iter, dim: int = 32, fit: str = "records", size: int = GLYPH_SIZE):
  """(embeddings float32 [N, dim], sample_ids int64 [N], (mean, components)).

  `fit`: 'records' fits the PCA on these records' glyphs, 'digits' on scikit-learn's digits.
  """
  if fit not in ("records", "digits"):
    raise ValueError(f"--fit must be 'records' or 'digits', got {fit!r}")
  glyphs, ids = [], []
  for rec in record_iter:
    glyphs.append(record_glyph(rec, size))
    ids.append(int(rec["sample_id"]))
  if not glyphs:
    raise ValueError("glyph teacher: no records to embed")
  glyphs = np.stack(glyphs)
  mean, comps = fit_pca(glyphs if fit == "records" else digits_glyphs(size), dim)
  emb = ((glyphs - mean) @ comps).astype(np.float32)
  # Cosine k-means cannot place a zero vector (a glyph equal to the PCA mean).
  zero = ~(np.abs(emb) > 0).any(axis=1)
  if zero.any():
    raise ValueError(f"glyph teacher: {int(zero.sum())} record(s) embed to the zero vector")
  return emb, np.asarray(ids, np.int64), (mean, comps)


def run(records_dir, output_dir, dim: int = 32, fit: str = "records",
        size: int = GLYPH_SIZE) -> dict:
  """Embeds every record of an ArrayRecord shard folder; writes embeddings.npy, sample_ids.npy and
  teacher.npz (glyph size, PCA mean and components, to embed further records the same way)."""
  if not isinstance(size, int) or size < 2:
    raise ValueError(f"--glyph_size must be an int >= 2, got {size!r}")
  emb, ids, (mean, comps) = embed_records(records.read_all(records_dir), dim, fit, size)
  return atomic_io.write_embedding_folder(output_dir, emb, ids, source=records_dir, glyph_size=np.int64(size),
                                         mean=mean, components=comps)


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m data_prep.glyph_teacher", description=__doc__)
  ap.add_argument("--records", required=True, help="folder of data-*-of-*.array_record shards")
  ap.add_argument("--output", required=True)
  ap.add_argument("--dim", type=int, default=32, help="embedding size (<= glyph_size**2)")
  ap.add_argument("--fit", choices=("records", "digits"), default="records",
                  help="fit the PCA on the records' glyphs or on scikit-learn's digits")
  ap.add_argument("--glyph_size", type=int, default=GLYPH_SIZE, help="glyph side in pixels")
  a = ap.parse_args(argv)
  paths = run(a.records, a.output, a.dim, a.fit, a.glyph_size)
  n = np.load(pathio.stage(paths["sample_ids"])).shape[0]
  print(f"embedded {n} records -> " + ", ".join(paths.values()))


if __name__ == "__main__":
  main()
