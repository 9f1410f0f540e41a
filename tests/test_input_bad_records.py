"""Unreadable records are skipped, counted and logged by shard and index; too many stop the input; missing shards are errors."""
import json
import logging
import os

import numpy as np
import pytest
from array_record.python import array_record_module

from tests.helpers import digit_shards
from ovenc_format import records
from ovenc_jax.input import pipeline as input_pipeline
from ovenc_jax.input import shards
from tests.helpers.train_cli import make_config


def _unreadable(path):
  """Indices of a shard's records that fail to read or decode (read one by one, the reference)."""
  reader = array_record_module.ArrayRecordReader(path)
  bad = []
  for i in range(reader.num_records()):
    try:
      records.decode_record(reader.read([i])[0])
    except Exception:
      bad.append(i)
  reader.close()
  return bad


@pytest.fixture()
def corrupt(tmp_path):
  folder = digit_shards.write_digit_shards(str(tmp_path / "train"), 0, 120, num_shards=4)
  shard = records.list_shards(folder)[1]
  ids = [r["sample_id"] for r in records.read_shard(shard)]
  data = bytearray(open(shard, "rb").read())
  data[300] ^= 0xFF  # one byte inside the first records' chunk
  with open(shard, "wb") as f:
    f.write(data)
  bad = _unreadable(shard)
  assert len(bad) == 1
  return folder, shard, bad[0], ids[bad[0]]


def _config(folder, **kw):
  c = make_config(folder, **{"input.pack": False, "input.max_segments": 1, "input.tokens_per_row": 32})
  c.input.update(kw)
  return c.input


def test_corrupt_record_is_skipped_counted_and_named(corrupt, caplog):
  folder, shard, index, bad_id = corrupt
  it = input_pipeline.make_train_iterator(_config(folder))
  other = input_pipeline.make_train_iterator(_config(folder))
  with caplog.at_level(logging.WARNING, logger="ovenc_jax.input"):
    seen = np.concatenate([next(it)["sample_id"].ravel() for _ in range(40)])  # > 2 epochs
  all_ids = {r["sample_id"] for p in records.list_shards(folder) if p != shard for r in records.read_shard(p)}
  assert bad_id not in set(seen.tolist())
  assert all_ids <= set(seen.tolist())
  # Distinct records: the second epoch hits the same record again without counting it twice.
  assert input_pipeline.skipped_records(it) == 1
  assert any(f"{shard} record {index}" in r.getMessage() for r in caplog.records)
  # Two pipelines in one process count apart: the other has read nothing yet.
  assert input_pipeline.skipped_records(other) == 0
  for _ in range(40):
    next(other)
  assert input_pipeline.skipped_records(other) == 1 and input_pipeline.skipped_records(it) == 1


def _until_counted(it, limit=40):
  """States before each batch, up to the batch after which the skip is counted."""
  states = []
  for _ in range(limit):
    states.append(it.get_state())
    next(it)
    if input_pipeline.skipped_records(it):
      return states
  raise AssertionError(f"no skipped record counted in {limit} batches")


@pytest.mark.parametrize("pack", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_count_survives_worker_processes_and_restore(corrupt, pack):
  folder = corrupt[0]
  segments = {"max_segments": 2} if pack else {}
  cfg = _config(folder, worker_count=2, pack=pack, **segments)
  it = input_pipeline.make_train_iterator(cfg)
  states = _until_counted(it)
  after = it.get_state()
  for _ in range(40):  # the workers meet the record again in later epochs
    next(it)
  assert input_pipeline.skipped_records(it) == 1
  # Restored: the count is the state's, not the process's; the batch that passed over the record
  # counts it again after a restore just before it.
  again = input_pipeline.make_train_iterator(cfg)
  again.set_state(after)
  assert input_pipeline.skipped_records(again) == 1
  # A state without the count (as checkpoints held before it was kept) restores with a count of 0.
  again.set_state(after["parent"])
  assert input_pipeline.skipped_records(again) == 0
  again.set_state(states[-1])
  assert input_pipeline.skipped_records(again) == 0
  next(again)
  assert input_pipeline.skipped_records(again) == 1


def test_unreadable_record_reads_as_a_marker_with_its_key(corrupt):
  folder, shard, index, _ = corrupt
  paths = records.list_shards(folder)
  source = shards.CheckedShards(paths, "x", 0.5, source=3)
  assert paths[1] == shard
  first = sum(1 for _ in records.read_shard(paths[0]))  # records before the corrupt shard
  assert source[first + index] == shards.SkippedRecord((3, first + index))


def test_too_many_unreadable_records_stop_the_input(corrupt):
  folder = corrupt[0]
  it = input_pipeline.make_train_iterator(_config(folder, max_bad_record_fraction=0.0))
  with pytest.raises(ValueError, match=r"1 of 120 records are unreadable, more than input.max_bad_record_fraction=0.0; last: .*record \d"):
    for _ in range(40):
      next(it)


def test_shard_missing_against_the_manifest(tmp_path):
  folder = digit_shards.write_digit_shards(str(tmp_path / "train"), 0, 40, num_shards=4)
  names = sorted(os.listdir(folder))
  with open(os.path.join(folder, "manifest.json"), "w") as f:
    json.dump({"shards": names, "num_shards": 4}, f)
  os.remove(os.path.join(folder, names[2]))
  with pytest.raises(ValueError, match=rf"input.sources\[0\].path: shard {names[2]} listed in .*manifest.json is missing"):
    input_pipeline.make_train_iterator(_config(os.path.join(folder, "data-*")))
  # A complete glob passes the same check.
  assert len(input_pipeline.shard_paths(os.path.join(folder, "data-0000[01]*"), "x")) == 2
