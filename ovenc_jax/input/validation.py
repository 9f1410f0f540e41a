"""Checks of the `input` config section: every error names the key that is missing, unknown or out of range."""
import math
import os
from typing import Mapping

import numpy as np

from ovenc_jax.input import augment
from ovenc_jax.input import branches
from ovenc_jax.input.defaults import TEMPORAL_POSITIONS, default_input_config, source_list


def is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _positive_int(cfg, key):
  v = cfg[key]
  if not is_int(v) or v < 1:
    raise ValueError(f"input.{key} must be a positive int, got {v!r}")
  return int(v)


def _validate_sources(sources) -> None:
  if not isinstance(sources, (list, tuple)) or not sources:
    raise ValueError(f"input.sources must be a non-empty list of {{'path', 'weight'}} dicts, "
                     f"got {sources!r}")
  for i, s in enumerate(sources):
    if not isinstance(s, Mapping) or set(s.keys()) - {"bank"} != {"path", "weight"}:
      raise ValueError(f"input.sources[{i}] must be a dict with 'path', 'weight' and optionally 'bank' "
                       f"(a loss.heads name), got {s!r}")
    if not isinstance(s["path"], (str, os.PathLike)) or not str(s["path"]):
      raise ValueError(f"input.sources[{i}].path must be a non-empty str, got {s['path']!r}")
    w = s["weight"]
    if isinstance(w, bool) or not isinstance(w, (int, float, np.number)) or not math.isfinite(w) or w <= 0:
      raise ValueError(f"input.sources[{i}].weight must be a finite number > 0, got {w!r}")


GEOMETRY_KEYS = ("image_size", "num_frames", "video_size")


def _validate_geometry(cfg) -> None:
  g = cfg.get("geometry")
  if g is None:
    return
  if not hasattr(g, "keys") or sorted(g.keys()) != list(GEOMETRY_KEYS):
    raise ValueError(f"input.geometry must be None or a dict with keys {list(GEOMETRY_KEYS)}, got {g!r}")
  for key in GEOMETRY_KEYS:
    v = g[key]
    if not is_int(v) or v < 1 or (key != "num_frames" and v % cfg.patch_size):
      raise ValueError(f"input.geometry.{key} must be a positive int (sizes a multiple of "
                       f"input.patch_size={cfg.patch_size}), got {v!r}")


def validate_input_config(cfg, process_count: int = 1) -> None:
  """Raises ValueError naming the `input.*` key that is missing, unknown or out of range."""
  known = set(default_input_config().keys())
  for key in sorted(known):
    if key not in cfg:
      raise ValueError(f"input.{key} is missing from the config")
  for key in sorted(set(cfg.keys()) - known):
    raise ValueError(f"input.{key} is not a known key; known: {sorted(known)}")
  _validate_sources(source_list(cfg.sources))
  if cfg.label_table is not None and (not isinstance(cfg.label_table, str) or not cfg.label_table):
    raise ValueError(f"input.label_table must be None or a non-empty path, got {cfg.label_table!r}")
  for key in ("global_batch_size", "tokens_per_row", "max_segments", "max_labels", "patch_size"):
    _positive_int(cfg, key)
  for key in ("pack", "hflip"):
    if not isinstance(cfg[key], (bool, np.bool_)):
      raise ValueError(f"input.{key} must be a bool, got {cfg[key]!r}")
  if not cfg.pack and cfg.max_segments != 1:
    raise ValueError(f"input.max_segments={cfg.max_segments}: must be 1 when input.pack is False "
                     f"(pad mode puts one sample per row)")
  if not is_int(cfg.seed) or not 0 <= cfg.seed < 2**32:
    raise ValueError(f"input.seed must be an int in [0, 2**32), got {cfg.seed!r}")
  if cfg.num_epochs is not None and (not is_int(cfg.num_epochs) or cfg.num_epochs < 1):
    raise ValueError(f"input.num_epochs must be None (repeat forever) or a positive int, "
                     f"got {cfg.num_epochs!r}")
  if not is_int(cfg.worker_count) or cfg.worker_count < 0:
    raise ValueError(f"input.worker_count must be an int >= 0, got {cfg.worker_count!r}")
  if cfg.max_tokens_per_sample is not None and (
      not is_int(cfg.max_tokens_per_sample) or cfg.max_tokens_per_sample < 1):
    raise ValueError(f"input.max_tokens_per_sample must be None (no cap) or a positive int, "
                     f"got {cfg.max_tokens_per_sample!r}")
  if cfg.temporal_positions not in TEMPORAL_POSITIONS:
    raise ValueError(f"input.temporal_positions must be one of {TEMPORAL_POSITIONS}, "
                     f"got {cfg.temporal_positions!r}")
  _validate_geometry(cfg)
  augment.validate(cfg.get("image_augment"))
  branches.validate(cfg.get("branches"), cfg.global_batch_size)
  if cfg.global_batch_size % process_count:
    raise ValueError(f"input.global_batch_size={cfg.global_batch_size} is not divisible by the "
                     f"process count {process_count}")
  f = cfg.max_bad_record_fraction
  if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < 1:
    raise ValueError(f"input.max_bad_record_fraction must be a number in [0, 1), got {f!r}")
