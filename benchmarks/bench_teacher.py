"""data_prep.teacher throughput (clips/s) with random CLIP towers (tiny and ViT-B/16 sized) against bare decode of the same frames."""
import argparse
import concurrent.futures
import json
import os
import tempfile
import time

import av
import numpy as np
import torch
import transformers

from data_prep import make_demo_data, teacher
from data_prep import teacher_inputs as ti
from data_prep import teacher_model as tm
from ovenc_format import progress

TOWERS = {
    # The tests' tower: speed is the pipeline's, not the model's.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 image_size=64, patch_size=16, projection_dim=48),
    # ViT-B/16 (OpenAI CLIP's image tower shape); random weights: speed does not depend on them.
    "vit_b16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, image_size=224, patch_size=16, projection_dim=512),
}


def make_clips(out_dir, count, frames, width, height, seed=0):
  """H.264 clips of a textured background panning under the camera, GOP 25."""
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(count):
    bg = make_demo_data.textured_background(rng, height + frames, width + 2 * frames)
    path = os.path.join(out_dir, f"clip_{i:03d}.mp4")
    with av.open(path, "w") as c:
      s = c.add_stream("libx264", rate=25)
      s.width, s.height, s.pix_fmt = width, height, "yuv420p"
      s.options = {"g": "25", "preset": "veryfast"}
      for t in range(frames):
        f = np.clip(bg[t:t + height, 2 * t:2 * t + width], 0, 255).astype(np.uint8)
        for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
          c.mux(pkt)
      for pkt in s.encode():
        c.mux(pkt)
    paths.append(path)
  return paths


def save_tower(out_dir, spec):
  torch.manual_seed(0)
  cfg = transformers.CLIPVisionConfig(**spec)
  transformers.CLIPVisionModelWithProjection(cfg).save_pretrained(out_dir)
  side = spec["image_size"]
  transformers.CLIPImageProcessor(size={"shortest_edge": side},
                                  crop_size={"height": side, "width": side}).save_pretrained(out_dir)
  return out_dir


def bare_decode_rate(paths, frames):
  t0 = time.perf_counter()
  for p in paths:
    ti.decode_video(p, frames, "linspace")
  return len(paths) / (time.perf_counter() - t0)


def steady_rate(model, paths, a):
  """Clips/s of the local loop with the model loaded and the decode workers started."""
  tower = tm.Teacher(model, a.device)
  recipe = teacher.Recipe(a.frames, 0, "linspace", "direct", 64)
  recipe.out_dim = a.frames * tower.dim
  pool = teacher.decode_pool(model, a.frames, "linspace", a.decode_workers)
  try:
    if pool is not None:
      concurrent.futures.wait([pool.submit(ti.ping) for _ in range(4 * a.decode_workers)])
    with tempfile.TemporaryDirectory() as out, progress.Progress(len(paths), "steady") as bar:
      t0 = time.perf_counter()
      teacher.run_local(tower, recipe, [(0, [("file", p) for p in paths])], out, 1, pool, bar,
                        a.decode_workers)
      return len(paths) / (time.perf_counter() - t0)
  finally:
    if pool is not None:
      pool.shutdown()


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--clips", type=int, default=32, help="clips for the tiny tower")
  ap.add_argument("--clips_b16", type=int, default=8, help="clips for the ViT-B/16 tower")
  ap.add_argument("--clip_frames", type=int, default=64)
  ap.add_argument("--width", type=int, default=320)
  ap.add_argument("--height", type=int, default=240)
  ap.add_argument("--frames", type=int, default=8)
  ap.add_argument("--decode_workers", type=int, default=1)
  ap.add_argument("--device", default="cpu")
  ap.add_argument("--towers", default="tiny,vit_b16")
  ap.add_argument("--json", default=None)
  a = ap.parse_args()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    clip_dir = os.path.join(tmp, "clips")
    os.makedirs(clip_dir)
    paths = make_clips(clip_dir, max(a.clips, a.clips_b16), a.clip_frames, a.width, a.height)
    for name in a.towers.split(","):
      model = save_tower(os.path.join(tmp, name), TOWERS[name])
      n = a.clips if name == "tiny" else a.clips_b16
      listing = os.path.join(tmp, f"{name}.txt")
      with open(listing, "w") as f:
        f.write("\n".join(paths[:n]) + "\n")
      decode_rate = bare_decode_rate(paths[:n], a.frames)
      flags = ["--input", listing, "--model", model, "--output_dir", os.path.join(tmp, f"out_{name}"),
               "--frames", str(a.frames), "--per_frame_dim", "0", "--device", a.device,
               "--decode_workers", str(a.decode_workers), "--overwrite"]
      # A whole run: model load and decode-worker start (overlapped), decode, processor, model.
      t0 = time.perf_counter()
      teacher.run(flags)
      whole = n / (time.perf_counter() - t0)
      rate = steady_rate(model, paths[:n], a)
      rows.append(dict(tower=name, clips=n, decode_clips_per_s=decode_rate, whole_run_clips_per_s=whole,
                       teacher_clips_per_s=rate, teacher_over_decode=rate / decode_rate))
  print(f"\n{a.frames} frames per clip of {a.clip_frames}-frame {a.width}x{a.height} H.264 clips, "
        f"{a.decode_workers} decode worker(s), device {a.device}, {os.cpu_count()} CPUs")
  print("teacher clips/s: the local loop, model loaded and workers started; whole run: the CLI end "
        "to end\n(model load and worker start included)")
  print(f"{'tower':>8} {'clips':>6} {'decode clips/s':>15} {'teacher clips/s':>16} "
        f"{'teacher/decode':>15} {'whole run clips/s':>18}")
  for r in rows:
    print(f"{r['tower']:>8} {r['clips']:6d} {r['decode_clips_per_s']:15.2f} "
          f"{r['teacher_clips_per_s']:16.3f} {r['teacher_over_decode']:15.4f} "
          f"{r['whole_run_clips_per_s']:18.3f}")
  if a.json:
    figures = {f"{r['tower']}_{k}": v for r in rows for k, v in r.items() if k != "tower"}
    with open(a.json + ".tmp", "w") as f:
      json.dump(figures, f, indent=1, sort_keys=True)
    os.replace(a.json + ".tmp", a.json)


if __name__ == "__main__":
  main()
