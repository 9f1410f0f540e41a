"""Teacher inputs in the decode workers: videos, images and dense records -> sampled frames -> processor arrays."""
import os
import tempfile

import numpy as np

from data_prep import teacher_model as tm
from data_prep.codec import decode
from data_prep.codec.config import InputError, is_image_path
from ovenc_format import paths as pathio
from ovenc_format import records


def item_name(item) -> str:
  return item[1] if item[0] == "file" else f"{item[1]}#{item[2]}"


def decode_video(path: str, frames: int, rule: str) -> list:
  """The sampled frames of a video, RGB uint8 at the stored size, upright (display matrix)."""
  container = decode.open_video(path)
  try:
    n = decode.declared_frames(container, path)
  finally:
    container.close()
  if n < 1:
    raise InputError("video stream has no frames")
  for _ in range(2):
    idx = tm.frame_indices(n, frames, rule)
    wanted, held, count = set(idx.tolist()), {}, 0
    container = decode.open_video(path)
    try:
      stream = container.streams.video[0]
      stream.thread_type = "AUTO"  # no motion vectors here: frame threading is safe
      for count, frame in enumerate(container.decode(stream), 1):
        if count - 1 in wanted:
          rgb = frame.to_ndarray(format="rgb24")
          held[count - 1] = np.ascontiguousarray(np.rot90(rgb, decode.rotation_k(frame.rotation)))
        if count - 1 >= idx[-1]:
          break
    except Exception as e:
      if not held:
        raise InputError(f"cannot decode ({type(e).__name__}: {e})") from e
      raise InputError(f"decode failed after {count} frames ({type(e).__name__}: {e})") from e
    finally:
      container.close()
    if len(held) == len(wanted):
      return [held[i] for i in idx.tolist()]
    if count < 1:
      raise InputError("video stream decoded to 0 frames")
    n = count  # the header over-counted: sample again on the true count
  raise InputError(f"frame count unstable between two decodes ({count})")


def decode_image(path: str) -> np.ndarray:
  from PIL import Image, ImageOps, UnidentifiedImageError
  try:
    with Image.open(path) as im:
      return np.asarray(ImageOps.exif_transpose(im).convert("RGB"), np.uint8)
  except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
    raise InputError(f"cannot read image ({type(e).__name__}: {e})") from e


def record_frames(path: str, row: int, frames: int, rule: str):
  """(sample_id, frames) of a dense record (every patch kept, e.g. --selector dense); a remote
  shard is read from its copy in this host's staging cache."""
  from array_record.python import array_record_module
  reader = array_record_module.ArrayRecordReader(pathio.stage(path))
  try:
    rec = records.decode_record(reader.read([row])[0])
  finally:
    reader.close()
  t, h, w = (int(v) for v in rec["grid"])
  p = rec["patches"].shape[1]
  if rec["positions"].shape[0] != t * h * w:
    raise InputError(f"record {rec['sample_id']} keeps {rec['positions'].shape[0]} of {t * h * w} "
                     f"patches: the teacher needs dense records (codec job --selector dense, "
                     f"--image_budget 0) or the videos themselves")
  tiles = np.zeros((t, h, w, p, p, 3), np.uint8)
  pos = rec["positions"]
  tiles[pos[:, 0], pos[:, 1], pos[:, 2]] = rec["patches"]
  video = tiles.transpose(0, 1, 3, 2, 4, 5).reshape(t, h * p, w * p, 3)
  return rec["sample_id"], [video[i] for i in tm.frame_indices(t, frames, rule).tolist()]


def load_item(item, frames: int, rule: str):
  """-> (sample_id, kind 'video'|'image', [frames]); InputError for a bad input."""
  if item[0] == "record":
    sid, fr = record_frames(item[1], item[2], frames, rule)
    return sid, "video", fr
  path = item[1]
  local = path
  if pathio.is_remote(path):
    fd, local = tempfile.mkstemp(suffix=os.path.splitext(path)[1])  # PyAV and PIL open local files
    os.close(fd)
    try:
      pathio.download(path, local)
    except Exception as e:
      os.remove(local)
      raise InputError(f"cannot fetch input ({type(e).__name__}: {e})") from e
  try:
    if not pathio.is_remote(path) and not os.path.exists(path):
      raise InputError("file does not exist")
    if os.path.getsize(local) == 0:
      raise InputError("empty file (0 bytes)")
    if is_image_path(path):
      return records.sample_id_for(path), "image", [decode_image(local)]
    return records.sample_id_for(path), "video", decode_video(local, frames, rule)
  finally:
    if local != path and os.path.exists(local):
      os.remove(local)


# One processor per decode worker process (set by init_worker).
_WORKER = {}


def init_worker(model, frames, rule):
  _WORKER.update(processor=tm.load_processor(model), frames=frames, rule=rule)


def prepare(item, processor, frames, rule):
  """-> ('ok', sample_id, kind, processor arrays) or ('fail', reason). Never raises for bad input."""
  try:
    sid, kind, fr = load_item(item, frames, rule)
    inputs = processor(images=fr, return_tensors="np")
    return ("ok", sid, kind, {k: np.asarray(v) for k, v in inputs.items()})
  except InputError as e:
    return ("fail", str(e))
  except Exception as e:  # a bug or an unforeseen library error must not end the run
    return ("fail", f"internal error: {type(e).__name__}: {e}")


def ping():
  """A no-op task: submitting it starts a worker (and its initializer) ahead of the first input."""


def prepare_in_worker(item):
  return prepare(item, _WORKER["processor"], _WORKER["frames"], _WORKER["rule"])
