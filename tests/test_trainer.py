"""Trainer runs (learning, restore, processes, official recipe, mesh axes) and guards; SIGTERM: test_preemption."""
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from ovenc_format import label_table as label_table_lib
from ovenc_format import records
from ovenc_jax.configs import pretrain
from ovenc_jax.input import global_arrays
from ovenc_jax.input import pipeline as input_pipeline
from ovenc_jax.train import checkpoint as ckpt_lib
from ovenc_jax.train import compat
from ovenc_jax.train import trainer as train
from tests.helpers import digit_shards
from tests.helpers.tolerances import assert_reorder_close
from tests.helpers.train_cli import cli, finish, losses, make_config, overrides, set_keys, start_processes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("digits")
  return (digit_shards.write_digit_shards(str(root / "train"), 0, 600, num_shards=4),
          digit_shards.write_digit_shards(str(root / "eval"), 1000, 200, num_shards=2, seed=1))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  return digit_shards.write_digit_shards(str(tmp_path_factory.mktemp("digits") / "train"), 0, 300, num_shards=2)

@pytest.mark.slow
def test_short_run_lowers_loss_and_lifts_knn(trained_digits):
  summary, workdir = trained_digits["summary"], trained_digits["workdir"]
  loss = losses(workdir)
  first, last = np.mean([loss[s] for s in range(1, 11)]), np.mean([loss[s] for s in range(291, 301)])
  init_knn, final_knn = summary["initial_eval"]["knn_top1"], summary["final_eval"]["knn_top1"]
  print(f"loss {first:.3f} -> {last:.3f}, kNN {init_knn:.3f} -> {final_knn:.3f}")
  assert last < 0.5 * first, (first, last)
  assert final_knn > init_knn + 0.1, (init_knn, final_knn)
  assert os.path.isdir(os.path.join(workdir, "tensorboard"))


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [{}, {"mesh.data": 1, "mesh.fsdp": 8}], ids=["data", "fsdp8"])
def test_two_processes_match_one_process(data, tmp_path, mesh, request):
  """Data parallel, and FSDP over both processes (each weight gathered from, and its gradient
  reduce-scattered into, shards on the other process too). The data-parallel run's workdir is a
  bucket (the GCS emulator): what a pod does, with the local one-process run as its reference."""
  kw = dict(total_steps=4, **{"input.pack": False, "input.max_segments": 1}, **mesh)
  one = tmp_path / "one"
  train.Trainer(make_config(data[0], **kw), str(one)).run()  # in this process: no CLI start-up
  bucket = None if mesh else request.getfixturevalue("gcs_emulator")
  two = str(tmp_path / "two") if mesh else "gs://bkt/two-processes"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  outs = finish(start_processes(two, data[0], 2, env, **kw), timeout=300)
  assert "process 1/2" in outs[1] or "process 1/2" in outs[0]
  want_mesh = {"data": 1, "fsdp": 8, "tensor": 1} if mesh else {"data": 8, "fsdp": 1, "tensor": 1}
  assert all(f"mesh {want_mesh}" in out for out in outs), outs[0][-2000:]
  a = losses(str(one))
  b = losses(two) if mesh else bucket.losses("bkt", "two-processes")
  for s in range(1, 5):  # 2 processes x 4 devices vs 1 x 8: another reduction order
    assert_reorder_close(b[s], a[s], err_msg=f"step {s}")
  if bucket is not None:
    names = bucket.list_objects("bkt", "two-processes/")
    assert {"two-processes/config.json", "two-processes/metrics.jsonl"} <= set(names)
    assert any(n.startswith("two-processes/checkpoints/4/") for n in names), names
    assert not any(".tmp-" in n or ".write-probe-" in n for n in names), names
    assert not os.path.exists("gs:") and not (tmp_path / "gs:").exists()


@pytest.mark.slow
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
  set_keys(cfg, {key: value})
  with pytest.raises(ValueError, match=message):
    train.Trainer(cfg, str(tmp_path))


def test_unknown_config_key_on_command_line(data, tmp_path):
  r = subprocess.run(cli(tmp_path, data[0], extra=["--config.optim.learning_rate=1"]), capture_output=True,
                     text=True)
  assert r.returncode != 0
  assert "learning_rate" in r.stderr


@pytest.mark.slow
def test_embed_from_workdir_feeds_clustering(data, tmp_path):
  from data_prep import cluster
  from ovenc_format import atomic_io
  from ovenc_jax.eval import embed
  cfg = make_config(*data, total_steps=2, async_ckpt=False)
  trainer = train.Trainer(cfg, str(tmp_path))
  trainer.run()
  emb, ids = embed.embed_records(str(tmp_path), data[1], tokens_per_row=32, batch_size=16)
  ref_emb, _, ref_ids = trainer.embed(trainer.state["params"]["encoder"], input_pipeline.make_eval_batches(
      data[1], tokens_per_row=32, batch_size=16))
  assert emb.shape == (200, 128) and len(set(ids.tolist())) == 200
  np.testing.assert_array_equal(global_arrays.device_sample_ids(ids), ref_ids)
  np.testing.assert_allclose(emb, ref_emb, atol=1e-5)
  out = atomic_io.write_embedding_folder(str(tmp_path / "emb"), emb, ids)
  x, sid = cluster.load_embeddings(out["embeddings"])
  res = cluster.run_clustering(x, sid, 8, 2, iters=3)
  assert res["labels"].shape == (200, 2)
  np.testing.assert_array_equal(res["sample_ids"], ids)
  # The CLI form (embed, then cluster its output) is tests/test_cluster.py's two-step test.


# ---- the official recipe ---------------------------------------------------------------------

@pytest.mark.slow
def test_official_preset_trains(data, tmp_path):
  train_dir, _ = data
  c = pretrain.get_config(f"variant=tiny,data={train_dir},recipe=official")
  set_keys(c, overrides(total_steps=6, **{"input.max_labels": 1}))
  c.optim.warmup_steps = 1
  trainer = train.Trainer(c, str(tmp_path))
  state = trainer.init_state(0)
  ctr = np.asarray(state["params"]["centers"])[:10]
  np.testing.assert_allclose(ctr.std(), 0.01, rtol=0.2)  # N(0, 0.01), not unit rows
  summary = trainer.run()
  assert np.isfinite(summary["final_loss"])
  assert summary["final_step"] == 6


# ---- mesh axes from the axis rules -----------------------------------------------------------

@pytest.mark.slow
def test_centers_follow_the_classes_axis_rule(shards, tmp_path):
  """Rules that shard "classes" over data and fsdp only: the centers are split 4 ways and replicated
  over tensor, the loss reduces over those axes, and the first step's loss is the default layout's."""
  kw = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "loss.sample_rate": 1.0}
  default = train.Trainer(_tiny(shards, **kw), str(tmp_path / "a"))
  cfg = _tiny(shards, **kw)
  cfg.logical_axis_rules = tuple((name, ("data", "fsdp") if name == "classes" else axes)
                                 for name, axes in cfg.logical_axis_rules)
  trainer = train.Trainer(cfg, str(tmp_path / "b"))
  assert default.class_axes == ("data", "fsdp", "tensor") and default.batch_axes == ("data", "fsdp")
  assert trainer.class_axes == ("data", "fsdp") and trainer.batch_axes == ("data", "fsdp")
  batch = next(input_pipeline.make_train_iterator(cfg.input))
  step_losses = []
  for t, ways in ((default, 8), (trainer, 4)):
    state = t.init_state(0)
    centers = state["params"]["centers"]
    assert centers.sharding.spec == jax.P(t.class_axes, None)
    assert {s.data.shape[0] for s in centers.addressable_shards} == {centers.shape[0] // ways}
    _, metrics = t.train_step(state, batch)
    step_losses.append(float(metrics["loss"]))
  assert_reorder_close(step_losses[1], step_losses[0])


def _tiny(path, **kw):
  base = {"input.tokens_per_row": 32, "eval.tokens_per_row": 32, "ckpt_every": 100, "async_ckpt": False}
  return make_config(path, **dict(base, **kw))


# ---- exact accumulation ----------------------------------------------------------------------

@pytest.mark.slow
def test_accumulation_equals_full_batch_with_uneven_packed_rows(shards):
  kw = {"input.global_batch_size": 32, "input.tokens_per_row": 56, "input.max_segments": 4,
        "loss.sample_rate": 1.0}
  batch_np = next(input_pipeline.make_train_iterator(_tiny(shards, **kw).input))
  results = {}
  for accum in (1, 2, 4):
    trainer = train.Trainer(_tiny(shards, **kw, **{"optim.grad_accum_steps": accum}), "/nonexistent")
    if accum == 1:
      params = trainer.init_state(0)["params"]
    batch = global_arrays.global_batch(batch_np, trainer.mesh, trainer.batch_axes)
    with jax.set_mesh(trainer.mesh):
      loss, aux, grads = jax.jit(trainer._loss_and_grads)(params, batch, jax.random.key(3))
    results[accum] = (float(loss), jax.tree.map(np.asarray, grads), float(aux["loss_count"]))
    if accum > 1:
      # The microbatches (rows i, i+accum, ...) hold different numbers of labels.
      counts = [(batch_np["labels"][i::accum] >= 0).sum() for i in range(accum)]
      assert len(set(counts)) > 1, counts
  loss1, grads1, count1 = results[1]
  assert count1 == (batch_np["labels"] >= 0).sum()
  for accum in (2, 4):
    loss, grads, count = results[accum]
    assert count == count1
    np.testing.assert_allclose(loss, loss1, rtol=1e-6)
    # Per leaf, relative to the leaf; leaves whose true gradient is ~0 (the k-projection bias: a
    # softmax ignores a shift of every key) carry only rounding noise, bounded against the whole.
    total = np.sqrt(sum(np.sum(a.astype(np.float64) ** 2) for a in jax.tree.leaves(grads1)))
    errs = {}
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads1)[0], jax.tree.leaves(grads)):
      diff, norm = np.linalg.norm(b - a), np.linalg.norm(a)
      errs[jax.tree_util.keystr(path)] = (diff / max(norm, 1e-30), norm / total)
      assert diff <= 1e-6 * max(norm, 1e-3 * total), (accum, errs)


# ---- non-finite steps ------------------------------------------------------------------------

class PoisonedTrainer(train.Trainer):
  """A finite loss whose gradient is NaN at the steps in `bad_steps` (0-based state step)."""
  bad_steps = (0,)

  def _train_step(self, state, batch):
    self._step_now = state["step"]
    return super()._train_step(state, batch)

  def _loss(self, params, batch, rng):
    loss, metrics = super()._loss(params, batch, rng)
    bad = jnp.isin(self._step_now, jnp.asarray(self.bad_steps))
    x = jnp.where(bad, -1.0, 1.0) * (1.0 + jnp.sum(params["encoder"]["head"]["probe"] ** 2))
    # Forward 0 either way; backward 0 * d sqrt(x) = NaN where x < 0 (the unselected branch).
    return loss + jnp.where(x < 0, 0.0, 0.0 * jnp.sqrt(x)), metrics


def _saved_params(workdir, step):
  return ckpt_lib.load_params(str(workdir), step)[1]


@pytest.mark.slow
def test_nan_gradient_with_finite_loss_is_skipped_and_never_saved(shards, tmp_path):
  cfg = _tiny(shards, total_steps=3, ckpt_every=1, log_every=3)
  trainer = PoisonedTrainer(cfg, str(tmp_path))
  summary = trainer.run()
  assert summary["skipped_steps"] == 1 and summary["final_step"] == 3
  init = jax.tree.map(np.asarray, trainer.init_state(cfg.seed)["params"])
  # Step 1 was not applied: its checkpoint holds the initial params; later steps trained on.
  jax.tree.map(np.testing.assert_array_equal, _saved_params(tmp_path, 1), init)
  for s in (2, 3):
    leaves = jax.tree.leaves(_saved_params(tmp_path, s))
    assert all(np.isfinite(x).all() for x in leaves)
  assert np.isfinite(losses(str(tmp_path))[1])


@pytest.mark.slow
def test_bad_steps_in_a_row_stop_the_run(shards, tmp_path):
  cfg = _tiny(shards, total_steps=6, ckpt_every=1, log_every=2, max_bad_steps=3)
  trainer = PoisonedTrainer(cfg, str(tmp_path))
  trainer.bad_steps = tuple(range(1, 100))
  with pytest.raises(train.NonFiniteLossError, match=r"non-finite loss .* at step 4, 3 steps in a row"):
    trainer.run()
  for s in ckpt_lib.make_manager(str(tmp_path), async_save=False).all_steps():
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(_saved_params(tmp_path, s)))


# ---- labels ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_no_labels_stops_at_the_first_step_naming_the_label_table(tmp_path):
  rng = np.random.default_rng(0)
  digits = load_digits()
  recs = [digit_shards.digit_record(digits.images[i], 0, i, rng) for i in range(40)]
  for r in recs:
    r["labels"] = np.zeros((0,), np.int32)  # as codec_patchify writes them
  path = digit_shards.write_shards(str(tmp_path / "unlabelled"), recs)
  with pytest.raises(ValueError, match=r"step 1: the batch holds no valid label.*input.label_table"):
    train.Trainer(_tiny(path), str(tmp_path / "w")).run()


def test_num_classes_comes_from_the_label_table_and_must_agree(shards, tmp_path):
  ids = np.array([r["sample_id"] for r in records.read_all(shards)])
  table = label_table_lib.write_label_table(str(tmp_path / "labels.npz"), np.sort(ids),
                                            np.zeros((ids.size, 1), np.int32), num_classes=12)
  cfg = _tiny(shards, **{"loss.num_classes": 0})
  cfg.input.label_table = table
  assert train.Trainer(cfg, str(tmp_path / "w")).config.loss.num_classes == 12
  cfg.loss.num_classes = 10
  with pytest.raises(ValueError, match=r"loss.num_classes=10 != the 12 classes of input.label_table"):
    train.Trainer(cfg, str(tmp_path / "w"))


@pytest.mark.slow
def test_labels_out_of_range_are_an_error(shards, tmp_path):
  # Digit labels are 0..9; 5 classes leave half of them out of range.
  with pytest.raises(ValueError, match=r"label\(s\) outside \[0, loss.num_classes=5\)"):
    train.Trainer(_tiny(shards, **{"loss.num_classes": 5}), str(tmp_path)).run()


def test_model_and_input_patch_sizes_must_agree(shards, tmp_path):
  cfg = _tiny(shards)
  cfg.model.patch_size = 16
  with pytest.raises(ValueError, match="model.patch_size=16 != input.patch_size=14"):
    train.Trainer(cfg, str(tmp_path))


# ---- host syncs ------------------------------------------------------------------------------

@pytest.mark.slow
def test_steps_per_s_leaves_out_compilation_and_the_initial_save(shards, tmp_path, monkeypatch):
  """orbax always checkpoints the first step, and that save blocks; steps_per_s times steps 2..N only. A fake clock in train.py ticks 1 per reading and jumps 1000
  during the first save: with the jump inside the window, the figure would be below 0.01."""
  clock = {"t": 0.0}

  def perf_counter():
    clock["t"] += 1.0
    return clock["t"]
  monkeypatch.setattr(train, "time", type("FakeTime", (), {"perf_counter": staticmethod(perf_counter)}))
  saves = []
  real_save = train.Trainer._save

  def save(self, *a, **kw):
    if not saves:
      clock["t"] += 1000.0
    saves.append(1)
    return real_save(self, *a, **kw)
  monkeypatch.setattr(train.Trainer, "_save", save)
  summary = train.Trainer(_tiny(shards, total_steps=5, log_every=2), str(tmp_path)).run()
  assert len(saves) == 5
  assert 0.1 < summary["steps_per_s"] <= 4.0, summary["steps_per_s"]


@pytest.mark.slow
def test_metrics_reach_the_host_once_per_log_window(shards, tmp_path, monkeypatch):
  calls = []
  real = jax.device_get
  monkeypatch.setattr(train.jax, "device_get", lambda x: calls.append(1) or real(x))
  train.Trainer(_tiny(shards, total_steps=9, log_every=4), str(tmp_path / "window")).run()
  # The first step (label checks), steps 2-4, 5-8 and the last step: 4 transfers for 9 steps.
  assert len(calls) == 4, len(calls)
  monkeypatch.setattr(train.jax, "device_get", real)
  train.Trainer(_tiny(shards, total_steps=9, log_every=4, fetch_metrics_every_step=True),
                str(tmp_path / "every")).run()
  a, b = losses(str(tmp_path / "window")), losses(str(tmp_path / "every"))
  assert sorted(a) == list(range(1, 10)) and a == b


def test_init_from_of_another_shape_names_the_parameter_before_writing(shards, tmp_path):
  cfg = make_config(shards)
  trainer = train.Trainer(cfg, str(tmp_path / "run"))
  # The encoder with every matrix's last axis halved: another model of the same structure.
  enc = jax.tree.map(lambda a: np.zeros(a.shape[:-1] + (a.shape[-1] // 2,) if a.ndim else (), a.dtype),
                     trainer.abstract_state["params"]["encoder"])
  src = str(tmp_path / "src")
  ckpt_lib.write_params_checkpoint(src, {"encoder": enc})
  cfg.init_from = src
  with pytest.raises(compat.ModelMismatchError, match=r"config.init_from=.*src: checkpoint step 0 does not fit the "
                     r"configured model: params/encoder/\S+ has shape \[.*\] in the checkpoint and \[.*\] in the model"):
    train.Trainer(cfg, str(tmp_path / "run")).run()
  assert not (tmp_path / "run").exists()
