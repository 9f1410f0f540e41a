"""PyAV decoding: open, count, seek, decode with motion vectors, resize, transcode to H.264."""
import collections
import math
import threading
from fractions import Fraction

import av
import numpy as np

from data_prep.codec.config import InputError, is_image_path

_PICT_CHAR = {1: "I", 2: "P", 3: "B"}
# Decoders from which FFmpeg exports motion vectors (flags2=+export_mvs); others get transcoded.
MV_CODECS = frozenset({"h264", "mpeg1video", "mpeg2video", "mpeg4", "h263", "h263p", "flv1",
                       "msmpeg4v2", "msmpeg4v3", "wmv1", "wmv2"})
# 8-bit pixel formats whose plane 0 is the luma plane at full resolution.
_LUMA_PLANE_FORMATS = frozenset({
    "yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "yuv440p", "yuvj440p",
    "yuv411p", "yuv410p", "nv12", "nv21", "nv16", "gray", "yuva420p"})
# AVMotionVector as FFmpeg lays it out (PyAV builds this dtype on every to_ndarray call, which
# costs more than reading the vectors).
MV_DTYPE = np.dtype([("source", "int32"), ("w", "uint8"), ("h", "uint8"), ("src_x", "int16"),
                     ("src_y", "int16"), ("dst_x", "int16"), ("dst_y", "int16"),
                     ("flags", "uint64"), ("motion_x", "int32"), ("motion_y", "int32"),
                     ("motion_scale", "uint16")], align=True)


def read_vectors(side_data) -> np.ndarray:
  """Structured [N] read-only view of a frame's MOTION_VECTORS side data (no copy)."""
  out = np.frombuffer(side_data, dtype=MV_DTYPE)
  out.flags.writeable = False
  return out


def frame_vectors(frame):
  """A decoded frame's motion vectors (read_vectors), or None when it exports none."""
  sd = frame.side_data.get("MOTION_VECTORS")
  return read_vectors(sd) if sd is not None else None


def picture_type(frame) -> str:
  """'I', 'P', 'B', or '?' for any other picture type."""
  return _PICT_CHAR.get(int(frame.pict_type), "?")


def luma_rows(frame) -> np.ndarray:
  """[H, >= W] C-contiguous uint8 luma of a decoded frame: the decoder's buffer, line padding
  included, when possible (columns from W on are not picture)."""
  if frame.format.name in _LUMA_PLANE_FORMATS:
    plane = frame.planes[0]
    buf = np.frombuffer(plane, np.uint8)
    return buf[: plane.line_size * frame.height].reshape(frame.height, plane.line_size)
  return frame.to_ndarray(format="gray")


def luma_plane(frame) -> np.ndarray:
  """[H, W] uint8 luma of a decoded frame, a view of the decoder's buffer when possible."""
  return luma_rows(frame)[:, : frame.width]


def check_size(width, height, cfg):
  """InputError unless a width x height frame fits cfg's minimum side, grid and aspect ratio."""
  if width < 1 or height < 1:
    raise InputError(f"frame size {width}x{height} is empty")
  side = max(cfg.min_side, cfg.grid_side)
  if min(width, height) < side:
    raise InputError(f"frame size {width}x{height} is smaller than the minimum side {side} "
                     f"(min_side={cfg.min_side}, grid {cfg.grid_side})")
  if max(width, height) > cfg.max_aspect * min(width, height):
    raise InputError(f"frame size {width}x{height} exceeds max_aspect={cfg.max_aspect}")


def rotation_k(rotation) -> int:
  """Quarter turns counter-clockwise that bring the coded frame upright (display matrix)."""
  rot = float(rotation or 0)
  k = int(round(rot / 90.0))
  if abs(rot - 90 * k) > 1:
    raise InputError(f"display rotation {rot} degrees is not a multiple of 90")
  return k % 4


def open_video(path):
  """A PyAV container with at least one video stream; InputError otherwise."""
  try:
    container = av.open(path, metadata_errors="ignore")
  except av.error.FFmpegError as e:
    raise InputError(f"cannot open as media ({type(e).__name__}: {e.strerror or e})") from e
  if not container.streams.video:
    kinds = sorted({s.type for s in container.streams})
    container.close()
    raise InputError(f"no video stream (streams: {kinds or 'none'})")
  return container


def declared_frames(container, path) -> int:
  """Frames in the first video stream: the header's count, else demux packets (no decoding).

  Counting uses a separate open, not a seek back: raw elementary streams (.h264) cannot seek.
  """
  n = container.streams.video[0].frames
  if n > 0:
    return n
  counter = open_video(path)
  try:
    return sum(1 for pkt in counter.demux(counter.streams.video[0]) if pkt.size)
  except av.error.FFmpegError as e:
    raise InputError(f"cannot read packets ({type(e).__name__}: {e.strerror or e})") from e
  finally:
    counter.close()


def media_duration(path: str) -> float:
  """Seconds of the first video stream from the header (0 for images and unreadable files)."""
  if is_image_path(path):
    return 0.0
  try:
    with av.open(path, metadata_errors="ignore") as c:
      if not c.streams.video:
        return 0.0
      st = c.streams.video[0]
      if st.duration is not None and st.time_base is not None:
        return max(0.0, float(st.duration * st.time_base))
      return max(0.0, (c.duration or 0) / 1e6)
  except (av.error.FFmpegError, OSError, ValueError):
    return 0.0


_REFORMATTERS = threading.local()


def _reformatter():
  """One swscale context per thread: building one per frame costs more than the conversion."""
  r = getattr(_REFORMATTERS, "r", None)
  if r is None:
    r = _REFORMATTERS.r = av.video.reformatter.VideoReformatter()
  return r


def to_rgb(frame, size: int, interpolation: str) -> np.ndarray:
  """A decoded frame resized to size x size RGB (coded orientation)."""
  return _reformatter().reformat(frame, width=size, height=size, format="rgb24",
                                 interpolation=interpolation).to_ndarray()


def stream_info(stream):
  """(frames per second, 0 when unknown; the codec's name)."""
  fps = float(stream.average_rate or stream.guessed_rate or 0)
  # The codec, not the decoder (AV1 decodes through "libdav1d")
  codec = stream.codec_context.codec.canonical_name or stream.codec_context.name or ""
  return fps if math.isfinite(fps) and fps > 0 else 0.0, codec


def prepare_stream(stream):
  """Single-threaded decoding with motion vectors exported."""
  # Frame threading truncates exported MVs and makes them non-deterministic.
  stream.thread_type = "NONE"
  stream.codec_context.options = {"flags2": "+export_mvs"}


class SeekFailed(Exception):
  """Frame indices after a seek are not exact (variable frame rate, missing timestamps)."""


def seekable(container, stream, fps, num_decoded, cfg) -> bool:
  """Seeking by time finds frame n only in a constant-frame-rate stream: the declared frame count
  must match duration x fps."""
  if cfg.seek == "never" or fps <= 0 or stream.time_base is None:
    return False
  if stream.duration is not None:
    duration = float(stream.duration * stream.time_base)
  elif container.duration:
    duration = container.duration / 1e6
  else:
    return False
  return abs(duration * fps - num_decoded) <= 2


def decoded_frames(container, stream, idx, fps, cfg, seek):
  """Yields (frame index, frame, first after a seek) up to the last sampled frame.

  Without seeking, every frame from the start. With seeking, a gap of more than seek_min_gap
  seconds to the next sample is skipped: the decoder jumps to the keyframe before (sample - 1 s)
  and the frame index is read from the timestamp (exact or SeekFailed).
  """
  it = container.decode(stream)
  n, t0 = -1, None
  tb = float(stream.time_base or 0)  # float, not Fraction, arithmetic per frame
  gap = max(1, int(round(cfg.seek_min_gap * fps)))
  for target in sorted(set(idx.tolist())):
    if seek and n >= 0 and target - n > gap:
      start = max(n + 1, target - int(round(fps)))
      ts = int(round((t0 + start / fps) / stream.time_base))
      try:
        container.seek(ts, stream=stream, backward=True)
      except av.error.FFmpegError as e:
        raise SeekFailed(str(e)) from e
      it, restarted = container.decode(stream), True
    else:
      restarted = False
    while n < target:
      frame = next(it, None)
      if frame is None:
        if restarted or n >= 0 and seek:
          raise SeekFailed("stream ended after a seek")
        return
      if t0 is None:
        t0 = 0.0 if frame.pts is None else frame.pts * tb
      if seek:
        if frame.pts is None:
          raise SeekFailed("frame without a timestamp")
        x = (frame.pts * tb - t0) * fps
        m = int(round(x))
        if abs(x - m) > 0.05 or (not restarted and m != n + 1):
          raise SeekFailed(f"timestamp {x:.3f} frames is not the next frame index")
        if m <= n:
          continue  # the keyframe lies before frames already decoded
      else:
        m = n + 1
      yield m, frame, restarted
      restarted, n = False, m


class Transcoder:
  """Re-encodes decoded frames to P-only H.264 (no B-frames, one reference, one GOP, size x size)
  in memory and decodes them back with their motion vectors, one frame in, one frame out, in
  order. The published pipeline does the same with an HEVC step; here it gives vectors to codecs
  FFmpeg exports none for (HEVC, VP9, AV1) and real ones to low-bitrate B-frame streams."""

  def __init__(self, size: int, interpolation: str, crf: int = 23, gop: int = 100000):
    """gop: frames from one keyframe to the next (the default: one GOP)."""
    self.size, self.interpolation = size, interpolation
    self.enc = av.CodecContext.create("libx264", "w")
    self.enc.width = self.enc.height = size
    self.enc.pix_fmt = "yuv420p"
    self.enc.time_base = Fraction(1, 25)
    self.enc.options = {"bf": "0", "refs": "1", "g": str(gop), "keyint_min": str(gop),
                        "sc_threshold": "0", "crf": str(crf), "preset": "veryfast",
                        "threads": "1", "rc-lookahead": "0"}
    self.dec = av.CodecContext.create("h264", "r")
    self.dec.thread_type = "NONE"
    self.dec.options = {"flags2": "+export_mvs"}
    self.pts = 0
    self.indices = collections.deque()  # source frame index of each frame in flight

  def _decode(self, packets):
    for pkt in packets:
      for frame in self.dec.decode(pkt):
        yield self.indices.popleft(), frame, frame_vectors(frame)

  def push(self, frame, index: int):
    """Encodes one frame; returns the (index, frame, vectors) that came out so far."""
    small = _reformatter().reformat(frame, width=self.size, height=self.size, format="yuv420p",
                                    interpolation=self.interpolation)
    small.pts, small.pict_type = self.pts, 0
    self.pts += 1
    self.indices.append(index)
    return list(self._decode(self.enc.encode(small)))

  def flush(self):
    out = list(self._decode(self.enc.encode(None)))
    out += list(self._decode([None]))
    return out
