"""Generated clips and independent decodes shared by the codec tests."""
import av
import numpy as np

from data_prep import make_demo_data as md
from data_prep.codec import decode
from tests.helpers.scheduling import keep_scheduling_policy

S, P, G = 112, 14, 8  # image size, patch size, grid side used by most tests
SQ = 24  # moving square side


def square_frames(n=16, size=S, seed=0, step=(2, 4)):
  """A textured square moving `step` px per frame over a textured background; (frames, boxes)."""
  rng = np.random.default_rng(seed)
  bg = md.textured_background(rng, size, size)
  square = rng.uniform(0, 255, size=(SQ // 4, SQ // 4, 3)).repeat(4, 0).repeat(4, 1)
  frames, boxes = [], []
  for t in range(n):
    y, x = 16 + step[0] * t, 8 + step[1] * t
    f = bg.copy()
    f[y:y + SQ, x:x + SQ] = square
    frames.append(f)
    boxes.append((y, x, y + SQ, x + SQ))
  return np.clip(np.rint(np.stack(frames)), 0, 255).astype(np.uint8), boxes


def decode_rgb(path, size=S):
  """Independent decode: plain PyAV (no MV export), each frame converted by PyAV itself."""
  with av.open(path) as c:
    return [f.to_ndarray(format="rgb24", width=size, height=size, interpolation="AREA")
            for f in c.decode(video=0)]


def real_frames(path):
  """[(luma, vectors or None, pict_type int)] of every frame, decoded as the patchifier does."""
  c = av.open(path)
  st = c.streams.video[0]
  st.thread_type = "NONE"
  st.codec_context.options = {"flags2": "+export_mvs"}
  out = []
  for f in c.decode(st):
    sd = f.side_data.get("MOTION_VECTORS")
    out.append((decode.luma_plane(f).copy(), None if sd is None else sd.to_ndarray(),
                int(f.pict_type)))
  c.close()
  return out


def encode(path, frames, codec="libx264", options=None, rate=25):
  """frames [T, H, W, 3] encoded with `codec` and its `options` (B-frames, GOP, ...)."""
  with keep_scheduling_policy(), av.open(path, "w") as c:
    s = c.add_stream(codec, rate=rate)
    s.height, s.width = frames.shape[1:3]
    s.pix_fmt = "yuv420p"
    s.options = options or {}
    for f in frames:
      for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
        c.mux(pkt)
    for pkt in s.encode():
      c.mux(pkt)


def pan_and_square(n=48, size=128, seed=0):
  """A camera pan (1 px down, 2 px right... per frame) with a square moving over it."""
  rng = np.random.default_rng(seed)
  bg = md.textured_background(rng, size + 64, size + 64)
  sq = rng.uniform(0, 255, (8, 8, 3)).repeat(4, 0).repeat(4, 1)
  frames = []
  for t in range(n):
    f = bg[t:t + size, 2 * t % 64:2 * t % 64 + size].copy()
    y, x = 20 + t, 10 + (2 * t) % 80
    f[y:y + 32, x:x + 32] = sq
    frames.append(f)
  return np.clip(np.rint(np.stack(frames)), 0, 255).astype(np.uint8)


def digit_clip(path, seed, n=8, size=64, **kw):
  """A demo clip of two moving digits (make_demo_data), GOP 4."""
  frames, _ = md.render_clip(np.random.default_rng(seed), size, n, label=seed % 10, num_digits=2)
  md.encode_clip(path, frames, gop=4, **kw)


# Motion between samples: N decoded frames sampled at T, intervals of 6 decoded frames.
N, T = 48, 8
IDX = np.minimum((2 * np.arange(T) + 1) * N // (2 * T), N - 1)  # centred uniform sampling


def motion_clip(path, which, seed=0):
  """'travel': a square moving 18 px over each sampling interval but never at a sampled frame;
  'jitter': a square that moves 4 px only at sampled frames (and back right after); 'both'.
  Returns the boxes per frame."""
  rng = np.random.default_rng(seed)
  bg = md.textured_background(rng, S, S)
  tex = [rng.uniform(0, 255, (6, 6, 3)).repeat(4, 0).repeat(4, 1) for _ in range(2)]
  sampled = set(IDX.tolist())
  x, trav = 0.0, []
  for n in range(N):
    if n > 0 and n not in sampled:
      x += (1 if np.searchsorted(IDX, n) % 2 else -1) * 18 / 5
    trav.append(x)
  trav = np.asarray(trav) - min(trav)
  frames, boxes = [], []
  for n in range(N):
    f, b = bg.copy(), {}
    if which in ("travel", "both"):
      x0 = int(round(8 + trav[n]))
      f[10:34, x0:x0 + 24] = tex[0]
      b["travel"] = (10, x0, 34, x0 + 24)
    if which in ("jitter", "both"):
      x0 = 60 + (4 if n in sampled else 0)
      f[70:94, x0:x0 + 24] = tex[1]
      b["jitter"] = (70, x0, 94, x0 + 24)
    frames.append(f)
    boxes.append(b)
  md.encode_clip(path, np.clip(np.rint(np.stack(frames)), 0, 255).astype(np.uint8), gop=N)
  return boxes


def motion_clips(directory, which=("travel", "jitter", "both")):
  """{kind: (path, boxes)} of motion_clip in `directory`."""
  return {w: (str(directory / f"{w}.mp4"), motion_clip(str(directory / f"{w}.mp4"), w))
          for w in which}


def kept_on(positions, boxes, name):
  """Kept patches that overlap the object anywhere in their slot's sampling interval."""
  count = 0
  for t, h, w in positions:
    lo = IDX[t - 1] + 1 if t else 0
    count += any(h * P < y1 and (h + 1) * P > y0 and w * P < x1 and (w + 1) * P > x0
                 for y0, x0, y1, x1 in (boxes[n][name] for n in range(lo, IDX[t] + 1)))
  return count
