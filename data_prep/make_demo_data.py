"""Embedded demo data: moving handwritten digits (scikit-learn) as H.264 clips, plus stills."""
import argparse
import json
import os
import tempfile
import time
from fractions import Fraction

import av
import numpy as np
from PIL import Image

_DIGITS = None


def _digits():
  """(images [N, 8, 8] float in [0, 1], labels [N]) of scikit-learn's bundled digits."""
  global _DIGITS
  if _DIGITS is None:
    from sklearn.datasets import load_digits
    d = load_digits()
    _DIGITS = (d.images.astype(np.float32) / 16.0, d.target.astype(np.int64))
  return _DIGITS


def _resize(arr: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize of a float [h, w] or [h, w, c] array through PIL (per channel)."""
  if arr.ndim == 2:
    return np.asarray(Image.fromarray(arr.astype(np.float32), mode="F").resize(
        (width, height), Image.BILINEAR))
  return np.stack([_resize(arr[..., c], height, width) for c in range(arr.shape[-1])], -1)


# Digit clips use a darker, lower-contrast texture than textured_background's defaults, so the
# near-white strokes stand out from any background pixel in luma.
DIGIT_TEXTURE = dict(levels=(25.0, 140.0), stripes=15.0)
# Ink is near-white with a mild per-digit tint: shape, not colour, tells digits apart.
INK_TINT = 40.0
# Digit side as a fraction of the frame: 0.4 -> 45 px at 112, spanning ~4x4 patches of 14 px.
DIGIT_SCALE = 0.4
# Default clip count: enough variety for the tiny encoder to generalise in a few hundred CPU steps.
NUM_CLIPS = 800


def textured_background(rng, height: int, width: int, levels=(40.0, 200.0),
                        stripes: float = 25.0) -> np.ndarray:
  """Static colour texture: smooth random blobs (channel levels uniform in `levels`) plus oriented
  stripes of amplitude `stripes`, float [H, W, 3] 0..255."""
  coarse = rng.uniform(*levels, size=(max(2, height // 16), max(2, width // 16), 3))
  base = _resize(coarse, height, width)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  angle = rng.uniform(0, np.pi)
  period = rng.uniform(5, 12)
  wave = stripes * np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period)
  return np.clip(base + wave[..., None], 0, 255)


def natural_background(rng, height: int, width: int, num_frames: int, speed: float):
  """Camera pan over one of scikit-learn's two photos: float [T, H, W, 3] (for benchmarks)."""
  from sklearn.datasets import load_sample_image
  photo = load_sample_image(rng.choice(["china.jpg", "flower.jpg"])).astype(np.float32)
  travel = int(np.ceil(speed * num_frames)) + 1
  scale = max((height + travel) / photo.shape[0], (width + travel) / photo.shape[1], 1.0)
  if scale > 1.0:
    photo = _resize(photo, int(np.ceil(photo.shape[0] * scale)),
                    int(np.ceil(photo.shape[1] * scale)))
  angle = rng.uniform(0, 2 * np.pi)
  y0 = rng.integers(0, photo.shape[0] - height - travel + 1)
  x0 = rng.integers(0, photo.shape[1] - width - travel + 1)
  out = np.empty((num_frames, height, width, 3), np.float32)
  for t in range(num_frames):
    dy = int(round(t * speed * abs(np.sin(angle))))
    dx = int(round(t * speed * abs(np.cos(angle))))
    out[t] = photo[y0 + dy:y0 + dy + height, x0 + dx:x0 + dx + width]
  return out


def render_clip(rng, size: int, num_frames: int, label: int, num_digits: int,
                background: str = "texture", noise: float = 0.0,
                digit_scale: float = DIGIT_SCALE):
  """Frames [T, size, size, 3] uint8 of `num_digits` handwritten `label`s moving and bouncing.

  Each digit is a near-white glyph `digit_scale * size` pixels square. Also returns the per-frame
  digit boxes [T, num_digits, 4] (y0, x0, y1, x1) for tests/plots.
  """
  if not 0 < digit_scale <= 1:
    raise ValueError(f"render_clip: digit_scale={digit_scale} must be in (0, 1]")
  images, labels = _digits()
  pool = np.flatnonzero(labels == label)
  digit_px = min(size, max(8, int(round(digit_scale * size))))
  if background == "texture":
    bg = np.broadcast_to(textured_background(rng, size, size, **DIGIT_TEXTURE),
                         (num_frames, size, size, 3))
  elif background == "natural":
    bg = natural_background(rng, size, size, num_frames, speed=1.5)
  else:
    raise ValueError(f"render_clip: background={background!r} is not 'texture' or 'natural'")
  frames = np.array(bg, np.float32)
  boxes = np.zeros((num_frames, num_digits, 4), np.int32)
  for d in range(num_digits):
    glyph = _resize(images[rng.choice(pool)], digit_px, digit_px)
    # Stretch the blurry upscaled 8x8 grey levels so strokes get solid cores and sharp-ish edges.
    glyph = np.clip((glyph - 0.15) / 0.55, 0, 1)[..., None]
    colour = 255.0 - rng.uniform(0, INK_TINT, size=3)
    pos = rng.uniform(0, size - digit_px, size=2)
    speed = rng.uniform(1.5, 3.5)
    theta = rng.uniform(0, 2 * np.pi)
    vel = speed * np.array([np.sin(theta), np.cos(theta)])
    for t in range(num_frames):
      y, x = np.round(pos).astype(int)
      region = frames[t, y:y + digit_px, x:x + digit_px]
      region[:] = region * (1 - glyph) + colour * glyph
      boxes[t, d] = (y, x, y + digit_px, x + digit_px)
      pos = pos + vel
      for axis in range(2):  # bounce off the borders
        if pos[axis] < 0 or pos[axis] > size - digit_px:
          vel[axis] = -vel[axis]
          pos[axis] = np.clip(pos[axis], 0, size - digit_px)
  if noise:
    frames += rng.normal(0, noise, size=frames.shape).astype(np.float32)
  return np.clip(np.rint(frames), 0, 255).astype(np.uint8), boxes


def encode_clip(path: str, frames: np.ndarray, fps: int = 25, gop: int = 16, crf: int = 23,
                preset: str = "veryfast", pix_fmt: str = "yuv420p", rotation: int = 0,
                pts_ms=None, container_options=None):
  """Writes frames [T, H, W, 3] as H.264 (libx264, fixed GOP, no B-frames, 1 reference) to path.

  One reference frame keeps the exported motion vectors pointing at the previous frame, the
  prediction the residual map rebuilds. `rotation` sets the display matrix (degrees counter-
  clockwise); `pts_ms` gives per-frame timestamps in ms (a variable frame rate). yuv444p allows
  odd sizes; `container_options` go to the muxer (e.g. movflags). Written to a temp name, then
  renamed.
  """
  t, h, w, _ = frames.shape
  if pix_fmt == "yuv420p" and (h % 2 or w % 2):
    raise ValueError(f"encode_clip: frame size {w}x{h} must be even for yuv420p")
  tmp = f"{path}.tmp{os.getpid()}{os.path.splitext(path)[1]}"
  with av.open(tmp, "w", options=container_options or {}) as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
    stream.options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "bf": "0",
                      "refs": "1", "crf": str(crf), "preset": preset}
    if rotation:
      stream.set_display_rotation(rotation)
    if pts_ms is not None:
      stream.codec_context.time_base = Fraction(1, 1000)
    for i, frame in enumerate(frames):
      vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
      if pts_ms is not None:
        vf.pts, vf.time_base = int(pts_ms[i]), Fraction(1, 1000)
      for packet in stream.encode(vf):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  os.replace(tmp, path)


def motion_case_clip(path: str, interval: int, num_frames: int, objects, size: int = 112) -> list:
  """Two kinds of motion relative to the sampled frames, on a textured background, `interval`
  decoded frames per sampling interval: 'travel', a square that moves 18 px during each interval
  but stands still at the sampled frames, and 'jitter', one that moves 4 px only at the sampled
  frames. Writes the clip (one GOP) and returns each frame's boxes {name: (y0, x0, y1, x1)}."""
  from data_prep.codec.selection import sample_indices
  rng = np.random.default_rng(0)
  n = interval * num_frames
  idx = sample_indices(n, num_frames)
  sampled = set(idx.tolist())
  bg = textured_background(rng, size, size)
  tex = [rng.uniform(0, 255, (6, 6, 3)).repeat(4, 0).repeat(4, 1) for _ in range(2)]
  x, trav = 0.0, []
  for i in range(n):
    if i > 0 and i not in sampled:  # back and forth, 18 px per interval
      x += (1 if np.searchsorted(idx, i) % 2 else -1) * 18 / (interval - 1)
    trav.append(x)
  trav = np.asarray(trav) - min(trav)
  frames, boxes = [], []
  for i in range(n):
    f, b = bg.copy(), {}
    if "travel" in objects:
      x0 = int(round(8 + trav[i]))
      f[10:34, x0:x0 + 24] = tex[0]
      b["travel"] = (10, x0, 34, x0 + 24)
    if "jitter" in objects:
      x0 = 60 + (4 if i in sampled else 0)
      f[70:94, x0:x0 + 24] = tex[1]
      b["jitter"] = (70, x0, 94, x0 + 24)
    frames.append(f)
    boxes.append(b)
  encode_clip(path, np.clip(np.rint(np.stack(frames)), 0, 255).astype(np.uint8), gop=n)
  return boxes


def _write_json(path, obj):
  with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), delete=False,
                                   suffix=".tmp") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(f.name, path)


def make_demo_data(output_dir: str, num_clips: int = NUM_CLIPS, num_images: int = 100,
                   size: int = 112, num_frames: int = 16, gop: int = 16, seed: int = 0,
                   background: str = "texture", noise: float = 0.0,
                   digit_scale: float = DIGIT_SCALE) -> dict:
  """Writes clips/*.mp4, images/*.png, class_labels.json, manifest.json and list.txt."""
  if num_clips < 0 or num_images < 0 or num_clips + num_images == 0:
    raise ValueError("make_demo_data: num_clips and num_images must be >= 0, not both 0")
  if size < 16 or size % 2:
    raise ValueError(f"make_demo_data: size={size} must be even and >= 16")
  if num_frames < 1 or gop < 1:
    raise ValueError("make_demo_data: num_frames and gop must be >= 1")
  if not 0 < digit_scale <= 1:
    raise ValueError(f"make_demo_data: digit_scale={digit_scale} must be in (0, 1]")
  output_dir = os.path.abspath(output_dir)
  os.makedirs(os.path.join(output_dir, "clips"), exist_ok=True)
  os.makedirs(os.path.join(output_dir, "images"), exist_ok=True)
  rng = np.random.default_rng(seed)
  items = {}
  for i in range(num_clips):
    label, count = int(rng.integers(10)), int(rng.integers(1, 4))
    frames, _ = render_clip(rng, size, num_frames, label, count, background, noise, digit_scale)
    path = os.path.join(output_dir, "clips", f"clip_{i:05d}_digit{label}.mp4")
    encode_clip(path, frames, gop=gop)
    items[path] = {"kind": "video", "label": label, "num_digits": count,
                   "num_frames": num_frames, "size": [size, size]}
  for i in range(num_images):
    label = int(rng.integers(10))
    frames, _ = render_clip(rng, size, 1, label, 1, background, noise, digit_scale)
    path = os.path.join(output_dir, "images", f"image_{i:05d}_digit{label}.png")
    tmp = path + ".tmp.png"
    Image.fromarray(frames[0]).save(tmp)
    os.replace(tmp, path)
    items[path] = {"kind": "image", "label": label, "num_digits": 1, "size": [size, size]}
  _write_json(os.path.join(output_dir, "class_labels.json"),
              {p: v["label"] for p, v in items.items()})
  manifest = {"generator": "data_prep.make_demo_data", "seed": seed, "size": size,
              "num_frames": num_frames, "gop": gop, "background": background, "noise": noise,
              "digit_scale": digit_scale,
              "num_clips": num_clips, "num_images": num_images, "items": items}
  _write_json(os.path.join(output_dir, "manifest.json"), manifest)
  with tempfile.NamedTemporaryFile("w", dir=output_dir, delete=False, suffix=".tmp") as f:
    f.write("".join(p + "\n" for p in items))
  os.replace(f.name, os.path.join(output_dir, "list.txt"))
  return manifest


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--output_dir", required=True)
  ap.add_argument("--num_clips", type=int, default=NUM_CLIPS)
  ap.add_argument("--num_images", type=int, default=100)
  ap.add_argument("--size", type=int, default=112, help="frame side in pixels (even)")
  ap.add_argument("--num_frames", type=int, default=16, help="frames per clip")
  ap.add_argument("--gop", type=int, default=16, help="keyframe interval")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--background", choices=("texture", "natural"), default="texture",
                  help="static texture (default) or a camera pan over a photo")
  ap.add_argument("--noise", type=float, default=0.0, help="per-frame Gaussian noise sigma")
  ap.add_argument("--digit_scale", type=float, default=DIGIT_SCALE,
                  help="digit side as a fraction of --size (0.4: ~4x4 patches of 14 px at 112)")
  args = ap.parse_args(argv)
  start = time.time()
  m = make_demo_data(args.output_dir, args.num_clips, args.num_images, args.size,
                     args.num_frames, args.gop, args.seed, args.background, args.noise,
                     args.digit_scale)
  print(f"wrote {m['num_clips']} clips and {m['num_images']} images to {args.output_dir} "
        f"in {time.time() - start:.1f}s (labels: class_labels.json, inputs: list.txt)")


if __name__ == "__main__":
  main()
