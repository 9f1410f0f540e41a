"""Trainer tests: learning + kNN, cross-mesh restore, 2 processes vs 1, NaN, config errors (SIGTERM: test_preemption)."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.helpers import digit_shards
from tests.helpers.tolerances import assert_reorder_close
from ovenc_jax.configs import pretrain
from ovenc_jax.train import trainer as train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("digits")
  return (digit_shards.write_digit_shards(str(root / "train"), 0, 600, num_shards=4),
          digit_shards.write_digit_shards(str(root / "eval"), 1000, 200, num_shards=2, seed=1))


def overrides(total_steps=8, **extra):
  o = {"input.global_batch_size": 8, "input.tokens_per_row": 64, "input.max_segments": 2,
       "input.max_labels": 1, "loss.num_classes": 10, "loss.labels_per_step": 1,
       "optim.warmup_steps": 2, "total_steps": total_steps, "log_every": 1, "ckpt_every": 2,
       "eval_every": 0, "eval.tokens_per_row": 32, "eval.batch_size": 16, "eval.linear_probe": False}
  o.update(extra)
  return o


def make_config(train_dir, eval_dir="", **kw):
  c = pretrain.get_config(f"variant=tiny,data={train_dir},eval_data={eval_dir}")
  for key, value in overrides(**kw).items():
    section, _, name = key.rpartition(".")
    (c[section] if section else c)[name] = value
  return c


def losses(workdir):
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "loss" in row:
        out[row["step"]] = row["loss"]
  return out


def cli(workdir, train_dir, eval_dir="", extra=(), **kw):
  args = [sys.executable, "-m", "ovenc_jax.main", "--workdir", str(workdir),
          f"--config=ovenc_jax/configs/pretrain.py:variant=tiny,data={train_dir},eval_data={eval_dir}"]
  args += [f"--config.{k}={v}" for k, v in overrides(**kw).items()]
  return args + list(extra)


def test_short_run_lowers_loss_and_lifts_knn(data, tmp_path):
  cfg = make_config(*data, total_steps=300, ckpt_every=300, log_every=50,
                    **{"input.global_batch_size": 16, "optim.warmup_steps": 20})
  summary = train.Trainer(cfg, str(tmp_path)).run()
  loss = losses(str(tmp_path))
  first, last = np.mean([loss[s] for s in range(1, 11)]), np.mean([loss[s] for s in range(291, 301)])
  init_knn, final_knn = summary["initial_eval"]["knn_top1"], summary["final_eval"]["knn_top1"]
  print(f"loss {first:.3f} -> {last:.3f}, kNN {init_knn:.3f} -> {final_knn:.3f}")
  assert last < 0.5 * first, (first, last)
  assert final_knn > init_knn + 0.1, (init_knn, final_knn)
  assert os.path.isdir(os.path.join(tmp_path, "tensorboard"))


def test_checkpoint_restores_on_fewer_devices(data, tmp_path):
  devices = jax.devices()
  cfg = make_config(data[0], total_steps=4, async_ckpt=False)
  train.Trainer(cfg, str(tmp_path / "a"), devices=devices).run()
  os.system(f"cp -r {tmp_path / 'a'} {tmp_path / 'b'}")
  cont = make_config(data[0], total_steps=6)
  eight = train.Trainer(cont, str(tmp_path / "a"), devices=devices)
  s8 = eight.run()
  four = train.Trainer(cont, str(tmp_path / "b"), devices=devices[:4])
  s4 = four.run()
  assert s8["start_step"] == s4["start_step"] == 4
  la, lb = losses(str(tmp_path / "a")), losses(str(tmp_path / "b"))
  for s in (5, 6):  # 4 vs 8 devices reorders every reduction: equal to fp32 rounding, not bitwise
    assert_reorder_close(lb[s], la[s], err_msg=f"step {s}")
  centers = four.state["params"]["centers"]
  assert len(centers.sharding.device_set) == 4


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def finish(procs, timeout):
  """Outputs of trainer processes that must all exit 0 within `timeout` seconds each."""
  try:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:  # a hung trainer ignores SIGTERM (it only flags it): kill, so the suite goes on
      p.kill()
    raise
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


@pytest.mark.parametrize("mesh", [{}, {"mesh.data": 1, "mesh.fsdp": 8}], ids=["data", "fsdp8"])
def test_two_processes_match_one_process(data, tmp_path, mesh):
  """Data parallel, and FSDP over both processes (each weight gathered from, and its gradient
  reduce-scattered into, shards on the other process too)."""
  kw = dict(total_steps=4, **{"input.pack": False, "input.max_segments": 1}, **mesh)
  one = tmp_path / "one"
  train.Trainer(make_config(data[0], **kw), str(one)).run()  # in this process: ~8 s less start-up than a CLI run
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [subprocess.Popen(
      cli(tmp_path / "two", data[0], extra=[f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                            f"--process_id={i}"], **kw),
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = finish(procs, timeout=300)
  assert "process 1/2" in outs[1] or "process 1/2" in outs[0]
  want_mesh = {"data": 1, "fsdp": 8, "tensor": 1} if mesh else {"data": 8, "fsdp": 1, "tensor": 1}
  assert all(f"mesh {want_mesh}" in out for out in outs), outs[0][-2000:]
  a, b = losses(str(one)), losses(str(tmp_path / "two"))
  for s in range(1, 5):  # 2 processes x 4 devices vs 1 x 8: another reduction order
    assert_reorder_close(b[s], a[s], err_msg=f"step {s}")


def test_nan_stops_with_message(data, tmp_path):
  cfg = make_config(data[0], total_steps=6, max_bad_steps=2, **{"optim.lr": 1e30, "optim.clip_norm": None,
                                               "optim.warmup_steps": 0})
  with pytest.raises(train.NonFiniteLossError, match=r"non-finite loss .* at step \d"):
    train.Trainer(cfg, str(tmp_path)).run()


@pytest.mark.parametrize("key, value, message", [
    ("optim.schedule", "linear", "optim.schedule='linear'"),
    ("total_steps", 0, "config.total_steps=0"),
    ("optim.grad_accum_steps", 3, "not divisible by optim.grad_accum_steps=3"),
    ("mesh.data", 3, r"mesh.data\*mesh.fsdp\*mesh.tensor"),
    ("model.num_heads", 3, "model.width=128 is not divisible by model.num_heads=3"),
])
def test_bad_config_values(data, tmp_path, key, value, message):
  cfg = make_config(data[0])
  section, _, name = key.rpartition(".")
  (cfg[section] if section else cfg)[name] = value
  with pytest.raises(ValueError, match=message):
    train.Trainer(cfg, str(tmp_path))


def test_unknown_config_key_on_command_line(data, tmp_path):
  r = subprocess.run(cli(tmp_path, data[0], extra=["--config.optim.learning_rate=1"]), cwd=ROOT,
                     capture_output=True, text=True)
  assert r.returncode != 0
  assert "learning_rate" in r.stderr


def test_embed_from_workdir_feeds_clustering(data, tmp_path):
  from data_prep import cluster
  from ovenc_format import atomic_io
  from ovenc_jax.eval import embed
  from ovenc_jax.input import pipeline as input_pipeline
  cfg = make_config(*data, total_steps=2, async_ckpt=False)
  trainer = train.Trainer(cfg, str(tmp_path))
  trainer.run()
  emb, ids = embed.embed_records(str(tmp_path), data[1], tokens_per_row=32, batch_size=16)
  ref_emb, _, ref_ids = trainer.embed(trainer.state["params"]["encoder"], input_pipeline.make_eval_batches(
      data[1], tokens_per_row=32, batch_size=16))
  assert emb.shape == (200, 128) and len(set(ids.tolist())) == 200
  np.testing.assert_array_equal(input_pipeline.device_sample_ids(ids), ref_ids)
  np.testing.assert_allclose(emb, ref_emb, atol=1e-5)
  out = atomic_io.write_embedding_folder(str(tmp_path / "emb"), emb, ids)
  x, sid = cluster.load_embeddings(out["embeddings"])
  res = cluster.run_clustering(x, sid, 8, 2, iters=3)
  assert res["labels"].shape == (200, 2)
  np.testing.assert_array_equal(res["sample_ids"], ids)
  # The CLI path (--encoder_workdir) embeds with the same checkpoint and gives the same clustering.
  cluster.main(["--encoder_workdir", str(tmp_path), "--records", data[1], "--num_clusters", "8",
                "--top_k", "2", "--iters", "3", "--output", str(tmp_path / "clu")])
  table = np.load(tmp_path / "clu" / "labels.npz")
  order = np.argsort(res["sample_ids"])
  np.testing.assert_array_equal(np.sort(table["sample_id"]), np.sort(ids))
  got = dict(zip(table["sample_id"].tolist(), table["labels"].tolist()))
  np.testing.assert_array_equal(np.array([got[i] for i in res["sample_ids"][order].tolist()]),
                                res["labels"][order])
  with pytest.raises(SystemExit):
    cluster.main(["--encoder_workdir", str(tmp_path), "--num_clusters", "8", "--output", str(tmp_path / "x")])
