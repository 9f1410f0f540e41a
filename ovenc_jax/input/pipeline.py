"""Training input: grain over ArrayRecord codec-patch shards (shuffle, per-process shards, mixing, truncation, flips, packing or padding) and global arrays for the mesh."""
import atexit
import fnmatch
import functools
import json
import logging
import math
import os
import threading
from typing import Any, Iterator, Mapping, Sequence
import weakref

import grain
import jax
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_dict

from ovenc_format import label_table as label_table_lib
from ovenc_format import records
from ovenc_jax.interop import torch_layout

log = logging.getLogger("ovenc_jax.input.pipeline")
# Per-row features a batch carries besides the token arrays; fill values mark empty slots.
_SEGMENT_FILL = {"labels": -1, "class_label": -1, "sample_id": -1}
_TOKEN_FILL = {"patches": 0, "positions": 0}
_GLOB_CHARS = frozenset("*?[")
_INT32_MASK = np.int64(0x7FFFFFFF)

# Reader threads per process: they hide storage latency, but decoding holds the GIL, so on a small
# host they only contend (2 cores: 0 threads measured fastest in benchmarks/bench_input.py).
DEFAULT_READ_THREADS = min(8, max(0, (os.cpu_count() or 1) - 2))
_BATCH_PREFETCH = 2  # whole batches held ready by the background thread


def default_input_config() -> ml_collections.ConfigDict:
  """Input defaults; `sources` must be filled with at least one {"path", "weight"} before use."""
  return ml_collections.ConfigDict(dict(
      sources=[],                                 # [{"path": dir or glob of shards, "weight": float}]
      label_table=config_dict.placeholder(str),  # side table of cluster labels keyed by sample_id
      global_batch_size=256,                      # rows per step over all processes
      tokens_per_row=1024,                        # N: fixed token budget of a row
      max_segments=4,                             # S: samples per row when packing (1 when padding)
      pack=True,                                  # pack several samples per row; False = one per row
      max_labels=10,                              # L: labels per sample, padded with -1 / truncated
      hflip=False,                                # seeded per-sample horizontal flip
      seed=0,
      num_epochs=config_dict.placeholder(int),   # None = repeat forever
      worker_count=0,                             # grain multiprocessing workers per process
      patch_size=14,
      max_tokens_per_sample=config_dict.placeholder(int),  # keep this many highest-scored tokens
      temporal_positions="sample_index",          # t as "sample_index" or on the 64-frame "timeline64"
      max_bad_record_fraction=0.01,               # unreadable records skipped up to this share
  ))


TEMPORAL_POSITIONS = ("sample_index", "timeline64")
TIMELINE_FRAMES = torch_layout.ROPE_TEMPORAL_SIZE  # the published temporal RoPE grid (64 frames)


# ---- config -------------------------------------------------------------------------------------

def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _positive_int(cfg, key):
  v = cfg[key]
  if not _is_int(v) or v < 1:
    raise ValueError(f"input.{key} must be a positive int, got {v!r}")
  return int(v)


def parse_sources(spec: str) -> list[dict[str, Any]]:
  """'videos/:0.7+images/:0.3' -> [{"path": "videos/", "weight": 0.7}, ...]; no ':w' = weight 1.

  A tail after the last ':' that is not a number belongs to the path (gs://bucket/dir).
  """
  out = []
  for part in str(spec).split("+"):
    path, sep, tail = part.rpartition(":")
    try:
      weight = float(tail) if sep else None
    except ValueError:
      weight = None
    if weight is None:
      path, weight = part, 1.0
    if not path:
      raise ValueError(f"input.sources={spec!r}: empty path in {part!r}; expected "
                       f"PATH[:WEIGHT]+PATH[:WEIGHT]...")
    out.append({"path": path, "weight": weight})
  return out


def source_list(sources) -> Any:
  """input.sources as given in a config file (a list) or on the command line (a spec string)."""
  return parse_sources(sources) if isinstance(sources, str) else sources


def validate_input_config(cfg, process_count: int = 1) -> None:
  """Raises ValueError naming the `input.*` key that is missing, unknown or out of range."""
  known = set(default_input_config().keys())
  for key in sorted(known):
    if key not in cfg:
      raise ValueError(f"input.{key} is missing from the config")
  for key in sorted(set(cfg.keys()) - known):
    raise ValueError(f"input.{key} is not a known key; known: {sorted(known)}")
  sources = source_list(cfg.sources)
  if not isinstance(sources, (list, tuple)) or not sources:
    raise ValueError(f"input.sources must be a non-empty list of {{'path', 'weight'}} dicts, "
                     f"got {sources!r}")
  for i, s in enumerate(sources):
    if not isinstance(s, Mapping) or set(s.keys()) - {"bank"} != {"path", "weight"}:
      raise ValueError(f"input.sources[{i}] must be a dict with 'path', 'weight' and optionally 'bank' "
                       f"(a loss.heads name), got {s!r}")
    if not isinstance(s["path"], (str, os.PathLike)) or not str(s["path"]):
      raise ValueError(f"input.sources[{i}].path must be a non-empty str, got {s['path']!r}")
    w = s["weight"]
    if isinstance(w, bool) or not isinstance(w, (int, float, np.number)) or not math.isfinite(w) or w <= 0:
      raise ValueError(f"input.sources[{i}].weight must be a finite number > 0, got {w!r}")
  if cfg.label_table is not None and (not isinstance(cfg.label_table, str) or not cfg.label_table):
    raise ValueError(f"input.label_table must be None or a non-empty path, got {cfg.label_table!r}")
  for key in ("global_batch_size", "tokens_per_row", "max_segments", "max_labels", "patch_size"):
    _positive_int(cfg, key)
  for key in ("pack", "hflip"):
    if not isinstance(cfg[key], (bool, np.bool_)):
      raise ValueError(f"input.{key} must be a bool, got {cfg[key]!r}")
  if not cfg.pack and cfg.max_segments != 1:
    raise ValueError(f"input.max_segments={cfg.max_segments}: must be 1 when input.pack is False "
                     f"(pad mode puts one sample per row)")
  if not _is_int(cfg.seed) or not 0 <= cfg.seed < 2**32:
    raise ValueError(f"input.seed must be an int in [0, 2**32), got {cfg.seed!r}")
  if cfg.num_epochs is not None and (not _is_int(cfg.num_epochs) or cfg.num_epochs < 1):
    raise ValueError(f"input.num_epochs must be None (repeat forever) or a positive int, "
                     f"got {cfg.num_epochs!r}")
  if not _is_int(cfg.worker_count) or cfg.worker_count < 0:
    raise ValueError(f"input.worker_count must be an int >= 0, got {cfg.worker_count!r}")
  if cfg.max_tokens_per_sample is not None and (
      not _is_int(cfg.max_tokens_per_sample) or cfg.max_tokens_per_sample < 1):
    raise ValueError(f"input.max_tokens_per_sample must be None (no cap) or a positive int, "
                     f"got {cfg.max_tokens_per_sample!r}")
  if cfg.temporal_positions not in TEMPORAL_POSITIONS:
    raise ValueError(f"input.temporal_positions must be one of {TEMPORAL_POSITIONS}, "
                     f"got {cfg.temporal_positions!r}")
  if cfg.global_batch_size % process_count:
    raise ValueError(f"input.global_batch_size={cfg.global_batch_size} is not divisible by the "
                     f"process count {process_count}")
  f = cfg.max_bad_record_fraction
  if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < 1:
    raise ValueError(f"input.max_bad_record_fraction must be a number in [0, 1), got {f!r}")


def shard_paths(path, what: str) -> list[str]:
  """Shard files of a directory (complete data-XXXXX-of-YYYYY set) or of a file-name glob."""
  path = str(path)
  p = epath.Path(path)
  if p.is_dir():
    try:
      found = records.list_shards(path)
      if not (p / "manifest.json").exists():  # data_prep.codec_patchify writes it last
        raise ValueError(f"no manifest.json in {path}: the job writing it did not finish")
    except ValueError as e:
      raise ValueError(f"{what}: {e}") from e
    return _check_manifest(p, "*", found, what)
  head, pattern = os.path.split(path)
  if not _GLOB_CHARS & set(pattern):
    raise ValueError(f"{what}: shard directory {path} does not exist")
  if _GLOB_CHARS & set(head):
    raise ValueError(f"{what}: only the file-name part of {path} may be a glob")
  parent = epath.Path(head or ".")
  found = sorted(str(f) for f in parent.glob(pattern)) if parent.is_dir() else []
  if not found:
    raise ValueError(f"{what}: no shard files match {path}")
  return _check_manifest(parent, pattern, found, what)


def _check_manifest(folder: epath.Path, pattern: str, found: list[str], what: str) -> list[str]:
  """A folder's manifest.json (data_prep.codec_patchify) lists its shards: none may be missing."""
  manifest = folder / "manifest.json"
  if not manifest.exists():
    return found
  listed = json.loads(manifest.read_text()).get("shards") or []
  have = {os.path.basename(f) for f in found}
  missing = sorted(n for n in listed if fnmatch.fnmatch(n, pattern) and n not in have)
  if missing:
    raise ValueError(f"{what}: shard {missing[0]} listed in {manifest} is missing"
                     + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  return found


class CheckedShards:
  """Random access to decoded records of ArrayRecord shards; an unreadable or invalid record
  (bad checksum, bad encoding) reads as None, which grain skips, and is logged with its shard and
  index. Past `max_bad_fraction` of the records an error stops the input.

  The same records are bad on every pass and after a resume, so skipping keeps runs deterministic.
  """

  def __init__(self, paths: Sequence[str], what: str, max_bad_fraction: float):
    self._paths, self._what, self._max_bad = list(paths), what, float(max_bad_fraction)
    lengths = []
    for p in self._paths:
      try:
        lengths.append(grain.sources.ArrayRecordDataSource([p]).__len__())
      except RuntimeError as e:  # the shard's footer or index is corrupt: nothing in it is reachable
        raise ValueError(f"{what}: shard {p} cannot be opened: {e}") from e
    self._starts = np.cumsum([0] + lengths)
    self._source = grain.sources.ArrayRecordDataSource(self._paths)
    self._bad: set[int] = set()
    self._lock = threading.Lock()

  def __getstate__(self):  # grain workers get a pickled copy; a lock does not pickle
    return {k: v for k, v in self.__dict__.items() if k != "_lock"}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, index: int):
    try:
      return records.decode_record(self._source[index])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
      self._skip(int(index), e)
      return None

  def _skip(self, index: int, error: Exception) -> None:
    shard = int(np.searchsorted(self._starts, index, side="right")) - 1
    where = f"{self._paths[shard]} record {index - self._starts[shard]}"
    with self._lock:
      if index in self._bad:
        return
      self._bad.add(index)
      n = len(self._bad)
    _count_skipped()
    log.warning("%s: skipping unreadable record %s: %s", self._what, where, error)
    if n > self._max_bad * len(self):
      raise ValueError(f"{self._what}: {n} of {len(self)} records are unreadable, more than "
                       f"input.max_bad_record_fraction={self._max_bad}; last: {where}: {error}")


_SKIPPED = {"count": 0}
_SKIPPED_LOCK = threading.Lock()


def _count_skipped() -> None:
  with _SKIPPED_LOCK:
    _SKIPPED["count"] += 1


def skipped_records() -> int:
  """Distinct unreadable records skipped by this process's input pipelines so far (grain workers,
  with input.worker_count > 0, count their own and only log them)."""
  return _SKIPPED["count"]


def _resolve_process(process_index, process_count) -> tuple[int, int]:
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if not _is_int(pc) or pc < 1 or not _is_int(pi) or not 0 <= pi < pc:
    raise ValueError(f"process_index={pi!r} / process_count={pc!r}: need 0 <= index < count")
  return int(pi), int(pc)


def _block(n: int, index: int, count: int) -> tuple[int, int]:
  """Contiguous block `index` of `count` over n records; blocks differ in size by at most one."""
  return n * index // count, n * (index + 1) // count


def _seed(*parts: int) -> int:
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# ---- per-sample features --------------------------------------------------------------------------

def load_label_table(path: str) -> "label_table_lib.LabelTable":
  """The cluster-label side table written by ovenc_format/label_table.py (a .npz or its directory)."""
  try:
    return label_table_lib.LabelTable(path)
  except (OSError, ValueError) as e:
    raise ValueError(f"input.label_table: {e}") from e


def join_labels(record: Mapping[str, Any], table: "label_table_lib.LabelTable | None") -> np.ndarray:
  """The sample's labels: its row of the side table when one is given, else the record's own."""
  if table is None:
    return np.asarray(record["labels"], np.int32)
  try:
    row = table.lookup([record["sample_id"]], missing="error")[0]
  except KeyError as e:  # a table from other data would otherwise train on no labels, silently
    raise ValueError(f"input.label_table: {e.args[0]} (source {record['source']!r})") from None
  return row[row >= 0]


def timeline64(frame_indices: np.ndarray) -> np.ndarray:
  """Sampled frame indices -> slots of the 64-frame timeline: the first sample at 0, the last at
  63, the others in proportion to their frame index (repeated frames share a slot). Unknown
  indices (-1, format-1 records) are taken as evenly spaced."""
  fi = np.asarray(frame_indices, np.float64)
  if (fi < 0).any():
    fi = np.arange(fi.size, dtype=np.float64)
  span = fi.max() - fi.min()
  if span <= 0:
    return np.zeros(fi.size, np.int32)
  return np.rint((TIMELINE_FRAMES - 1) * (fi - fi.min()) / span).astype(np.int32)


def top_scored(scores: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
  """Sorted indices of the n highest scores; equal scores are ordered by a draw from `rng`."""
  order = np.lexsort((rng.random(scores.size), -np.asarray(scores, np.float64)))
  return np.sort(order[:n])


def sample_features(record: Mapping[str, Any], rng: np.random.Generator, *, patch_size: int,
                    tokens_per_row: int, max_labels: int, hflip: bool,
                    label_table: "label_table_lib.LabelTable | None" = None,
                    max_tokens_per_sample: int | None = None,
                    temporal_positions: str = "sample_index") -> dict[str, np.ndarray]:
  """One decoded record -> truncated, optionally flipped, flattened token set and its row features.

  With `max_tokens_per_sample`, only that many tokens are kept: the highest `scores` of the record
  (format 2; ties, and format-1 records whose scores are all 0, in an order drawn from `rng`).
  Tokens still beyond `tokens_per_row` are dropped by keeping a uniformly random subset of that size
  drawn from `rng`, in the record's (t, h, w) order. With `hflip`, a coin from `rng` decides whether
  the kept patches are mirrored left-right and w -> W-1-w; tokens are then re-sorted by (t, h, w).
  `temporal_positions="timeline64"` replaces t by the frame's slot on the 64-frame timeline.
  """
  patches, positions = record["patches"], record["positions"]
  p = patches.shape[1]
  if p != patch_size:
    raise ValueError(f"record sample_id={record['sample_id']} (source {record['source']!r}): patch "
                     f"size {p} != input.patch_size={patch_size}")
  # The coin is drawn first and always, so a sample's flip does not depend on its length.
  flip = bool(hflip) and bool(rng.random() < 0.5)
  k = patches.shape[0]
  if max_tokens_per_sample is not None and k > max_tokens_per_sample:
    keep = top_scored(record["scores"], max_tokens_per_sample, rng)
    patches, positions, k = patches[keep], positions[keep], max_tokens_per_sample
  if temporal_positions == "timeline64":
    positions = positions.copy()
    positions[:, 0] = timeline64(record["frame_indices"])[positions[:, 0]]
  if k > tokens_per_row:
    keep = np.sort(rng.choice(k, tokens_per_row, replace=False))
    patches, positions, k = patches[keep], positions[keep], tokens_per_row
  patches = patches.reshape(k, p * p * 3)
  if flip:
    width = int(record["grid"][2])
    positions = positions.copy()
    positions[:, 2] = width - 1 - positions[:, 2]
    order = np.lexsort((positions[:, 2], positions[:, 1], positions[:, 0]))
    # A gather over the flat patch mirrors it; a reversed-axis copy is ~1.3x slower as its innermost
    # loop runs over 3-byte pixels.
    patches, positions = np.take(patches[order], _mirror_index(p), axis=1), positions[order]
  labels = join_labels(record, label_table)[:max_labels]
  padded = np.full((1, max_labels), -1, np.int32)
  padded[0, :labels.size] = labels
  return dict(
      patches=patches,
      positions=np.ascontiguousarray(positions, np.int32),
      labels=padded,
      class_label=np.array([record["class_label"]], np.int32),
      sample_id=np.array([record["sample_id"]], np.int64))


@functools.lru_cache(maxsize=None)
def _mirror_index(p: int) -> np.ndarray:
  """Index into a flattened (p, p, 3) patch that mirrors it left-right."""
  index = np.arange(p * p * 3).reshape(p, p, 3)[:, ::-1, :].reshape(-1)
  index.setflags(write=False)  # shared by every call through the cache
  return index


def _decode_bank_features(tagged, rng: np.random.Generator, *, tables, offsets, **kw):
  """A record of source i, labelled from its bank's table and shifted into the bank's id range."""
  i, rec = tagged
  out = sample_features(rec, rng, label_table=tables[i], **kw)
  out["labels"] = np.where(out["labels"] >= 0, out["labels"] + offsets[i], -1).astype(np.int32)
  return out


def _tag_source(i: int, rec):
  return None if rec is None else (i, rec)  # None: a skipped record (CheckedShards) stays skipped


def _source_banks(cfg, banks):
  """Per source: (label table, label id offset) of the loss.heads bank it names."""
  tables, offsets, loaded = [], [], {}
  for i, src in enumerate(cfg.sources):
    if "bank" not in src or src["bank"] not in banks:
      raise ValueError(f"input.sources[{i}].bank={src.get('bank')!r}: with loss.heads every source "
                       f"names one of the banks {sorted(banks)}")
    offset, table = banks[src["bank"]]
    table = table or cfg.label_table  # a bank without its own table shares input.label_table
    if table and table not in loaded:  # sources of one bank share its table
      loaded[table] = load_label_table(table)
    tables.append(loaded.get(table))
    offsets.append(int(offset))
  return tables, offsets


def _decode_features_eval(data: bytes, **kw) -> dict[str, np.ndarray]:
  rec = records.decode_record(data)
  # Seeded by the sample itself, so a long sample keeps the same tokens in every evaluation.
  return sample_features(rec, np.random.default_rng(rec["sample_id"]), hflip=False, **kw)


def pad_row(features: Mapping[str, np.ndarray], tokens_per_row: int) -> dict[str, np.ndarray]:
  """One sample in one row: tokens first, then zero padding with segment id 0."""
  k, d = features["patches"].shape
  patches = np.zeros((tokens_per_row, d), np.uint8)
  positions = np.zeros((tokens_per_row, 3), np.int32)
  segment_ids = np.zeros((tokens_per_row,), np.int32)
  patches[:k], positions[:k], segment_ids[:k] = features["patches"], features["positions"], 1
  return dict(patches=patches, positions=positions, segment_ids=segment_ids,
              labels=features["labels"], class_label=features["class_label"],
              sample_id=features["sample_id"])


def empty_row(tokens_per_row: int, patch_size: int, max_labels: int) -> dict[str, np.ndarray]:
  return dict(patches=np.zeros((tokens_per_row, patch_size * patch_size * 3), np.uint8),
              positions=np.zeros((tokens_per_row, 3), np.int32),
              segment_ids=np.zeros((tokens_per_row,), np.int32),
              labels=np.full((1, max_labels), -1, np.int32),
              class_label=np.full((1,), -1, np.int32),
              sample_id=np.full((1,), -1, np.int64))


def _finish_packed(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames grain's packing outputs to the batch layout and drops its per-token offsets."""
  return dict(patches=row["patches"], positions=row["positions"],
              segment_ids=row["patches_segment_ids"], labels=row["labels"],
              class_label=row["class_label"], sample_id=row["sample_id"])


def _stack_padded(rows: Sequence[dict[str, np.ndarray]], *, size: int,
                  empty: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Stacks rows and fills up to `size` with empty rows (sample_id -1)."""
  rows = list(rows) + [empty] * (size - len(rows))
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


# Iterators whose background thread must stop before the interpreter does: a daemon thread that is
# still reading when Python finalizes dies inside array_record's C++ code and aborts the process
# ("terminate called without an active exception", exit status 134).
_LIVE_ITERATORS: "weakref.WeakSet[grain.DatasetIterator]" = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
  for it in list(_LIVE_ITERATORS):
    it.close()
    # grain's __del__ closes again during module teardown, when its module globals are already
    # None, and prints an ignored AttributeError; the iterator is closed, so that call is a no-op.
    it.close = lambda: None


def _ensure_absl_flags_parsed() -> None:
  # grain's worker processes read its absl flags; a library caller (tests, notebooks) has not parsed
  # them, and app.run() re-parses argv later anyway.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# ---- train / eval iterators ---------------------------------------------------------------------

class ProcessBlocks(grain.transforms.DatasetSelectionMap):
  """This process's share of the global stream: block u*count + index of every `count` blocks.

  With blocks of one host batch, global batch g is blocks g*count .. g*count+count-1 of the stream,
  one per process, so a padded global batch does not depend on the process count. The tail that
  would not give every process a whole block is dropped, so all processes yield equally many.
  """

  def __init__(self, stream_length: int, block: int, index: int, count: int):
    self._block, self._index, self._count = block, index, count
    self._length = stream_length // (block * count) * block

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, i: int) -> tuple[int, int]:
    if not 0 <= i < self._length:
      raise IndexError(f"ProcessBlocks: index {i} outside [0, {self._length})")
    unit, offset = divmod(i, self._block)
    return 0, (unit * self._count + self._index) * self._block + offset


def make_train_dataset(cfg, *, process_index=None, process_count=None,
                       read_threads: int = DEFAULT_READ_THREADS, banks=None) -> grain.IterDataset:
  """The grain IterDataset behind make_train_iterator (this process's batches).

  banks: {name: (label id offset, label table path or None)} of loss.heads (loss.source_banks);
  each source then names its bank and its labels come shifted into that bank's id range.
  """
  pi, pc = _resolve_process(process_index, process_count)
  validate_input_config(cfg, pc)
  rows = cfg.global_batch_size // pc
  n_tok, s_max = int(cfg.tokens_per_row), int(cfg.max_segments) if cfg.pack else 1
  table = load_label_table(cfg.label_table) if cfg.label_table else None

  # The global sample stream is the same on every process: each source shuffled (a new permutation
  # every epoch) and repeated, then interleaved by weight; flips and truncation are seeded by the
  # position in this stream. Records are read lazily, so a process reads only its own share.
  parts, weights = [], []
  for i, src in enumerate(source_list(cfg.sources)):
    what = f"input.sources[{i}].path"
    ds = grain.MapDataset.source(CheckedShards(shard_paths(src["path"], what), what,
                                               cfg.max_bad_record_fraction))
    if not len(ds):
      raise ValueError(f"input.sources[{i}].path={src['path']}: the shards hold no records")
    parts.append(ds.shuffle(seed=_seed(cfg.seed, 1, i)).repeat(cfg.num_epochs))
    if banks:
      parts[-1] = parts[-1].map(functools.partial(_tag_source, i))
    weights.append(float(src["weight"]))
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
  features = dict(patch_size=int(cfg.patch_size), tokens_per_row=n_tok, max_labels=int(cfg.max_labels),
                  hflip=bool(cfg.hflip), max_tokens_per_sample=cfg.max_tokens_per_sample,
                  temporal_positions=cfg.temporal_positions)
  named = [i for i, src in enumerate(cfg.sources) if "bank" in src]
  if named and not banks:
    raise ValueError(f"input.sources[{named[0]}].bank is set, but loss.heads names no banks")
  if banks:
    tables, offsets = _source_banks(cfg, banks)
    decode = functools.partial(_decode_bank_features, tables=tables, offsets=offsets, **features)
  else:
    decode = functools.partial(sample_features, label_table=table, **features)
  ds = ds.random_map(decode, seed=_seed(cfg.seed, 2))
  blocks = ProcessBlocks(len(ds), rows, pi, pc)
  if not len(blocks):
    raise ValueError(f"input.global_batch_size={cfg.global_batch_size}: one pass over the sources "
                     f"({len(ds)} samples) does not fill a global batch")
  ds = grain.MapDataset.select_from_datasets([ds], blocks)
  if not cfg.pack:
    ds = ds.map(functools.partial(pad_row, tokens_per_row=n_tok))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=max(2 * rows * s_max, 64)))
  if cfg.pack:
    # First-fit over `rows` bins: a sample goes whole into the first row with room for its tokens
    # and a free segment slot; the group of rows is emitted when a sample fits in none of them.
    it = grain.experimental.FirstFitPackIterDataset(
        it,
        length_struct=dict(patches=n_tok, positions=n_tok, labels=s_max, class_label=s_max,
                           sample_id=s_max),
        num_packing_bins=rows,
        shuffle_bins=False,
        meta_features=("positions", "labels", "class_label", "sample_id"),
        padding_struct=dict(_TOKEN_FILL, **_SEGMENT_FILL),
        max_sequences_per_bin=s_max,
    ).map(_finish_packed)
  it = it.batch(rows, drop_remainder=True)
  if cfg.worker_count:
    _ensure_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(cfg.worker_count)))
  else:
    # Packing and batching run in a background thread, so they overlap the train step, which
    # releases the GIL while the device computes; its state is recorded per batch, so resume is exact.
    it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=_BATCH_PREFETCH)
  return it


def make_train_iterator(cfg, *, process_index=None, process_count=None, banks=None) -> grain.DatasetIterator:
  """Per-host batches (numpy dicts) of global_batch_size // process_count rows; checkpointable.

  Keys: patches uint8 [b, N, p*p*3], positions int32 [b, N, 3], segment_ids int32 [b, N]
  (0 = padding, k = k-th sample of the row), labels int32 [b, S, L], class_label int32 [b, S],
  sample_id int64 [b, S] (-1 in empty slots).
  """
  it = iter(make_train_dataset(cfg, process_index=process_index, process_count=process_count, banks=banks))
  _LIVE_ITERATORS.add(it)
  return it


def make_eval_batches(path, *, tokens_per_row: int, batch_size: int, patch_size: int = 14,
                      max_labels: int = 1, process_index=None,
                      process_count=None) -> Iterator[dict[str, np.ndarray]]:
  """One pass, file order, one sample per row; `batch_size` rows over all processes per batch.

  Each process reads its contiguous block of records; every process yields the same number of
  batches (needed by the collectives of the eval step); rows past the data are empty (sample_id -1).
  """
  pi, pc = _resolve_process(process_index, process_count)
  for key, v in (("tokens_per_row", tokens_per_row), ("batch_size", batch_size),
                 ("patch_size", patch_size), ("max_labels", max_labels)):
    if not _is_int(v) or v < 1:
      raise ValueError(f"eval.{key} must be a positive int, got {v!r}")
  if batch_size % pc:
    raise ValueError(f"eval.batch_size={batch_size} is not divisible by the process count {pc}")
  rows = batch_size // pc
  ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(shard_paths(path, "eval.path")))
  n = len(ds)
  lo, hi = _block(n, pi, pc)
  largest_block = -(-n // pc)
  num_batches = -(-largest_block // rows)
  empty = empty_row(tokens_per_row, patch_size, max_labels)
  ds = ds[lo:hi].map(functools.partial(_decode_features_eval, patch_size=patch_size,
                                       tokens_per_row=tokens_per_row, max_labels=max_labels))
  ds = ds.map(functools.partial(pad_row, tokens_per_row=tokens_per_row))
  ds = ds.batch(rows, drop_remainder=False,
                batch_fn=functools.partial(_stack_padded, size=rows, empty=empty))
  if len(ds) < num_batches:
    filler = _stack_padded([], size=rows, empty=empty)
    ds = grain.MapDataset.concatenate(
        [ds, grain.MapDataset.source([filler]).repeat(num_batches - len(ds))])
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=DEFAULT_READ_THREADS,
                                                   prefetch_buffer_size=2 * rows)))


# ---- device arrays --------------------------------------------------------------------------------

def device_sample_ids(sample_id: np.ndarray) -> np.ndarray:
  """int64 ids -> int32 for a device without x64: low 31 bits of real ids, -1 stays -1.

  Plain int32 conversion keeps the low 32 bits, turning about half of the ids negative, which the
  step would count as empty slots.
  """
  sample_id = np.asarray(sample_id, np.int64)
  return np.where(sample_id >= 0, sample_id & _INT32_MASK, -1).astype(np.int32)


def global_batch(host_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh,
                 batch_axes: Sequence[str] = ("data", "fsdp")) -> dict[str, jax.Array]:
  """Per-host rows -> global jax.Arrays whose leading axis is sharded over `batch_axes`."""
  batch_axes = tuple(batch_axes)
  shards = math.prod(mesh.shape[a] for a in batch_axes)
  sharding = NamedSharding(mesh, P(batch_axes))
  out = {}
  for key, value in host_batch.items():
    value = np.asarray(value)
    if value.shape[0] * jax.process_count() % shards:
      raise ValueError(f"global_batch: {key!r} has {value.shape[0]} rows per host x "
                       f"{jax.process_count()} processes, not divisible by the {shards} shards of "
                       f"mesh axes {batch_axes}")
    if value.dtype == np.int64 and not jax.config.jax_enable_x64:
      value = device_sample_ids(value)
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out
