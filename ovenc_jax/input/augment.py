"""Still-image augmentation at load time: a random resized crop of the stored image back to its own grid."""
import math
from typing import Any, Mapping

import numpy as np
from PIL import Image

# The published image loader's crop: area fraction in [0.7, 1], aspect ratio (w/h) log-uniform in
# [0.8, 1.25], up to 100 tries, else a centre crop clamped to the ratio range; then a triangle-filter
# resize and a horizontal flip with probability 1/2 (input.image_augment's keys).
PUBLISHED = dict(scale=[0.7, 1.0], ratio=[0.8, 1.25], hflip=True)
KEYS = ("hflip", "ratio", "scale")
ATTEMPTS = 100


def crop_box(rng: np.random.Generator, height: int, width: int, scale, ratio,
             attempts: int = ATTEMPTS) -> tuple[int, int, int, int]:
  """(top, left, h, w) in pixels of a random crop of area fraction in `scale` and w/h in `ratio`."""
  area = height * width
  lo, hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(attempts):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(lo, hi))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  aspect = width / height  # no try fitted: the whole image, cut to the nearest allowed ratio
  if aspect < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif aspect > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def crop_still(record: Mapping[str, Any], rng: np.random.Generator, scale, ratio) -> dict[str, Any]:
  """The record's still, cropped with crop_box and resized back onto its own grid (same patch count
  for a full grid). Patches the record does not hold are black on the canvas; an output patch is kept
  when its centre falls on a held patch, and takes that patch's score."""
  patches, positions = record["patches"], record["positions"]
  p = patches.shape[1]
  gh, gw = int(record["grid"][1]), int(record["grid"][2])
  height, width = gh * p, gw * p
  canvas = np.zeros((gh, gw, p, p, 3), np.uint8)
  canvas[positions[:, 1], positions[:, 2]] = patches
  canvas = canvas.transpose(0, 2, 1, 3, 4).reshape(height, width, 3)
  held = np.full((gh, gw), -1, np.int64)
  held[positions[:, 1], positions[:, 2]] = np.arange(len(positions))
  top, left, h, w = crop_box(rng, height, width, scale, ratio)
  out = np.asarray(Image.fromarray(canvas).resize((width, height), Image.BILINEAR,
                                                  box=(left, top, left + w, top + h)))
  # The source patch under each output patch's centre.
  src_y = ((top + (np.arange(gh) + 0.5) * h / gh) // p).astype(np.int64)
  src_x = ((left + (np.arange(gw) + 0.5) * w / gw) // p).astype(np.int64)
  src = held[src_y[:, None], src_x[None, :]]
  hh, ww = np.nonzero(src >= 0)
  grid_patches = out.reshape(gh, p, gw, p, 3).transpose(0, 2, 1, 3, 4)
  return dict(record, patches=np.ascontiguousarray(grid_patches[hh, ww]),
              positions=np.stack([np.zeros_like(hh), hh, ww], -1).astype(np.int32),
              scores=np.asarray(record["scores"])[src[hh, ww]])


def validate(aug, where: str = "input.image_augment") -> None:
  """aug is None or {"scale": [lo, hi], "ratio": [lo, hi], "hflip": bool}; errors name the key."""
  if aug is None:
    return
  if not hasattr(aug, "keys") or sorted(aug.keys()) != list(KEYS):
    raise ValueError(f"{where} must be None or a dict with keys {list(KEYS)}, got {aug!r}")
  for key, ok in (("scale", lambda lo, hi: 0 < lo <= hi <= 1), ("ratio", lambda lo, hi: 0 < lo <= hi)):
    v = aug[key]
    if len(v) != 2 or not all(isinstance(x, (int, float)) for x in v) or not ok(*v):
      raise ValueError(f"{where}.{key} must be [lo, hi] with "
                       f"{'0 < lo <= hi <= 1' if key == 'scale' else '0 < lo <= hi'}, got {v!r}")
  if not isinstance(aug["hflip"], (bool, np.bool_)):
    raise ValueError(f"{where}.hflip must be a bool, got {aug['hflip']!r}")
