"""No-download bootstrap teacher: pooled patch-pixel statistics of each record, standardised and PCA-projected."""
import argparse

import numpy as np

from ovenc_format import atomic_io
from ovenc_format import paths as pathio
from ovenc_format import records

# Luminance weights (ITU-R BT.601) for the grey-level features.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
HIST_BINS = 8
LAYOUT = 4   # LAYOUT x LAYOUT grid over the record's (h, w) extent
THUMB = 4    # each patch box-averaged to THUMB x THUMB grey levels
FEATURE_DIM = 6 + 3 * HIST_BINS + LAYOUT * LAYOUT + 2 * THUMB * THUMB + 2


def _box_average(grey, size):
  """[K, p, p] -> [K, size, size] by averaging p/size-wide bins (bin edges rounded, all pixels used)."""
  k, p, _ = grey.shape
  edges = np.round(np.linspace(0, p, size + 1)).astype(int)
  out = np.empty((k, size, size), np.float32)
  for i in range(size):
    for j in range(size):
      out[:, i, j] = grey[:, edges[i]:edges[i + 1], edges[j]:edges[j + 1]].mean(axis=(1, 2))
  return out


def record_features(rec: dict) -> np.ndarray:
  """FEATURE_DIM float32 features of one decoded record (pixels scaled to [0, 1]):
  colour mean and std per channel (6); per-channel 8-bin histograms (24); a 4x4 layout of mean
  luminance over the (h, w) grid, averaged over time, empty cells = the record's mean (16); each
  patch box-averaged to 4x4 grey levels, mean and std over patches (32); mean |dx|, |dy| of
  luminance inside patches (2)."""
  patches = rec["patches"]
  if patches.ndim != 4 or patches.shape[-1] != 3:
    raise ValueError(f"field 'patches': expected [K, p, p, 3], got {patches.shape}")
  px = patches.astype(np.float32) / 255.0
  flat = px.reshape(-1, 3)
  mean, std = flat.mean(0), flat.std(0)
  hist = np.stack([np.histogram(flat[:, c], bins=HIST_BINS, range=(0.0, 1.0))[0] for c in range(3)])
  hist = hist.astype(np.float32).reshape(-1) / flat.shape[0]

  grey = px @ _LUMA                                                   # [K, p, p]
  # Shape features see contrast-normalised luminance, so a recoloured copy looks the same.
  grey = (grey - grey.mean()) / max(float(grey.std()), 1e-3)
  patch_mean = grey.mean(axis=(1, 2))
  grid = np.asarray(rec["grid"])
  pos = np.asarray(rec["positions"])
  cell = (np.minimum(pos[:, 1] * LAYOUT // grid[1], LAYOUT - 1) * LAYOUT
          + np.minimum(pos[:, 2] * LAYOUT // grid[2], LAYOUT - 1))
  sums = np.bincount(cell, weights=patch_mean, minlength=LAYOUT * LAYOUT)
  cnt = np.bincount(cell, minlength=LAYOUT * LAYOUT)
  layout = np.where(cnt > 0, sums / np.maximum(cnt, 1), grey.mean()).astype(np.float32)

  thumbs = _box_average(grey, THUMB).reshape(grey.shape[0], -1)
  dx = np.abs(np.diff(grey, axis=2)).mean() if grey.shape[2] > 1 else 0.0
  dy = np.abs(np.diff(grey, axis=1)).mean() if grey.shape[1] > 1 else 0.0
  return np.concatenate([mean, std, hist, layout, thumbs.mean(0), thumbs.std(0),
                         np.array([dx, dy], np.float32)]).astype(np.float32)


def fit_projection(features: np.ndarray, dim: int):
  """Per-feature z-score, then PCA to `dim` (eigenvectors of the covariance, sign fixed so the
  largest-magnitude loading is positive): (mean [F], scale [F], components [F, dim])."""
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"bootstrap teacher needs at least 2 records, got features {features.shape}")
  if not 1 <= dim <= features.shape[1]:
    raise ValueError(f"--dim must be in [1, {features.shape[1]}], got {dim}")
  f = features.astype(np.float64)
  mean = f.mean(0)
  scale = f.std(0)
  scale = np.where(scale > 1e-8, scale, 1.0)  # constant features stay at 0 instead of dividing by 0
  z = (f - mean) / scale
  evals, evecs = np.linalg.eigh(z.T @ z / (z.shape[0] - 1))
  comps = evecs[:, np.argsort(-evals, kind="stable")[:dim]]
  flip = np.sign(comps[np.argmax(np.abs(comps), axis=0), np.arange(dim)])
  return mean, scale, comps * flip[None, :]


def project(features, mean, scale, comps) -> np.ndarray:
  return (((features.astype(np.float64) - mean) / scale) @ comps).astype(np.float32)


def embed_records(record_iter, dim: int = 64):
  """(embeddings float32 [N, dim], sample_ids int64 [N], projection) for decoded records."""
  feats, ids = [], []
  for rec in record_iter:
    feats.append(record_features(rec))
    ids.append(int(rec["sample_id"]))
  if not feats:
    raise ValueError("bootstrap teacher: no records to embed")
  feats = np.stack(feats)
  proj = fit_projection(feats, dim)
  emb = project(feats, *proj)
  # A record whose standardised features are all zero has no direction for cosine k-means.
  zero = ~(np.abs(emb) > 0).any(axis=1)
  if zero.any():
    raise ValueError(f"bootstrap teacher: {int(zero.sum())} record(s) embed to the zero vector")
  return emb, np.asarray(ids, np.int64), proj


def run(records_dir, output_dir, dim: int = 64) -> dict:
  """Embeds every record of an ArrayRecord shard folder; writes embeddings.npy, sample_ids.npy and
  teacher.npz (the fitted standardisation + PCA, to embed further records the same way)."""
  emb, ids, (mean, scale, comps) = embed_records(records.read_all(records_dir), dim)
  return atomic_io.write_embedding_folder(output_dir, emb, ids, source=records_dir, mean=mean, scale=scale,
                                         components=comps)


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m data_prep.bootstrap_teacher", description=__doc__)
  ap.add_argument("--records", required=True, help="folder of data-*-of-*.array_record shards")
  ap.add_argument("--output", required=True)
  ap.add_argument("--dim", type=int, default=64, help=f"embedding size (<= {FEATURE_DIM})")
  a = ap.parse_args(argv)
  paths = run(a.records, a.output, a.dim)
  n = np.load(pathio.stage(paths["sample_ids"])).shape[0]
  print(f"embedded {n} records -> " + ", ".join(paths.values()))


if __name__ == "__main__":
  main()
