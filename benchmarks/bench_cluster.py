"""Sharded spherical k-means at laptop size (default 20k points x 256 dims x 1k centers): seconds per phase, purity."""
import argparse
import json
import os
import time

import jax
import numpy as np

from data_prep import cluster
from ovenc_jax import sharding


def planted(n, dim, clusters, noise, seed=0):
  """Unit centers plus isotropic Gaussian noise: points with a known cluster each."""
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(clusters, dim))
  centers /= np.linalg.norm(centers, axis=1, keepdims=True)
  truth = rng.integers(0, clusters, n)
  x = centers[truth] + noise * rng.normal(size=(n, dim)) / np.sqrt(dim)
  return x.astype(np.float32), truth


def purity(pred, truth):
  m = np.zeros((pred.max() + 1, truth.max() + 1), np.int64)
  np.add.at(m, (pred, truth), 1)
  return m.max(axis=1).sum() / truth.size


def main():
  sharding.use_host_cpu_devices()
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--points", type=int, default=20_000)
  ap.add_argument("--dim", type=int, default=256)
  ap.add_argument("--clusters", type=int, default=1000)
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--noise", type=float, default=0.5)
  ap.add_argument("--json", default=None)
  a = ap.parse_args()
  x, truth = planted(a.points, a.dim, a.clusters, a.noise)
  ids = np.arange(a.points)
  rows = []
  for init in ("kmeans++", "random"):
    # A first call compiles; the figures are from the second (same shapes, same seed).
    cluster.run_clustering(x, ids, a.clusters, 10, iters=a.iters, init=init)
    t0 = time.perf_counter()
    marks = {}
    res = cluster.run_clustering(
        x, ids, a.clusters, 10, iters=a.iters, init=init,
        log=lambda msg: marks.setdefault(msg.split(":")[0].split()[0], time.perf_counter() - t0))
    total = time.perf_counter() - t0
    rows.append(dict(init=init, init_s=marks["init"], lloyd_and_topk_s=total - marks["init"], total_s=total,
                     purity=float(purity(res["labels"][:, 0], truth)), mean_cos=res["history"][-1]["mean_cos"]))
  print(f"\n{a.points} points x {a.dim} dims -> {a.clusters} centers, {a.iters} Lloyd iterations + top-10 labels, "
        f"{jax.device_count()} host devices (mesh {dict(cluster.make_cluster_mesh(a.clusters, a.dim).shape)})")
  print(f"{'init':>10} {'init s':>8} {'Lloyd+top-k s':>14} {'total s':>8} {'purity':>7} {'mean cos':>9}")
  for r in rows:
    print(f"{r['init']:>10} {r['init_s']:8.2f} {r['lloyd_and_topk_s']:14.2f} {r['total_s']:8.2f} "
          f"{r['purity']:7.3f} {r['mean_cos']:9.4f}")
  if a.json:
    names = {"kmeans++": "kmeanspp", "random": "random"}
    figures = {f"{names[r['init']]}_{k}": v for r in rows for k, v in r.items() if k != "init"}
    with open(a.json + ".tmp", "w") as f:
      json.dump(figures, f, indent=1, sort_keys=True)
    os.replace(a.json + ".tmp", a.json)


if __name__ == "__main__":
  main()
