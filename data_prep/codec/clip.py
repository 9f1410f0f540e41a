"""One input file -> one record: decode, score, select and cut the patches (patchify_file)."""
import dataclasses
import math
import os

import av
import numpy as np

from ovenc_format import records
from data_prep.codec import decode, selection
from data_prep.codec.reencode import reencode_scores
from data_prep.codec.config import InputError, PatchifyConfig, is_image_path
from data_prep.codec.scoring import IntervalScorer, select_patches
from data_prep.codec.signals import normalise, patch_means, percentile95


def _patches_from(rgb: np.ndarray, hw: np.ndarray, p: int) -> np.ndarray:
  g = rgb.shape[0] // p
  tiles = rgb.reshape(g, p, g, p, 3).transpose(0, 2, 1, 3, 4)
  return tiles[hw[:, 0], hw[:, 1]]


def dense_frame_choice(num_frames: int, dense_frames: int, seed) -> np.ndarray:
  """t of the stored whole frames: one per each of `dense_frames` equal bins of the sampled frames,
  at an offset drawn uniformly within the bin (seeded by the record's tie seed and sample id)."""
  size = num_frames // dense_frames
  rng = np.random.default_rng(np.random.SeedSequence([int(x) for x in np.atleast_1d(seed)] + [size]))
  return (np.arange(dense_frames) * size + rng.integers(0, size, dense_frames)).astype(np.int32)


def _decode_once(path, cfg, num_decoded, seed, free_between_samples):
  """_patchify_video on a fresh open of path."""
  container = decode.open_video(path)
  try:
    return _patchify_video(container, cfg, num_decoded, seed, free_between_samples)
  finally:
    container.close()


def patchify_video(path: str, cfg: PatchifyConfig, seed=0,
                   free_between_samples: bool = False) -> dict:
  """Decodes one video and returns its record fields (without class_label/labels).

  `seed` seeds the tie-breaking order of the top-K and the baseline selectors (patchify_file passes
  (tie_seed, sample_id); the baselines use the sample_id). `free_between_samples`: the benchmark
  counterfactual of IntervalScorer.
  """
  container = decode.open_video(path)
  try:
    declared = decode.declared_frames(container, path)
    if declared < 1:
      raise InputError("video stream has no frames")
    try:
      fields, decoded = _patchify_video(container, cfg, declared, seed, free_between_samples)
      seek_failed = False
    except decode.SeekFailed:
      seek_failed = True
  finally:
    container.close()
  if seek_failed:
    # A seek landed where frame indices cannot be trusted: decode from the start instead.
    cfg = dataclasses.replace(cfg, seek="never")
    fields, decoded = _decode_once(path, cfg, declared, seed, free_between_samples)
  if fields is None:
    if decoded < 1:
      raise InputError("video stream decoded to 0 frames")
    # The header over-counted (edit lists, damaged index): plan again on the true count.
    fields, decoded = _decode_once(path, cfg, decoded, seed, free_between_samples)
    if fields is None:
      raise InputError(f"frame count unstable between two decodes ({decoded})")
  if (cfg.transcode == "auto" and decoded > 1
      and not {"mv", "transcode"} & set(fields["signal"].split("+"))):
    # A codec that usually exports vectors exported none here (e.g. an all-intra stream).
    return patchify_video(path, dataclasses.replace(cfg, transcode="always"), seed,
                          free_between_samples)
  return fields


def _flush(encoder, scorer):
  for m, coded, mvs in encoder.flush():
    scorer.add(m, coded, mvs)


def _score_frames(container, stream, idx, fps, cfg, seek, transcode, free_between_samples, score=True):
  """Decodes up to the last sample, feeding every frame to an IntervalScorer (`score` False: only
  the sampled frames are kept, for --score_on reencode).

  Returns (scorer or None if nothing decoded, display rotation, the sampled frames by index,
  the last frame index decoded).
  """
  s = cfg.image_size
  sampled = set(idx.tolist())
  scorer, rot_k, encoder, size = None, 0, None, None
  held = {}  # decoded index -> sampled frame
  n = -1
  try:
    for n, frame, restarted in decode.decoded_frames(container, stream, idx, fps, cfg, seek):
      if scorer is None:
        decode.check_size(frame.width, frame.height, cfg)
        rot_k = decode.rotation_k(frame.rotation)
        size = (frame.width, frame.height)
        scorer = IntervalScorer(cfg, idx, s if transcode else frame.height,
                                s if transcode else frame.width, rot_k, free_between_samples)
      elif transcode and (frame.width, frame.height) != size:
        raise InputError(f"frame size changes mid-stream ({size[0]}x{size[1]} -> "
                         f"{frame.width}x{frame.height})")
      if restarted:
        if encoder is not None:
          _flush(encoder, scorer)
          encoder = None
        scorer.restart()
      if n in sampled:
        held[n] = frame
      if not score:
        continue
      if transcode:
        encoder = encoder or decode.Transcoder(s, cfg.resize_interpolation)
        for m, coded, mvs in encoder.push(frame, n):
          scorer.add(m, coded, mvs)
      else:
        scorer.add(n, frame, decode.frame_vectors(frame) if scorer.wants(n) else None)
    if encoder is not None:
      _flush(encoder, scorer)
  except av.error.FFmpegError as e:
    raise InputError(f"decode error at frame {n + 1} ({type(e).__name__}: "
                     f"{e.strerror or e})") from e
  return scorer, rot_k, held, n


def _select(scores, has_mvs, tokens, cfg, seed):
  """-> (positions [K, 3], the record's signal tokens)."""
  if cfg.selector != selection.CODEC:  # a baseline rule: the record's signal names it, not the maps
    # Seeded by the video alone (its sample_id), so every budget draws from the same stream.
    video_seed = seed[-1] if isinstance(seed, tuple) else seed
    # The baselines are the plain rules: --iframe keep does not apply to them.
    positions = selection.select(cfg.selector, scores.shape, cfg.num_keep(scores.shape[0]),
                                 video_seed)
    return positions, {cfg.selector}
  positions, extra = select_patches(scores, has_mvs, cfg, seed)
  return positions, tokens | extra


def _patchify_video(container, cfg, num_decoded, seed=0, free_between_samples=False):
  """Returns (fields, frames decoded); fields is None if the stream ended before the plan."""
  p, s = cfg.patch_size, cfg.image_size
  idx = selection.sample_indices(num_decoded, cfg.num_frames)
  stream = container.streams.video[0]
  fps, codec = decode.stream_info(stream)
  seek = decode.seekable(container, stream, fps, num_decoded, cfg)
  decode.prepare_stream(stream)
  transcode = cfg.transcode == "always" or (
      cfg.transcode == "auto" and codec not in decode.MV_CODECS)
  reencode = cfg.score_on == "reencode"
  scorer, rot_k, held, n = _score_frames(container, stream, idx, fps, cfg, seek, transcode and not reencode,
                                         free_between_samples, score=not reencode)
  if n < int(idx[-1]):
    return None, n + 1
  if reencode:
    scores, has_mvs, tokens = reencode_scores([held[int(i)] for i in idx], cfg, rot_k)
  else:
    scores, has_mvs, tokens = scorer.finish()
  if transcode and not reencode:
    tokens.add("transcode")
  positions, tokens = _select(scores, has_mvs, tokens, cfg, seed)
  k = positions.shape[0]
  patches = np.empty((k, p, p, 3), np.uint8)

  def rgb_of(t):
    return np.rot90(decode.to_rgb(held[int(idx[t])], s, cfg.resize_interpolation), rot_k)

  for t in np.unique(positions[:, 0]):
    rows = np.flatnonzero(positions[:, 0] == t)
    patches[rows] = _patches_from(rgb_of(t), positions[rows, 1:], p)
  dense = {}
  if cfg.dense_frames:
    g = cfg.grid_side
    every = selection.unravel_positions(np.arange(g * g), (1, g, g))[:, 1:]
    dense_t = dense_frame_choice(len(idx), cfg.dense_frames, seed)
    dense = dict(dense_t=dense_t, dense_patches=np.concatenate([_patches_from(rgb_of(t), every, p)
                                                                for t in dense_t]))
  frames = [held[int(i)] for i in idx]
  patch_scores = scores[positions[:, 0], positions[:, 1], positions[:, 2]]
  if cfg.keep_first_frame and "static_fallback" not in tokens:
    patch_scores[positions[:, 0] == 0] = np.inf  # kept whole by rule: first under any later cut
  return dict(patches=patches, positions=positions, grid=np.asarray(scores.shape, np.int32),
              frame_types="".join(decode.picture_type(f) for f in frames),
              signal=records.canonical_signal(tokens), scores=scores,
              frame_indices=idx.astype(np.int32),
              timestamps=np.asarray([np.nan if f.time is None else f.time for f in frames]),
              fps=fps, codec=codec, patch_scores=patch_scores, **dense), n + 1


def _image_saliency(luma: np.ndarray) -> np.ndarray:
  """Gradient magnitude of luma (central differences), the saliency used for image budgets."""
  f = luma.astype(np.float32)
  gx = np.zeros_like(f)
  gy = np.zeros_like(f)
  gx[:, 1:-1] = f[:, 2:] - f[:, :-2]
  gy[1:-1] = f[2:] - f[:-2]
  return np.hypot(gx, gy)


def patchify_image(path: str, cfg: PatchifyConfig, seed=0) -> dict:
  """One still image -> t=0 record: the whole grid, or top-K by saliency if image_budget > 0."""
  from PIL import Image, ImageOps, UnidentifiedImageError
  try:
    with Image.open(path) as im:
      im = ImageOps.exif_transpose(im)  # EXIF rotation, like the display matrix for video
      decode.check_size(im.width, im.height, cfg)
      rgb_img = im.convert("RGB")
      codec = (im.format or "").lower()
  except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
    raise InputError(f"cannot read image ({type(e).__name__}: {e})") from e
  g, p, s = cfg.grid_side, cfg.patch_size, cfg.image_size
  # Resize through swscale too, so images and video frames are resampled the same way.
  frame = av.VideoFrame.from_ndarray(np.asarray(rgb_img, np.uint8), format="rgb24")
  rgb = decode.to_rgb(frame, s, cfg.resize_interpolation)
  grid = (1, g, g)
  if cfg.image_budget:
    k = int(math.floor(cfg.image_budget * g * g + 0.5))
    luma = (rgb.astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32))
    sal = _image_saliency(luma)
    sal = normalise(sal, percentile95(sal), 1.0)
    scores = patch_means(sal, g)[None]
    positions = selection.select_top_k(scores, k, seed=seed)
    signal = "image+saliency"
  else:
    positions = selection.unravel_positions(np.arange(g * g), grid)
    scores = np.ones(grid)
    signal = "image"
  return dict(patches=_patches_from(rgb, positions[:, 1:], p), positions=positions,
              grid=np.asarray(grid, np.int32), frame_types="I", signal=signal, scores=scores,
              frame_indices=np.zeros(1, np.int32), timestamps=np.zeros(1), fps=0.0, codec=codec,
              patch_scores=scores[0][positions[:, 1], positions[:, 2]])


def patchify_file(path: str, cfg: PatchifyConfig, class_label: int = -1,
                  with_scores: bool = False, source: str = None,
                  free_between_samples: bool = False) -> dict:
  """Any local input path -> a full record dict (validated by records). InputError if bad.

  `source` (default: path) is what the record names, e.g. the URL a local copy came from.
  `free_between_samples` is a benchmark counterfactual (IntervalScorer), for videos only.
  """
  if os.path.isfile(path):
    size = os.path.getsize(path)
    if size == 0:
      raise InputError("empty file (0 bytes)")
  elif not os.path.exists(path):
    raise InputError("file does not exist")
  source = path if source is None else source
  sample_id = records.sample_id_for(source)
  seed = (int(cfg.tie_seed), sample_id)
  fields = (patchify_image(path, cfg, seed) if is_image_path(path)
            else patchify_video(path, cfg, seed, free_between_samples))
  scores = fields.pop("scores")
  fields["scores"] = fields.pop("patch_scores")
  rec = dict(fields, source=source, sample_id=sample_id, labels=np.zeros([0], np.int32),
             class_label=int(class_label))
  rec = records.validate_record(rec)
  if with_scores:
    rec["grid_scores"] = scores  # [T, H, W] slot scores (not a record field)
  return rec


def process_path(path: str, label: int, cfg, source: str = None,
                 free_between_samples: bool = False) -> tuple:
  """-> ('ok', record bytes, stats) or ('fail', reason). Never raises for a bad input."""
  try:
    rec = patchify_file(path, cfg, label, source=source,
                        free_between_samples=free_between_samples)
    data = records.encode_record(rec)
  except InputError as e:
    return ("fail", str(e))
  except Exception as e:  # a bug or an unforeseen library error must not end the run
    return ("fail", f"internal error: {type(e).__name__}: {e}")
  return ("ok", data, {"tokens": int(rec["positions"].shape[0]), "signal": rec["signal"],
                       "kind": "image" if rec["signal"].startswith("image") else "video"})
