"""Training and eval iterators: grain over ArrayRecord codec-patch shards (shuffle, mixing, per-process blocks, packing or padding, batches)."""
import atexit
import functools
import os
from typing import Iterator
import weakref

import grain
import jax
import numpy as np

from ovenc_jax.input import branches as branches_lib
from ovenc_jax.input import features as features_lib
from ovenc_jax.input import packing
from ovenc_jax.input import skipped
from ovenc_jax.input.defaults import source_list
from ovenc_jax.input.shards import CheckedShards, SkippedRecord, shard_paths
from ovenc_jax.input.validation import is_int, validate_input_config

# Reader threads per process: they hide storage latency, but decoding holds the GIL, so on a small
# host they only contend (benchmarks/bench_input.py compares thread counts).
DEFAULT_READ_THREADS = min(8, max(0, (os.cpu_count() or 1) - 2))
_BATCH_PREFETCH = 2  # whole batches held ready by the background thread


def _resolve_process(process_index, process_count) -> tuple[int, int]:
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if not is_int(pc) or pc < 1 or not is_int(pi) or not 0 <= pi < pc:
    raise ValueError(f"process_index={pi!r} / process_count={pc!r}: need 0 <= index < count")
  return int(pi), int(pc)


def _seed(*parts: int) -> int:
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# Iterators whose background thread must stop before the interpreter does: a daemon thread that is
# still reading when Python finalizes dies inside array_record's C++ code and aborts the process
# ("terminate called without an active exception", exit status 134).
_LIVE_ITERATORS: "weakref.WeakSet[grain.DatasetIterator]" = weakref.WeakSet()


def _noop() -> None:
  pass


def _iterator_tree(it: grain.DatasetIterator) -> Iterator[grain.DatasetIterator]:
  """The iterator and all the iterators it reads from."""
  stack = [it]
  while stack:
    node = stack.pop()
    yield node
    stack.extend(getattr(node, "_parents", ()))


@atexit.register
def _close_live_iterators() -> None:
  for it in list(_LIVE_ITERATORS):
    it.close()
    # grain's __del__ closes each iterator of the chain again during module teardown, when its
    # module globals are already None, and prints an ignored AttributeError; they are all closed,
    # so those calls are no-ops.
    for node in _iterator_tree(it):
      node.close = _noop


def _ensure_absl_flags_parsed() -> None:
  # grain's worker processes read its absl flags; a library caller (tests, notebooks) has not parsed
  # them, and app.run() re-parses argv later anyway.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# ---- train ----------------------------------------------------------------------------------------

def _sample_stream(cfg, banks) -> grain.MapDataset:
  """The global sample stream, the same on every process: each source shuffled (a new permutation
  every epoch) and repeated, then interleaved by weight. Records are read lazily, so a process reads
  only its own share."""
  parts, weights = [], []
  for i, src in enumerate(source_list(cfg.sources)):
    what = f"input.sources[{i}].path"
    ds = grain.MapDataset.source(CheckedShards(shard_paths(src["path"], what), what,
                                               cfg.max_bad_record_fraction, source=i))
    if not len(ds):
      raise ValueError(f"input.sources[{i}].path={src['path']}: the shards hold no records")
    parts.append(ds.shuffle(seed=_seed(cfg.seed, 1, i)).repeat(cfg.num_epochs))
    if cfg.get("branches") is not None:  # by the index in this source's stream: exact per period
      parts[-1] = parts[-1].map_with_index(branches_lib.tagger(cfg.branches, cfg.global_batch_size))
    if banks:
      tag = functools.partial(features_lib.tag_source, i)
      parts[-1] = parts[-1].map(functools.partial(skipped.unless_skipped, fn=tag))
    weights.append(float(src["weight"]))
  return parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)


def _geometry(cfg):
  g = cfg.get("geometry")
  return None if g is None else {k: int(v) for k, v in dict(g).items()}


def _image_augment(cfg):
  a = cfg.get("image_augment")
  return None if a is None else dict(scale=tuple(a["scale"]), ratio=tuple(a["ratio"]), hflip=bool(a["hflip"]))


def _decoder(cfg, banks, table):
  """record (or (source, record) with banks), rng -> the sample's features."""
  kw = dict(patch_size=int(cfg.patch_size), tokens_per_row=int(cfg.tokens_per_row),
            max_labels=int(cfg.max_labels), hflip=bool(cfg.hflip),
            max_tokens_per_sample=cfg.max_tokens_per_sample, temporal_positions=cfg.temporal_positions,
            geometry=_geometry(cfg), image_augment=_image_augment(cfg),
            branch_frames=None if cfg.get("branches") is None else int(cfg.branches["num_frames"]))
  named = [i for i, src in enumerate(cfg.sources) if "bank" in src]
  if named and not banks:
    raise ValueError(f"input.sources[{named[0]}].bank is set, but loss.heads names no banks")
  if banks:
    tables, offsets = features_lib.source_banks(cfg.sources, cfg.label_table, banks)
    return functools.partial(features_lib.decode_bank_features, tables=tables, offsets=offsets, **kw)
  return functools.partial(features_lib.sample_features, label_table=table, **kw)


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
  table = features_lib.load_label_table(cfg.label_table) if cfg.label_table else None
  # Flips and truncation are seeded by the position in the global stream.
  ds = _sample_stream(cfg, banks)
  decode = _decoder(cfg, banks, table)
  ds = ds.random_map(functools.partial(skipped.unless_skipped_random, fn=decode), seed=_seed(cfg.seed, 2))
  blocks = packing.ProcessBlocks(len(ds), rows, pi, pc)
  if not len(blocks):
    raise ValueError(f"input.global_batch_size={cfg.global_batch_size}: one pass over the sources "
                     f"({len(ds)} samples) does not fill a global batch")
  ds = grain.MapDataset.select_from_datasets([ds], blocks)
  if not cfg.pack:
    pad = functools.partial(packing.pad_row, tokens_per_row=n_tok)
    ds = ds.map(functools.partial(skipped.unless_skipped, fn=pad))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=max(2 * rows * s_max, 64)))
  it = skipped.AttachSkipped(it)
  if cfg.pack:
    it = packing.pack_rows(it, rows=rows, tokens_per_row=n_tok, max_segments=s_max)
  it = it.batch(rows, drop_remainder=True)
  if cfg.worker_count:
    _ensure_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(cfg.worker_count)))
  else:
    # Packing and batching run in a background thread, so they overlap the train step, which
    # releases the GIL while the device computes; its state is recorded per batch, so resume is exact.
    it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=_BATCH_PREFETCH)
  return skipped.CountSkipped(it)


def make_train_iterator(cfg, *, process_index=None, process_count=None, banks=None) -> grain.DatasetIterator:
  """Per-host batches (numpy dicts) of global_batch_size // process_count rows; checkpointable.

  Keys: patches uint8 [b, N, p*p*3], positions int32 [b, N, 3], segment_ids int32 [b, N]
  (0 = padding, k = k-th sample of the row), labels int32 [b, S, L], class_label int32 [b, S],
  sample_id int64 [b, S] (-1 in empty slots). skipped_records(iterator) counts the unreadable
  records skipped so far.
  """
  it = iter(make_train_dataset(cfg, process_index=process_index, process_count=process_count, banks=banks))
  _LIVE_ITERATORS.add(it)
  return it


def skipped_records(iterator: skipped.CountSkippedIterator) -> int:
  """Distinct unreadable records that the batches of a make_train_iterator iterator have passed over
  (those read by its grain worker processes included); restored with the iterator's state. A record
  is counted with the next readable sample, so one at the very end of a finite stream is not."""
  return iterator.skipped_records


# ---- eval -----------------------------------------------------------------------------------------

def make_eval_batches(path, *, tokens_per_row: int, batch_size: int, patch_size: int = 14,
                      max_labels: int = 1, process_index=None, process_count=None,
                      temporal_positions: str = "sample_index", max_bad_fraction: float = 1.0,
                      stats: dict | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass, file order, one sample per row; `batch_size` rows over all processes per batch.

  Each process reads its contiguous block of records; every process yields the same number of
  batches (needed by the collectives of the eval step); rows past the data are empty (sample_id -1).
  An unreadable record reads as an empty row, is logged, and once the pass is over `stats`
  (when given) holds its count as "skipped_records"; more than `max_bad_fraction` of them is an error.
  """
  pi, pc = _resolve_process(process_index, process_count)
  for key, v in (("tokens_per_row", tokens_per_row), ("batch_size", batch_size),
                 ("patch_size", patch_size), ("max_labels", max_labels)):
    if not is_int(v) or v < 1:
      raise ValueError(f"eval.{key} must be a positive int, got {v!r}")
  if batch_size % pc:
    raise ValueError(f"eval.batch_size={batch_size} is not divisible by the process count {pc}")
  rows = batch_size // pc
  checked = CheckedShards(shard_paths(path, "eval.path"), "eval.path", max_bad_fraction)
  ds = grain.MapDataset.source(checked)
  n = len(ds)
  lo, hi = packing.contiguous_block(n, pi, pc)
  largest_block = -(-n // pc)
  num_batches = -(-largest_block // rows)
  empty = packing.empty_row(tokens_per_row, patch_size, max_labels)
  decode = functools.partial(features_lib.sample_features_eval, patch_size=patch_size,
                             tokens_per_row=tokens_per_row, max_labels=max_labels,
                             temporal_positions=temporal_positions)
  ds = ds[lo:hi].map(functools.partial(_eval_row, decode=decode, empty=empty, tokens_per_row=tokens_per_row))
  ds = ds.batch(rows, drop_remainder=False,
                batch_fn=functools.partial(packing.stack_padded, size=rows, empty=empty))
  if len(ds) < num_batches:
    filler = packing.stack_padded([], size=rows, empty=empty)
    ds = grain.MapDataset.concatenate(
        [ds, grain.MapDataset.source([filler]).repeat(num_batches - len(ds))])
  it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=DEFAULT_READ_THREADS,
                                                 prefetch_buffer_size=2 * rows)))
  return _counting(it, checked, stats)


def _eval_row(rec, *, decode, empty, tokens_per_row):
  return empty if isinstance(rec, SkippedRecord) else packing.pad_row(decode(rec), tokens_per_row)


def _counting(it, checked: CheckedShards, stats: dict | None):
  yield from it
  if stats is not None:
    stats["skipped_records"] = checked.num_skipped
