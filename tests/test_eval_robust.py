"""Evaluation on imperfect data: missing labels, rare classes, corrupt records, timeline positions, batch checks."""
import logging

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from ovenc_format import records
from ovenc_jax.eval import embed as embed_lib
from ovenc_jax.eval import in_training
from ovenc_jax.eval import probes
from ovenc_jax.eval import token_features
from ovenc_jax.input import features
from ovenc_jax.input import pipeline as input_pipeline
from ovenc_jax.model import encoder as model_lib
from ovenc_jax.train import trainer as train
from tests.helpers import digit_shards
from tests.helpers.train_cli import make_config


def _digits(count, label_fn=lambda i, y: y, frames=1):
  digits, rng = load_digits(), np.random.default_rng(0)
  recs = []
  for i in range(count):
    r = digit_shards.digit_record(digits.images[i], int(label_fn(i, digits.target[i])), i, rng)
    r["class_label"] = int(label_fn(i, digits.target[i]))
    if frames > 1:  # the same digit spread over `frames` frames sampled at uneven frame indices
      r["grid"] = np.array([frames, 5, 5], np.int32)
      r["frame_types"] = "I" * frames
      r["positions"] = r["positions"].copy()
      r["positions"][:, 0] = np.arange(len(r["positions"])) % frames
      order = np.lexsort(r["positions"].T[::-1])
      r["positions"], r["patches"] = r["positions"][order], r["patches"][order]
      r["frame_indices"] = np.array([0, 3, 40, 90][:frames], np.int32)
    recs.append(r)
  return recs


@pytest.fixture(scope="module")
def corrupt_and_unlabelled(tmp_path_factory):
  """60 digits, every 5th without a label, one record of shard 1 corrupted."""
  folder = digit_shards.write_shards(str(tmp_path_factory.mktemp("ev") / "eval"),
                                     _digits(60, lambda i, y: -1 if i % 5 == 0 else y), num_shards=2)
  shard = records.list_shards(folder)[1]
  data = bytearray(open(shard, "rb").read())
  data[300] ^= 0xFF
  open(shard, "wb").write(data)
  return folder


def test_reader_skips_and_counts_unlabelled_and_corrupt_records(corrupt_and_unlabelled, caplog):
  stats = token_features.ReadStats()
  with caplog.at_level(logging.WARNING):
    rows = list(token_features.labelled_rows(corrupt_and_unlabelled, patch_size=14, tokens_per_row=32, stats=stats))
  assert len(rows) + stats.missing_labels + len(stats.failures) == stats.records == 60
  assert len(stats.failures) == 1 and stats.missing_labels in (11, 12), stats.as_dict()
  assert all(int(r["class_label"][0]) >= 0 for r in rows)
  assert "skipped 1 unreadable record(s) and" in caplog.text


@pytest.mark.slow
def test_trainer_eval_skips_unlabelled_and_corrupt_records(corrupt_and_unlabelled, caplog):
  cfg = make_config(corrupt_and_unlabelled, corrupt_and_unlabelled, **{
      "input.max_bad_record_fraction": 0.05, "eval.attentive.enabled": True, "eval.attentive.epochs": 2,
      "eval.attentive.batch_size": 8})
  mesh = jax.make_mesh((8,), ("data",))
  enc = model_lib.encoder_from_config(cfg.model)
  params = jax.jit(enc.init)(jax.random.key(0), *(np.zeros((1, 32, 588), np.uint8), np.zeros((1, 32, 3), np.int32),
                                                   np.ones((1, 32), np.int32)))["params"]
  with caplog.at_level(logging.WARNING):
    res = in_training.Evaluator(enc, cfg, mesh, ("data",))(params)
  assert res["skipped_records"] == 1 and res["missing_labels"] in (11, 12), res
  assert 0 <= res["knn_top1"] <= 1 and 0 <= res["attentive_top1"] <= res["attentive_top5"] <= 1
  assert "without a class label skipped" in caplog.text and "unreadable record" in caplog.text
  # The CLI's reader counts the same cases.
  stats = token_features.ReadStats()
  list(token_features.labelled_rows(corrupt_and_unlabelled, patch_size=14, tokens_per_row=32, stats=stats))
  assert res["missing_labels"] == stats.missing_labels


def test_split_by_class_keeps_every_class_in_train():
  labels = np.array([0, 0, 0, 0, 1, 1, 2, 3, 3, 3])
  ids = np.array([9, 3, 5, 1, 7, 2, 4, 8, 6, 0])
  val = in_training.split_by_class(labels, ids, 0.3)
  np.testing.assert_array_equal(np.flatnonzero(val), [3, 5, 9])  # per class the lowest ids; class 2 alone stays
  assert set(labels[~val]) == {0, 1, 2, 3}


def test_rare_classes_are_dropped_and_reported():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 8))
  y = np.repeat([0, 1, 2], [19, 20, 1])
  x[y == 1] += 2.0
  report = {}
  got = probes.linear_probe_accuracy(x, y, report=report)
  assert report["dropped_classes"] == {2: 1}
  keep = y != 2
  ref = np.mean(cross_val_score(LogisticRegression(max_iter=500, C=10.0, random_state=0),
                                probes.l2_normalize(x[keep]), y[keep], cv=3))
  assert got == pytest.approx(ref)


def test_one_class_or_no_samples_say_so():
  with pytest.raises(probes.ProbeDataError, match="one class"):
    probes.linear_probe_accuracy(np.ones((5, 3)), np.zeros(5, int))
  with pytest.raises(probes.ProbeDataError, match="no labelled samples"):
    probes.knn_top1(np.ones((0, 3)), np.zeros(0, int))
  with pytest.raises(probes.ProbeDataError, match=r"classes with >= 2 samples\): the eval set has one class"):
    probes.linear_probe_accuracy(np.ones((4, 3)), np.array([0, 0, 0, 1]))


def test_positions_follow_temporal_positions(tmp_path):
  folder = digit_shards.write_shards(str(tmp_path / "t"), _digits(6, frames=4), num_shards=1)
  recs = {r["sample_id"]: r for r in records.read_all(folder)}
  for mode in ("sample_index", "timeline64"):
    batch = next(input_pipeline.make_eval_batches(folder, tokens_per_row=32, batch_size=8,
                                                  temporal_positions=mode))
    stats = token_features.ReadStats()
    rows = list(token_features.labelled_rows(folder, patch_size=14, tokens_per_row=32, stats=stats,
                                             temporal_positions=mode))
    for b, sid in enumerate(batch["sample_id"][:6, 0]):
      r = recs[int(sid)]
      t = r["positions"][:, 0]
      want = features.timeline64(r["frame_indices"])[t] if mode == "timeline64" else t
      k = len(t)
      np.testing.assert_array_equal(batch["positions"][b, :k, 0], want)
      np.testing.assert_array_equal(rows[b]["positions"][:k, 0], want)
    if mode == "timeline64":
      assert batch["positions"][:6, :, 0].max() == 63
  cfg = make_config(folder)
  cfg.input.temporal_positions = "timeline64"
  embed_lib.save_config(str(tmp_path / "wd"), cfg)
  assert embed_lib.temporal_positions_of(str(tmp_path / "wd")) == "timeline64"


def test_eval_batch_size_must_split_over_the_mesh(tmp_path):
  cfg = make_config("", str(tmp_path), **{"eval.batch_size": 12})
  mesh = jax.make_mesh((8,), ("data",))
  with pytest.raises(ValueError, match=r"eval.batch_size=12 is not divisible by mesh.data=8"):
    in_training.check_config(cfg, mesh, ("data",))
  cfg = make_config("", str(tmp_path), **{"eval.attentive.enabled": True, "eval.attentive.batch_size": 4})
  with pytest.raises(ValueError, match=r"eval.attentive.batch_size=4 is not divisible by the 8 devices"):
    in_training.check_config(cfg, mesh, ("data",))
  # The trainer refuses at construction, before any step.
  cfg = make_config(str(tmp_path), str(tmp_path), **{"eval.batch_size": 12})
  with pytest.raises(ValueError, match=r"eval.batch_size=12"):
    train.Trainer(cfg, str(tmp_path / "wd"))
