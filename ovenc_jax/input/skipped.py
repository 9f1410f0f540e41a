"""Counting skipped unreadable records in the iterator's own state, so the count survives worker processes and resume.

A bad record travels the sample stream as a shards.SkippedRecord; AttachSkipped drops it and hands
its key to the next sample (feature FEATURE, a 0-d object array of (source, index) pairs); rows and
batches carry the keys of their samples; CountSkipped, the last stage in the training process,
takes them off each batch and keeps the set of distinct keys in its checkpointable state.
"""
from typing import Any, Callable, Iterable

import grain
import numpy as np

from ovenc_jax.input.shards import SkippedRecord

FEATURE = "skipped_records"
_STATE_KEY = "skipped_records"


def unless_skipped(element, *, fn: Callable):
  """fn(element) for a record, the marker itself for a skipped one (for MapDataset.map)."""
  return element if isinstance(element, SkippedRecord) else fn(element)


def unless_skipped_random(element, rng: np.random.Generator, *, fn: Callable):
  """fn(element, rng) for a record, the marker itself for a skipped one (for MapDataset.random_map)."""
  return element if isinstance(element, SkippedRecord) else fn(element, rng)


def keys_value(keys: Iterable[tuple[int, int]]) -> np.ndarray:
  """Keys as one leaf of a sample: a 0-d object array, which batching stacks like any feature."""
  value = np.empty((), object)
  value[()] = tuple(tuple(int(x) for x in k) for k in keys)
  return value


def merge_keys(values: Iterable[np.ndarray]) -> np.ndarray:
  """The keys of several samples (one packed row) as one value."""
  return keys_value(k for v in values for k in v[()])


class AttachSkipped(grain.IterDataset):
  """Drops SkippedRecord markers and attaches their keys to the next sample."""

  def __iter__(self) -> grain.DatasetIterator:
    return _AttachSkippedIterator(self._parent.__iter__())


class _AttachSkippedIterator(grain.DatasetIterator):

  def __next__(self) -> dict[str, Any]:
    keys = []
    while True:
      element = next(self._parent)
      if not isinstance(element, SkippedRecord):
        break
      keys.append(element.key)
    # A shallow copy: the parent may hand out the same dict again (a cached or repeated element).
    return dict(element, **{FEATURE: keys_value(keys)})

  # Nothing is held between elements, so the parent's state is this stage's state.
  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


class CountSkipped(grain.IterDataset):
  """Takes the skipped-record keys off each batch; its iterator's `skipped_records` is how many
  distinct unreadable records the batches so far have passed over."""

  def __iter__(self) -> "CountSkippedIterator":
    return CountSkippedIterator(self._parent.__iter__())


class CountSkippedIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self._seen: set[tuple[int, int]] = set()

  @property
  def skipped_records(self) -> int:
    return len(self._seen)

  def __next__(self) -> dict[str, np.ndarray]:
    batch = dict(next(self._parent))
    for keys in np.ravel(batch.pop(FEATURE)):
      self._seen.update(keys)
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), _STATE_KEY: sorted(list(k) for k in self._seen)}

  def set_state(self, state: dict[str, Any]) -> None:
    if _STATE_KEY not in state:  # a checkpoint written before the count was part of the state
      self._parent.set_state(state)
      self._seen = set()
      return
    self._parent.set_state(state["parent"])
    self._seen = {tuple(k) for k in state[_STATE_KEY]}
