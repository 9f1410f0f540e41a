"""The job's output (data_prep.patchify_output): parts finalised into shards, failures.jsonl and
manifest.json, each record once; the shard compression flag."""
import json
import os

import numpy as np
import pytest

from data_prep import patchify_output
from ovenc_format import records


def _digit_rows(ids):
  from sklearn.datasets import load_digits
  from tests.helpers import digit_shards
  d = load_digits()
  rng = np.random.default_rng(0)
  recs = [digit_shards.digit_record(d.images[i], int(d.target[i]), i, rng) for i in ids]
  return [(records.encode_record(r), [r["sample_id"], r["source"], len(r["positions"]), "image",
                                      "image"]) for r in recs]


def test_finalize_keeps_each_record_once_and_refuses_a_gap(tmp_path):
  rows = _digit_rows(range(5))
  paths = [r[1][1] for r in rows] + ["bad.mp4"]
  staging = tmp_path / "out" / "beam-temp-run"
  staging.mkdir(parents=True)
  (tmp_path / "out" / "beam-temp-stale").mkdir()  # left by a crashed run

  def part(items, failures=(), shard_bytes=10**9):
    w = patchify_output.PartWriter(str(staging), shard_bytes)
    for data, row in items:
      w.add(data, row)
    for f in failures:
      w.fail(f)
    w.close()

  part(rows[:3])
  part(rows[:3])  # a retried bundle that cut the same shard: same part, overwritten
  part(rows[2:4], [{"path": "bad.mp4", "reason": "decode timeout: x"},
                   {"path": rows[2][1][1], "reason": "decode timeout: y"}])  # overlaps one
  header = {"num_inputs": len(paths)}
  with pytest.raises(patchify_output.IncompleteOutput, match=r"1 input\(s\) have neither.*00004"):
    patchify_output.finalize_output(str(tmp_path / "out"), str(staging), paths, header)
  assert sorted(os.listdir(tmp_path / "out")) == ["beam-temp-run", "beam-temp-stale"]
  assert len(list(staging.glob("part-*.json"))) == 2
  part(rows[4:], shard_bytes=1)
  m = patchify_output.finalize_output(str(tmp_path / "out"), str(staging), paths, header)
  got = [r["sample_id"] for r in records.read_all(str(tmp_path / "out"))]
  assert sorted(got) == sorted(r[1][0] for r in rows)
  assert m["num_records"] == 5 and m["num_shards"] == 3 and sum(m["records_per_shard"]) == 5
  # The record outranks the failed attempt at the same input; the other failure stays.
  assert _failures(tmp_path / "out") == [{"path": "bad.mp4", "reason": "decode timeout: x"}]
  assert sorted(os.listdir(tmp_path / "out")) == m["shards"] + ["failures.jsonl", "manifest.json"]


def _failures(out):
  return [json.loads(line) for line in open(os.path.join(out, "failures.jsonl"))]


def test_shard_compression_values():
  w = patchify_output.writer_options
  assert w("zstd:1") == "group_size:1,zstd:1" and w("uncompressed") == "group_size:1,uncompressed"
  assert w("brotli:11") == "group_size:1,brotli:11" and w("snappy") == "group_size:1,snappy"
  for bad in ("zstd:0", "zstd:23", "brotli:12", "zstd", "zstd:-1", "ZSTD:1", "snappy,zstd:1", ""):
    with pytest.raises(ValueError, match=r"--shard_compression="):
      w(bad)
