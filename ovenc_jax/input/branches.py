"""The three-branch video batch: codec-selected tokens, dense whole frames, and a collage of frames tiled into one image."""
import functools
from typing import Any, Mapping

import numpy as np

from ovenc_jax.input.defaults import BRANCH_SPLITS

CODEC, FRAMES, COLLAGE = 0, 1, 2
NAMES = ("codec", "frames", "collage")
KEYS = ("codec", "collage", "frames", "num_frames", "period")
PUBLISHED = BRANCH_SPLITS["official"]
FIELD = "branch"  # the record key the stream tags each sample with


def validate(branches, global_batch_size: int, where: str = "input.branches") -> None:
  """branches is None or {"codec", "frames", "collage": shares summing to 1, "num_frames": F >= 1,
  "period": P >= 0 (0 = the global batch)}; errors name the key."""
  if branches is None:
    return
  if not hasattr(branches, "keys") or sorted(branches.keys()) != list(KEYS):
    raise ValueError(f"{where} must be None or a dict with keys {list(KEYS)}, got {branches!r}")
  for key in NAMES:
    v = branches[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
      raise ValueError(f"{where}.{key} must be a share in [0, 1], got {v!r}")
  total = sum(float(branches[k]) for k in NAMES)
  if abs(total - 1) > 1e-6:
    raise ValueError(f"{where}: codec + frames + collage must be 1, got {total}")
  for key, lo in (("num_frames", 1), ("period", 0)):
    v = branches[key]
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
      raise ValueError(f"{where}.{key} must be an int >= {lo}, got {v!r}")
  if int(branches["period"] or global_batch_size) < 1:
    raise ValueError(f"{where}.period must be >= 1")


def counts(branches: Mapping[str, Any], period: int) -> tuple[int, int, int]:
  """Samples of each branch in one period: codec and frames rounded down, the rest collages (as the
  published code rounds its per-GPU batch)."""
  n_codec = int(period * float(branches["codec"]))
  n_frames = min(int(period * float(branches["frames"])), period - n_codec)
  return n_codec, n_frames, period - n_codec - n_frames


def pattern(branches: Mapping[str, Any], period: int) -> np.ndarray:
  """Branch ids of the `period` positions: exactly counts() of each, interleaved evenly (item m of a
  branch with n items sits near (m + 1/2) / n of the period), so every process's contiguous share
  of a global batch holds about the same mix."""
  keys, ids = [], []
  for b, n in enumerate(counts(branches, period)):
    keys.extend((np.arange(n) + 0.5) / n)
    ids.extend([b] * n)
  order = np.lexsort((np.asarray(ids), np.asarray(keys)))
  return np.asarray(ids, np.int32)[order]


def tagger(branches: Mapping[str, Any], global_batch_size: int):
  """(index in a source's stream, record) -> the record tagged with its branch: position index mod
  the period of pattern(), the same whatever the process count or the restart point."""
  return functools.partial(_tag, pattern(branches, int(branches["period"] or global_batch_size)))


def _tag(ids: np.ndarray, index: int, rec):
  if not isinstance(rec, dict):  # an unreadable record's stand-in passes on untouched
    return rec
  return dict(rec, **{FIELD: int(ids[index % ids.size])})


def branch_record(record: Mapping[str, Any], num_frames: int, rng: np.random.Generator) -> dict[str, Any]:
  """A clip tagged for the frames or collage branch, as that branch sees it (frames drawn from rng)."""
  rows = pick_frames(record, num_frames, rng)
  return (frames_record if record[FIELD] == FRAMES else collage_record)(record, rows)


def pick_frames(record: Mapping[str, Any], num_frames: int, rng: np.random.Generator) -> np.ndarray:
  """Rows into record["dense_t"] of `num_frames` whole frames: one from each of num_frames equal bins
  of the clip's T frames, uniformly among the stored frames of that bin (the published draw when all
  T frames are stored)."""
  t_len, dense_t = int(record["grid"][0]), np.asarray(record["dense_t"])
  if t_len % num_frames:
    raise ValueError(f"record sample_id={record['sample_id']} (source {record['source']!r}): T={t_len} "
                     f"frames do not split into input.branches.num_frames={num_frames} equal bins")
  bins = dense_t // (t_len // num_frames)
  rows = []
  for b in range(num_frames):
    have = np.flatnonzero(bins == b)
    if not have.size:
      raise ValueError(f"record sample_id={record['sample_id']} (source {record['source']!r}): no stored "
                       f"whole frame in bin {b} of {num_frames} (dense_t={dense_t.tolist()}); prep the "
                       f"clips with --dense_frames a multiple of {num_frames}")
    rows.append(have[rng.integers(have.size)] if have.size > 1 else have[0])
  return np.asarray(rows, np.int64)


def _frame_tokens(record, rows):
  hw = int(record["grid"][1]) * int(record["grid"][2])
  take = (np.asarray(rows)[:, None] * hw + np.arange(hw)).reshape(-1)
  return record["dense_patches"][take]


def frames_record(record: Mapping[str, Any], rows: np.ndarray) -> dict[str, Any]:
  """The clip as the frames branch sees it: every patch of the picked frames at their own
  (t, h, w), t the frame's index in the clip."""
  _, h, w = (int(x) for x in record["grid"])
  t = np.asarray(record["dense_t"])[rows]
  hh, ww = np.divmod(np.arange(h * w), w)
  positions = np.stack([np.repeat(t, h * w), np.tile(hh, t.size), np.tile(ww, t.size)], -1)
  patches = _frame_tokens(record, rows)
  return dict(record, patches=patches, positions=positions.astype(np.int32),
              scores=np.zeros(len(patches), np.float16))


def collage_record(record: Mapping[str, Any], rows: np.ndarray) -> dict[str, Any]:
  """The clip as the collage branch sees it: the picked frames stacked top to bottom into one still
  of F*H x W patches (the published 8 x 224 = 1792 x 224 image), t = 0, h = i*H + the frame's h."""
  _, h, w = (int(x) for x in record["grid"])
  f = len(rows)
  hh, ww = np.divmod(np.arange(f * h * w), w)
  positions = np.stack([np.zeros_like(hh), hh, ww], -1).astype(np.int32)
  patches = _frame_tokens(record, rows)
  return dict(record, patches=patches, positions=positions, grid=np.array([1, f * h, w], np.int32),
              frame_types="I", frame_indices=np.zeros(1, np.int32), scores=np.zeros(len(patches), np.float16))
