"""Real-teacher embeddings: a Hugging Face vision tower on videos, images or dense records -> sharded embeddings.npy."""
import argparse
import concurrent.futures
import contextlib
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import uuid

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from data_prep import codec_patchify as cp
from data_prep import patchify_output as output
from data_prep import teacher_inputs as ti
from data_prep import teacher_model as tm
from data_prep.codec.config import is_image_path
from ovenc_format import atomic_io
from ovenc_format import failures as failures_lib
from ovenc_format import paths as pathio
from ovenc_format import progress as progress_lib
from ovenc_format import records

log = logging.getLogger("teacher")
MANIFEST = "teacher_manifest.json"
FAILURES = "failures.jsonl"
# Settings a resumed run must share with the shards already written.
_RESUME_KEYS = ("model", "frames", "per_frame_dim", "frame_rule", "image_embedding", "shard_size",
                "num_items", "items_sha1", "dim")


def shard_files(output_dir: str, i: int, n: int) -> dict:
  """One shard's files; the ids file name is cluster.ids_path_for of the embeddings file name."""
  tag = f"{i:05d}-of-{n:05d}"
  return dict(embeddings=pathio.join(output_dir, f"embeddings-{tag}.npy"),
              sample_ids=pathio.join(output_dir, f"sample_ids-{tag}.npy"),
              failures=pathio.join(output_dir, f"failures-{tag}.jsonl"))


# ----------------------------------------------------------------------------------------------
# Inputs: ("file", canonical path) or ("record", shard path, row).

def list_items(inputs, records_dir) -> list:
  if records_dir:
    items = []
    from array_record.python import array_record_module
    for path in records.list_shards(records_dir):
      # Items keep the shard's own path (remote ones are staged once per host where they are read).
      reader = array_record_module.ArrayRecordReader(pathio.stage(path))
      items += [("record", path, r) for r in range(reader.num_records())]
      reader.close()
    return items
  return [("file", p) for p in cp.expand_inputs(inputs)]  # the codec job's listing: same ids


def _bounded_map(pool, fn, items, window):
  """pool.map in order with at most `window` items in flight (decoded frames stay bounded)."""
  pending = []
  it = iter(items)
  for item in it:
    pending.append(pool.submit(fn, item))
    if len(pending) >= window:
      break
  while pending:
    yield pending.pop(0).result()
    nxt = next(it, None)
    if nxt is not None:
      pending.append(pool.submit(fn, nxt))


# ----------------------------------------------------------------------------------------------
# Embedding shards.

class Recipe:
  """The settings that turn per-frame embeddings into one row per sample."""

  def __init__(self, frames, per_frame_dim, frame_rule, image_embedding, batch_size):
    self.frames, self.per_frame_dim = frames, per_frame_dim
    self.frame_rule, self.image_embedding, self.batch_size = frame_rule, image_embedding, batch_size
    self.out_dim = None  # the width of every row of this run (set once the model is known)

  def row(self, kind: str, per_frame: np.ndarray) -> np.ndarray:
    if kind == "image" and self.image_embedding == "direct":
      return tm.image_embedding(per_frame[0])
    if kind == "image":  # the image as `frames` identical frames: the videos' space
      per_frame = np.repeat(per_frame, self.frames, axis=0)
    return tm.video_embedding(per_frame, self.per_frame_dim)

  def dims(self, model_dim: int) -> dict:
    video = self.frames * (self.per_frame_dim or model_dim)
    return dict(video=video, image=model_dim if self.image_embedding == "direct" else video)


def embed_shard(teacher, recipe, items, prepared, on_done=None):
  """(embeddings [n, D], sample_ids [n], failure rows) of one shard's items; `prepared` yields
  prepare() results (data_prep.teacher_inputs) in item order."""
  rows, ids, fails = [], [], []
  batch = []  # (sample_id, kind, arrays)

  def flush():
    if not batch:
      return
    keys = batch[0][2].keys()
    emb = teacher.embed_inputs({k: np.concatenate([b[2][k] for b in batch]) for k in keys})
    start = 0
    for sid, kind, arrays in batch:
      t = len(next(iter(arrays.values())))
      rows.append(recipe.row(kind, emb[start:start + t]))
      ids.append(sid)
      start += t
      if on_done is not None:  # a clip counts once its row exists
        on_done()
    batch.clear()

  for item, res in zip(items, prepared):
    if res[0] == "ok":
      batch.append(res[1:])
      if sum(len(next(iter(b[2].values()))) for b in batch) >= recipe.batch_size:
        flush()
    else:
      log.warning("failed: %s: %s", ti.item_name(item), res[1])
      fails.append({"path": ti.item_name(item), "reason": res[1]})
      if on_done is not None:
        on_done()
  flush()
  return rows, np.asarray(ids, np.int64), fails


def write_shard(files: dict, rows, ids, fails, dim: int):
  """Failures, ids, then embeddings last: the embeddings file marks the shard done. Each file is
  written whole (atomic_io: temp then rename; on a bucket, a local file uploaded under a temp name,
  then copied to its own), so a half-written shard never looks done."""
  failures_lib.write_report(files["failures"], fails)
  atomic_io.save_npy(files["sample_ids"], ids)
  emb = np.stack(rows).astype(np.float32) if rows else np.zeros((0, dim), np.float32)
  atomic_io.save_npy(files["embeddings"], emb)


# ----------------------------------------------------------------------------------------------
# Runs.

def decode_pool(model: str, frames: int, rule: str, workers: int):
  """Decode workers (spawned: the model's process may hold threads), started now so that their
  imports overlap the model's load; None for workers == 0."""
  if workers < 1:
    return None
  pool = concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("spawn"), initializer=ti.init_worker,
      initargs=(model, frames, rule))
  for _ in range(workers):
    pool.submit(ti.ping)
  return pool


def run_local(teacher, recipe, shards, output_dir, num_shards, pool, bar, workers=1):
  """Single host: decode and the image processor in `pool` (decode_pool of `workers`; None = here),
  the model in batches of recipe.batch_size frames here."""
  # Clips in flight: two batches' worth, at least two per worker.
  window = max(2 * -(-recipe.batch_size // recipe.frames), 2 * workers, 4)
  for i, items in shards:
    if pool is not None:
      prepared = _bounded_map(pool, ti.prepare_in_worker, items, window)
    else:
      prepared = (ti.prepare(it, teacher.processor, recipe.frames, recipe.frame_rule) for it in items)
    rows, ids, fails = embed_shard(teacher, recipe, items, prepared, bar.update)
    write_shard(shard_files(output_dir, i, num_shards), rows, ids, fails, recipe.out_dim)


class TeacherShardFn(beam.DoFn):
  """shard index -> that shard's files, the model loaded once per worker."""

  def __init__(self, settings, recipe, shard_items, output_dir, num_shards, marks_dir):
    self.settings, self.recipe, self.shard_items = settings, recipe, shard_items
    self.output_dir, self.num_shards, self.marks_dir = output_dir, num_shards, marks_dir

  def setup(self):
    s = self.settings
    self.teacher = tm.Teacher(s["model"], s["device"], s["dtype"])
    self.marks = None
    try:  # one byte per clip for the driver's progress bar; remote workers have no such folder
      self.marks = open(os.path.join(self.marks_dir, f"{output.PROGRESS_PREFIX}{uuid.uuid4().hex}"),
                        "ab", buffering=0)
    except OSError as e:
      log.info("no progress marks in %s: %s", self.marks_dir, e)

  def process(self, i):
    items, r = self.shard_items[i], self.recipe
    prepared = (ti.prepare(it, self.teacher.processor, r.frames, r.frame_rule) for it in items)
    mark = (lambda: self.marks.write(b".")) if self.marks is not None else None
    rows, ids, fails = embed_shard(self.teacher, r, items, prepared, mark)
    write_shard(shard_files(self.output_dir, i, self.num_shards), rows, ids, fails, r.out_dim)
    yield i

  def teardown(self):
    marks = getattr(self, "marks", None)
    if marks is not None:
      marks.close()


def run_beam(settings, recipe, shards, output_dir, num_shards, beam_args, num_todo):
  """Beam job: one element per shard to do (DirectRunner by default; Dask, Dataflow, ...)."""
  # Progress marks are appended one byte at a time: a local folder (a bucket cannot append).
  marks_dir = (tempfile.mkdtemp(prefix=f"{output.STAGING_PREFIX}teacher-") if pathio.is_remote(output_dir)
               else os.path.join(output_dir, f"{output.STAGING_PREFIX}teacher-{uuid.uuid4().hex}"))
  os.makedirs(marks_dir, exist_ok=True)
  shard_items = dict(shards)
  on_dask = _is_dask(beam_args)
  if on_dask:
    beam_args = cp._without_flag(beam_args, "--runner") + [f"--runner={cp.DASK_RUNNER}"]
    if not (cp._flag(beam_args, "--dask_npartitions") or cp._flag(beam_args, "--dask_partition_size")):
      beam_args.append("--dask_partition_size=1")  # a shard is already a big unit of work
  try:
    with contextlib.ExitStack() as stack:
      if on_dask:
        beam_args = stack.enter_context(cp._dask_cluster(beam_args, settings["dask_workers"]))
      runner = None if cp._flag(beam_args, "--runner") else FnApiRunner()
      stack.enter_context(output.watch_progress(marks_dir, num_todo, desc="teacher", unit="clip"))
      pipeline = beam.Pipeline(runner=runner, options=PipelineOptions(beam_args))
      _ = (pipeline
           | "Shards" >> beam.Create(sorted(shard_items))
           | "Spread" >> beam.Reshuffle()
           | "Embed" >> beam.ParDo(TeacherShardFn(settings, recipe, shard_items, output_dir,
                                                  num_shards, marks_dir)))
      result = pipeline.run()
      client = getattr(result, "client", None)
      if client is not None:
        stack.callback(client.close)
      result.wait_until_finish()
  finally:
    shutil.rmtree(marks_dir, ignore_errors=True)


def _is_dask(beam_args):
  runner = cp._flag(beam_args, "--runner")
  return runner is not None and runner.lower() in ("dask", "daskrunner", cp.DASK_RUNNER.lower())


# ----------------------------------------------------------------------------------------------
# Output folder.

def _items_sha1(items) -> str:
  h = hashlib.sha1()
  for it in items:
    h.update(json.dumps(list(it)).encode() + b"\n")
  return h.hexdigest()


def prepare_output(output_dir, header, overwrite):
  """Creates output_dir (a folder or a gs:// prefix); refuses to resume shards made with other
  settings unless --overwrite."""
  pathio.makedirs(output_dir)
  path = pathio.join(output_dir, MANIFEST)
  old = json.loads(pathio.as_path(path).read_text()) if pathio.exists(path) else None
  folder = pathio.as_path(output_dir)
  stale = sorted(str(f) for pattern in ("embeddings-*.npy", "sample_ids-*.npy", "failures-*.jsonl")
                 for f in folder.glob(pattern))
  if overwrite:
    for f in stale:
      pathio.remove(f)
  elif old is not None:
    diff = [k for k in _RESUME_KEYS if old.get(k) != header.get(k)]
    if diff:
      raise ValueError(f"--output_dir {output_dir} holds shards made with other settings "
                       f"({', '.join(f'{k}: {old.get(k)!r} -> {header.get(k)!r}' for k in diff)}); "
                       f"pass --overwrite to replace them or use another folder")
  elif stale:
    raise ValueError(f"--output_dir {output_dir} holds shards but no {MANIFEST}; pass --overwrite")
  atomic_io.save_json(path, dict(header, complete=False))


def finalize(output_dir, header, num_shards) -> dict:
  fails, n_rows = [], 0
  for i in range(num_shards):
    files = shard_files(output_dir, i, num_shards)
    text = pathio.as_path(files["failures"]).read_text()
    fails += [json.loads(line) for line in text.splitlines() if line.strip()]
    n_rows += np.load(io.BytesIO(pathio.as_path(files["sample_ids"]).read_bytes())).shape[0]
  failures_lib.write_report(pathio.join(output_dir, FAILURES), fails)
  manifest = dict(header, complete=True, num_embeddings=n_rows, num_failures=len(fails))
  atomic_io.save_json(pathio.join(output_dir, MANIFEST), manifest)
  return manifest


# ----------------------------------------------------------------------------------------------
# CLI.

PROG = "python -m data_prep.teacher"


def build_parser():
  ap = argparse.ArgumentParser(prog=PROG, description=__doc__, allow_abbrev=False, epilog=(
      "With --mode beam, other flags are Beam pipeline options (--runner, --direct_num_workers, "
      "--dask_client_address, --project, ...), checked as the codec job checks them."))
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--input", action="append",
                   help="glob, list file (.txt/.list/.lst), directory or file, as the codec job "
                   "takes them (same sample_id); repeatable")
  src.add_argument("--records", help="codec records folder whose records keep every patch "
                   "(--selector dense); frames are rebuilt from the patches")
  ap.add_argument("--model", required=True,
                  help="transformers vision tower: a local folder or a hub id (CLIP, MetaCLIP, "
                  "SigLIP, SigLIP2, DINOv2, ...) with its preprocessor_config.json; a gs:// "
                  "folder is staged once per host ($OVENC_CACHE_DIR)")
  ap.add_argument("--output_dir", required=True, help="folder or gs:// prefix of the embedding shards")
  ap.add_argument("--frames", type=int, default=8, help="frames sampled per video")
  ap.add_argument("--per_frame_dim", type=int, default=512,
                  help="leading dims kept of each frame's embedding (0 = all)")
  ap.add_argument("--frame_rule", choices=tm.FRAME_RULES, default="linspace",
                  help="linspace: rint(linspace(0, n-1, frames)); segment: the middle frame of "
                  "each of `frames` equal steps (the published extractor's rule)")
  ap.add_argument("--image_embedding", choices=("direct", "frames"), default="direct",
                  help="direct: an image's own embedding; frames: the image as `frames` identical "
                  "frames through the video recipe (one space with the videos)")
  ap.add_argument("--batch_size", type=int, default=64, help="frames per model call")
  ap.add_argument("--shard_size", type=int, default=1024, help="inputs per output shard")
  ap.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cuda:1")
  ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
  ap.add_argument("--mode", choices=("local", "beam"), default="local",
                  help="local: one process runs the model, --decode_workers decode; beam: a Beam "
                  "job with one element per shard")
  ap.add_argument("--decode_workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                  help="local mode: decode processes (0 = decode in the model's process)")
  ap.add_argument("--dask_workers", type=int, default=os.cpu_count(),
                  help="--runner=dask without --dask_client_address: local Dask processes")
  ap.add_argument("--overwrite", action="store_true", help="replace shards of an earlier run")
  failures_lib.add_flag(ap, "inputs (failures.jsonl rows)")
  return ap


def parse_args(argv=None):
  """Our flags, then Beam's (checked as the codec job checks them); Beam's need --mode beam."""
  ap = build_parser()
  args, beam_args = cp.parse_with_beam_flags(ap, argv)
  if beam_args and args.mode != "beam":
    ap.error(f"{beam_args[0].split('=', 1)[0]} is a Beam option: Beam options need --mode beam")
  return args, beam_args


def run(argv=None) -> dict:
  args, beam_args = parse_args(argv)
  return run_parsed(args, beam_args)


def run_parsed(args, beam_args) -> dict:
  for flag in ("batch_size", "shard_size"):
    if getattr(args, flag) < 1:
      raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
  if args.decode_workers < 0:
    raise ValueError(f"--decode_workers must be >= 0, got {args.decode_workers}")
  pathio.check_writable(args.output_dir, "--output_dir")
  items = list_items(args.input, args.records)
  if not items:
    raise ValueError("--input: no input paths")
  start = time.time()
  pool = decode_pool(args.model, args.frames, args.frame_rule,
                     args.decode_workers if args.mode == "local" else 0)
  try:
    manifest = _run(args, beam_args, items, pool, start)
  except BaseException:
    if pool is not None:  # do not wait for workers still starting
      pool.shutdown(wait=False, cancel_futures=True)
    raise
  if pool is not None:
    pool.shutdown()
  return manifest


def _run(args, beam_args, items, pool, start) -> dict:
  teacher = tm.Teacher(args.model, args.device, args.dtype)
  recipe = Recipe(args.frames, args.per_frame_dim, args.frame_rule, args.image_embedding,
                  args.batch_size)
  dims = recipe.dims(teacher.dim)
  kinds = {"image" if it[0] == "file" and is_image_path(it[1]) else "video" for it in items}
  if "video" in kinds or args.image_embedding == "frames":  # images used directly ignore it
    tm.check_recipe(args.frames, args.per_frame_dim, teacher.dim)
  if len(kinds) == 2 and dims["image"] != dims["video"]:
    raise ValueError(f"--input mixes videos ({dims['video']} dims) and images ({dims['image']} "
                     f"dims with --image_embedding direct): pass --image_embedding frames for one "
                     f"space, or run images and videos into separate --output_dir")
  dim = recipe.out_dim = dims["image"] if kinds == {"image"} else dims["video"]
  output_dir = pathio.absolute(args.output_dir)
  num_shards = -(-len(items) // args.shard_size)
  header = dict(format="embeddings-*.npy + sample_ids-*.npy (data_prep.cluster --embeddings)",
                created_by="data_prep.teacher", model=args.model, model_type=teacher.model_type,
                frames=args.frames, per_frame_dim=args.per_frame_dim, frame_rule=args.frame_rule,
                image_embedding=args.image_embedding, shard_size=args.shard_size,
                num_shards=num_shards, num_items=len(items), items_sha1=_items_sha1(items), dim=dim,
                inputs=args.input, records=args.records)
  prepare_output(output_dir, header, args.overwrite)
  shards = [(i, items[i * args.shard_size:(i + 1) * args.shard_size]) for i in range(num_shards)]
  todo = [(i, its) for i, its in shards
          if not pathio.exists(shard_files(output_dir, i, num_shards)["embeddings"])]
  num_todo = sum(len(its) for _, its in todo)
  log.info("teacher %s (%s): %d inputs, %d of %d shards to do -> %s", args.model,
           teacher.model_type, len(items), len(todo), num_shards, output_dir)
  if args.mode == "local":
    with progress_lib.Progress(num_todo, "teacher", unit="clip") as bar:
      run_local(teacher, recipe, todo, output_dir, num_shards, pool, bar, args.decode_workers)
  elif todo:
    del teacher  # each Beam worker loads its own
    settings = dict(model=args.model, device=args.device, dtype=args.dtype, frames=args.frames,
                    per_frame_dim=args.per_frame_dim, frame_rule=args.frame_rule,
                    image_embedding=args.image_embedding, batch_size=args.batch_size,
                    dask_workers=args.dask_workers)
    run_beam(settings, recipe, todo, output_dir, num_shards, beam_args, num_todo)
  manifest = finalize(output_dir, header, num_shards)
  elapsed = time.time() - start
  print(f"teacher finished in {elapsed:.1f}s: {manifest['num_embeddings']} embeddings of dim "
        f"{dim}, {manifest['num_failures']} failures ({len(todo)} of {num_shards} shards run) "
        f"-> {output_dir}", flush=True)
  return manifest


def main(argv=None):
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
  logging.getLogger("apache_beam").setLevel(logging.WARNING)
  try:
    args, beam_args = parse_args(argv)
    manifest = run_parsed(args, beam_args)
    failures_lib.check(manifest["num_failures"], manifest["num_items"], args.max_failure_fraction,
                       pathio.join(args.output_dir, FAILURES), "inputs",
                       num_written=manifest["num_embeddings"])
  except ValueError as e:
    print(f"teacher: error: {e}", file=sys.stderr)
    sys.exit(2)
  except failures_lib.TooManyFailures as e:
    print(f"teacher: error: {e}", file=sys.stderr)
    sys.exit(failures_lib.EXIT_CODE)


if __name__ == "__main__":
  # Through the importable module, so Beam and the decode workers pickle functions by name.
  from data_prep import teacher
  teacher.main()
