"""Sharded spherical k-means, top-k labels, the label side table and the bootstrap teacher."""
import os

import numpy as np
import pytest

from tests.helpers import digit_shards
from tests.helpers.tolerances import assert_reorder_close
from data_prep import bootstrap_teacher, cluster
from ovenc_format import label_table
from ovenc_format import records


def _planted(num_clusters, per_cluster, dim, noise, seed):
  """Well separated Gaussians on the sphere: random unit centers plus isotropic noise."""
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(num_clusters, dim))
  centers /= np.linalg.norm(centers, axis=1, keepdims=True)
  truth = np.repeat(np.arange(num_clusters), per_cluster)
  rng.shuffle(truth)
  x = centers[truth] + noise * rng.normal(size=(truth.size, dim)) / np.sqrt(dim)
  return x.astype(np.float32), truth


def _purity(pred, truth):
  m = np.zeros((pred.max() + 1, truth.max() + 1), int)
  np.add.at(m, (pred, truth), 1)
  return m.max(axis=1).sum() / truth.size


def _brute_force_top_k(x, centers, k):
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  scores = xn.astype(np.float64) @ centers.astype(np.float64).T
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return order, np.take_along_axis(scores, order, 1), scores


@pytest.fixture(scope="module")
def planted():
  x, truth = _planted(32, 100, 64, noise=0.6, seed=0)
  ids = np.arange(x.shape[0], dtype=np.int64) * 3 + 11
  return x, ids, truth


def test_planted_clusters_and_top_k(planted):
  x, ids, truth = planted
  res = cluster.run_clustering(x, ids, 32, 5, iters=8, seed=0, model_shards=4, chunk_size=256)
  assert res["centers"].shape == (32, 64) and res["labels"].shape == (3200, 5)
  np.testing.assert_allclose(np.linalg.norm(res["centers"], axis=1), 1.0, rtol=1e-5)
  assert _purity(res["labels"][:, 0], truth) >= 0.95
  order, top_scores, scores = _brute_force_top_k(x, res["centers"], 5)
  np.testing.assert_allclose(res["cosine"], top_scores, atol=1e-5)
  mismatch = res["labels"] != order
  # Only exact near-ties may be ordered differently than float64 numpy orders them.
  got_scores = np.take_along_axis(scores, res["labels"], 1)
  assert np.abs(got_scores - top_scores)[mismatch].max(initial=0.0) < 1e-5
  assert mismatch.mean() < 1e-3
  np.testing.assert_array_equal(res["sample_ids"], ids)
  # Each center is the normalised mean of its points (a converged Lloyd step, recomputed in numpy).
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  for c in range(0, 32, 7):
    mean = xn[res["labels"][:, 0] == c].sum(0)
    np.testing.assert_allclose(res["centers"][c], mean / np.linalg.norm(mean), atol=1e-4)


def test_deterministic_and_independent_of_mesh_shape(planted):
  x, ids, truth = planted
  a = cluster.run_clustering(x, ids, 30, 3, iters=4, seed=5, init="random", model_shards=1)
  b = cluster.run_clustering(x, ids, 30, 3, iters=4, seed=5, init="random", model_shards=8)
  c = cluster.run_clustering(x, ids, 30, 3, iters=4, seed=6, init="random", model_shards=1)
  # 1 vs 8 model shards reorders the center sums: equal to fp32 rounding (tests/tolerances.py). A label
  # may only differ where its two candidate centers score the same to that rounding.
  assert_reorder_close(b["centers"], a["centers"])
  diff = a["labels"] != b["labels"]
  if diff.any():
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    rows = np.nonzero(diff)[0]
    sa = np.take_along_axis(xn[rows] @ a["centers"].T, a["labels"][rows], 1)[diff[rows]]
    sb = np.take_along_axis(xn[rows] @ a["centers"].T, b["labels"][rows], 1)[diff[rows]]
    assert_reorder_close(sb, sa)
  assert diff.mean() < 1e-3
  assert (a["labels"] != c["labels"]).any()
  a2 = cluster.run_clustering(x, ids, 30, 3, iters=4, seed=5, init="random", model_shards=1)
  np.testing.assert_array_equal(a["centers"], a2["centers"])


def test_empty_cluster_repair():
  # 8 directions, 40 exact copies each: random init picks some direction several times, identical
  # centers tie (lowest index wins), the others stay empty and must be re-seeded, which has to
  # split the clusters that hold several directions.
  rng = np.random.default_rng(1)
  dirs = rng.normal(size=(8, 16))
  truth = np.repeat(np.arange(8), 40)
  x = dirs[truth].astype(np.float32)
  ids = np.arange(320)
  res = cluster.run_clustering(x, ids, 8, 1, iters=6, seed=3, init="random", model_shards=2)
  hist = res["history"]
  assert hist[0]["empty"] > 0 and sum(h["repaired"] for h in hist) > 0
  assert hist[-1]["empty"] == 0
  assert len(np.unique(res["labels"][:, 0])) == 8
  assert _purity(res["labels"][:, 0], truth) == 1.0


def _write_pair(d, tag, x, ids):
  np.save(os.path.join(d, f"embeddings{tag}.npy"), x)
  np.save(os.path.join(d, f"sample_ids{tag}.npy"), ids)


def test_cli_folder_and_label_table(tmp_path, planted):
  x, ids, truth = planted
  emb_dir = tmp_path / "emb"
  emb_dir.mkdir()
  _write_pair(str(emb_dir), "-00000", x[:2000], ids[:2000])
  _write_pair(str(emb_dir), "-00001", x[2000:], ids[2000:])
  out = tmp_path / "out"
  cluster.main(["--embeddings", str(emb_dir), "--num_clusters", "32", "--top_k", "4",
                "--output", str(out), "--iters", "5", "--seed", "0"])
  assert sorted(os.listdir(out)) == ["centers.npy", "cluster_summary.json", "failures.jsonl", "labels.npz"]
  assert open(out / "failures.jsonl").read() == ""  # every row was valid
  centers = np.load(out / "centers.npy")
  table = label_table.LabelTable(out)
  assert len(table) == 3200 and table.top_k == 4 and table.num_classes == 32
  assert (np.diff(table.sample_ids) > 0).all()
  q = ids[[5, 3000, 17]]
  order, _, _ = _brute_force_top_k(x[[5, 3000, 17]], centers, 4)
  np.testing.assert_array_equal(table.lookup(q), order)
  as_dict = label_table.load_label_table(out / "labels.npz")
  np.testing.assert_array_equal(as_dict[int(ids[3000])], order[1])
  with pytest.raises(KeyError, match="1 sample_id"):
    table.lookup([ids[0], 10**12])
  np.testing.assert_array_equal(table.lookup([10**12], missing="pad"), [[-1, -1, -1, -1]])
  # A single file with its sibling ids works the same way.
  x1, ids1 = cluster.load_embeddings(emb_dir / "embeddings-00001.npy")
  np.testing.assert_array_equal(ids1, ids[2000:])


@pytest.mark.slow
def test_encoder_embeddings_cluster_in_two_steps(tmp_path):
  """Re-clustering with a workdir's encoder: `python -m ovenc_jax.eval.embed` writes the folder that
  `python -m data_prep.cluster --embeddings DIR` reads as it is, and the labels are run_clustering's
  on embed_records' embeddings (the same checkpoint, the same clustering)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from ovenc_jax.configs import pretrain
  from ovenc_jax.eval import embed
  from ovenc_jax.model import encoder as model_lib
  from ovenc_jax.train import checkpoint as ckpt_lib

  shards = digit_shards.write_digit_shards(str(tmp_path / "shards"), 0, 96)
  config = pretrain.get_config("variant=tiny")
  work = str(tmp_path / "run")
  embed.save_config(work, config)
  t, p = 64, config.model.patch_size
  example = dict(patches=jnp.zeros((1, t, p * p * 3), jnp.uint8), positions=jnp.zeros((1, t, 3), jnp.int32),
                 segment_ids=jnp.ones((1, t), jnp.int32))
  params = model_lib.encoder_from_config(config.model).init(jax.random.key(0), **example)["params"]
  ckpt_lib.write_params_checkpoint(work, {"encoder": nn.meta.unbox(params)})

  emb, ids = embed.embed_records(work, shards, tokens_per_row=64)
  res = cluster.run_clustering(emb, ids, 8, 2, iters=3)
  embed.main(["--workdir", work, "--records", shards, "--output", str(tmp_path / "emb"), "--tokens_per_row", "64"])
  np.testing.assert_array_equal(np.load(tmp_path / "emb" / "embeddings.npy"), emb)
  np.testing.assert_array_equal(np.load(tmp_path / "emb" / "sample_ids.npy"), ids)
  cluster.main(["--embeddings", str(tmp_path / "emb"), "--num_clusters", "8", "--top_k", "2", "--iters", "3",
                "--output", str(tmp_path / "clu")])
  table = np.load(tmp_path / "clu" / "labels.npz")
  order = np.argsort(res["sample_ids"])
  np.testing.assert_array_equal(np.sort(table["sample_id"]), np.sort(ids))
  got = dict(zip(table["sample_id"].tolist(), table["labels"].tolist()))
  np.testing.assert_array_equal(np.array([got[i] for i in res["sample_ids"][order].tolist()]),
                                res["labels"][order])
  with pytest.raises(SystemExit):  # the records to embed are required
    embed.main(["--workdir", work, "--output", str(tmp_path / "x")])
  with pytest.raises(SystemExit):  # the cluster job embeds nothing itself
    cluster.main(["--encoder_workdir", work, "--num_clusters", "8", "--output", str(tmp_path / "x")])


def test_input_errors(tmp_path):
  d = str(tmp_path)
  x = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
  _write_pair(d, "", x, np.arange(10))
  with pytest.raises(ValueError, match="sample_ids-a.npy is missing"):
    np.save(os.path.join(d, "embeddings-a.npy"), x)
    cluster.load_embeddings(d)
  os.remove(os.path.join(d, "embeddings-a.npy"))
  np.save(os.path.join(d, "sample_ids.npy"), np.arange(9))
  with pytest.raises(ValueError, match="9 ids for 10 embeddings"):
    cluster.load_embeddings(os.path.join(d, "embeddings.npy"))
  np.save(os.path.join(d, "sample_ids.npy"), np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 8]))
  with pytest.raises(ValueError, match="duplicate sample id"):
    cluster.load_embeddings(d)
  bad = x.copy()
  bad[3] = np.nan
  with pytest.raises(ValueError, match=r"row\(s\) \[3\] contain NaN"):
    cluster.run_clustering(bad, np.arange(10), 2, 1)
  with pytest.raises(ValueError, match="--top_k"):
    cluster.run_clustering(x, np.arange(10), 2, 3)
  with pytest.raises(ValueError, match="--num_clusters"):
    cluster.run_clustering(x, np.arange(10), 11, 1)
  with pytest.raises(ValueError, match="must contain 'embeddings'"):
    np.save(os.path.join(d, "feats.npy"), x)
    cluster.load_embeddings(os.path.join(d, "feats.npy"))
  # Label table: range checks on write, clear errors on read.
  with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
    label_table.write_label_table(os.path.join(d, "t.npz"), [1, 2], [[0], [5]], num_classes=5)
  with pytest.raises(ValueError, match="duplicate sample_id"):
    label_table.write_label_table(os.path.join(d, "t.npz"), [1, 1], [[0], [4]], num_classes=5)
  p = label_table.write_label_table(os.path.join(d, "t.npz"), [9, 2], [[0, -1], [4, 3]], num_classes=5)
  assert [f for f in os.listdir(d) if f.startswith(".")] == []  # no temp files left behind
  np.testing.assert_array_equal(label_table.LabelTable(p).lookup([2, 9]), [[4, 3], [0, -1]])
  with open(os.path.join(d, "v2.npz"), "wb") as f:
    np.savez(f, sample_id=np.array([1], np.int64), labels=np.array([[0]], np.int32),
             cosine=np.array([[1.0]], np.float32), num_classes=np.int64(1), format_version=np.int64(2))
  with pytest.raises(ValueError, match="v2.npz: field 'format_version' is 2"):
    label_table.LabelTable(os.path.join(d, "v2.npz"))
  with open(os.path.join(d, "broken.npz"), "wb") as f:
    f.write(b"not a zip")
  with pytest.raises(ValueError, match="broken.npz: not a readable .npz"):
    label_table.LabelTable(os.path.join(d, "broken.npz"))
  with pytest.raises(FileNotFoundError, match="run data_prep.cluster"):
    label_table.LabelTable(os.path.join(d, "nope.npz"))


def _record(rng, i, family):
  """Family 0: smooth reddish patches; family 1: striped bluish patches. Sparse 3x3 grid subsets."""
  k = int(rng.integers(4, 10))
  cells = np.sort(rng.choice(9, k, replace=False))
  p = 8
  yy, xx = np.mgrid[0:p, 0:p]
  if family == 0:
    base = np.array([200, 60, 50]) + rng.integers(-30, 30, 3)
    img = np.broadcast_to(base, (k, p, p, 3)) + rng.integers(-10, 10, (k, p, p, 1))
  else:
    base = np.array([40, 70, 200]) + rng.integers(-30, 30, 3)
    stripes = 60 * ((xx + yy) % 4 < 2)[None, :, :, None]
    img = base + stripes + rng.integers(-10, 10, (k, p, p, 1))
  path = f"synthetic/{family}/{i}.png"
  return dict(patches=np.clip(img, 0, 255).astype(np.uint8),
              positions=np.stack([np.zeros(k, int), cells // 3, cells % 3], -1).astype(np.int32),
              grid=np.array([1, 3, 3], np.int32), frame_types="I", source=path,
              sample_id=records.sample_id_for(path), labels=np.zeros(0, np.int32), signal="image",
              class_label=family)


def test_bootstrap_teacher(tmp_path):
  rng = np.random.default_rng(0)
  recs = [_record(rng, i, i % 2) for i in range(60)]
  shard_dir = digit_shards.write_shards(tmp_path / "shards", recs)
  out = tmp_path / "teacher"
  bootstrap_teacher.main(["--records", shard_dir, "--output", str(out), "--dim", "16"])
  emb = np.load(out / "embeddings.npy")
  ids = np.load(out / "sample_ids.npy")
  assert emb.shape == (60, 16) and emb.dtype == np.float32 and ids.dtype == np.int64
  assert sorted(ids.tolist()) == sorted(r["sample_id"] for r in recs)
  first = emb.copy()
  bootstrap_teacher.main(["--records", shard_dir, "--output", str(out), "--dim", "16"])
  np.testing.assert_array_equal(np.load(out / "embeddings.npy"), first)

  # Features against direct numpy computations on one record.
  r = recs[1]
  f = bootstrap_teacher.record_features(records.decode_record(records.encode_record(r)))
  assert f.shape == (bootstrap_teacher.FEATURE_DIM,)
  px = r["patches"].reshape(-1, 3) / 255.0
  np.testing.assert_allclose(f[:3], px.mean(0), rtol=1e-5)
  np.testing.assert_allclose(f[3:6], px.std(0), rtol=1e-4)
  np.testing.assert_allclose(f[6:14], np.histogram(px[:, 0], 8, (0, 1))[0] / len(px), atol=1e-6)
  # Whole pipeline: the embedding separates the two visual families.
  by_id = {rec["sample_id"]: rec["class_label"] for rec in recs}
  truth = np.array([by_id[i] for i in ids])
  res = cluster.run_clustering(emb, ids, 2, 1, iters=5, seed=0)
  assert _purity(res["labels"][:, 0], truth) == 1.0
  # Standardised PCA: projected features are centred, uncorrelated, with descending variance.
  cov = np.cov(emb.T.astype(np.float64))
  np.testing.assert_allclose(emb.mean(0), 0, atol=1e-4)
  off = cov - np.diag(np.diag(cov))
  assert np.abs(off).max() < 1e-4 * np.diag(cov).max()
  assert (np.diff(np.diag(cov)) <= 1e-6).all()
  with pytest.raises(ValueError, match="--dim must be in"):
    bootstrap_teacher.run(str(shard_dir), str(tmp_path / "x"), dim=500)


def test_atomic_write_keeps_the_old_file_when_a_write_fails(tmp_path):
  from ovenc_format import atomic_io
  path = str(tmp_path / "centers.npy")
  atomic_io.save_npy(path, np.arange(3))

  def crash(f):
    f.write(b"half a file")
    raise RuntimeError("disk full")
  with pytest.raises(RuntimeError, match="disk full"):
    atomic_io.atomic_write(path, crash)
  np.testing.assert_array_equal(np.load(path), np.arange(3))
  assert os.listdir(tmp_path) == ["centers.npy"]


def test_embedding_folder_refuses_duplicate_sample_ids(tmp_path):
  from ovenc_format import atomic_io
  with pytest.raises(ValueError, match=r"shards/: duplicate sample_id\(s\) across records, e.g. \[7\]"):
    atomic_io.write_embedding_folder(str(tmp_path / "emb"), np.ones((3, 2), np.float32), np.array([7, 1, 7]),
                                     source="shards/")
  assert not os.path.exists(tmp_path / "emb")
