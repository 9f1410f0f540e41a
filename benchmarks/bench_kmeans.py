"""data_prep.cluster's sharded JAX k-means against faiss k-means (the published clustering) on the same embeddings: time and inertia."""
import argparse
import json
import os
import time

import jax
import numpy as np

from data_prep import cluster
from ovenc_jax import sharding


def planted(n, dim, clusters, noise, seed=0):
  """Unit rows: unit centers plus isotropic Gaussian noise, renormalised (as teacher rows are)."""
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(clusters, dim)).astype(np.float32)
  centers /= np.linalg.norm(centers, axis=1, keepdims=True)
  truth = rng.integers(0, clusters, n)
  x = centers[truth] + noise * rng.normal(size=(n, dim)).astype(np.float32) / np.sqrt(dim)
  return x / np.linalg.norm(x, axis=1, keepdims=True), truth


def score(x, centers, truth, block=4096):
  """Inertia (sum of squared distances to the nearest unit center, = sum of 2 - 2 cos), mean
  cosine and purity, with every method's centers renormalised (both label by cosine)."""
  c = centers / np.linalg.norm(centers, axis=1, keepdims=True)
  best, arg = [], []
  for s in range(0, x.shape[0], block):
    cos = x[s:s + block] @ c.T
    arg.append(cos.argmax(1))
    best.append(cos.max(1))
  best, arg = np.concatenate(best), np.concatenate(arg)
  m = np.zeros((c.shape[0], truth.max() + 1), np.int64)
  np.add.at(m, (arg, truth), 1)
  return dict(inertia=float(np.sum(2.0 - 2.0 * best)), mean_cos=float(best.mean()),
              purity=float(m.max(axis=1).sum() / truth.size))


def main():
  sharding.use_host_cpu_devices()
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--points", type=int, default=20_000)
  ap.add_argument("--dim", type=int, default=4096)
  ap.add_argument("--clusters", type=int, default=1000)
  ap.add_argument("--iters", type=int, default=20, help="Lloyd iterations of both (published: 20)")
  ap.add_argument("--noise", type=float, default=1.0)
  ap.add_argument("--json", default=None)
  a = ap.parse_args()
  import faiss
  x, truth = planted(a.points, a.dim, a.clusters, a.noise)
  rows = []
  # Ours: random init like faiss's (k-means++ seeding costs C sequential passes).
  t0 = time.perf_counter()
  res = cluster.run_clustering(x, np.arange(a.points), a.clusters, 1, iters=a.iters, init="random")
  rows.append(dict(method="jax", seconds=time.perf_counter() - t0, **score(x, res["centers"], truth)))
  # The published settings: L2 k-means on unit rows, every point used, centroids renormalised after.
  faiss.omp_set_num_threads(os.cpu_count())
  t0 = time.perf_counter()
  km = faiss.Kmeans(a.dim, a.clusters, niter=a.iters, seed=1234, max_points_per_centroid=10_000_000,
                    verbose=False)
  km.train(x)
  rows.append(dict(method="faiss", seconds=time.perf_counter() - t0, **score(x, km.centroids, truth)))
  print(f"\n{a.points} unit points x {a.dim} dims -> {a.clusters} centers, {a.iters} iterations, "
        f"random init; jax on {jax.device_count()} host devices, faiss {faiss.__version__} on "
        f"{os.cpu_count()} threads (jax time includes its compile)")
  print(f"{'method':>6} {'seconds':>8} {'inertia':>10} {'mean cos':>9} {'purity':>7}")
  for r in rows:
    print(f"{r['method']:>6} {r['seconds']:8.1f} {r['inertia']:10.1f} {r['mean_cos']:9.4f} "
          f"{r['purity']:7.3f}")
  if a.json:
    figures = {f"{r['method']}_{k}": v for r in rows for k, v in r.items() if k != "method"}
    with open(a.json + ".tmp", "w") as f:
      json.dump(figures, f, indent=1, sort_keys=True)
    os.replace(a.json + ".tmp", a.json)


if __name__ == "__main__":
  main()
