"""The one definition of the codec-patch record format (msgpack) and of the shard layout."""
import hashlib
import math
import re

import msgpack
import numpy as np

# Bumped whenever a field is added, removed or changes meaning. decode_record reads every version
# in READ_VERSIONS (older ones get the defaults of the fields they lack) and refuses newer ones.
FORMAT_VERSION = 3
READ_VERSIONS = (1, 2, 3)

SHARD_PATTERN = "data-*-of-*.array_record"
_SHARD_RE = re.compile(r"^data-(\d{5})-of-(\d{5})\.array_record$")

FRAME_TYPE_CHARS = frozenset("IPB?")
# Tokens of `signal`, joined by '+' in this canonical order (see docs/data_prep.md).
SIGNAL_TOKENS = ("transcode", "mv", "residual", "frame_diff", "image", "saliency",
                 "static_fallback", "random", "uniform_frames", "dense")  # last three: data_prep/codec/selection.py

FIELDS = ("patches", "positions", "grid", "frame_types", "source", "sample_id", "labels",
          "signal", "class_label")
# Added by format 2; a record (or v1 payload) without them gets these defaults: frame indices -1
# (unknown), timestamps NaN, fps 0 (unknown), codec "" (unknown), every patch score 0 (unranked).
V2_FIELDS = ("frame_indices", "timestamps", "fps", "codec", "scores")
# Added by format 3: whole sampled frames stored beside the kept patches (codec_patchify
# --dense_frames), read by the dense-frame and collage branches of the training input. dense_t [D]:
# their t, strictly increasing; dense_patches [D*H*W, p, p, 3]: every patch of each, in (t, h, w)
# order. Default: none (D = 0). A record without them is written as format 2, byte for byte as before.
V3_FIELDS = ("dense_t", "dense_patches")
_INT32 = np.iinfo(np.int32)
_MAX_ID = 2**63 - 1


def sample_id_for(path: str) -> int:
  """Stable int64 id of an input path: sha1 bytes 0..7, little endian, top bit cleared."""
  if not isinstance(path, str):
    raise ValueError(f"sample_id_for: path must be str, got {type(path).__name__}")
  return int.from_bytes(hashlib.sha1(path.encode("utf-8")).digest()[:8], "little") & _MAX_ID


def canonical_signal(tokens) -> str:
  """Joins signal tokens ('mv', 'residual', ...) in canonical order, dropping duplicates."""
  tokens = set(tokens)
  unknown = tokens - set(SIGNAL_TOKENS)
  if unknown:
    raise ValueError(f"field 'signal': unknown token(s) {sorted(unknown)}; known: {SIGNAL_TOKENS}")
  return "+".join(t for t in SIGNAL_TOKENS if t in tokens)


def _int_array(rec, name, ndim):
  value = rec[name]
  arr = np.asarray(value)
  if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
    raise ValueError(f"field {name!r}: expected an integer array, got dtype {arr.dtype}")
  if arr.ndim != ndim:
    raise ValueError(f"field {name!r}: expected {ndim} dims, got shape {arr.shape}")
  if arr.size and (arr.min() < _INT32.min or arr.max() > _INT32.max):
    raise ValueError(f"field {name!r}: values outside int32 range")
  return arr.astype(np.int32)


def _is_int(value):
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def validate_record(rec: dict) -> dict:
  """Checks every field of a record; returns it normalised (int32 arrays, Python ints).

  The format-2 fields (V2_FIELDS) are optional here: absent ones get their defaults.
  """
  if not isinstance(rec, dict):
    raise ValueError(f"record must be a dict, got {type(rec).__name__}")
  missing = [f for f in FIELDS if f not in rec]
  if missing:
    raise ValueError(f"record is missing field(s) {missing}")
  extra = sorted(set(rec) - set(FIELDS) - set(V2_FIELDS) - set(V3_FIELDS))
  if extra:
    raise ValueError(f"record has unknown field(s) {extra}; known: {list(FIELDS + V2_FIELDS + V3_FIELDS)}")

  grid = _int_array(rec, "grid", 1)
  if grid.shape != (3,) or (grid < 1).any():
    raise ValueError(f"field 'grid': expected 3 positive ints (T, H, W), got {grid.tolist()}")

  patches = rec["patches"]
  if not isinstance(patches, np.ndarray) or patches.dtype != np.uint8:
    raise ValueError(f"field 'patches': expected a uint8 numpy array, got "
                     f"{getattr(patches, 'dtype', type(patches).__name__)}")
  if (patches.ndim != 4 or patches.shape[0] < 1 or patches.shape[1] < 1
      or patches.shape[1] != patches.shape[2] or patches.shape[3] != 3):
    raise ValueError(f"field 'patches': expected shape [K>=1, p, p, 3], got {patches.shape}")
  k = patches.shape[0]

  positions = _int_array(rec, "positions", 2)
  if positions.shape != (k, 3):
    raise ValueError(f"field 'positions': expected shape [{k}, 3] to match patches, "
                     f"got {positions.shape}")
  if (positions < 0).any() or (positions >= grid[None, :]).any():
    raise ValueError(f"field 'positions': entries outside grid {grid.tolist()}")
  # Strictly increasing (t, h, w) keys: sorted and unique in one check.
  keys = (positions[:, 0].astype(np.int64) * grid[1] + positions[:, 1]) * grid[2] + positions[:, 2]
  if k > 1 and not (np.diff(keys) > 0).all():
    raise ValueError("field 'positions': must be unique and sorted by (t, h, w)")

  frame_types = rec["frame_types"]
  if not isinstance(frame_types, str) or len(frame_types) != grid[0]:
    raise ValueError(f"field 'frame_types': expected a str of length T={grid[0]}, "
                     f"got {frame_types!r}")
  bad = set(frame_types) - FRAME_TYPE_CHARS
  if bad:
    raise ValueError(f"field 'frame_types': chars {sorted(bad)} not in 'IPB?'")

  source = rec["source"]
  if not isinstance(source, str) or not source:
    raise ValueError(f"field 'source': expected a non-empty str, got {source!r}")

  sample_id = rec["sample_id"]
  if not _is_int(sample_id) or not 0 <= int(sample_id) <= _MAX_ID:
    raise ValueError(f"field 'sample_id': expected an int in [0, 2**63), got {sample_id!r}")

  labels = _int_array(rec, "labels", 1)

  signal = rec["signal"]
  if not isinstance(signal, str) or not signal:
    raise ValueError(f"field 'signal': expected a non-empty str, got {signal!r}")
  if canonical_signal(signal.split("+")) != signal:
    raise ValueError(f"field 'signal': {signal!r} is not in canonical form "
                     f"{canonical_signal(signal.split('+'))!r}")

  class_label = rec["class_label"]
  if not _is_int(class_label) or int(class_label) < -1 or int(class_label) > _INT32.max:
    raise ValueError(f"field 'class_label': expected an int >= -1 (-1 = unknown), "
                     f"got {class_label!r}")

  out = dict(patches=patches, positions=positions, grid=grid, frame_types=frame_types,
             source=source, sample_id=int(sample_id), labels=labels, signal=signal,
             class_label=int(class_label))
  out.update(_validate_v2(rec, int(grid[0]), k))
  out.update(_validate_v3(rec, grid, patches.shape[1]))
  return out


def _validate_v3(rec, grid, p):
  """The format-3 fields of `rec` (no dense frames where absent), checked against the grid."""
  dense_t = rec.get("dense_t")
  dense_t = np.zeros(0, np.int32) if dense_t is None else _int_array(rec, "dense_t", 1)
  d = dense_t.size
  if d and ((dense_t < 0).any() or (dense_t >= grid[0]).any() or (np.diff(dense_t) <= 0).any()):
    raise ValueError(f"field 'dense_t': expected strictly increasing frame indices in [0, T={grid[0]}), "
                     f"got {dense_t.tolist()}")
  dense = rec.get("dense_patches")
  want = (d * int(grid[1]) * int(grid[2]), p, p, 3)
  if dense is None and not d:
    dense = np.zeros(want, np.uint8)
  if not isinstance(dense, np.ndarray) or dense.dtype != np.uint8 or dense.shape != want:
    raise ValueError(f"field 'dense_patches': expected a uint8 array of shape {list(want)} "
                     f"(every patch of the {d} frames of dense_t), got "
                     f"{getattr(dense, 'dtype', type(dense).__name__)} {getattr(dense, 'shape', '')}")
  return dict(dense_t=dense_t, dense_patches=dense)


def _validate_v2(rec, t_len, k):
  """The format-2 fields of `rec` (defaults where absent), checked against T and K."""
  fi = rec.get("frame_indices")
  fi = np.full(t_len, -1, np.int32) if fi is None else _int_array(rec, "frame_indices", 1)
  if fi.shape != (t_len,) or (fi < -1).any():
    raise ValueError(f"field 'frame_indices': expected T={t_len} ints >= -1 (-1 = unknown), "
                     f"got shape {fi.shape}")
  ts = rec.get("timestamps")
  ts = np.full(t_len, np.nan) if ts is None else np.asarray(ts)
  if ts.dtype.kind not in "fiu" or ts.shape != (t_len,):
    raise ValueError(f"field 'timestamps': expected T={t_len} floats (seconds, NaN = unknown), "
                     f"got {ts.dtype} {ts.shape}")
  fps = rec.get("fps", 0.0)
  if isinstance(fps, (bool, np.bool_)) or not isinstance(fps, (int, float, np.number)) or not (
      math.isfinite(fps) and fps >= 0):
    raise ValueError(f"field 'fps': expected a finite float >= 0 (0 = unknown), got {fps!r}")
  codec = rec.get("codec", "")
  if not isinstance(codec, str):
    raise ValueError(f"field 'codec': expected a str ('' = unknown), got {codec!r}")
  scores = rec.get("scores")
  scores = np.zeros(k, np.float16) if scores is None else np.asarray(scores)
  if scores.dtype.kind != "f" or scores.shape != (k,):
    raise ValueError(f"field 'scores': expected K={k} floats (one per kept patch), "
                     f"got {scores.dtype} {scores.shape}")
  scores = scores.astype(np.float16)  # +inf marks patches kept whole (e.g. --iframe keep)
  if np.isnan(scores).any() or (scores < 0).any():
    raise ValueError("field 'scores': must be >= 0 and not NaN")
  return dict(frame_indices=fi, timestamps=ts.astype(np.float64), fps=float(fps), codec=codec,
              scores=scores)


def encode_record(rec: dict) -> bytes:
  """Validates a record and packs it with msgpack, arrays as little-endian raw bytes: format 3 when
  it holds dense frames, else format 2 (readable by older checkouts)."""
  r = validate_record(rec)
  dense = {}
  if r["dense_t"].size:
    dense = {"dense_t": r["dense_t"].astype("<i4").tobytes(),
             "dense_patches": np.ascontiguousarray(r["dense_patches"]).tobytes()}
  return msgpack.packb({
      "v": 3 if dense else 2,
      "patch_size": int(r["patches"].shape[1]),
      "patches": np.ascontiguousarray(r["patches"]).tobytes(),
      "positions": r["positions"].astype("<i4").tobytes(),
      "grid": [int(x) for x in r["grid"]],
      "frame_types": r["frame_types"],
      "source": r["source"],
      "sample_id": r["sample_id"],
      "labels": r["labels"].astype("<i4").tobytes(),
      "signal": r["signal"],
      "class_label": r["class_label"],
      "frame_indices": r["frame_indices"].astype("<i4").tobytes(),
      "timestamps": r["timestamps"].astype("<f8").tobytes(),
      "fps": r["fps"],
      "codec": r["codec"],
      "scores": r["scores"].astype("<f2").tobytes(),
      **dense,
  }, use_bin_type=True)


# Raw-byte arrays of the payload: name -> (numpy dtype, format versions that carry it).
_RAW_ARRAYS = {"patches": ("u1", (1, 2, 3)), "positions": ("<i4", (1, 2, 3)), "labels": ("<i4", (1, 2, 3)),
               "frame_indices": ("<i4", (2, 3)), "timestamps": ("<f8", (2, 3)),
               "scores": ("<f2", (2, 3)), "dense_t": ("<i4", (3,)), "dense_patches": ("u1", (3,))}


def decode_record(data: bytes) -> dict:
  """Unpacks and validates one record of any readable version; arrays come back writable."""
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise ValueError(f"decode_record: expected bytes, got {type(data).__name__}")
  try:
    raw = msgpack.unpackb(data, raw=False)
  except Exception as e:  # msgpack raises several types for garbage input
    raise ValueError(f"decode_record: not a msgpack record ({type(e).__name__}: {e})") from e
  if not isinstance(raw, dict):
    raise ValueError("decode_record: payload is not a map")
  version = raw.get("v")
  if version not in READ_VERSIONS:
    newer = _is_int(version) and version > FORMAT_VERSION
    raise ValueError(f"field 'v' (format version): got {version!r}, this reader reads "
                     f"{list(READ_VERSIONS)}" + ("; the shard was written by a newer "
                                                 "data_prep: update this checkout" if newer else ""))
  want = ({"v", "patch_size"} | set(FIELDS) | (set(V2_FIELDS) if version >= 2 else set())
          | (set(V3_FIELDS) if version >= 3 else set()))
  if set(raw) != want:
    raise ValueError(f"decode_record: fields {sorted(set(raw) ^ want)} missing or unknown "
                     f"(format {version})")
  p = raw["patch_size"]
  if not _is_int(p) or p < 1:
    raise ValueError(f"field 'patch_size': expected a positive int, got {p!r}")
  arrays = {}
  for name, (dtype, versions) in _RAW_ARRAYS.items():
    if version not in versions:
      continue
    if not isinstance(raw[name], bytes):
      raise ValueError(f"field {name!r}: expected raw bytes")
    size = np.dtype(dtype).itemsize * (3 if name == "positions" else 1)
    if len(raw[name]) % size:
      raise ValueError(f"field {name!r}: {len(raw[name])} bytes is not a multiple of {size}")
    arrays[name] = np.frombuffer(raw[name], dtype)
  positions = arrays["positions"].reshape(-1, 3).astype(np.int32)
  k = positions.shape[0]
  if arrays["patches"].size != k * p * p * 3:
    raise ValueError(f"field 'patches': {arrays['patches'].size} bytes, expected K*p*p*3 = "
                     f"{k}*{p}*{p}*3")
  if not isinstance(raw["grid"], list) or not all(_is_int(x) for x in raw["grid"]):
    raise ValueError(f"field 'grid': expected a list of ints, got {raw['grid']!r}")
  rec = dict(
      patches=arrays["patches"].reshape(k, p, p, 3).copy(),
      positions=positions,
      grid=np.asarray(raw["grid"], dtype=np.int64),
      frame_types=raw["frame_types"],
      source=raw["source"],
      sample_id=raw["sample_id"],
      labels=arrays["labels"].astype(np.int32),
      signal=raw["signal"],
      class_label=raw["class_label"],
  )
  if version >= 2:
    rec.update(frame_indices=arrays["frame_indices"].astype(np.int32),
               timestamps=arrays["timestamps"].astype(np.float64),
               fps=raw["fps"], codec=raw["codec"], scores=arrays["scores"].astype(np.float16))
  if version >= 3:
    dense_t = arrays["dense_t"].astype(np.int32)
    n = dense_t.size * p * p * 3 * int(np.prod(rec["grid"][1:]))
    if arrays["dense_patches"].size != n:
      raise ValueError(f"field 'dense_patches': {arrays['dense_patches'].size} bytes, expected "
                       f"D*H*W*p*p*3 = {n}")
    rec.update(dense_t=dense_t, dense_patches=arrays["dense_patches"].reshape(-1, p, p, 3).copy())
  return validate_record(rec)


def shard_name(index: int, num_shards: int) -> str:
  return f"data-{index:05d}-of-{num_shards:05d}.array_record"


def list_shards(output_dir) -> list:
  """Sorted shard paths of an output dir; raises if the set is incomplete or mixed."""
  from etils import epath  # local: keeps records.py importable without etils for pure decoding
  d = epath.Path(output_dir)
  if not d.is_dir():
    raise ValueError(f"list_shards: {output_dir} is not a directory")
  found = {}
  for path in d.glob(SHARD_PATTERN):
    m = _SHARD_RE.match(path.name)
    if m:
      found[path.name] = (int(m.group(1)), int(m.group(2)), path)
  if not found:
    raise ValueError(f"list_shards: no {SHARD_PATTERN} files in {output_dir}")
  totals = {n for _, n, _ in found.values()}
  if len(totals) != 1:
    raise ValueError(f"list_shards: {output_dir} mixes shard counts {sorted(totals)}")
  total = totals.pop()
  have = {i for i, _, _ in found.values()}
  missing = sorted(set(range(total)) - have)
  if missing or max(have) >= total:
    raise ValueError(f"list_shards: {output_dir} lacks shard(s) {missing} of {total}")
  return [str(found[shard_name(i, total)][2]) for i in range(total)]


def read_shard(path):
  """Yields decoded records of one ArrayRecord shard in file order."""
  from array_record.python import array_record_module
  reader = array_record_module.ArrayRecordReader(str(path))
  try:
    n = reader.num_records()
    for start in range(0, n, 256):
      for data in reader.read(list(range(start, min(n, start + 256)))):
        yield decode_record(data)
  finally:
    reader.close()


def read_all(output_dir):
  """Yields every record of an output dir, shard by shard (remote shards staged to local disk first:
  ArrayRecord reads local files)."""
  from ovenc_format import paths  # local, as list_shards' etils import
  for path in list_shards(output_dir):
    yield from read_shard(paths.stage(path))
