"""Rows of a fixed token budget: first-fit packing of several samples, or one padded sample; process blocks of the stream."""
from typing import Mapping, Sequence

import grain
import numpy as np

from ovenc_jax.input import skipped

# Per-row features a batch carries besides the token arrays; fill values mark empty slots.
_SEGMENT_FILL = {"labels": -1, "class_label": -1, "sample_id": -1}
_TOKEN_FILL = {"patches": 0, "positions": 0}


def pad_row(features: Mapping[str, np.ndarray], tokens_per_row: int) -> dict[str, np.ndarray]:
  """One sample in one row: tokens first, then zero padding with segment id 0."""
  k, d = features["patches"].shape
  patches = np.zeros((tokens_per_row, d), np.uint8)
  positions = np.zeros((tokens_per_row, 3), np.int32)
  segment_ids = np.zeros((tokens_per_row,), np.int32)
  patches[:k], positions[:k], segment_ids[:k] = features["patches"], features["positions"], 1
  return dict(patches=patches, positions=positions, segment_ids=segment_ids,
              labels=features["labels"], class_label=features["class_label"],
              sample_id=features["sample_id"])


def empty_row(tokens_per_row: int, patch_size: int, max_labels: int) -> dict[str, np.ndarray]:
  return dict(patches=np.zeros((tokens_per_row, patch_size * patch_size * 3), np.uint8),
              positions=np.zeros((tokens_per_row, 3), np.int32),
              segment_ids=np.zeros((tokens_per_row,), np.int32),
              labels=np.full((1, max_labels), -1, np.int32),
              class_label=np.full((1,), -1, np.int32),
              sample_id=np.full((1,), -1, np.int64))


def stack_padded(rows: Sequence[dict[str, np.ndarray]], *, size: int,
                 empty: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Stacks rows and fills up to `size` with empty rows (sample_id -1)."""
  rows = list(rows) + [empty] * (size - len(rows))
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _finish_packed(row: dict) -> dict:
  """Renames grain's packing outputs to the batch layout and drops its per-token offsets."""
  return dict(patches=row["patches"], positions=row["positions"],
              segment_ids=row["patches_segment_ids"], labels=row["labels"],
              class_label=row["class_label"], sample_id=row["sample_id"],
              **{skipped.FEATURE: skipped.merge_keys(row[skipped.FEATURE])})


def pack_rows(it: grain.IterDataset, *, rows: int, tokens_per_row: int,
              max_segments: int) -> grain.IterDataset:
  """First-fit over `rows` bins: a sample goes whole into the first row with room for its tokens
  and a free segment slot; the group of rows is emitted when a sample fits in none of them."""
  n_tok, s_max = tokens_per_row, max_segments
  return grain.experimental.FirstFitPackIterDataset(
      it,
      length_struct=dict(patches=n_tok, positions=n_tok, labels=s_max, class_label=s_max,
                         sample_id=s_max),
      num_packing_bins=rows,
      shuffle_bins=False,
      # The skipped-record keys are not packed: grain hands over the list of the row's samples' keys.
      meta_features=("positions", "labels", "class_label", "sample_id", skipped.FEATURE),
      padding_struct=dict(_TOKEN_FILL, **_SEGMENT_FILL),
      max_sequences_per_bin=s_max,
  ).map(_finish_packed)


class ProcessBlocks(grain.transforms.DatasetSelectionMap):
  """This process's share of the global stream: block u*count + index of every `count` blocks.

  With blocks of one host batch, global batch g is blocks g*count .. g*count+count-1 of the stream,
  one per process, so a padded global batch does not depend on the process count. The tail that
  would not give every process a whole block is dropped, so all processes yield equally many.
  """

  def __init__(self, stream_length: int, block: int, index: int, count: int):
    self._block, self._index, self._count = block, index, count
    self._length = stream_length // (block * count) * block

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, i: int) -> tuple[int, int]:
    if not 0 <= i < self._length:
      raise IndexError(f"ProcessBlocks: index {i} outside [0, {self._length})")
    unit, offset = divmod(i, self._block)
    return 0, (unit * self._count + self._index) * self._block + offset


def contiguous_block(n: int, index: int, count: int) -> tuple[int, int]:
  """Contiguous block `index` of `count` over n records; blocks differ in size by at most one."""
  return n * index // count, n * (index + 1) // count
