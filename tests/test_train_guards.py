"""Trainer guards: exact accumulation, skipped non-finite steps, label checks, metrics fetched per log window."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from tests.helpers import digit_shards
from ovenc_format import label_table as label_table_lib
from ovenc_format import records
from ovenc_jax.train import checkpoint as ckpt_lib
from ovenc_jax.input import pipeline as input_pipeline
from ovenc_jax.train import trainer as train
from tests.test_train import losses, make_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  return digit_shards.write_digit_shards(str(tmp_path_factory.mktemp("digits") / "train"), 0, 300, num_shards=2)


def _tiny(path, **kw):
  base = {"input.tokens_per_row": 32, "eval.tokens_per_row": 32, "ckpt_every": 100, "async_ckpt": False}
  return make_config(path, **dict(base, **kw))


# ---- exact accumulation ----------------------------------------------------------------------

def test_accumulation_equals_full_batch_with_uneven_packed_rows(shards):
  kw = {"input.global_batch_size": 32, "input.tokens_per_row": 56, "input.max_segments": 4,
        "loss.sample_rate": 1.0}
  batch_np = next(input_pipeline.make_train_iterator(_tiny(shards, **kw).input))
  results = {}
  for accum in (1, 2, 4):
    trainer = train.Trainer(_tiny(shards, **kw, **{"optim.grad_accum_steps": accum}), "/nonexistent")
    if accum == 1:
      params = trainer.init_state(0)["params"]
    batch = input_pipeline.global_batch(batch_np, trainer.mesh, train.BATCH_AXES)
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


def test_bad_steps_in_a_row_stop_the_run(shards, tmp_path):
  cfg = _tiny(shards, total_steps=6, ckpt_every=1, log_every=2, max_bad_steps=3)
  trainer = PoisonedTrainer(cfg, str(tmp_path))
  trainer.bad_steps = tuple(range(1, 100))
  with pytest.raises(train.NonFiniteLossError, match=r"non-finite loss .* at step 4, 3 steps in a row"):
    trainer.run()
  for s in ckpt_lib.make_manager(str(tmp_path), async_save=False).all_steps():
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(_saved_params(tmp_path, s)))


# ---- labels ----------------------------------------------------------------------------------

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

def test_steps_per_s_leaves_out_compilation_and_the_initial_save(shards, tmp_path, monkeypatch):
  """orbax always checkpoints the first step (on one H200 that blocked for 8 s of a 51-step run);
  steps_per_s times steps 2..N only. A fake clock in train.py ticks 1 per reading and jumps 1000
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
