"""Apache Beam job: videos/images -> codec-selected patch records in ArrayRecord shards."""
import argparse
import contextlib
import dataclasses
import difflib
import importlib
import json
import logging
import math
import multiprocessing
import os
import sys
import time
import uuid

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from data_prep import patchify_output as output
from data_prep.codec import clip, config
from data_prep.codec.worker import DecodeWorker
from ovenc_format import failures as failures_lib
from ovenc_format import records

log = logging.getLogger("codec_patchify")

MEDIA_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".m2ts", ".flv",
    ".wmv", ".3gp", ".ogv", ".y4m", ".h264", ".264", ".hevc", ".265", ".ivf", ".gif",
}) | config.IMAGE_EXTENSIONS
LIST_EXTENSIONS = frozenset({".txt", ".list", ".lst"})
METRICS_NAMESPACE = "codec_patchify"


# ----------------------------------------------------------------------------------------------
# Inputs.

def _canonical(path: str) -> str:
  """Local paths become absolute with symlinks resolved (a stable `source` and sample_id, and a
  link is not a second sample); URLs stay as written."""
  return path if output.is_url(path) else os.path.realpath(path)


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
        text = output.read_text(spec)
      except Exception as e:
        raise ValueError(f"--input {spec!r}: cannot read list file ({e})") from e
      base = os.path.dirname(spec)
      for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
          # Relative entries are relative to the list file, so the list travels with its data.
          out.append(line if output.is_url(line) or os.path.isabs(line) else os.path.join(base, line))
    elif not output.is_url(spec) and os.path.isdir(spec):
      found = [os.path.join(root, name) for root, _, names in os.walk(spec) for name in names
               if os.path.splitext(name)[1].lower() in MEDIA_EXTENSIONS]
      if not found:
        raise ValueError(f"--input {spec!r}: the directory holds no media files")
      out.extend(found)
    elif output.is_url(spec) and ext not in MEDIA_EXTENSIONS:  # a bucket "folder": the objects under it
      pattern = FileSystems.join(spec.rstrip("/"), "**")
      found = [m.path for r in FileSystems.match([pattern]) for m in r.metadata_list
               if os.path.splitext(m.path)[1].lower() in MEDIA_EXTENSIONS]
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
    raw = json.loads(output.read_text(path))
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


# Decoder children kept between Dask partitions, one per worker process (see PatchifyFn.teardown).
_IDLE_DECODERS = {}

DAEMON_WORKER_ERROR = (
    "this worker process is daemonic (Dask's default), so it cannot start the decoder child that "
    "--decode_timeout needs; start the Dask workers with DASK_DISTRIBUTED__WORKER__DAEMON=False "
    "(or distributed.worker.daemon: false in their config), or pass --decode_timeout 0")


def _in_dask_worker() -> bool:
  # Not imported = not a Dask worker; importing distributed only to ask would cost every worker's
  # teardown an import, which the DirectRunner pays one worker after another at the end of a job.
  if "distributed" not in sys.modules:
    return False
  try:
    from distributed import get_worker
    get_worker()
  except (ImportError, ValueError):
    return False
  return True


class PatchifyFn(beam.DoFn):
  """paths -> records written straight into this bundle's shards; failures into its parts."""

  def __init__(self, cfg, class_labels: dict, timeout: float, log_every_s: float, staging: str,
               shard_bytes: int, writer_options: str = output.DEFAULT_WRITER_OPTIONS):
    self.cfg = cfg
    self.class_labels = class_labels
    self.timeout = timeout
    self.log_every_s = log_every_s
    self.staging = staging
    self.shard_bytes = shard_bytes
    self.writer_options = writer_options
    self.ok = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "files_ok")
    self.failed = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "files_failed")
    self.tokens = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "tokens_kept")
    self.seconds = beam.metrics.Metrics.distribution(METRICS_NAMESPACE, "ms_per_file")

  def setup(self):
    self.worker = None
    if self.timeout > 0:
      if multiprocessing.current_process().daemon:
        raise RuntimeError(DAEMON_WORKER_ERROR)
      self.worker = (_IDLE_DECODERS.pop(self._decoder_key(), None)
                     or DecodeWorker(self.cfg, self.timeout))
      try:
        self.worker.prestart()  # the child's imports overlap with the runner's own start-up
      except OSError as e:  # run() starts it again and reports per file if it still fails
        log.warning("decoder child did not start in setup: %s", e)
        self.worker.close()
    self.done = self.n_failed = self.n_tokens = 0
    self.started = self.last_log = time.time()
    self.marks = None
    if not output.is_url(self.staging):
      # One byte per finished file, so the driver can show progress across worker processes
      # (it sums the sizes of these files; see patchify_output.watch_progress).
      try:
        name = f"{output.PROGRESS_PREFIX}{uuid.uuid4().hex}"
        self.marks = open(os.path.join(self.staging, name), "ab", buffering=0)
      except OSError as e:  # progress is a convenience: the job goes on without it
        log.warning("no progress marks in %s: %s", self.staging, e)

  def _decoder_key(self):
    return (repr(self.cfg), self.timeout)

  def start_bundle(self):
    self.part = output.PartWriter(self.staging, self.shard_bytes, self.writer_options)

  def process(self, path):
    label = self.class_labels.get(path, -1)
    t0 = time.time()
    try:
      local = output.fetch(path) if output.is_url(path) else path
    except Exception as e:  # an unreadable remote file is a failure row, not a crash
      result = ("fail", f"cannot fetch input ({type(e).__name__}: {e})")
    else:
      try:
        if self.worker is None:
          result = clip.process_path(local, label, self.cfg, source=path)
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
      self.part.add(data, [records.sample_id_for(path), path, stats["tokens"], stats["kind"],
                           stats["signal"]])
    else:
      self.failed.inc()
      self.n_failed += 1
      log.warning("failed: %s: %s", path, result[1])
      self.part.fail({"path": path, "reason": result[1]})
    if self.marks is not None:
      self.marks.write(b".")
    now = time.time()
    if now - self.last_log >= self.log_every_s:
      self.last_log = now
      log.info("worker %d: %d files done (%d failed), %d tokens kept, %.1f files/s", os.getpid(),
               self.done, self.n_failed, self.n_tokens, self.done / max(now - self.started, 1e-9))

  def finish_bundle(self):
    self.part.close()

  def teardown(self):
    marks, self.marks = getattr(self, "marks", None), None
    if marks is not None:
      marks.close()
    worker, self.worker = getattr(self, "worker", None), None
    if worker is None:
      return
    if _in_dask_worker():
      # The DaskRunner calls setup/teardown around every partition, and starting a decoder child
      # is slow, so this process keeps one for its next partition.
      for idle in _IDLE_DECODERS.values():
        idle.close()
      _IDLE_DECODERS.clear()
      _IDLE_DECODERS[self._decoder_key()] = worker
    else:
      worker.close()


# ----------------------------------------------------------------------------------------------
# CLI.

PROG = "python -m data_prep.codec_patchify"
EPILOG = (
    "Other flags are Beam pipeline options (--runner, --direct_num_workers, "
    "--direct_running_mode, --dask_client_address, --project, ...): each must be an option Beam "
    "defines, else the job stops with 'unknown flag' and the closest known flag. Flags after a "
    "lone '--' go to Beam unchecked (options of a PipelineOptions class this process does not "
    "import).")


class _Parser(argparse.ArgumentParser):
  """argparse with a one-line error (exit code 2): the flag list is too long to repeat."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
  d = config.PatchifyConfig()
  ap = _Parser(
      prog=PROG,
      allow_abbrev=False,  # a Beam option must never be taken for a prefix of one of ours
      description=__doc__, epilog=EPILOG)
  ap.add_argument("--input", action="append", required=True,
                  help="glob, list file (.txt/.list/.lst), directory or file; repeatable")
  ap.add_argument("--output_dir", required=True, help="local dir or a Beam filesystem URL")
  ap.add_argument("--budget", type=float, default=d.budget, help="fraction of T*H*W kept")
  ap.add_argument("--num_frames", type=int, default=d.num_frames, help="T, sampled per video")
  ap.add_argument("--image_size", type=int, default=d.image_size, help="frames resized to SxS")
  ap.add_argument("--patch_size", type=int, default=d.patch_size, help="p; grid is S/p")
  ap.add_argument("--fusion", choices=config.FUSIONS, default=d.fusion,
                  help="how the motion and residual maps combine")
  ap.add_argument("--motion_weight", type=float, default=d.motion_weight)
  ap.add_argument("--residual_weight", type=float, default=d.residual_weight)
  ap.add_argument("--camera_compensation", action="store_true",
                  help="subtract the median motion vector (camera motion) before |MV|")
  ap.add_argument("--iframe", choices=config.IFRAME_MODES, default=d.iframe,
                  help="keep: sampled frame t=0 whole, top-K over the rest; scored: top-K over "
                  "all (frames without vectors scored as zero motion either way)")
  ap.add_argument("--tie_seed", type=int, default=d.tie_seed,
                  help="seeds, with each sample_id, the random order that breaks top-K ties")
  ap.add_argument("--transcode", choices=config.TRANSCODE_MODES, default=d.transcode,
                  help="re-encode the sampled span to P-only H.264 for vectors: auto = when the "
                  "codec exports none (HEVC, VP9, AV1, ...)")
  ap.add_argument("--seek", choices=config.SEEK_MODES, default=d.seek,
                  help="auto: jump to the keyframe before a sample when the gap is long")
  ap.add_argument("--seek_min_gap", type=float, default=d.seek_min_gap,
                  help="seconds; with --seek auto, gaps longer than this are skipped")
  ap.add_argument("--interval_frames", type=int, default=d.interval_frames,
                  help="frames scored per sampling interval (evenly spaced, the sampled one "
                  "included); 0 = every decoded frame, 1 = the sampled frame only (faster)")
  ap.add_argument("--score_on", choices=config.SCORE_ON, default=d.score_on,
                  help="source: the video's own codec signals over each sampling interval; "
                  "reencode: a P-only encode of the sampled frames alone (GOP 16, crf 23, "
                  "keyframes zeroed), as the published pipeline scores")
  ap.add_argument("--dense_frames", type=int, default=d.dense_frames,
                  help="also store D whole sampled frames (one per each of D equal bins, seeded) "
                  "for the training input's dense-frame and collage branches (input.branches); "
                  "0 = none; each costs H*W patches of storage")
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
                  choices=config.RESIZE_FILTERS, help="swscale resize filter")
  ap.add_argument("--max_mv_pixels", type=int, default=d.max_mv_pixels,
                  help="vectors are clipped to this length when warping")
  ap.add_argument("--selector", choices=config.SELECTORS, default=d.selector,
                  help="video patch rule: codec top-K, or a baseline (random K, uniform whole "
                  "frames, dense = every patch; see data_prep/codec/selection.py)")
  ap.add_argument("--class_labels", default=None,
                  help="JSON {input path: int}; fills class_label (-1 when absent)")
  ap.add_argument("--shard_mb", type=float, default=256.0,
                  help="each bundle cuts its shards at this size (MiB of records)")
  ap.add_argument("--shard_compression", default=output.DEFAULT_COMPRESSION,
                  help="ArrayRecord chunk compression: zstd:LEVEL, brotli:LEVEL, snappy or "
                  "uncompressed (ArrayRecord's own default is zstd:3: smaller files for more CPU)")
  ap.add_argument("--dask_workers", type=int, default=os.cpu_count(),
                  help="--runner=dask without --dask_client_address: processes of the local "
                  "Dask cluster the job starts and stops")
  ap.add_argument("--decode_timeout", type=float, default=600.0,
                  help="seconds per file in a child process; 0 decodes in-process, no timeout")
  ap.add_argument("--log_every_s", type=float, default=30.0,
                  help="seconds between progress lines of each worker")
  ap.add_argument("--overwrite", action="store_true",
                  help="replace shards/manifest/failures of an earlier run in output_dir")
  failures_lib.add_flag(ap, "inputs (failures.jsonl rows)")
  return ap


def _beam_parser():
  """A parser of every option Beam defines, built as PipelineOptions.get_all_options builds it
  (each direct PipelineOptions subclass adds its own), with the Dask runner's options loaded."""
  from apache_beam.options import pipeline_options as po
  try:  # DaskOptions is defined where the runner is; register it unless dask is missing
    importlib.import_module("apache_beam.runners.dask.dask_runner")
  except ImportError:
    pass
  parser = po._BeamArgumentParser(allow_abbrev=False)  # pylint: disable=protected-access
  subset = {}
  for cls in po.PipelineOptions.__subclasses__():
    subset.setdefault(str(cls), cls)
  for cls in subset.values():
    cls._add_argparse_args(parser)  # pylint: disable=protected-access
  return parser


def _option_strings(parser) -> list:
  return [o for a in parser._actions for o in a.option_strings if o.startswith("--")]


def parse_args(argv=None):
  return parse_with_beam_flags(build_parser(), argv)


def parse_with_beam_flags(ap, argv=None):
  """ap's flags, then Beam's: (args, beam_args). Leftover flags must be Beam options; an unknown
  one is an argparse error naming it and the closest known flag. After a lone '--', everything
  goes to Beam unchecked."""
  argv = list(sys.argv[1:] if argv is None else argv)
  unchecked = []
  if "--" in argv:
    i = argv.index("--")
    argv, unchecked = argv[:i], argv[i + 1:]
  args, leftover = ap.parse_known_args(argv)
  if leftover:
    beam = _beam_parser()
    try:
      _, unknown = beam.parse_known_args(leftover)
    except SystemExit:  # Beam's parser already printed why (a bad value of one of its options)
      ap.exit(2)
    for token in unknown:
      name = token.split("=", 1)[0]
      if not token.startswith("-"):
        ap.error(f"unexpected argument {token!r}")
      close = difflib.get_close_matches(name, _option_strings(ap) + _option_strings(beam), n=1)
      ap.error(f"unknown flag {name}" + (f" (did you mean {close[0]}?)" if close else ""))
  return args, leftover + unchecked


def config_from_args(args) -> config.PatchifyConfig:
  fields = {f.name for f in dataclasses.fields(config.PatchifyConfig)}
  return config.PatchifyConfig(
      **{k: v for k, v in vars(args).items() if k in fields}).validate()


DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"
# Leaves of the task graph per Dask partition (= one bundle, one set of shards): enough for load
# balance on small runs, capped by the records one shard holds on large ones.
DASK_MIN_PARTITIONS = 64


def _flag(beam_args, name):
  """Value of --name=V or --name V in beam_args, else None."""
  for i, a in enumerate(beam_args):
    if a.startswith(name + "="):
      return a.split("=", 1)[1]
    if a == name and i + 1 < len(beam_args):
      return beam_args[i + 1]
  return None


def _without_flag(beam_args, name):
  out, skip = [], False
  for i, a in enumerate(beam_args):
    if skip:
      skip = False
    elif a.startswith(name + "="):
      continue
    elif a == name:
      skip = i + 1 < len(beam_args)
    else:
      out.append(a)
  return out


def _dask_args(beam_args, num_inputs: int, cfg, shard_bytes: int):
  """--runner=dask -> Beam's DaskRunner class path, plus a partition size when none is given.
  Returns (beam_args, True when the runner is Dask)."""
  runner = _flag(beam_args, "--runner")
  if runner is None or runner.lower() not in ("dask", "daskrunner", DASK_RUNNER.lower()):
    return beam_args, False
  beam_args = _without_flag(beam_args, "--runner") + [f"--runner={DASK_RUNNER}"]
  if _flag(beam_args, "--dask_npartitions") is None and _flag(
      beam_args, "--dask_partition_size") is None:
    record_bytes = cfg.num_keep() * cfg.patch_size**2 * 3 + 1024
    size = max(1, min(math.ceil(num_inputs / DASK_MIN_PARTITIONS), shard_bytes // record_bytes))
    beam_args.append(f"--dask_partition_size={size}")
  return beam_args, True


@contextlib.contextmanager
def _dask_cluster(beam_args, workers: int):
  """Starts a local Dask cluster (and stops it after the job) unless an address is given."""
  if _flag(beam_args, "--dask_client_address") or _flag(beam_args, "--dask_scheduler_file"):
    yield beam_args
    return
  if workers < 1:
    raise ValueError(f"--dask_workers={workers} must be >= 1")
  import dask
  from distributed import LocalCluster
  # Non-daemonic worker processes may start the decoder child (see DAEMON_WORKER_ERROR).
  with dask.config.set({"distributed.worker.daemon": False}):
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    try:
      log.info("started a local Dask cluster of %d workers at %s", workers,
               cluster.scheduler_address)
      yield beam_args + [f"--dask_client_address={cluster.scheduler_address}"]
    finally:
      cluster.close()


def _direct_defaults(beam_args, decode_timeout: float, num_inputs: int):
  """Without --runner, the job uses every core: a worker per CPU, at most one per input. A worker
  only waits on its decoder child, so workers are threads of this process: no SDK worker
  processes to start and feed over gRPC, which costs CPU time the decoders could use.
  Decoding in-process (--decode_timeout 0) keeps Beam's single in-memory worker. Flags the user
  gives win."""
  if _flag(beam_args, "--runner") or decode_timeout <= 0:
    return beam_args
  out = list(beam_args)
  if _flag(out, "--direct_num_workers") is None:
    out.append(f"--direct_num_workers={max(1, min(os.cpu_count() or 1, num_inputs))}")
  if _flag(out, "--direct_running_mode") is None:
    out.append("--direct_running_mode=multi_threading")
  return out


def run(argv=None):
  """Parses flags, runs the pipeline, returns the manifest dict."""
  return run_parsed(*parse_args(argv))


def run_parsed(args, beam_args):
  """run() of parsed flags (parse_args)."""
  cfg = config_from_args(args)
  if not args.shard_mb > 0:
    raise ValueError(f"--shard_mb={args.shard_mb} must be > 0")
  if args.decode_timeout < 0:
    raise ValueError(f"--decode_timeout={args.decode_timeout} must be >= 0")
  paths = expand_inputs(args.input)
  if not paths:
    raise ValueError("--input: no input paths")
  labels = load_class_labels(args.class_labels) if args.class_labels else {}
  labels = {p: labels[p] for p in paths if p in labels}
  shard_bytes = max(1, int(args.shard_mb * 2**20))
  options = output.writer_options(args.shard_compression)
  beam_args, on_dask = _dask_args(beam_args, len(paths), cfg, shard_bytes)
  beam_args = _direct_defaults(beam_args, args.decode_timeout, len(paths))
  output_dir = args.output_dir if output.is_url(args.output_dir) else os.path.abspath(args.output_dir)
  output.prepare_output_dir(output_dir, args.overwrite)
  staging = FileSystems.join(output_dir, f"{output.STAGING_PREFIX}codec_patchify-{uuid.uuid4().hex}")
  if not output.is_url(staging):
    os.makedirs(staging)
  header = {
      "format": "ovenc codec patches (ovenc_format/records.py)",
      "format_version": records.FORMAT_VERSION, "created_by": "data_prep.codec_patchify",
      "num_inputs": len(paths), "options": dataclasses.asdict(cfg),
      "num_keep_per_video": cfg.num_keep(), "grid": [cfg.num_frames, cfg.grid_side, cfg.grid_side],
      "inputs": args.input, "class_labels": args.class_labels,
      "num_class_labels": len(labels), "decode_timeout": args.decode_timeout,
      "shard_mb": args.shard_mb, "shard_compression": args.shard_compression,
      "beam_args": beam_args, "max_failure_fraction": args.max_failure_fraction,
  }
  log.info("codec_patchify: %d inputs -> %s (shards cut at %g MiB), K=%d of %s per video",
           len(paths), output_dir, args.shard_mb, cfg.num_keep(), header["grid"])
  start = time.time()
  with contextlib.ExitStack() as stack:
    if on_dask:
      beam_args = stack.enter_context(_dask_cluster(beam_args, args.dask_workers))
    # No --runner: Beam's in-process portable runner, which the DirectRunner falls back to.
    # The DirectRunner itself would first try to download the Prism runner's binary (network
    # at run time, and a different runner wherever the download works).
    runner = None if _flag(beam_args, "--runner") else FnApiRunner()
    if not output.is_url(staging):
      stack.enter_context(output.watch_progress(staging, len(paths)))
    pipeline = beam.Pipeline(runner=runner, options=PipelineOptions(beam_args))
    # One linear chain and no side inputs: runners that only evaluate the last transform's graph
    # inside worker tasks (the DaskRunner) run it as they run the DirectRunner and Dataflow.
    _ = (pipeline
         | "Inputs" >> beam.Create(paths)
         | "Spread" >> beam.Reshuffle()
         | "PatchifyAndWrite" >> beam.ParDo(PatchifyFn(cfg, labels, args.decode_timeout,
                                                       args.log_every_s, staging, shard_bytes,
                                                       options)))
    result = pipeline.run()
    client = getattr(result, "client", None)  # the DaskRunner's; it never closes it itself
    if client is not None:
      stack.callback(client.close)
    result.wait_until_finish()
  manifest = output.finalize_output(output_dir, staging, paths, header)
  _print_summary(manifest, result, time.time() - start)
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
    args, beam_args = parse_args(argv)
    manifest = run_parsed(args, beam_args)
    # The outputs and failures.jsonl are final by now: too many failures only set the exit code.
    failures_lib.check(manifest["num_failures"], manifest["num_inputs"],
                       args.max_failure_fraction,
                       FileSystems.join(args.output_dir, "failures.jsonl"), "inputs",
                       num_written=manifest["num_records"])
  except ValueError as e:
    print(f"codec_patchify: error: {e}", file=sys.stderr)
    sys.exit(2)
  except (output.IncompleteOutput, failures_lib.TooManyFailures) as e:
    print(f"codec_patchify: error: {e}", file=sys.stderr)
    sys.exit(failures_lib.EXIT_CODE)


if __name__ == "__main__":
  # Run through the importable module, so Beam and multiprocessing pickle its classes by name
  # (data_prep.codec_patchify.X) instead of as __main__.X, which workers cannot import.
  from data_prep import codec_patchify
  codec_patchify.main()
