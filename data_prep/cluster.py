"""Spherical k-means over teacher embeddings on a (data, model) JAX mesh; writes centers and top-k labels."""
import argparse
import functools
import glob
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ovenc_format import atomic_io
from ovenc_format import failures
from ovenc_format import label_table
from ovenc_format import paths as pathio
from ovenc_format import progress

MESH_AXES = ("data", "model")
FAILURES_FILE = "failures.jsonl"  # rejected input rows, one JSON object per line
_CENTER_BUDGET_BYTES = 1 << 30  # per-device bytes for centers (+ sums) before the model axis is used


# ----------------------------------------------------------------------------------------------
# Input


def ids_path_for(embeddings_path: str) -> str:
  """Sibling ids file: the file name with its first 'embeddings' replaced by 'sample_ids'."""
  d, name = os.path.split(embeddings_path)
  if "embeddings" not in name:
    raise ValueError(f"{embeddings_path}: embeddings file names must contain 'embeddings' (their ids "
                     f"live in the same name with 'sample_ids', e.g. embeddings-00000.npy + "
                     f"sample_ids-00000.npy)")
  return os.path.join(d, name.replace("embeddings", "sample_ids", 1))


def load_embeddings(path, reject_bad_rows: bool = False):
  """(float32 [N, D], int64 [N]) from one embeddings .npy or a folder of *embeddings*.npy files.

  A row run_clustering cannot take (NaN/inf or all zero, a negative = missing sample id, or a
  sample id that more than one row has) raises, naming the file and the rows; with
  reject_bad_rows it is left out instead, and the result is (x, ids, rejected), one dict per
  rejected row (file, row, sample_id, reason). Files that do not fit together always raise."""
  path = os.fspath(path)
  if pathio.is_dir(path):
    files = (sorted(str(f) for f in pathio.as_path(path).glob("*embeddings*.npy")) if pathio.is_remote(path)
             else sorted(glob.glob(os.path.join(path, "*embeddings*.npy"))))
    if not files:
      raise ValueError(f"{path}: no *embeddings*.npy files in this folder")
  elif pathio.is_file(path):
    files = [path]
  else:
    raise FileNotFoundError(f"--embeddings {path} does not exist")
  xs, ids, dim, where = [], [], None, []
  for f in files:
    idf = ids_path_for(f)
    if not pathio.is_file(idf):
      raise ValueError(f"{f}: sibling sample ids file {idf} is missing")
    # Remote files are staged to this host's cache: np.load memory-maps local files only.
    x = np.load(pathio.stage(f), mmap_mode="r", allow_pickle=False)
    i = np.load(pathio.stage(idf), allow_pickle=False)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
      raise ValueError(f"{f}: expected a float [N, D] array, got {x.dtype} {x.shape}")
    if i.ndim != 1 or not np.issubdtype(i.dtype, np.integer):
      raise ValueError(f"{idf}: expected an integer [N] array, got {i.dtype} {i.shape}")
    if i.shape[0] != x.shape[0]:
      raise ValueError(f"{idf}: {i.shape[0]} ids for {x.shape[0]} embeddings in {f}")
    if dim is not None and x.shape[1] != dim:
      raise ValueError(f"{f}: dim {x.shape[1]} differs from {dim} of {files[0]}")
    dim = x.shape[1]
    x = np.asarray(x, np.float32)
    if not reject_bad_rows:
      _check_rows(x, f)
    xs.append(x)
    ids.append(i.astype(np.int64))
    where.append(np.stack([np.full(len(i), len(where)), np.arange(len(i))], 1))
  x, ids = np.concatenate(xs), np.concatenate(ids)
  if not reject_bad_rows:
    _check_ids(ids, path)
    return x, ids
  reasons = _row_problems(x, ids)
  where = np.concatenate(where)
  rejected = [dict(file=files[where[r, 0]], row=int(where[r, 1]), sample_id=int(ids[r]),
                   reason=reasons[r]) for r in sorted(reasons)]
  keep = np.ones(len(ids), bool)
  keep[list(reasons)] = False
  return x[keep], ids[keep], rejected


def _row_problems(x, ids) -> dict:
  """{row: reason} of the rows _check_rows/_check_ids refuse; every row of a duplicated id."""
  out = {}
  for r in np.flatnonzero(~np.isfinite(x).all(axis=1)):
    out[int(r)] = "embedding contains NaN/inf"
  for r in np.flatnonzero(~(np.abs(x) > 0).any(axis=1)):
    out.setdefault(int(r), "embedding is all zero (no direction)")
  for r in np.flatnonzero(ids < 0):
    out.setdefault(int(r), "sample id is missing (negative)")
  uniq, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
  # Which of the copies is right is unknown, so none of them is used.
  for r in np.flatnonzero(counts[inverse] > 1):
    out.setdefault(int(r), f"sample id {int(ids[r])} is duplicated ({int(counts[inverse[r]])} rows)")
  return out


def _check_rows(x, where):
  bad = ~np.isfinite(x).all(axis=1)
  if bad.any():
    raise ValueError(f"{where}: row(s) {np.flatnonzero(bad)[:5].tolist()} contain NaN/inf")
  zero = ~(np.abs(x) > 0).any(axis=1)
  if zero.any():
    raise ValueError(f"{where}: row(s) {np.flatnonzero(zero)[:5].tolist()} are all zero (no direction)")


def _check_ids(ids, where):
  if ids.size and ids.min() < 0:
    raise ValueError(f"{where}: sample ids must be >= 0")
  s = np.sort(ids)
  dup = s[1:][s[1:] == s[:-1]]
  if dup.size:
    raise ValueError(f"{where}: duplicate sample id(s), e.g. {dup[:5].tolist()}")


# ----------------------------------------------------------------------------------------------
# Mesh


def make_cluster_mesh(num_clusters: int, dim: int, model_shards=None, devices=None) -> Mesh:
  """(data, model) mesh over all local devices. model_shards=None: the fewest center shards that
  keep centers + their sums under ~1 GiB per device (divisors of the device count)."""
  devices = np.asarray(jax.local_devices() if devices is None else devices)
  n = devices.size
  if model_shards is None:
    need = 2 * num_clusters * dim * 4
    model_shards = next((m for m in range(1, n + 1) if n % m == 0 and need / m <= _CENTER_BUDGET_BYTES), n)
  if model_shards < 1 or n % model_shards:
    raise ValueError(f"--model_shards {model_shards} must divide the {n} local devices")
  return Mesh(devices.reshape(n // model_shards, model_shards), MESH_AXES)


# ----------------------------------------------------------------------------------------------
# Sharded pieces (shard_map bodies see one (data, model) block)


def _normalize(x):
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-30))


def _chunks(x, chunk):
  return x.reshape(-1, chunk, x.shape[-1])


def _local_scores(xc, c, cvalid):
  """Cosines of a point chunk to this shard's centers; padding centers score -inf."""
  return jnp.where(cvalid[None, :], xc @ c.T, -jnp.inf)


def _assign(x, c, cvalid, chunk):
  """Nearest center (global index, cosine) per local point; ties -> lowest index."""
  offset = jax.lax.axis_index("model") * c.shape[0]

  def one(xc):
    s = _local_scores(xc, c, cvalid)
    return jnp.max(s, axis=1), jnp.argmax(s, axis=1).astype(jnp.int32) + offset

  best, arg = jax.lax.map(one, _chunks(x, chunk))
  best, arg = best.reshape(-1), arg.reshape(-1)
  gbest = jax.lax.pmax(best, "model")
  garg = jax.lax.pmin(jnp.where(best == gbest, arg, jnp.iinfo(jnp.int32).max), "model")
  return gbest, garg


def _lloyd_step(x, w, c, cvalid, *, chunk, repair):
  """Assignment, per-cluster sums (psum over data), re-normalised means, empty-cluster repair."""
  n_loc, c_loc = x.shape[0], c.shape[0]
  c_off = jax.lax.axis_index("model") * c_loc
  d_off = jax.lax.axis_index("data") * n_loc
  best, arg = _assign(x, c, cvalid, chunk)

  loc = arg - c_off
  mine = (loc >= 0) & (loc < c_loc) & (w > 0)
  tgt = jnp.where(mine, loc, c_loc)
  sums = jax.lax.psum(jnp.zeros_like(c).at[tgt].add(x, mode="drop"), "data")
  counts = jax.lax.psum(jnp.zeros((c_loc,), jnp.float32).at[tgt].add(w, mode="drop"), "data")
  new = jnp.where((counts > 0)[:, None], _normalize(sums), c)

  # Empty clusters are re-seeded from the worst-fitting clusters: each cluster offers its
  # worst-fitted point (lowest cosine to its center), the clusters with the lowest such cosine
  # go first, one point per cluster, at most `repair` per iteration (the rest wait a round).
  empty = (counts == 0) & cvalid
  big = jnp.iinfo(jnp.int32).max
  score = jnp.where(w > 0, best, jnp.inf)
  worst = jax.lax.pmin(jnp.full((c_loc,), jnp.inf).at[tgt].min(score, mode="drop"), "data")
  is_worst = mine & (score == worst[jnp.clip(loc, 0, c_loc - 1)])
  pidx = jnp.where(is_worst, jnp.arange(n_loc, dtype=jnp.int32) + d_off, big)
  worst_idx = jax.lax.pmin(jnp.full((c_loc,), big).at[tgt].min(pidx, mode="drop"), "data")
  r_loc = min(repair, c_loc)
  neg, pick = jax.lax.top_k(-worst, r_loc)
  neg = jax.lax.all_gather(neg, "model", tiled=True, to="invarying")
  cand = jax.lax.all_gather(worst_idx[pick], "model", tiled=True, to="invarying")
  r = min(repair, neg.shape[0])
  neg, pick = jax.lax.top_k(neg, r)
  cand = cand[pick]
  cand_ok = jnp.isfinite(neg)
  owner = (cand >= d_off) & (cand < d_off + n_loc)
  rows = jax.lax.psum(jnp.where(owner[:, None], x[jnp.clip(cand - d_off, 0, n_loc - 1)], 0.0), "data")
  n_empty_loc = jnp.sum(empty.astype(jnp.int32))
  per_shard = jax.lax.all_gather(n_empty_loc, "model")
  before = jnp.sum(jnp.where(jnp.arange(per_shard.shape[0]) < jax.lax.axis_index("model"), per_shard, 0))
  rank = before + jnp.cumsum(empty.astype(jnp.int32)) - 1
  take = empty & (rank < r) & cand_ok[jnp.clip(rank, 0, r - 1)]
  new = jnp.where(take[:, None], rows[jnp.clip(rank, 0, r - 1)], new)

  stats = dict(
      mean_cos=jax.lax.psum(jnp.sum(jnp.where(w > 0, best, 0.0)), "data"),
      empty=jax.lax.psum(n_empty_loc, "model"),
      repaired=jax.lax.psum(jnp.sum(take.astype(jnp.int32)), "model"),
  )
  return new, stats


def _top_k(x, c, cvalid, *, k, chunk):
  """Global top-k centers per local point: local top-k per shard, then a top-k over the gathered."""
  c_off = jax.lax.axis_index("model") * c.shape[0]
  kl = min(k, c.shape[0])

  def one(xc):
    v, i = jax.lax.top_k(_local_scores(xc, c, cvalid), kl)
    return v, i.astype(jnp.int32) + c_off

  v, i = jax.lax.map(one, _chunks(x, chunk))
  v, i = v.reshape(-1, kl), i.reshape(-1, kl)
  v = jax.lax.all_gather(v, "model", axis=1, tiled=True, to="invarying")
  i = jax.lax.all_gather(i, "model", axis=1, tiled=True, to="invarying")
  v, j = jax.lax.top_k(v, k)
  return v, jnp.take_along_axis(i, j, axis=1)


@functools.partial(jax.jit, static_argnames=("num_clusters", "trials"))
def _kmeanspp(x, w, key, num_clusters, trials):
  """Greedy k-means++ seeding: per step, `trials` candidates drawn by D^2 sampling (chord distance
  2 - 2cos, Gumbel-max trick), keeping the one that lowers the total potential most."""
  n = x.shape[0]
  k0, key = jax.random.split(key)
  first = jnp.argmax(jnp.where(w > 0, jax.random.gumbel(k0, (n,)), -jnp.inf))
  c0 = x[first]
  d2 = jnp.maximum(2.0 - 2.0 * (x @ c0), 0.0) * w
  centers = jnp.zeros((num_clusters, x.shape[1]), x.dtype).at[0].set(c0)

  def body(i, carry):
    centers, d2 = carry
    g = jax.random.gumbel(jax.random.fold_in(key, i), (trials, n))
    logp = jnp.where(d2 > 0, jnp.log(jnp.where(d2 > 0, d2, 1.0)), -jnp.inf)
    cand = x[jnp.argmax(logp[None, :] + g, axis=1)]                                # [trials, D]
    dc = jnp.minimum(d2[None, :], jnp.maximum(2.0 - 2.0 * (cand @ x.T), 0.0) * w[None, :])
    best = jnp.argmin(jnp.sum(dc, axis=1))
    return centers.at[i].set(cand[best]), dc[best]

  centers, _ = jax.lax.fori_loop(1, num_clusters, body, (centers, d2))
  return centers


# ----------------------------------------------------------------------------------------------
# Driver


def run_clustering(embeddings, sample_ids, num_clusters: int, top_k: int, *, iters: int = 20,
                   seed: int = 0, init: str = "kmeans++", mesh: Mesh = None, model_shards=None,
                   chunk_size: int = 4096, repair: int = 1024, init_trials=None, log=None,
                   progress=None) -> dict:
  """Spherical k-means + top-k labels. Returns dict(centers float32 [C, D] (unit rows), labels int32
  [N, top_k] (nearest first), cosine float32 [N, top_k], sample_ids int64 [N], history list)."""
  x = np.asarray(embeddings, np.float32)
  ids = np.asarray(sample_ids)
  if x.ndim != 2:
    raise ValueError(f"embeddings must be [N, D], got shape {x.shape}")
  if ids.shape != (x.shape[0],) or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"sample_ids must be an integer [N={x.shape[0]}] array, got {ids.dtype} {ids.shape}")
  _check_rows(x, "embeddings")
  _check_ids(ids, "sample_ids")
  n, d = x.shape
  if not 1 <= num_clusters <= n:
    raise ValueError(f"--num_clusters must be in [1, {n}] (the number of points), got {num_clusters}")
  if not 1 <= top_k <= num_clusters:
    raise ValueError(f"--top_k must be in [1, --num_clusters={num_clusters}], got {top_k}")
  if iters < 0:
    raise ValueError(f"--iters must be >= 0, got {iters}")
  if init not in ("kmeans++", "random"):
    raise ValueError(f"--init must be 'kmeans++' or 'random', got {init!r}")
  if init_trials is not None and init_trials < 1:
    raise ValueError(f"--init_trials must be >= 1, got {init_trials}")
  if chunk_size < 1 or repair < 1:
    raise ValueError(f"chunk_size and repair must be >= 1, got {chunk_size}, {repair}")
  log = log or (lambda msg: None)
  mesh = mesh or make_cluster_mesh(num_clusters, d, model_shards)
  n_data, n_model = mesh.shape["data"], mesh.shape["model"]

  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  n_loc = -(-n // n_data)
  chunk = min(chunk_size, n_loc)
  n_loc = -(-n_loc // chunk) * chunk
  x_pad = np.zeros((n_loc * n_data, d), np.float32)
  x_pad[:n] = x
  w_pad = (np.arange(n_loc * n_data) < n).astype(np.float32)
  c_pad = -(-num_clusters // n_model) * n_model
  cvalid_np = np.arange(c_pad) < num_clusters

  pts = NamedSharding(mesh, P("data", None))
  xs = jax.device_put(x_pad, pts)
  ws = jax.device_put(w_pad, NamedSharding(mesh, P("data")))
  csh = NamedSharding(mesh, P("model", None))
  cvalid = jax.device_put(cvalid_np, NamedSharding(mesh, P("model")))

  t0 = time.perf_counter()
  if init == "random":
    idx = np.random.default_rng(seed).choice(n, num_clusters, replace=False)
    c0 = x[np.sort(idx)]
  else:
    # sklearn's default number of local trials.
    trials = init_trials or 2 + int(math.log(num_clusters))
    # Seeding is sequential over centers: spread the points over every device for it.
    n_dev = n_data * n_model
    n_init = -(-n // n_dev) * n_dev
    flat = NamedSharding(mesh, P(MESH_AXES, None))
    xi = jax.device_put(np.pad(x, ((0, n_init - n), (0, 0))), flat)
    wi = jax.device_put((np.arange(n_init) < n).astype(np.float32), NamedSharding(mesh, P(MESH_AXES)))
    c0 = np.asarray(_kmeanspp(xi, wi, jax.random.key(seed), num_clusters, trials))
    del xi, wi
  centers = np.zeros((c_pad, d), np.float32)
  centers[:num_clusters] = c0
  centers = jax.device_put(centers, csh)
  log(f"init {init}: {time.perf_counter() - t0:.2f}s")

  step = jax.jit(jax.shard_map(
      functools.partial(_lloyd_step, chunk=chunk, repair=repair), mesh=mesh,
      in_specs=(P("data", None), P("data"), P("model", None), P("model")),
      out_specs=(P("model", None), P())))
  history = []
  for it in range(iters):
    centers, stats = step(xs, ws, centers, cvalid)
    # Block every iteration: queued collectives on many host devices can deadlock XLA's CPU runtime.
    stats = {k: v.item() for k, v in jax.device_get(stats).items()}
    stats["mean_cos"] /= n
    history.append(dict(iter=it, **stats))
    log(f"iter {it}: mean cos {stats['mean_cos']:.4f}, empty {stats['empty']}, repaired {stats['repaired']}")
    if progress is not None:
      progress.update()

  topk = jax.jit(jax.shard_map(
      functools.partial(_top_k, k=top_k, chunk=chunk), mesh=mesh,
      in_specs=(P("data", None), P("model", None), P("model")),
      out_specs=(P("data", None), P("data", None))))
  cos, lab = jax.device_get(topk(xs, centers, cvalid))
  centers = np.asarray(jax.device_get(centers))[:num_clusters]
  log(f"k-means done in {time.perf_counter() - t0:.2f}s")
  return dict(centers=centers, labels=np.asarray(lab[:n], np.int32), cosine=np.asarray(cos[:n], np.float32),
              sample_ids=ids.astype(np.int64), history=history)


def write_outputs(output_dir, result: dict, params: dict) -> dict:
  """centers.npy, labels.npz (label_table format) and cluster_summary.json; each atomically."""
  pathio.makedirs(output_dir)
  paths = dict(centers=pathio.join(output_dir, "centers.npy"),
               labels=pathio.join(output_dir, label_table.FILE_NAME),
               summary=pathio.join(output_dir, "cluster_summary.json"))
  atomic_io.save_npy(paths["centers"], result["centers"].astype(np.float32))
  label_table.write_label_table(paths["labels"], result["sample_ids"], result["labels"],
                                num_classes=int(result["centers"].shape[0]), cosine=result["cosine"])
  sizes = np.bincount(result["labels"][:, 0], minlength=result["centers"].shape[0])
  summary = dict(params, num_points=int(result["labels"].shape[0]), dim=int(result["centers"].shape[1]),
                 history=result["history"], cluster_size_min=int(sizes.min()),
                 cluster_size_max=int(sizes.max()), empty_clusters=int((sizes == 0).sum()))
  atomic_io.save_json(paths["summary"], summary)
  return paths


def main(argv=None):
  # No abbreviations: a typo that is a prefix of a flag must not pass as that flag.
  ap = argparse.ArgumentParser(prog="python -m data_prep.cluster", description=__doc__,
                               allow_abbrev=False)
  ap.add_argument("--embeddings", required=True,
                  help="embeddings .npy (+ sibling sample_ids .npy) or a folder of them, e.g. a teacher's "
                       "output or `python -m ovenc_jax.eval.embed --output DIR` for a trained encoder")
  ap.add_argument("--num_clusters", type=int, required=True)
  ap.add_argument("--top_k", type=int, default=10)
  ap.add_argument("--output", required=True)
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--init", choices=("kmeans++", "random"), default="kmeans++")
  ap.add_argument("--model_shards", type=int, default=None,
                  help="devices the centers are split over (default: fewest that fit ~1 GiB/device)")
  ap.add_argument("--chunk_size", type=int, default=4096, help="points per scoring block")
  ap.add_argument("--init_trials", type=int, default=None,
                  help="k-means++ candidates per step (default 2 + ln C; 1 = plain k-means++)")
  failures.add_flag(ap, "embedding rows (NaN/inf or all-zero rows, missing or duplicated sample ids)")
  a = ap.parse_args(argv)
  x, ids, rejected = load_embeddings(a.embeddings, reject_bad_rows=True)
  # The report is written before any check, so it always matches this run's input.
  report = failures.write_report(pathio.join(a.output, FAILURES_FILE), rejected)
  total = x.shape[0] + len(rejected)
  print(f"{total} embeddings of dim {x.shape[1]} from {a.embeddings}, {len(rejected)} rejected "
        f"(see {report}); devices: {jax.local_device_count()}")
  try:
    failures.check(len(rejected), total, a.max_failure_fraction, report, "embedding rows",
                   num_written=x.shape[0])
  except failures.TooManyFailures as e:
    print(f"{ap.prog}: error: {e}", file=sys.stderr)
    sys.exit(failures.EXIT_CODE)
  with progress.Progress(a.iters, "k-means", unit="iter") as bar:
    res = run_clustering(x, ids, a.num_clusters, a.top_k, iters=a.iters, seed=a.seed, init=a.init,
                         model_shards=a.model_shards, chunk_size=a.chunk_size,
                         init_trials=a.init_trials, log=bar.write, progress=bar)
  params = dict(embeddings=a.embeddings, num_clusters=a.num_clusters, top_k=a.top_k,
                iters=a.iters, seed=a.seed, init=a.init)
  paths = write_outputs(a.output, res, params)
  print("wrote " + ", ".join(paths.values()))


if __name__ == "__main__":
  main()
