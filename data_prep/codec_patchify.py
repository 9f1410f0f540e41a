"""Apache Beam job: videos/images -> codec-selected patch records in ArrayRecord shards."""
import argparse
import collections
import dataclasses
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
import uuid

import apache_beam as beam
from apache_beam.coders import coders
from apache_beam.io import filebasedsink
from apache_beam.io import filesystem
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from data_prep import codec_signals
from data_prep import records
from data_prep import selectors

log = logging.getLogger("codec_patchify")

MEDIA_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".m2ts", ".flv",
    ".wmv", ".3gp", ".ogv", ".y4m", ".h264", ".264", ".hevc", ".265", ".ivf", ".gif",
}) | codec_signals.IMAGE_EXTENSIONS
LIST_EXTENSIONS = frozenset({".txt", ".list", ".lst"})
METRICS_NAMESPACE = "codec_patchify"


# ----------------------------------------------------------------------------------------------
# Inputs.

def _is_url(path: str) -> bool:
  return "://" in path


def _canonical(path: str) -> str:
  """Local paths become absolute (a stable `source` and sample_id); URLs stay as written."""
  return path if _is_url(path) else os.path.abspath(path)


def _read_text(path: str) -> str:
  with FileSystems.open(path) as f:
    return f.read().decode("utf-8")


def expand_inputs(specs) -> list:
  """Glob patterns, list files (.txt/.list/.lst: one path per line), dirs or single files ->
  sorted unique canonical paths. Raises ValueError naming a spec that matches nothing."""
  out = []
  for spec in specs:
    spec = spec.strip()
    ext = os.path.splitext(spec)[1].lower()
    if any(c in spec for c in "*?["):
      matched = [m.path for r in FileSystems.match([spec]) for m in r.metadata_list]
      if not matched:
        raise ValueError(f"--input {spec!r}: the glob matches no files")
      out.extend(matched)
    elif ext in LIST_EXTENSIONS:
      try:
        text = _read_text(spec)
      except Exception as e:
        raise ValueError(f"--input {spec!r}: cannot read list file ({e})") from e
      base = os.path.dirname(spec)
      for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
          # Relative entries are relative to the list file, so the list travels with its data.
          out.append(line if _is_url(line) or os.path.isabs(line) else os.path.join(base, line))
    elif not _is_url(spec) and os.path.isdir(spec):
      found = [os.path.join(root, name) for root, _, names in os.walk(spec) for name in names
               if os.path.splitext(name)[1].lower() in MEDIA_EXTENSIONS]
      if not found:
        raise ValueError(f"--input {spec!r}: the directory holds no media files")
      out.extend(found)
    else:
      # A single path; a missing or broken one becomes a failures.jsonl row, not an abort.
      out.append(spec)
  return sorted({_canonical(p) for p in out})


def load_class_labels(path: str) -> dict:
  """JSON object {input path: int label} -> {canonical path: label}."""
  try:
    raw = json.loads(_read_text(path))
  except Exception as e:
    raise ValueError(f"--class_labels {path!r}: cannot read JSON ({e})") from e
  if not isinstance(raw, dict):
    raise ValueError(f"--class_labels {path!r}: expected a JSON object path -> int")
  out = {}
  for key, value in raw.items():
    if not isinstance(value, int) or isinstance(value, bool) or value < -1:
      raise ValueError(f"--class_labels {path!r}: label of {key!r} is {value!r}, not an int >= -1")
    out[_canonical(key)] = value
  return out


def _fetch(url: str) -> str:
  """Copies a remote input (gs://, s3://, ...) to a local temp file PyAV can open."""
  fd, local = tempfile.mkstemp(suffix=os.path.splitext(url)[1])
  with os.fdopen(fd, "wb") as dst, FileSystems.open(url) as src:
    while chunk := src.read(1 << 22):
      dst.write(chunk)
  return local


class PatchifyFn(beam.DoFn):
  """path -> encoded record (main output) or a failures.jsonl line (tagged 'failures')."""

  def __init__(self, cfg, class_labels: dict, timeout: float, log_every_s: float):
    self.cfg = cfg
    self.class_labels = class_labels
    self.timeout = timeout
    self.log_every_s = log_every_s
    self.ok = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "files_ok")
    self.failed = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "files_failed")
    self.tokens = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "tokens_kept")
    self.seconds = beam.metrics.Metrics.distribution(METRICS_NAMESPACE, "ms_per_file")

  def setup(self):
    self.worker = codec_signals.DecodeWorker(self.cfg, self.timeout) if self.timeout > 0 else None
    self.done = self.n_failed = self.n_tokens = 0
    self.started = self.last_log = time.time()

  def process(self, path):
    label = self.class_labels.get(path, -1)
    t0 = time.time()
    try:
      local = _fetch(path) if _is_url(path) else path
    except Exception as e:  # an unreadable remote file is a failure row, not a crash
      result = ("fail", f"cannot fetch input ({type(e).__name__}: {e})")
    else:
      try:
        if self.worker is None:
          result = codec_signals.process_path(local, label, self.cfg, source=path)
        else:
          result = self.worker.run(local, label, source=path)
      except Exception as e:  # e.g. the worker cannot start: still one failure row per file
        result = ("fail", f"internal error: {type(e).__name__}: {e}")
      finally:
        if local != path and os.path.exists(local):
          os.remove(local)
    self.seconds.update(int(1000 * (time.time() - t0)))
    self.done += 1
    if result[0] == "ok":
      _, data, stats = result
      self.ok.inc()
      self.tokens.inc(stats["tokens"])
      self.n_tokens += stats["tokens"]
      yield beam.pvalue.TaggedOutput("stats", stats)
      yield data
    else:
      self.failed.inc()
      self.n_failed += 1
      log.warning("failed: %s: %s", path, result[1])
      yield beam.pvalue.TaggedOutput("failures", json.dumps({"path": path, "reason": result[1]},
                                                            ensure_ascii=False))
    now = time.time()
    if now - self.last_log >= self.log_every_s:
      self.last_log = now
      log.info("worker %d: %d files done (%d failed), %d tokens kept, %.1f files/s", os.getpid(),
               self.done, self.n_failed, self.n_tokens, self.done / max(now - self.started, 1e-9))

  def teardown(self):
    if getattr(self, "worker", None) is not None:
      self.worker.close()


# ----------------------------------------------------------------------------------------------
# Output.

class ArrayRecordSink(filebasedsink.FileBasedSink):
  """ArrayRecord shards through Beam's temp-file-then-rename finalisation.

  Each bundle writes a temp file under DIR/beam-temp-*; finalize renames complete temp files to
  DIR/data-XXXXX-of-YYYYY.array_record, so an interrupted run never leaves a final-named shard.
  The ArrayRecord writer needs a local file: for remote filesystems it writes locally and then
  copies into the temp path.
  """

  def __init__(self, output_dir: str, num_shards: int):
    super().__init__(FileSystems.join(output_dir, "data"), file_name_suffix=".array_record",
                     num_shards=num_shards, shard_name_template="-SSSSS-of-NNNNN",
                     coder=coders.ToBytesCoder(), mime_type="application/octet-stream",
                     compression_type=filesystem.CompressionTypes.UNCOMPRESSED)

  def open(self, temp_path):
    from array_record.python import array_record_module
    local = temp_path
    if _is_url(temp_path):
      fd, local = tempfile.mkstemp(suffix=".array_record")
      os.close(fd)
    return (array_record_module.ArrayRecordWriter(local, "group_size:1"), local, temp_path)

  def write_encoded_record(self, handle, value):
    handle[0].write(value)

  def close(self, handle):
    writer, local, temp_path = handle
    writer.close()
    if local != temp_path:
      with open(local, "rb") as src, FileSystems.create(temp_path) as dst:
        while chunk := src.read(1 << 22):
          dst.write(chunk)
      os.remove(local)


def _write_atomic(path: str, text: str):
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  with FileSystems.create(tmp) as f:
    f.write(text.encode("utf-8"))
  FileSystems.rename([tmp], [path])


def _merge_stats(items):
  out = {"records": 0, "tokens": 0, "videos": 0, "images": 0, "signals": {}}
  for s in items:
    out["records"] += 1
    out["tokens"] += s["tokens"]
    out["videos" if s["kind"] == "video" else "images"] += 1
    out["signals"][s["signal"]] = out["signals"].get(s["signal"], 0) + 1
  return out


class _StatsFn(beam.CombineFn):
  def create_accumulator(self):
    return _merge_stats([])

  def add_input(self, acc, s):
    return self.merge_accumulators([acc, _merge_stats([s])])

  def merge_accumulators(self, accs):
    out = _merge_stats([])
    for a in accs:
      for key in ("records", "tokens", "videos", "images"):
        out[key] += a[key]
      for sig, n in a["signals"].items():
        out["signals"][sig] = out["signals"].get(sig, 0) + n
    return out

  def extract_output(self, acc):
    return acc


def _failure_reason_kind(reason: str) -> str:
  """'frame size 7x5 is smaller ...' -> 'frame size': the reason up to its first detail."""
  return re.split(r"[0-9(:]", reason, maxsplit=1)[0].strip()[:80]


def write_manifest(_, output_dir, header, stats, shards, failures):
  """Runs after the shards and failures.jsonl are final (they arrive as side inputs)."""
  kinds = collections.Counter(_failure_reason_kind(json.loads(f)["reason"]) for f in failures)
  manifest = dict(header)
  manifest.update(
      num_records=stats["records"], num_videos=stats["videos"], num_images=stats["images"],
      num_failures=len(failures), num_tokens=stats["tokens"],
      tokens_per_record=stats["tokens"] / max(stats["records"], 1),
      signals=dict(sorted(stats["signals"].items())), failure_kinds=dict(sorted(kinds.items())),
      shards=sorted(os.path.basename(s) for s in shards), num_shards=len(shards),
      finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
  _write_atomic(FileSystems.join(output_dir, "manifest.json"),
                json.dumps(manifest, indent=1, sort_keys=True))
  return manifest


# ----------------------------------------------------------------------------------------------
# CLI.

def build_parser():
  d = codec_signals.PatchifyConfig()
  ap = argparse.ArgumentParser(
      allow_abbrev=False,  # a Beam option must never be taken for a prefix of one of ours
      description=__doc__, epilog="Unknown flags are Beam pipeline options (--runner, "
      "--direct_num_workers, --project, ...) and pass straight through to Beam.")
  ap.add_argument("--input", action="append", required=True,
                  help="glob, list file (.txt/.list/.lst), directory or file; repeatable")
  ap.add_argument("--output_dir", required=True, help="local dir or a Beam filesystem URL")
  ap.add_argument("--budget", type=float, default=d.budget, help="fraction of T*H*W kept")
  ap.add_argument("--num_frames", type=int, default=d.num_frames, help="T, sampled per video")
  ap.add_argument("--image_size", type=int, default=d.image_size, help="frames resized to SxS")
  ap.add_argument("--patch_size", type=int, default=d.patch_size, help="p; grid is S/p")
  ap.add_argument("--fusion", choices=codec_signals.FUSIONS, default=d.fusion,
                  help="how the motion and residual maps combine")
  ap.add_argument("--motion_weight", type=float, default=d.motion_weight)
  ap.add_argument("--residual_weight", type=float, default=d.residual_weight)
  ap.add_argument("--camera_compensation", action="store_true",
                  help="subtract the median motion vector (camera motion) before |MV|")
  ap.add_argument("--keep_first_frame", action="store_true",
                  help="keep the first sampled frame whole; top-K fills the rest of K")
  ap.add_argument("--no_static_fallback", dest="static_fallback", action="store_false",
                  help="always use top-K, even on static videos")
  ap.add_argument("--static_threshold", type=float, default=d.static_threshold,
                  help="static when the 95th pct of patch scores (MV frames) is below this")
  ap.add_argument("--motion_floor", type=float, default=d.motion_floor,
                  help="pixels; the |MV| map is divided by max(95th pct, this)")
  ap.add_argument("--residual_floor", type=int, default=d.residual_floor,
                  help="luma levels; the residual map is divided by max(95th pct, this)")
  ap.add_argument("--min_side", type=int, default=d.min_side,
                  help="inputs with a shorter side (or one below the grid) are failures")
  ap.add_argument("--max_aspect", type=float, default=d.max_aspect,
                  help="inputs with a longer/shorter side ratio above this are failures")
  ap.add_argument("--image_budget", type=float, default=d.image_budget,
                  help="0: images keep the whole grid; else fraction kept by gradient saliency")
  ap.add_argument("--resize_interpolation", default=d.resize_interpolation,
                  choices=codec_signals.RESIZE_FILTERS, help="swscale resize filter")
  ap.add_argument("--max_mv_pixels", type=int, default=d.max_mv_pixels,
                  help="vectors are clipped to this length when warping")
  ap.add_argument("--selector", choices=selectors.NAMES, default=d.selector,
                  help="video patch rule: codec top-K, or a baseline (random K, uniform whole "
                  "frames, dense = every patch; see data_prep/selectors.py)")
  ap.add_argument("--class_labels", default=None,
                  help="JSON {input path: int}; fills class_label (-1 when absent)")
  ap.add_argument("--num_shards", type=int, default=0,
                  help="0: one shard per 1024 inputs (at least 1)")
  ap.add_argument("--decode_timeout", type=float, default=600.0,
                  help="seconds per file in a child process; 0 decodes in-process, no timeout")
  ap.add_argument("--log_every_s", type=float, default=30.0,
                  help="seconds between progress lines of each worker")
  ap.add_argument("--overwrite", action="store_true",
                  help="replace shards/manifest/failures of an earlier run in output_dir")
  return ap


def config_from_args(args) -> codec_signals.PatchifyConfig:
  fields = {f.name for f in dataclasses.fields(codec_signals.PatchifyConfig)}
  return codec_signals.PatchifyConfig(
      **{k: v for k, v in vars(args).items() if k in fields}).validate()


def _prepare_output_dir(output_dir: str, overwrite: bool):
  earlier = [m.path for pattern in (records.SHARD_PATTERN, "manifest.json", "failures.jsonl")
             for r in FileSystems.match([FileSystems.join(output_dir, pattern)])
             for m in r.metadata_list]
  if earlier and not overwrite:
    raise ValueError(f"--output_dir {output_dir!r} holds {len(earlier)} file(s) of an earlier "
                     f"run (e.g. {os.path.basename(earlier[0])}); pass --overwrite to replace them")
  if earlier:
    FileSystems.delete(earlier)
  if not _is_url(output_dir):
    os.makedirs(output_dir, exist_ok=True)


def run(argv=None):
  """Parses flags, runs the pipeline, returns the manifest dict."""
  args, beam_args = build_parser().parse_known_args(argv)
  cfg = config_from_args(args)
  if args.num_shards < 0:
    raise ValueError(f"--num_shards={args.num_shards} must be >= 0")
  if args.decode_timeout < 0:
    raise ValueError(f"--decode_timeout={args.decode_timeout} must be >= 0")
  paths = expand_inputs(args.input)
  if not paths:
    raise ValueError("--input: no input paths")
  labels = load_class_labels(args.class_labels) if args.class_labels else {}
  labels = {p: labels[p] for p in paths if p in labels}
  num_shards = args.num_shards or max(1, math.ceil(len(paths) / 1024))
  output_dir = args.output_dir if _is_url(args.output_dir) else os.path.abspath(args.output_dir)
  _prepare_output_dir(output_dir, args.overwrite)
  header = {
      "format": "ovenc codec patches (data_prep/records.py)",
      "format_version": records.FORMAT_VERSION, "created_by": "data_prep.codec_patchify",
      "num_inputs": len(paths), "options": dataclasses.asdict(cfg),
      "num_keep_per_video": cfg.num_keep(), "grid": [cfg.num_frames, cfg.grid_side, cfg.grid_side],
      "inputs": args.input, "class_labels": args.class_labels,
      "num_class_labels": len(labels), "decode_timeout": args.decode_timeout,
      "beam_args": beam_args,
  }
  log.info("codec_patchify: %d inputs -> %s (%d shards), K=%d of %s per video", len(paths),
           output_dir, num_shards, cfg.num_keep(), header["grid"])
  start = time.time()
  options = PipelineOptions(beam_args)
  pipeline = beam.Pipeline(options=options)
  out = (pipeline
         | "Inputs" >> beam.Create(paths)
         | "Spread" >> beam.Reshuffle()
         | "Patchify" >> beam.ParDo(PatchifyFn(cfg, labels, args.decode_timeout,
                                               args.log_every_s)).with_outputs(
                                                   "failures", "stats", main="records"))
  shards = out.records | "WriteShards" >> beam.io.iobase.Write(ArrayRecordSink(output_dir,
                                                                                num_shards))
  fail_files = out.failures | "WriteFailures" >> beam.io.WriteToText(
      FileSystems.join(output_dir, "failures"), file_name_suffix=".jsonl", num_shards=1,
      shard_name_template="")
  stats = out.stats | "Stats" >> beam.CombineGlobally(_StatsFn())
  _ = (pipeline
       | "ManifestTrigger" >> beam.Create([None])
       | "Manifest" >> beam.Map(
           write_manifest, output_dir, header, stats=beam.pvalue.AsSingleton(stats),
           shards=beam.pvalue.AsList(shards), failures=beam.pvalue.AsList(
               out.failures | "AfterFailures" >> beam.FlatMap(
                   lambda f, _done: [f], _done=beam.pvalue.AsList(fail_files)))))
  result = pipeline.run()
  result.wait_until_finish()
  elapsed = time.time() - start
  manifest = json.loads(_read_text(FileSystems.join(output_dir, "manifest.json")))
  _print_summary(manifest, result, elapsed)
  return manifest


def _print_summary(manifest, result, elapsed):
  counters = {}
  try:
    for c in result.metrics().query()["counters"]:
      if c.key.metric.namespace == METRICS_NAMESPACE:
        counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + (
            c.committed if c.committed is not None else c.attempted)
  except Exception as e:  # some runners do not report metrics; the manifest has the counts
    log.info("metrics unavailable from this runner: %s", e)
  n = manifest["num_records"] + manifest["num_failures"]
  lines = [
      f"codec_patchify finished in {elapsed:.1f}s: {n} files "
      f"({n / max(elapsed, 1e-9):.1f}/s), {manifest['num_records']} records "
      f"({manifest['num_videos']} videos, {manifest['num_images']} images), "
      f"{manifest['num_failures']} failures",
      f"  tokens kept: {manifest['num_tokens']} ({manifest['tokens_per_record']:.1f} per record)",
      f"  signals: {manifest['signals']}",
      f"  shards: {manifest['num_shards']} x data-*-of-{manifest['num_shards']:05d}.array_record",
  ]
  if manifest["failure_kinds"]:
    lines.append(f"  failure kinds: {manifest['failure_kinds']} (see failures.jsonl)")
  if counters:
    lines.append(f"  beam counters: {dict(sorted(counters.items()))}")
  print("\n".join(lines), flush=True)


def main(argv=None):
  # force: importing Beam already gave the root logger a WARNING-level handler.
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
  logging.getLogger("apache_beam").setLevel(logging.WARNING)
  try:
    run(argv)
  except ValueError as e:
    print(f"codec_patchify: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  # Run through the importable module, so Beam and multiprocessing pickle its classes by name
  # (data_prep.codec_patchify.X) instead of as __main__.X, which workers cannot import.
  from data_prep import codec_patchify
  codec_patchify.main()
