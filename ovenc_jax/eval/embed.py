"""Pooled embeddings of ArrayRecord samples by a workdir's encoder, as the folder `data_prep.cluster --embeddings` reads."""
import argparse
import functools
import json
import sys

import grain
import jax
import ml_collections
import numpy as np

from ovenc_format import atomic_io
from ovenc_format import failures as failures_lib
from ovenc_format import paths as pathio
from ovenc_format import progress as progress_lib
from ovenc_jax.train import checkpoint as ckpt_lib
from ovenc_jax.input import features as features_lib
from ovenc_jax.input import packing
from ovenc_jax.input import pipeline as input_pipeline
from ovenc_jax.model import encoder as model_lib

CONFIG_FILE = "config.json"
FAILURES_FILE = "failures.jsonl"


def save_config(workdir: str, config) -> str:
  """Writes WORKDIR/config.json (atomically) so tools can rebuild the model without the config file."""
  path = pathio.join(workdir, CONFIG_FILE)
  atomic_io.atomic_write(path, lambda f: f.write(config.to_json(indent=1)), mode="w")
  return path


def read_model_section(workdir: str) -> tuple[str, dict | None]:
  """(path of WORKDIR/config.json, its 'model' section), or (path, None) when the file is absent."""
  path = pathio.join(workdir, CONFIG_FILE)
  if not pathio.is_file(path):
    return path, None
  cfg = json.loads(pathio.as_path(path).read_text())
  if "model" not in cfg:
    raise KeyError(f"{path} has no 'model' section")
  return path, cfg["model"]


def load_model_config(workdir: str) -> ml_collections.ConfigDict:
  path, model = read_model_section(workdir)
  if model is None:
    raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
  return ml_collections.ConfigDict(model)


def read_row(index: int, *, source, starts, paths, patch_size: int, tokens_per_row: int,
             temporal_positions: str = "sample_index") -> dict:
  """Record `index` as one padded eval row, or {"failure": {shard, record, reason}}."""
  try:
    f = features_lib.decode_features_eval(source[index], patch_size=patch_size, tokens_per_row=tokens_per_row,
                                          max_labels=1, temporal_positions=temporal_positions)
    return packing.pad_row(f, tokens_per_row)
  except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
    shard = int(np.searchsorted(starts, index, side="right")) - 1
    return {"failure": dict(shard=paths[shard], record=int(index - starts[shard]),
                            reason=f"{type(e).__name__}: {e}")}


def temporal_positions_of(workdir: str) -> str:
  """The input.temporal_positions the workdir's model was trained with (config.json), else sample_index."""
  path = pathio.join(workdir, CONFIG_FILE)
  if not pathio.is_file(path):
    return "sample_index"
  return json.loads(pathio.as_path(path).read_text()).get("input", {}).get("temporal_positions", "sample_index")


def open_shards(records_dir: str, what: str = "--records") -> tuple[list[str], np.ndarray]:
  paths = input_pipeline.shard_paths(records_dir, what)
  lengths = []
  for p in paths:
    try:
      lengths.append(len(grain.sources.ArrayRecordDataSource([p])))
    except RuntimeError as e:  # a corrupt footer or index: no record of the shard is reachable
      raise ValueError(f"{what}: shard {p} cannot be opened: {e}") from e
  return paths, np.cumsum([0] + lengths)


def embed_records(workdir: str, records_dir: str, *, step: int | None = None, tokens_per_row: int = 1024,
                  batch_size: int = 32, failures: list | None = None,
                  progress=None) -> tuple[np.ndarray, np.ndarray]:
  """(embeddings [N, D] float32, sample_ids [N] int64) of every record, with the checkpoint's encoder,
  in file order. An unreadable record raises ValueError naming its shard and index; when a
  `failures` list is given it is skipped instead and its {shard, record, reason} appended there.
  `progress` (ovenc_format.progress.Progress) counts records."""
  model_cfg = load_model_config(workdir)
  encoder = model_lib.encoder_from_config(model_cfg)
  _, params = ckpt_lib.load_params(workdir, step)
  apply = jax.jit(lambda p, b: encoder.apply({"params": p}, b["patches"], b["positions"],
                                             b["segment_ids"])["pooled"][:, 0])
  paths, starts = open_shards(records_dir)
  read = functools.partial(read_row, source=grain.sources.ArrayRecordDataSource(paths), starts=starts,
                           paths=paths, patch_size=model_cfg.patch_size, tokens_per_row=tokens_per_row,
                           temporal_positions=temporal_positions_of(workdir))
  rows_ds = grain.MapDataset.range(int(starts[-1])).map(read).to_iter_dataset(
      grain.ReadOptions(num_threads=input_pipeline.DEFAULT_READ_THREADS, prefetch_buffer_size=2 * batch_size))
  empty = packing.empty_row(tokens_per_row, model_cfg.patch_size, 1)
  embs, ids = [], []

  def run(rows, seen):
    if rows:
      batch = packing.stack_padded(rows, size=batch_size, empty=empty)
      e = np.asarray(apply(params["encoder"], {k: batch[k] for k in ("patches", "positions", "segment_ids")}))
      embs.append(e[:len(rows)].astype(np.float32))
      ids.append(batch["sample_id"][:len(rows), 0].astype(np.int64))
    if progress is not None:
      progress.update(seen)

  rows, seen = [], 0
  for row in rows_ds:
    seen += 1
    if "failure" in row:
      f = row["failure"]
      if failures is None:
        raise ValueError(f"--records: {f['shard']} record {f['record']} is unreadable: {f['reason']}")
      failures.append(f)
    else:
      rows.append(row)
    if len(rows) == batch_size:
      run(rows, seen)
      rows, seen = [], 0
  run(rows, seen)
  if not embs:
    return np.zeros((0, 0), np.float32), np.zeros((0,), np.int64)
  return np.concatenate(embs), np.concatenate(ids)


def main(argv=None):
  # No abbreviations: a typo that is a prefix of a flag must not pass as that flag.
  ap = argparse.ArgumentParser(prog="python -m ovenc_jax.eval.embed", description=__doc__, allow_abbrev=False)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--records", required=True)
  ap.add_argument("--output", required=True,
                  help="folder for embeddings.npy [N, D] float32, sample_ids.npy [N] int64 and "
                       "failures.jsonl (the unreadable records, skipped)")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  ap.add_argument("--tokens_per_row", type=int, default=1024)
  failures_lib.add_flag(ap, "records (unreadable ones, listed in failures.jsonl)")
  a = ap.parse_args(argv)
  try:
    total = int(open_shards(a.records)[1][-1])
  except ValueError as e:
    ap.error(str(e))
  bad = []
  with progress_lib.Progress(total, "embed", unit="record") as bar:
    emb, ids = embed_records(a.workdir, a.records, step=a.step, tokens_per_row=a.tokens_per_row,
                             failures=bad, progress=bar)
  written = []
  if len(ids):  # nothing valid: leave any earlier embeddings in place rather than emptying them
    written = list(atomic_io.write_embedding_folder(a.output, emb, ids, source=a.records).values())
  report = failures_lib.write_report(pathio.join(a.output, FAILURES_FILE), bad)
  print("wrote " + ", ".join(written + [report]))
  try:
    failures_lib.check(len(bad), total, a.max_failure_fraction, report, "records", num_written=len(ids))
  except failures_lib.TooManyFailures as e:
    print(f"{ap.prog}: error: {e}", file=sys.stderr)
    sys.exit(failures_lib.EXIT_CODE)


if __name__ == "__main__":
  main()
