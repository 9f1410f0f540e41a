"""Output of the codec_patchify job: bundle parts in a staging folder, finalised into shards."""
import collections
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid

from apache_beam.io.filesystems import FileSystems

from ovenc_format import paths as pathio
from ovenc_format import progress as progress_lib
from ovenc_format import records

log = logging.getLogger("codec_patchify")


def is_url(path: str) -> bool:
  return "://" in path


def _is_gcs(path: str) -> bool:
  return path.startswith("gs://")


def rename(srcs: list[str], dsts: list[str]):
  """FileSystems.rename, except on gs://: Beam's GCS filesystem renames and deletes in batch
  requests, which GCS emulators do not serve; there ovenc_format.paths (gcsfs) moves each object
  by a server-side copy, which makes it visible whole."""
  if srcs and _is_gcs(srcs[0]):
    for s, d in zip(srcs, dsts):
      pathio.move(s, d)
  else:
    FileSystems.rename(srcs, dsts)


def delete(paths: list[str]):
  """FileSystems.delete; on gs:// one object at a time (see rename)."""
  if paths and _is_gcs(paths[0]):
    for p in paths:
      pathio.remove(p)
  else:
    FileSystems.delete(paths)


def read_text(path: str) -> str:
  with FileSystems.open(path) as f:
    return f.read().decode("utf-8")


def fetch(url: str) -> str:
  """Copies a remote input (gs://, s3://, ...) to a local temp file PyAV can open."""
  fd, local = tempfile.mkstemp(suffix=os.path.splitext(url)[1])
  with os.fdopen(fd, "wb") as dst, FileSystems.open(url) as src:
    shutil.copyfileobj(src, dst, 1 << 22)
  return local


def upload(local: str, dst: str):
  """Moves a local file to dst (any Beam filesystem; an object store makes it visible whole)."""
  if is_url(dst):
    with open(local, "rb") as src, FileSystems.create(dst) as out:
      shutil.copyfileobj(src, out, 1 << 22)
    os.remove(local)
  else:
    shutil.move(local, dst)  # a rename when both are on one filesystem (PartWriter's temp files)


# ArrayRecord's own default is zstd level 3; level 1 costs much less CPU per record for slightly
# larger files (bench_codec.py --sections compression). Readers take any of them (each shard
# names its codec).
DEFAULT_COMPRESSION = "zstd:1"
_COMPRESSION = re.compile(r"^(uncompressed|snappy|zstd:(\d+)|brotli:(\d+))$")


def writer_options(compression: str) -> str:
  """--shard_compression -> ArrayRecordWriter options (one record per chunk: random access)."""
  m = _COMPRESSION.match(compression)
  if not m or (m.group(2) and not 1 <= int(m.group(2)) <= 22) or (
      m.group(3) and not 0 <= int(m.group(3)) <= 11):
    raise ValueError(f"--shard_compression={compression!r}: expected zstd:LEVEL (1..22), "
                     f"brotli:LEVEL (0..11), snappy or uncompressed")
  return f"group_size:1,{compression}"


DEFAULT_WRITER_OPTIONS = writer_options(DEFAULT_COMPRESSION)

# Parts are staged in <output_dir>/beam-temp-*; the driver renames them into place.
STAGING_PREFIX = "beam-temp-"
PART_GLOB = "part-*.json"
# Per-worker progress files in the staging folder (not part-*: finalize_output never reads them).
PROGRESS_PREFIX = ".progress-"


class PartWriter:
  """One bundle's output. Records stream into a shard file, cut when it reaches shard_bytes.

  A part commits as: its shard renamed from a temp name (or copied, for remote dirs), then
  part-<hash>.json written atomically, holding each record's (sample_id, source, tokens, kind,
  signal) and the bundle's failure rows. The hash is of the part's content, so a retried bundle
  that redoes the same inputs (a Dask task rerun after a worker died) overwrites its own earlier
  part instead of adding a second one; the driver removes any other overlap (finalize_output).
  """

  def __init__(self, staging: str, shard_bytes: int, writer_options: str = DEFAULT_WRITER_OPTIONS):
    self.staging = staging
    self.shard_bytes = shard_bytes
    self.writer_options = writer_options
    self.writer = None
    self.rows, self.failures, self.nbytes = [], [], 0

  def add(self, data: bytes, row: list):
    if self.writer is None:
      from array_record.python import array_record_module
      fd, self.local = tempfile.mkstemp(
          dir=None if is_url(self.staging) else self.staging,
          prefix=f".tmp-{os.getpid()}-", suffix=".array_record")
      os.close(fd)
      self.writer = array_record_module.ArrayRecordWriter(self.local, self.writer_options)
    self.writer.write(data)
    self.rows.append(row)
    self.nbytes += len(data)
    if self.nbytes >= self.shard_bytes:
      self._commit()

  def fail(self, row: dict):
    self.failures.append(row)

  def close(self):
    if self.rows or self.failures:
      self._commit()

  def _commit(self):
    key = json.dumps([sorted(r[0] for r in self.rows), sorted(f["path"] for f in self.failures)])
    name = "part-" + hashlib.sha1(key.encode()).hexdigest()[:24]
    shard = None
    if self.writer is not None:
      self.writer.close()
      shard = name + ".array_record"
      upload(self.local, FileSystems.join(self.staging, shard))
    write_atomic(FileSystems.join(self.staging, name + ".json"),
                  json.dumps({"shard": shard, "records": self.rows, "failures": self.failures},
                             ensure_ascii=False))
    self.writer = None
    self.rows, self.failures, self.nbytes = [], [], 0


class IncompleteOutput(RuntimeError):
  """The runner finished, but some inputs have neither a record nor a failure row."""


def write_atomic(path: str, text: str):
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  with FileSystems.create(tmp) as f:
    f.write(text.encode("utf-8"))
  rename([tmp], [path])


def _failure_reason_kind(reason: str) -> str:
  """'frame size 7x5 is smaller ...' -> 'frame size': the reason up to its first detail."""
  return re.split(r"[0-9(:]", reason, maxsplit=1)[0].strip()[:80]


def _rewrite_shard(src: str, keep_ids: set, dst: str, writer_options: str):
  """Copies the records of shard src whose sample_id is in keep_ids into a new shard dst."""
  from array_record.python import array_record_module
  local = fetch(src) if is_url(src) else src
  reader = array_record_module.ArrayRecordReader(local)
  fd, out = tempfile.mkstemp(suffix=".array_record")
  os.close(fd)
  writer = array_record_module.ArrayRecordWriter(out, writer_options)
  for i in range(reader.num_records()):
    data = reader.read([i])[0]
    if records.decode_record(data)["sample_id"] in keep_ids:
      writer.write(data)
  writer.close()
  reader.close()
  if local != src:
    os.remove(local)
  upload(out, dst)


def read_parts(staging: str) -> list:
  names = sorted(m.path for r in FileSystems.match([FileSystems.join(staging, PART_GLOB)])
                 for m in r.metadata_list)
  return [dict(json.loads(read_text(p)), name=os.path.basename(p)[:-5]) for p in names]


def finalize_output(output_dir: str, staging: str, paths: list, header: dict) -> dict:
  """Driver side, after the runner finished: parts -> final shards, failures.jsonl, manifest.json.

  Every input must end as exactly one record or one failure row: records repeated across parts
  (retried bundles) are kept once (a part that only partly overlaps is rewritten without the
  repeats); an input with neither raises IncompleteOutput and leaves no manifest. manifest.json is
  written last: its presence marks a complete output.
  """
  parts = read_parts(staging)
  taken, kept = {}, []  # sample_id -> record row; (part name, shard, rows) in commit order
  for part in parts:
    rows = [r for r in part["records"] if r[0] not in taken]
    if not rows:
      continue
    shard = FileSystems.join(staging, part["shard"])
    if len(rows) < len(part["records"]):
      new = FileSystems.join(staging, part["name"] + "-dedup.array_record")
      _rewrite_shard(shard, {r[0] for r in rows}, new,
                     writer_options(header.get("shard_compression", DEFAULT_COMPRESSION)))
      log.warning("%s: %d record(s) repeated from another part (a retried bundle); kept once",
                  part["name"], len(part["records"]) - len(rows))
      shard = new
    for r in rows:
      taken[r[0]] = r
    kept.append((shard, rows))
  recorded = {r[1] for r in taken.values()}
  failures = {}
  for part in parts:
    for f in part["failures"]:
      if f["path"] not in recorded:  # a retry that succeeded outranks an attempt that failed
        failures.setdefault(f["path"], f)
  missing = sorted(set(paths) - recorded - set(failures))
  unexpected = sorted((recorded | set(failures)) - set(paths))
  if missing or unexpected:
    raise IncompleteOutput(
        f"{output_dir}: {len(missing)} input(s) have neither a record nor a failure row (e.g. "
        f"{missing[:3]}) and {len(unexpected)} output(s) match no input (e.g. {unexpected[:3]}); "
        f"the runner lost or mixed work. Nothing was finalised; the parts are in {staging}")

  finals = [FileSystems.join(output_dir, records.shard_name(i, len(kept)))
            for i in range(len(kept))]
  if kept:
    rename([s for s, _ in kept], finals)
  rows = sorted(failures.values(), key=lambda f: f["path"])
  write_atomic(FileSystems.join(output_dir, "failures.jsonl"),
                "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in rows))
  recs = list(taken.values())
  kinds = collections.Counter(_failure_reason_kind(f["reason"]) for f in rows)
  manifest = dict(header)
  manifest.update(
      num_records=len(recs), num_videos=sum(r[3] == "video" for r in recs),
      num_images=sum(r[3] == "image" for r in recs), num_failures=len(rows),
      num_tokens=sum(r[2] for r in recs),
      tokens_per_record=sum(r[2] for r in recs) / max(len(recs), 1),
      signals=dict(sorted(collections.Counter(r[4] for r in recs).items())),
      failure_kinds=dict(sorted(kinds.items())),
      shards=[os.path.basename(f) for f in finals], num_shards=len(finals),
      records_per_shard=[len(r) for _, r in kept],
      finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
  write_atomic(FileSystems.join(output_dir, "manifest.json"),
                json.dumps(manifest, indent=1, sort_keys=True))
  remove_staging(output_dir)
  return manifest


def remove_staging(output_dir: str):
  """Removes this run's staging folder and stale ones of crashed runs (Beam's sinks' too)."""
  if is_url(output_dir):
    found = [m.path for r in FileSystems.match([FileSystems.join(output_dir,
                                                                 STAGING_PREFIX + "**")])
             for m in r.metadata_list]
    if found:
      delete(found)
    return
  for name in os.listdir(output_dir):
    if name.startswith(STAGING_PREFIX):
      shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def prepare_output_dir(output_dir: str, overwrite: bool):
  """Creates output_dir; an earlier run's shards, manifest or failures are an error unless
  overwrite, which deletes them."""
  earlier = [m.path for pattern in (records.SHARD_PATTERN, "manifest.json", "failures.jsonl")
             for r in FileSystems.match([FileSystems.join(output_dir, pattern)])
             for m in r.metadata_list]
  if earlier and not overwrite:
    raise ValueError(f"--output_dir {output_dir!r} holds {len(earlier)} file(s) of an earlier "
                     f"run (e.g. {os.path.basename(earlier[0])}); pass --overwrite to replace them")
  if earlier:
    delete(earlier)
  if not is_url(output_dir):
    os.makedirs(output_dir, exist_ok=True)


@contextlib.contextmanager
def watch_progress(staging: str, total: int, every_s: float = 0.5, desc: str = "codec_patchify",
                   unit: str = "file"):
  """Files done / total with rate and ETA, from the workers' progress marks (PatchifyFn.setup in
  codec_patchify): workers may be threads, processes or Dask workers, so the driver reads their
  count off disk."""
  bar = progress_lib.Progress(total, desc, unit=unit)
  stop = threading.Event()

  def done():
    n = 0
    try:
      for name in os.listdir(staging):
        if name.startswith(PROGRESS_PREFIX):
          n += os.path.getsize(os.path.join(staging, name))
    except OSError:  # the folder is being finalised
      pass
    return n

  def poll():
    while not stop.wait(every_s):
      bar.set(done())

  thread = threading.Thread(target=poll, name="codec_patchify-progress", daemon=True)
  thread.start()
  try:
    yield bar
  finally:
    stop.set()
    thread.join()
    bar.set(done())
    bar.close()
