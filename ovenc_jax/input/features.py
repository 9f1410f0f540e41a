"""Per-sample features of a decoded record: labels (own or from a side table), token budget, truncation, flips, timeline."""
import functools
from typing import Any, Mapping

import numpy as np

from ovenc_format import label_table as label_table_lib
from ovenc_format import records
from ovenc_jax.input import augment
from ovenc_jax.input import branches as branches_lib
from ovenc_jax.input.defaults import TIMELINE_FRAMES


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


def check_geometry(record: Mapping[str, Any], geometry: Mapping[str, int] | None, patch_size: int) -> None:
  """A record whose grid is not input.geometry's (a clip of num_frames x video_size px, or a still
  of image_size px) was prepped with other --num_frames/--image_size: an error naming it."""
  if not geometry:
    return
  grid = tuple(int(x) for x in record["grid"])
  if grid[0] == 1:
    want = (1,) + (geometry["image_size"] // patch_size,) * 2
    what, flags = "still", f"--image_size {geometry['image_size']}"
  else:
    want = (int(geometry["num_frames"]),) + (geometry["video_size"] // patch_size,) * 2
    what, flags = "clip", f"--num_frames {geometry['num_frames']} --image_size {geometry['video_size']}"
  if grid != want:
    raise ValueError(f"record sample_id={record['sample_id']} (source {record['source']!r}): grid {grid} "
                     f"is not the {what} grid {want} of input.geometry={dict(geometry)}; prep it with {flags}")


def sample_features(record: Mapping[str, Any], rng: np.random.Generator, *, patch_size: int,
                    tokens_per_row: int, max_labels: int, hflip: bool,
                    label_table: "label_table_lib.LabelTable | None" = None,
                    max_tokens_per_sample: int | None = None,
                    temporal_positions: str = "sample_index",
                    geometry: Mapping[str, int] | None = None,
                    image_augment: Mapping[str, Any] | None = None,
                    branch_frames: int | None = None) -> dict[str, np.ndarray]:
  """One decoded record -> truncated, optionally flipped, flattened token set and its row features.

  With `max_tokens_per_sample`, only that many tokens are kept: the highest `scores` of the record
  (format 2; ties, and format-1 records whose scores are all 0, in an order drawn from `rng`).
  Tokens still beyond `tokens_per_row` are dropped by keeping a uniformly random subset of that size
  drawn from `rng`, in the record's (t, h, w) order. With `hflip`, a coin from `rng` decides whether
  the kept patches are mirrored left-right and w -> W-1-w; tokens are then re-sorted by (t, h, w).
  `temporal_positions="timeline64"` replaces t by the frame's slot on the 64-frame timeline.
  With `image_augment` ({"scale", "ratio", "hflip"}), a still (grid T = 1) is first cropped and
  resized back onto its grid (augment.crop_still) from a generator seeded by one draw of `rng`, and
  its "hflip" flips stills as `hflip` flips every sample.
  With `branch_frames` F (input.branches), a clip the stream tagged for the frames or collage branch
  is first replaced by F whole frames drawn from `rng` (branches.branch_record); those keep all
  their tokens (no score cut) and are never cropped.
  """
  patches, positions = record["patches"], record["positions"]
  p = patches.shape[1]
  if p != patch_size:
    raise ValueError(f"record sample_id={record['sample_id']} (source {record['source']!r}): patch "
                     f"size {p} != input.patch_size={patch_size}")
  check_geometry(record, geometry, patch_size)
  if branch_frames and int(record["grid"][0]) > 1 and record.get(branches_lib.FIELD, 0) != branches_lib.CODEC:
    record = branches_lib.branch_record(record, branch_frames, rng)
    patches, positions, image_augment, max_tokens_per_sample = record["patches"], record["positions"], None, None
    if len(patches) > tokens_per_row:
      raise ValueError(f"input.branches: the {branches_lib.NAMES[record[branches_lib.FIELD]]} branch of "
                       f"record sample_id={record['sample_id']} gives {len(patches)} tokens, more than "
                       f"input.tokens_per_row={tokens_per_row}")
  still = int(record["grid"][0]) == 1
  augment_still = still and image_augment is not None
  # The coin is drawn first and always, so a sample's flip does not depend on its length.
  flip = (bool(hflip) or (augment_still and bool(image_augment["hflip"]))) and bool(rng.random() < 0.5)
  if augment_still:  # one draw seeds the crop, so the draws after it do not depend on its tries
    record = augment.crop_still(record, np.random.default_rng(rng.integers(2**63)),
                                image_augment["scale"], image_augment["ratio"])
    patches, positions = record["patches"], record["positions"]
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
    # A gather over the flat patch mirrors it; a reversed-axis copy is slower, as its innermost
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


# ---- label banks (loss.heads): each source names the bank its labels belong to ---------------------

def tag_source(i: int, rec):
  """A record of source i as (i, record), so decoding can pick the source's bank."""
  return (i, rec)


def decode_bank_features(tagged, rng: np.random.Generator, *, tables, offsets, **kw):
  """A record of source i, labelled from its bank's table and shifted into the bank's id range."""
  i, rec = tagged
  out = sample_features(rec, rng, label_table=tables[i], **kw)
  out["labels"] = np.where(out["labels"] >= 0, out["labels"] + offsets[i], -1).astype(np.int32)
  return out


def source_banks(sources, label_table: str | None, banks):
  """Per source: (label table, label id offset) of the loss.heads bank it names."""
  tables, offsets, loaded = [], [], {}
  for i, src in enumerate(sources):
    if "bank" not in src or src["bank"] not in banks:
      raise ValueError(f"input.sources[{i}].bank={src.get('bank')!r}: with loss.heads every source "
                       f"names one of the banks {sorted(banks)}")
    offset, table = banks[src["bank"]]
    table = table or label_table  # a bank without its own table shares input.label_table
    if table and table not in loaded:  # sources of one bank share its table
      loaded[table] = load_label_table(table)
    tables.append(loaded.get(table))
    offsets.append(int(offset))
  return tables, offsets


def decode_features_eval(data: bytes, **kw) -> dict[str, np.ndarray]:
  return sample_features_eval(records.decode_record(data), **kw)


def sample_features_eval(rec: Mapping[str, Any], **kw) -> dict[str, np.ndarray]:
  # Seeded by the sample itself, so a long sample keeps the same tokens in every evaluation.
  return sample_features(rec, np.random.default_rng(rec["sample_id"]), hflip=False, **kw)
