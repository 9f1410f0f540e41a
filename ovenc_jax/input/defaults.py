"""The `input` section's defaults and the PATH[:WEIGHT]+... sources spec; no jax or grain needed."""
from typing import Any

import ml_collections
from ml_collections import config_dict

from ovenc_jax.model.defaults import ROPE_TEMPORAL_SIZE

TEMPORAL_POSITIONS = ("sample_index", "timeline64")
# "timeline64" spreads a clip's frames over the model's temporal RoPE grid.
TIMELINE_FRAMES = ROPE_TEMPORAL_SIZE

# `geometry=NAME` config presets: what the prep job made (frames per clip, clip and still-image side in
# pixels) and the token budget a row holds. "official" is the published OneVision-Encoder geometry:
# 64 frames at 224 px (16x16 patches of 14 px a frame), 12.5% of 64x256 = 2,048 kept patches on the
# 64-slot temporal RoPE grid, and stills at 448 px (32x32 = 1,024 patches, two to a row).
GEOMETRIES = {
    "official": dict(num_frames=TIMELINE_FRAMES, video_size=224, image_size=448, patch_size=14,
                     tokens_per_row=2048, max_segments=2),
}

# `branches=NAME` config presets (input.branches): the published stage-2 split
# (`--residual_ratio 0.5 --frame_sampling_ratio 0.4`, the rest collages) over 8 frames
# (`--num_frames 8`); period 0 = one global batch.
BRANCH_SPLITS = {
    "official": dict(codec=0.5, frames=0.4, collage=0.1, num_frames=8, period=0),
}


def default_input_config() -> ml_collections.ConfigDict:
  """Input defaults; `sources` must be filled with at least one {"path", "weight"} before use."""
  return ml_collections.ConfigDict(dict(
      sources=[],                                 # [{"path": dir or glob of shards, "weight": float}]
      label_table=config_dict.placeholder(str),  # side table of cluster labels keyed by sample_id
      global_batch_size=256,                      # rows per step over all processes
      tokens_per_row=1024,                        # N: fixed token budget of a row
      max_segments=4,                             # S: samples per row when packing (1 when padding)
      pack=True,                                  # pack several samples per row; False = one per row
      max_labels=10,                              # L: labels per sample, padded with -1 / truncated
      hflip=False,                                # seeded per-sample horizontal flip
      seed=0,
      num_epochs=config_dict.placeholder(int),   # None = repeat forever
      worker_count=0,                             # grain multiprocessing workers per process
      patch_size=14,
      max_tokens_per_sample=config_dict.placeholder(int),  # keep this many highest-scored tokens
      temporal_positions="sample_index",          # t as "sample_index" or on the 64-frame "timeline64"
      max_bad_record_fraction=0.01,               # unreadable records skipped up to this share
      # None, or {"num_frames", "video_size", "image_size"} the records must have been made with
      # (set by the geometry= config arg); a record of another grid is an error naming it.
      geometry=config_dict.placeholder(dict),
      # None, or {"scale": [lo, hi], "ratio": [lo, hi], "hflip": bool}: stills get a random resized
      # crop back onto their grid and a flip, seeded per sample (augment.py; recipe=official sets it).
      image_augment=config_dict.placeholder(dict),
      # None, or {"codec", "frames", "collage": shares summing to 1, "num_frames": F, "period": P}: clips
      # split into three branches by their index in their source's stream, exactly per P of them
      # (0 = input.global_batch_size): the kept tokens; F whole frames (records need
      # codec_patchify --dense_frames); those F frames tiled into one image (branches.py).
      branches=config_dict.placeholder(dict),
  ))


def parse_sources(spec: str) -> list[dict[str, Any]]:
  """'videos/:0.7+images/:0.3' -> [{"path": "videos/", "weight": 0.7}, ...]; no ':w' = weight 1.

  A tail after the last ':' that is not a number belongs to the path (gs://bucket/dir).
  """
  out = []
  for part in str(spec).split("+"):
    path, sep, tail = part.rpartition(":")
    try:
      weight = float(tail) if sep else None
    except ValueError:
      weight = None
    if weight is None:
      path, weight = part, 1.0
    if not path:
      raise ValueError(f"input.sources={spec!r}: empty path in {part!r}; expected "
                       f"PATH[:WEIGHT]+PATH[:WEIGHT]...")
    out.append({"path": path, "weight": weight})
  return out


def source_list(sources) -> Any:
  """input.sources as given in a config file (a list) or on the command line (a spec string)."""
  return parse_sources(sources) if isinstance(sources, str) else sources
