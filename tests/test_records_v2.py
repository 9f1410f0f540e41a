"""Record format 2 (frame indices, timestamps, fps, codec, float16 scores) and reading format 1."""
import msgpack
import numpy as np
import pytest

from ovenc_format import records
from tests.test_records import _record


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
  assert msgpack.unpackb(data)["v"] == 2 == records.FORMAT_VERSION
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
  for v, match in [(3, "newer data_prep"), (0, "reads \\[1, 2\\]"), ("2", "reads")]:
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
