"""Test data: real handwritten digits (scikit-learn) as small labelled t=0 token sets in ArrayRecord shards."""
import json
import os

import numpy as np
from array_record.python import array_record_module
from sklearn.datasets import load_digits

from ovenc_format import records

P = 14


def digit_record(image8: np.ndarray, label: int, index: int, rng: np.random.Generator) -> dict:
  """An 8x8 digit upscaled x7 onto a 70x70 canvas at a random offset -> its inked 14x14x3 patches."""
  canvas = np.full((70, 70, 3), 20, np.uint8)
  big = np.kron(image8 / 16.0, np.ones((7, 7)))
  oy, ox = rng.integers(0, 70 - 56, size=2)
  color = np.array([255, 255, 255]) - rng.integers(0, 40, size=3)
  canvas[oy:oy + 56, ox:ox + 56] = (big[..., None] * color).astype(np.uint8) + 20 * (big[..., None] == 0)
  patches = canvas.reshape(5, P, 5, P, 3).transpose(0, 2, 1, 3, 4).reshape(25, P, P, 3)
  # Keep only patches with ink, as the codec selection keeps only patches that carry signal.
  keep = np.flatnonzero(patches.reshape(25, -1).max(-1) > 40)
  patches = patches[keep]
  h, w = np.divmod(keep, 5)
  path = f"digits/{index:05d}.png"
  return dict(patches=patches, positions=np.stack([np.zeros_like(h), h, w], -1).astype(np.int32),
              grid=np.array([1, 5, 5], np.int32), frame_types="I", source=path,
              sample_id=records.sample_id_for(path), labels=np.array([label], np.int32),
              signal="image", class_label=int(label))


def write_shards(out_dir, recs, num_shards: int = 2) -> str:
  """Writes records round-robin into num_shards ArrayRecord shards under out_dir (the data_prep layout)."""
  os.makedirs(out_dir, exist_ok=True)
  for s in range(num_shards):
    writer = array_record_module.ArrayRecordWriter(
        os.path.join(out_dir, records.shard_name(s, num_shards)), "group_size:1")
    for r in recs[s::num_shards]:
      writer.write(records.encode_record(r))
    writer.close()
  with open(os.path.join(out_dir, "manifest.json"), "w") as f:  # written last, as data_prep does
    json.dump({"num_records": len(recs), "num_shards": num_shards}, f)
  return str(out_dir)


def write_digit_shards(out_dir: str, start: int, count: int, num_shards: int = 2, seed: int = 0) -> str:
  digits = load_digits()
  rng = np.random.default_rng(seed)
  # Records are made in index order so the rng draws (and so the data) do not depend on num_shards.
  recs = [digit_record(digits.images[i], int(digits.target[i]), i, rng) for i in range(start, start + count)]
  return write_shards(out_dir, recs, num_shards)
