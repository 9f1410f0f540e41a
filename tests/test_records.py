"""Round trip and validation of ovenc_format.records (the codec-patch record format); format 2 fields (frame indices, timestamps, fps, codec, float16 scores) and reading format 1."""
import hashlib
import os

import msgpack
import numpy as np
import pytest

from ovenc_format import records


def _record(k=5, p=4, grid=(3, 4, 5), seed=0):
  rng = np.random.default_rng(seed)
  t, h, w = grid
  flat = np.sort(rng.choice(t * h * w, size=k, replace=False))
  positions = np.stack([flat // (h * w), (flat // w) % h, flat % w], axis=1).astype(np.int32)
  return dict(
      patches=rng.integers(0, 256, size=(k, p, p, 3), dtype=np.uint8),
      positions=positions,
      grid=np.asarray(grid, np.int32),
      frame_types="IPB"[:t] if t <= 3 else "I" + "P" * (t - 1),
      source="/data/clip ü.mp4",
      sample_id=records.sample_id_for("/data/clip ü.mp4"),
      labels=np.asarray([3, 1, 4], np.int32),
      signal="mv+residual+frame_diff",
      class_label=7,
  )


def test_sample_id_matches_independent_hash():
  path = "/some/dir/vid_001.mp4"
  want = int.from_bytes(hashlib.sha1(path.encode()).digest()[:8], "little") & (2**63 - 1)
  assert records.sample_id_for(path) == want
  assert records.sample_id_for(path) != records.sample_id_for(path + "x")
  assert 0 <= records.sample_id_for("é") < 2**63


def test_round_trip_exact():
  rec = _record()
  out = records.decode_record(records.encode_record(rec))
  assert set(out) == set(records.FIELDS + records.V2_FIELDS + records.V3_FIELDS)
  np.testing.assert_array_equal(out["patches"], rec["patches"])
  assert out["patches"].dtype == np.uint8 and out["patches"].flags.writeable
  np.testing.assert_array_equal(out["positions"], rec["positions"])
  assert out["positions"].dtype == np.int32 and out["grid"].dtype == np.int32
  np.testing.assert_array_equal(out["grid"], [3, 4, 5])
  np.testing.assert_array_equal(out["labels"], [3, 1, 4])
  for key in ("frame_types", "source", "sample_id", "signal", "class_label"):
    assert out[key] == rec[key], key


def test_round_trip_empty_labels_and_int64_ids():
  rec = _record(k=1, p=14, grid=(1, 16, 16))
  rec.update(labels=np.zeros([0], np.int32), signal="image", frame_types="I", class_label=-1,
             sample_id=2**63 - 1)
  out = records.decode_record(records.encode_record(rec))
  assert out["labels"].shape == (0,) and out["sample_id"] == 2**63 - 1 and out["class_label"] == -1


def test_encoding_is_compact_and_not_pickle():
  rec = _record(k=40, p=14)
  data = records.encode_record(rec)
  # Format 2 adds per patch a float16 score, per frame an int32 index and a float64 time.
  assert len(data) < 40 * 14 * 14 * 3 + 40 * (12 + 2) + 3 * (4 + 8) + 250
  assert not data.startswith(b"\x80")  # pickle protocol marker
  assert isinstance(msgpack.unpackb(data), dict)


@pytest.mark.parametrize("field,value,match", [
    ("patches", np.zeros((5, 4, 4, 3), np.int32), "'patches'"),
    ("patches", np.zeros((5, 4, 3, 3), np.uint8), "'patches'"),
    ("patches", np.zeros((5, 4, 4), np.uint8), "'patches'"),
    ("patches", [[0]], "'patches'"),
    ("positions", np.zeros((4, 3), np.int32), "'positions'"),
    ("positions", np.zeros((5, 3), np.float32), "'positions'"),
    ("grid", np.asarray([3, 4], np.int32), "'grid'"),
    ("grid", np.asarray([0, 4, 5], np.int32), "'grid'"),
    ("frame_types", "IP", "'frame_types'"),
    ("frame_types", "IPX", "'frame_types'"),
    ("frame_types", 3, "'frame_types'"),
    ("source", "", "'source'"),
    ("source", None, "'source'"),
    ("sample_id", -1, "'sample_id'"),
    ("sample_id", 2**63, "'sample_id'"),
    ("sample_id", 1.5, "'sample_id'"),
    ("sample_id", True, "'sample_id'"),
    ("labels", np.zeros((2, 2), np.int32), "'labels'"),
    ("labels", np.asarray([2**40]), "'labels'"),
    ("labels", np.asarray([0.5]), "'labels'"),
    ("signal", "", "'signal'"),
    ("signal", "optical_flow", "'signal'"),
    ("signal", "residual+mv", "'signal'"),
    ("class_label", -2, "'class_label'"),
    ("class_label", "3", "'class_label'"),
])
def test_encode_rejects_bad_field(field, value, match):
  rec = _record()
  rec[field] = value
  with pytest.raises(ValueError, match=match):
    records.encode_record(rec)


def test_positions_must_be_in_grid_unique_and_sorted():
  rec = _record()
  bad = rec["positions"].copy()
  bad[0] = [3, 0, 0]  # t == T
  with pytest.raises(ValueError, match="outside grid"):
    records.encode_record(dict(rec, positions=bad))
  bad = rec["positions"].copy()
  bad[1] = bad[0]
  with pytest.raises(ValueError, match="unique and sorted"):
    records.encode_record(dict(rec, positions=bad))
  with pytest.raises(ValueError, match="unique and sorted"):
    records.encode_record(dict(rec, positions=rec["positions"][::-1].copy()))
  with pytest.raises(ValueError, match="outside grid"):
    records.encode_record(dict(rec, positions=-rec["positions"]))


def test_missing_and_unknown_fields():
  rec = _record()
  del rec["signal"]
  with pytest.raises(ValueError, match="missing field.*signal"):
    records.encode_record(rec)
  with pytest.raises(ValueError, match="unknown field.*extra"):
    records.encode_record(dict(_record(), extra=1))
  with pytest.raises(ValueError, match="must be a dict"):
    records.encode_record([1, 2])


def _repack(data, **changes):
  raw = msgpack.unpackb(data)
  raw.update(changes)
  for key in [k for k, v in changes.items() if v is None]:
    del raw[key]
  return msgpack.packb(raw, use_bin_type=True)


def test_decode_validates():
  data = records.encode_record(_record())
  with pytest.raises(ValueError, match="not a msgpack record"):
    records.decode_record(b"\xc1garbage")
  with pytest.raises(ValueError, match="expected bytes"):
    records.decode_record("text")
  with pytest.raises(ValueError, match="not a map"):
    records.decode_record(msgpack.packb([1, 2]))
  with pytest.raises(ValueError, match="format version"):
    records.decode_record(_repack(data, v=records.FORMAT_VERSION + 1))
  with pytest.raises(ValueError, match="'patches'.*bytes"):
    records.decode_record(_repack(data, patches=b"\x00" * 10))
  with pytest.raises(ValueError, match="'positions'"):
    records.decode_record(_repack(data, positions=b"\x00" * 13))
  with pytest.raises(ValueError, match="'labels'"):
    records.decode_record(_repack(data, labels=b"\x00" * 3))
  with pytest.raises(ValueError, match="'patch_size'"):
    records.decode_record(_repack(data, patch_size=0))
  with pytest.raises(ValueError, match="missing or unknown"):
    records.decode_record(_repack(data, signal=None))
  with pytest.raises(ValueError, match="'frame_types'"):
    records.decode_record(_repack(data, frame_types="IPZ"))
  with pytest.raises(ValueError, match="'grid'"):
    records.decode_record(_repack(data, grid=[3, 4, -5]))
  with pytest.raises(ValueError, match="'grid'"):
    records.decode_record(_repack(data, grid=["3", 4, 5]))
  with pytest.raises(ValueError, match="'sample_id'"):
    records.decode_record(_repack(data, sample_id=-4))


def test_canonical_signal():
  got = records.canonical_signal(["frame_diff", "mv", "residual", "mv"])
  assert got == "mv+residual+frame_diff"
  with pytest.raises(ValueError, match="unknown token"):
    records.canonical_signal(["flow"])


def test_list_shards_and_read_all(tmp_path):
  from array_record.python import array_record_module
  recs = [_record(seed=i) for i in range(5)]
  for i, chunk in enumerate([recs[:3], recs[3:]]):
    w = array_record_module.ArrayRecordWriter(str(tmp_path / records.shard_name(i, 2)),
                                              "group_size:1")
    for r in chunk:
      w.write(records.encode_record(r))
    w.close()
  (tmp_path / "manifest.json").write_text("{}")
  paths = records.list_shards(str(tmp_path))
  want = [records.shard_name(0, 2), records.shard_name(1, 2)]
  assert [os.path.basename(p) for p in paths] == want
  got = list(records.read_all(str(tmp_path)))
  assert len(got) == 5
  for a, b in zip(got, recs):
    np.testing.assert_array_equal(a["patches"], b["patches"])
  os.remove(paths[1])
  with pytest.raises(ValueError, match=r"lacks shard\(s\) \[1\] of 2"):
    records.list_shards(str(tmp_path))
  (tmp_path / records.shard_name(0, 3)).write_bytes(b"")
  with pytest.raises(ValueError, match="mixes shard counts"):
    records.list_shards(str(tmp_path))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no data-"):
    records.list_shards(str(tmp_path / "empty"))
  with pytest.raises(ValueError, match="not a directory"):
    records.list_shards(str(tmp_path / "missing"))


# ---- format 2, and reading format 1 -------------------------------------------------------------

def _v2(k=5, grid=(3, 4, 5)):
  rec = _record(k=k, grid=grid)
  rec.update(frame_indices=np.asarray([2, 9, 17], np.int32), timestamps=np.asarray([0.08, 0.36, 0.68]),
             fps=25.0, codec="h264", scores=np.asarray([0.5, 1 / 3, np.inf, 0.0, 0.125]))
  return rec


def _v1_payload(rec):
  """A format-1 record as the old encoder wrote it (independent of encode_record)."""
  return msgpack.packb({
      "v": 1, "patch_size": rec["patches"].shape[1], "patches": rec["patches"].tobytes(),
      "positions": rec["positions"].astype("<i4").tobytes(), "grid": list(map(int, rec["grid"])),
      "frame_types": rec["frame_types"], "source": rec["source"], "sample_id": rec["sample_id"],
      "labels": rec["labels"].astype("<i4").tobytes(), "signal": rec["signal"],
      "class_label": rec["class_label"]}, use_bin_type=True)


def test_v2_round_trip():
  rec = _v2()
  data = records.encode_record(rec)
  assert msgpack.unpackb(data)["v"] == 2  # no dense frames: format 2, as older checkouts read
  out = records.decode_record(data)
  np.testing.assert_array_equal(out["frame_indices"], [2, 9, 17])
  np.testing.assert_array_equal(out["timestamps"], [0.08, 0.36, 0.68])  # float64, exact
  assert out["fps"] == 25.0 and out["codec"] == "h264"
  assert out["scores"].dtype == np.float16
  np.testing.assert_array_equal(out["scores"], np.asarray(rec["scores"], np.float16))
  assert np.isinf(out["scores"][2])
  np.testing.assert_array_equal(out["patches"], rec["patches"])


def test_v1_shard_reads_with_defaults():
  rec = _record()
  out = records.decode_record(_v1_payload(rec))
  np.testing.assert_array_equal(out["positions"], rec["positions"])
  np.testing.assert_array_equal(out["patches"], rec["patches"])
  np.testing.assert_array_equal(out["frame_indices"], [-1, -1, -1])
  assert np.isnan(out["timestamps"]).all() and out["timestamps"].shape == (3,)
  assert out["fps"] == 0.0 and out["codec"] == ""
  np.testing.assert_array_equal(out["scores"], np.zeros(5, np.float16))
  # Re-encoding a v1 record writes v2 with the defaults spelled out.
  again = records.decode_record(records.encode_record(out))
  np.testing.assert_array_equal(again["frame_indices"], [-1, -1, -1])


def test_future_and_unknown_versions_are_refused():
  raw = msgpack.unpackb(records.encode_record(_v2()))
  for v, match in [(4, "newer data_prep"), (0, "reads \\[1, 2, 3\\]"), ("2", "reads")]:
    with pytest.raises(ValueError, match=f"format version.*{match}"):
      records.decode_record(msgpack.packb(dict(raw, v=v), use_bin_type=True))
  # A v1 payload carrying v2 fields (or a v2 payload without them) is malformed.
  with pytest.raises(ValueError, match="missing or unknown.*format 1"):
    records.decode_record(msgpack.packb(dict(raw, v=1), use_bin_type=True))
  del raw["scores"]
  with pytest.raises(ValueError, match="missing or unknown.*format 2"):
    records.decode_record(msgpack.packb(raw, use_bin_type=True))


@pytest.mark.parametrize("field,value,match", [
    ("frame_indices", np.asarray([1, 2], np.int32), "'frame_indices'"),
    ("frame_indices", np.asarray([1, -2, 3], np.int32), "'frame_indices'"),
    ("timestamps", np.asarray([0.0, 1.0]), "'timestamps'"),
    ("timestamps", np.asarray(["a", "b", "c"]), "'timestamps'"),
    ("fps", -1.0, "'fps'"),
    ("fps", float("nan"), "'fps'"),
    ("fps", "25", "'fps'"),
    ("codec", None, "'codec'"),
    ("scores", np.zeros(4), "'scores'"),
    ("scores", np.asarray([0, 0, -1.0, 0, 0]), "'scores'"),
    ("scores", np.asarray([0, 0, np.nan, 0, 0]), "'scores'"),
    ("scores", np.zeros(5, np.int32), "'scores'"),
])
def test_v2_fields_are_validated(field, value, match):
  rec = _v2()
  rec[field] = value
  with pytest.raises(ValueError, match=match):
    records.encode_record(rec)


def test_v2_raw_field_sizes_are_checked():
  raw = msgpack.unpackb(records.encode_record(_v2()))
  for name, size in (("scores", 2), ("timestamps", 8), ("frame_indices", 4)):
    bad = dict(raw, **{name: raw[name][:-1]})
    with pytest.raises(ValueError, match=f"'{name}'.*multiple of {size}"):
      records.decode_record(msgpack.packb(bad, use_bin_type=True))


def test_v3_dense_frames_round_trip():
  rec = _v2()
  t, h, w = rec["grid"]
  p = rec["patches"].shape[1]
  dense = np.random.default_rng(3).integers(0, 256, (2 * h * w, p, p, 3), dtype=np.uint8)
  data = records.encode_record(dict(rec, dense_t=np.array([0, 2], np.int32), dense_patches=dense))
  assert msgpack.unpackb(data)["v"] == 3 == records.FORMAT_VERSION
  out = records.decode_record(data)
  np.testing.assert_array_equal(out["dense_t"], [0, 2])
  np.testing.assert_array_equal(out["dense_patches"], dense)
  np.testing.assert_array_equal(out["patches"], rec["patches"])
  # Without dense frames the fields read back empty and the record stays format 2.
  plain = records.decode_record(records.encode_record(rec))
  assert plain["dense_t"].shape == (0,) and plain["dense_patches"].shape == (0, p, p, 3)
  for bad, match in [(dict(dense_t=np.array([2, 0])), "dense_t.*strictly increasing"),
                     (dict(dense_t=np.array([t])), "dense_t.*strictly increasing"),
                     (dict(dense_t=np.array([1]), dense_patches=dense), "dense_patches.*shape")]:
    with pytest.raises(ValueError, match=match):
      records.encode_record(dict(dict(rec, dense_patches=dense[:h * w]), **bad))
