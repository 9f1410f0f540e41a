"""PNG of one record: the sampled frames in a grid, kept patches bright, dropped ones dimmed."""
import argparse
import json
import os

import av
import numpy as np
from PIL import Image, ImageDraw

from data_prep.codec import decode
from data_prep.codec.config import InputError
from data_prep.codec.selection import sample_indices
from ovenc_format import records


def record_at(output_dir: str, index: int) -> dict:
  """The index-th record of an output dir, counting through the shards in order."""
  from array_record.python import array_record_module
  if index < 0:
    raise ValueError(f"--index {index} must be >= 0")
  seen = 0
  for path in records.list_shards(output_dir):
    reader = array_record_module.ArrayRecordReader(path)
    try:
      n = reader.num_records()
      if index < seen + n:
        return records.decode_record(reader.read([index - seen])[0])
      seen += n
    finally:
      reader.close()
  raise ValueError(f"--index {index} is out of range: {output_dir} holds {seen} records")


def source_frames(rec: dict, interpolation: str = "AREA"):
  """Re-decodes the record's sampled frames from its source, [T, S, S, 3], or None if unreadable.

  Uses the record's frame indices (format 2) or the patchifier's sampling (format 1), the same
  resize and rotation, so kept patches line up. The video is streamed: only the T sampled
  frames, resized, are held.
  """
  t_len, g, _ = rec["grid"].tolist()
  p = rec["patches"].shape[1]
  size = g * p
  path = rec["source"]
  if not os.path.isfile(path):
    return None
  try:
    if rec["signal"].startswith("image"):
      from PIL import ImageOps
      with Image.open(path) as im:
        rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"), np.uint8)
      return decode.to_rgb(av.VideoFrame.from_ndarray(rgb, format="rgb24"), size,
                                  interpolation)[None]
    idx = np.asarray(rec.get("frame_indices", np.full(t_len, -1)))
    with av.open(path) as c:
      if (idx < 0).any():  # format 1: the patchifier sampled over the stream's frame count
        idx = sample_indices(decode.declared_frames(c, path), t_len)
      return sampled_frames(c, idx, size, interpolation)
  except (av.error.FFmpegError, OSError, ValueError, InputError):
    return None


def sampled_frames(container, idx, size: int, interpolation: str):
  """Frames idx (decoded order, repeats allowed) of the first video stream, resized to size x size
  and turned upright, [len(idx), S, S, 3]; None if the stream has fewer frames."""
  out = np.empty((len(idx), size, size, 3), np.uint8)
  slots = {}
  for slot, i in enumerate(np.asarray(idx).tolist()):
    slots.setdefault(i, []).append(slot)
  last = max(slots)
  k = None
  for n, frame in enumerate(container.decode(video=0)):
    if k is None:
      k = decode.rotation_k(frame.rotation)
    if n in slots:
      out[slots[n]] = np.rot90(decode.to_rgb(frame, size, interpolation), k)
    if n >= last:
      return out
  return None


def render(rec: dict, frames=None, dim: float = 0.25, scale: int = 1, columns: int = 8) -> Image:
  """Grid image: one tile per sampled frame; kept patches at full brightness."""
  t_len, g, _ = rec["grid"].tolist()
  p = rec["patches"].shape[1]
  size = g * p
  canvas = np.zeros((t_len, size, size, 3), np.float32)
  kept = np.zeros((t_len, g, g), bool)
  if frames is not None:
    canvas[:] = frames * dim
  else:
    canvas[:] = 40.0  # dropped pixels are not in the record: plain dark grey
  for (t, h, w), patch in zip(rec["positions"], rec["patches"]):
    canvas[t, h * p:(h + 1) * p, w * p:(w + 1) * p] = patch
    kept[t, h, w] = True
  cols = min(columns, t_len)
  rows = -(-t_len // cols)
  pad = 4
  tile = size * scale
  label_h = 14
  out = Image.new("RGB", (cols * (tile + pad) + pad, rows * (tile + pad + label_h) + pad),
                  (255, 255, 255))
  draw = ImageDraw.Draw(out)
  for t in range(t_len):
    r, c = divmod(t, cols)
    x, y = pad + c * (tile + pad), pad + r * (tile + pad + label_h)
    img = Image.fromarray(np.clip(canvas[t], 0, 255).astype(np.uint8))
    if scale != 1:
      img = img.resize((tile, tile), Image.NEAREST)
    out.paste(img, (x, y + label_h))
    draw.text((x, y), f"t={t} {rec['frame_types'][t]} {int(kept[t].sum())}/{g * g}",
              fill=(0, 0, 0))
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--input", required=True, help="output dir of data_prep.codec_patchify")
  ap.add_argument("--index", type=int, default=0, help="record number across shards")
  ap.add_argument("--output", required=True, help="PNG path")
  ap.add_argument("--scale", type=int, default=2, help="integer upscale of each tile")
  ap.add_argument("--dim", type=float, default=0.25, help="brightness of dropped patches")
  ap.add_argument("--columns", type=int, default=8)
  args = ap.parse_args(argv)
  if args.scale < 1 or args.columns < 1 or not 0 <= args.dim <= 1:
    ap.error("--scale and --columns must be >= 1 and --dim in [0, 1]")
  rec = record_at(args.input, args.index)
  interpolation = "AREA"
  manifest = os.path.join(args.input, "manifest.json")
  if os.path.isfile(manifest):
    with open(manifest) as f:
      interpolation = json.load(f).get("options", {}).get("resize_interpolation", interpolation)
  frames = source_frames(rec, interpolation)
  img = render(rec, frames, args.dim, args.scale, args.columns)
  tmp = args.output + ".tmp.png"
  img.save(tmp)
  os.replace(tmp, args.output)
  kept = rec["positions"].shape[0]
  total = int(np.prod(rec["grid"]))
  print(f"{args.output}: {rec['source']} ({rec['signal']}, {kept}/{total} patches kept, "
        f"frames {rec['frame_types']}, dropped patches "
        f"{'dimmed from the source' if frames is not None else 'grey: source unreadable'})")


if __name__ == "__main__":
  main()
