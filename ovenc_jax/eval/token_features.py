"""Frozen-encoder token features of labelled records: extracted once, sharded over the mesh, cached as .npy shards."""
import dataclasses
import functools
import json
import logging
import os
import tempfile

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ovenc_format import atomic_io
from ovenc_format import paths as pathio
from ovenc_jax.eval import attentive_probe as probe_lib
from ovenc_jax.eval import embed as embed_lib
from ovenc_jax.input import global_arrays
from ovenc_jax.input import packing
from ovenc_jax.input import pipeline as input_pipeline

log = logging.getLogger("ovenc_jax.eval.token_features")
META_FILE = "meta.json"
_ARRAYS = ("tokens", "mask", "labels", "sample_ids")


@dataclasses.dataclass
class ReadStats:
  """What a pass over records left out: unreadable records and samples without a label."""
  records: int = 0
  failures: list = dataclasses.field(default_factory=list)
  missing_labels: int = 0
  frames: list = dataclasses.field(default_factory=list)  # per kept clip: distinct frames (t) of its tokens
  tokens: list = dataclasses.field(default_factory=list)  # per kept clip: its tokens

  def as_dict(self) -> dict:
    return dict(records=self.records, skipped_unreadable=len(self.failures),
                skipped_missing_label=self.missing_labels,
                frames_per_clip=float(np.mean(self.frames)) if self.frames else 0.0,
                tokens_per_clip=float(np.mean(self.tokens)) if self.tokens else 0.0)


def labelled_rows(records_dir: str, *, patch_size: int, tokens_per_row: int,
                  temporal_positions: str = "sample_index", stats: ReadStats, what: str = "--records"):
  """Padded rows of the records with a class label, in file order. Unreadable records and records
  whose class_label is -1 are skipped and counted in `stats` (a warning names the counts)."""
  paths, starts = embed_lib.open_shards(records_dir, what)
  read = functools.partial(embed_lib.read_row, source=grain.sources.ArrayRecordDataSource(paths),
                           starts=starts, paths=paths, patch_size=patch_size, tokens_per_row=tokens_per_row,
                           temporal_positions=temporal_positions)
  rows = grain.MapDataset.range(int(starts[-1])).map(read).to_iter_dataset(
      grain.ReadOptions(num_threads=input_pipeline.DEFAULT_READ_THREADS, prefetch_buffer_size=64))
  for row in rows:
    stats.records += 1
    if "failure" in row:
      stats.failures.append(row["failure"])
    elif int(row["class_label"][0]) < 0:
      stats.missing_labels += 1
    else:
      k = int((row["segment_ids"] > 0).sum())
      stats.tokens.append(k)
      stats.frames.append(len(np.unique(row["positions"][:k, 0])))
      yield row
  if stats.failures or stats.missing_labels:
    log.warning("%s %s: skipped %d unreadable record(s) and %d without a class label, of %d",
                what, records_dir, len(stats.failures), stats.missing_labels, stats.records)


class ShardedArray:
  """Rows of several .npy shards (memory-mapped) read as one array by integer-array indexing."""

  def __init__(self, parts: list[np.ndarray]):
    self.parts = parts
    self.starts = np.cumsum([0] + [len(p) for p in parts])
    self.shape = (int(self.starts[-1]),) + tuple(parts[0].shape[1:])
    self.dtype = parts[0].dtype

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, idx) -> np.ndarray:
    idx = np.asarray(idx, np.int64)
    shard = np.searchsorted(self.starts, idx, side="right") - 1
    out = np.empty((len(idx),) + self.shape[1:], self.dtype)
    for s in np.unique(shard):
      sel = shard == s
      out[sel] = self.parts[s][idx[sel] - self.starts[s]]
    return out


def token_apply(encoder):
  def apply(params, batch):
    return encoder.apply({"params": params}, batch["patches"], batch["positions"],
                         batch["segment_ids"])["last_hidden_state"]
  return apply


@functools.lru_cache(maxsize=8)
def _jitted_tokens(encoder):
  """One jitted token function per encoder: the train and val splits (and a second params set of
  the same model) reuse its compilation."""
  return jax.jit(token_apply(encoder))


def extract(encoder, enc_params, records_dir: str, *, patch_size: int, tokens_per_row: int,
            temporal_positions: str = "sample_index", batch_size: int = 32, mesh=None, batch_axes=("data",),
            out_dir: str | None = None, shard_clips: int = 1024, dtype=np.float16,
            batch_key: str = "--batch_size", what: str = "--records") -> tuple[probe_lib.Features, ReadStats]:
  """Encoder tokens of every labelled record, the batch sharded over `batch_axes` of `mesh`.

  With `out_dir` (a folder or a gs:// prefix), the features are written there as shards
  (tokens-XXXXX.npy of `dtype`, mask, labels, sample_ids) plus meta.json, and returned memory-mapped
  from those files (on a bucket: from this host's staged copies, kept as they are uploaded)."""
  mesh = mesh if mesh is not None else jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  probe_lib.check_batch_size(batch_size, mesh, batch_axes, batch_key)
  params = jax.device_put(enc_params, NamedSharding(mesh, P()))
  fn = _jitted_tokens(encoder)
  stats = ReadStats()
  empty = packing.empty_row(tokens_per_row, patch_size, 1)
  chunks = {k: [] for k in _ARRAYS}
  pending = {k: [] for k in _ARRAYS}
  written = []

  def flush(force=False):
    n = sum(len(x) for x in pending["labels"])
    if n == 0 or (n < shard_clips and not force):
      return
    arrays = {k: np.concatenate(v) for k, v in pending.items()}
    for k in pending:
      pending[k] = []
    if out_dir is None:
      for k in _ARRAYS:
        chunks[k].append(arrays[k])
      return
    i = len(written)
    for k in _ARRAYS:
      _save_npy(pathio.join(out_dir, f"{k}-{i:05d}.npy"), arrays[k])
    written.append(len(arrays["labels"]))

  def run(rows):
    batch = packing.stack_padded(rows, size=batch_size, empty=empty)
    dev = global_arrays.global_batch({k: batch[k] for k in ("patches", "positions", "segment_ids")},
                                     mesh, batch_axes)
    with jax.set_mesh(mesh):
      tok = np.asarray(jax.device_get(fn(params, dev)))[:len(rows)]
    pending["tokens"].append(tok.astype(dtype))
    pending["mask"].append(batch["segment_ids"][:len(rows)] > 0)
    pending["labels"].append(batch["class_label"][:len(rows), 0].astype(np.int32))
    pending["sample_ids"].append(batch["sample_id"][:len(rows), 0].astype(np.int64))
    flush()

  if out_dir is not None:
    pathio.makedirs(out_dir)
    for old in pathio.as_path(out_dir).glob("*-[0-9][0-9][0-9][0-9][0-9].npy"):
      pathio.remove(str(old))  # a cache of another run must not mix with this one
  rows = []
  for row in labelled_rows(records_dir, patch_size=patch_size, tokens_per_row=tokens_per_row,
                           temporal_positions=temporal_positions, stats=stats, what=what):
    rows.append(row)
    if len(rows) == batch_size:
      run(rows)
      rows = []
  if rows:
    run(rows)
  flush(force=True)
  if out_dir is None:
    if not chunks["labels"]:
      width = int(encoder.width)
      return probe_lib.Features(np.zeros((0, tokens_per_row, width), dtype), np.zeros((0, tokens_per_row), bool),
                                np.zeros((0,), np.int32)), stats
    arrays = {k: np.concatenate(v) for k, v in chunks.items()}
    return probe_lib.Features(arrays["tokens"], arrays["mask"], arrays["labels"]), stats
  atomic_io.save_json(pathio.join(out_dir, META_FILE), dict(
      source=pathio.absolute(records_dir), shards=written, tokens_per_row=tokens_per_row,
      width=int(encoder.width), temporal_positions=temporal_positions, **stats.as_dict()))
  return load(out_dir), stats


def _save_npy(path: str, arr) -> None:
  if not pathio.is_remote(path):
    atomic_io.save_npy(path, arr)
    return
  # Written beside the staging cache, then kept there: this host reads it back without a download.
  os.makedirs(pathio.cache_dir(), exist_ok=True)
  fd, local = tempfile.mkstemp(suffix=".npy", prefix=".tmp-", dir=pathio.cache_dir())
  try:
    with os.fdopen(fd, "wb") as f:
      np.save(f, arr)
    pathio.upload_staged(local, path)
  finally:
    if os.path.exists(local):
      os.remove(local)


def load(cache_dir: str) -> probe_lib.Features:
  """Features written by `extract(out_dir=...)`, memory-mapped (remote shards staged once per host)."""
  path = pathio.join(cache_dir, META_FILE)
  if not pathio.is_file(path):
    raise FileNotFoundError(f"{path} not found: {cache_dir} is not a complete feature cache")
  meta = json.loads(pathio.as_path(path).read_text())
  if not meta["shards"]:
    w, t = meta["width"], meta["tokens_per_row"]
    return probe_lib.Features(np.zeros((0, t, w), np.float16), np.zeros((0, t), bool), np.zeros((0,), np.int32))
  parts = {k: [np.load(pathio.stage(pathio.join(cache_dir, f"{k}-{i:05d}.npy")), mmap_mode="r")
               for i in range(len(meta["shards"]))] for k in _ARRAYS}
  return probe_lib.Features(ShardedArray(parts["tokens"]), ShardedArray(parts["mask"]),
                            np.concatenate([np.asarray(p) for p in parts["labels"]]))


def pooled(feats: probe_lib.Features, batch: int = 256) -> np.ndarray:
  """Masked mean over each clip's tokens [N, D] float32: the input of the kNN and linear probes."""
  out = []
  for i in range(0, len(feats), batch):
    idx = np.arange(i, min(i + batch, len(feats)))
    t = np.asarray(feats.tokens[idx], np.float32)
    m = np.asarray(feats.mask[idx], np.float32)[..., None]
    out.append((t * m).sum(1) / np.maximum(m.sum(1), 1.0))
  return np.concatenate(out) if out else np.zeros((0, feats.tokens.shape[-1]), np.float32)
