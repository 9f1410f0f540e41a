"""Shard discovery (a directory with its manifest, or a file-name glob) and checked random access to the records."""
import dataclasses
import fnmatch
import json
import logging
import os
import threading
from typing import Sequence

import grain
import numpy as np
from etils import epath

from ovenc_format import paths as pathio
from ovenc_format import records

log = logging.getLogger(__name__)
_GLOB_CHARS = frozenset("*?[")


def shard_paths(path, what: str) -> list[str]:
  """Local paths of the shard files of a directory (complete data-XXXXX-of-YYYYY set) or of a
  file-name glob. ArrayRecord reads local files only: remote shards (gs://) are staged to this host's
  cache (ovenc_format.paths.stage, $OVENC_CACHE_DIR) once, each through a temp file and rename."""
  return [pathio.stage(f) for f in _find_shards(str(path), what)]


def _find_shards(path: str, what: str) -> list[str]:
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


@dataclasses.dataclass(frozen=True)
class SkippedRecord:
  """Stands in the sample stream for an unreadable record, so the iterator that drops it can count it.

  key: (source index in input.sources, record index over the source's shards).
  """
  key: tuple[int, int]


class CheckedShards:
  """Random access to decoded records of ArrayRecord shards; an unreadable or invalid record
  (bad checksum, bad encoding) reads as a SkippedRecord and is logged with its shard and index.
  Past `max_bad_fraction` of the records an error stops the input.

  The same records are bad on every pass and after a resume, so skipping keeps runs deterministic.
  """

  def __init__(self, paths: Sequence[str], what: str, max_bad_fraction: float, source: int = 0):
    self._paths, self._what, self._max_bad = list(paths), what, float(max_bad_fraction)
    self._source = int(source)
    lengths = []
    for p in self._paths:
      try:
        lengths.append(grain.sources.ArrayRecordDataSource([p]).__len__())
      except RuntimeError as e:  # the shard's footer or index is corrupt: nothing in it is reachable
        raise ValueError(f"{what}: shard {p} cannot be opened: {e}") from e
    self._starts = np.cumsum([0] + lengths)
    self._reader = grain.sources.ArrayRecordDataSource(self._paths)
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
      return records.decode_record(self._reader[index])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
      self._skip(int(index), e)
      return SkippedRecord((self._source, int(index)))

  @property
  def num_skipped(self) -> int:
    """Distinct unreadable records met so far (in this process)."""
    return len(self._bad)

  def _skip(self, index: int, error: Exception) -> None:
    shard = int(np.searchsorted(self._starts, index, side="right")) - 1
    where = f"{self._paths[shard]} record {index - self._starts[shard]}"
    with self._lock:
      if index in self._bad:
        return
      self._bad.add(index)
      n = len(self._bad)
    log.warning("%s: skipping unreadable record %s: %s", self._what, where, error)
    if n > self._max_bad * len(self):
      raise ValueError(f"{self._what}: {n} of {len(self)} records are unreadable, more than "
                       f"input.max_bad_record_fraction={self._max_bad}; last: {where}: {error}")
