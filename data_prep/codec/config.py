"""Options of the codec patchifier (PatchifyConfig), their allowed values, and InputError."""
import dataclasses
import math
import os

import numpy as np

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
FUSIONS = ("mean", "max", "sum", "geomean")
RESIZE_FILTERS = ("AREA", "BILINEAR", "BICUBIC", "FAST_BILINEAR", "POINT", "X", "BICUBLIN",
                  "GAUSS", "SINC", "LANCZOS", "SPLINE")  # swscale's scaling filters
# --iframe: "keep" keeps sampled frame t=0 whole and ranks the rest (the published rule);
# "scored" ranks every frame. Either way a frame without vectors is scored as a frame with zero
# motion, on the same scale as the motion-compensated frames.
IFRAME_MODES = ("keep", "scored")
# --transcode: re-encode the sampled span to P-only H.264 when the stream exports no vectors
# ("auto"), always, or never (frame differences for codecs without vectors).
TRANSCODE_MODES = ("auto", "always", "never")
# --seek: "auto" jumps to the keyframe before a sample when the gap to it is long; "never" decodes
# every frame from the start.
SEEK_MODES = ("auto", "never")
# What the scores come from: the source stream's frames over each sampling interval, or a fresh
# encode of the sampled frames alone (data_prep/codec/reencode.py).
SCORE_ON = ("source", "reencode")
# --selector: `codec` is the codec-signal top-K; the others are the baselines of
# data_prep.codec.selection, which ignore the signals.
CODEC = "codec"
DENSE = "dense"
SELECTORS = (CODEC, "random", "uniform_frames", DENSE)


class InputError(ValueError):
  """A bad input file: the message is the reason written to failures.jsonl."""


def is_image_path(path: str) -> bool:
  return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


@dataclasses.dataclass(frozen=True)
class PatchifyConfig:
  """Options of the codec patchifier (the CLI flags of data_prep.codec_patchify)."""
  budget: float = 0.125
  num_frames: int = 16
  image_size: int = 224
  patch_size: int = 14
  fusion: str = "mean"
  motion_weight: float = 1.0
  residual_weight: float = 1.0
  camera_compensation: bool = False
  iframe: str = "keep"
  tie_seed: int = 0  # ties in the top-K are broken by a random order seeded by (this, sample_id)
  transcode: str = "auto"
  seek: str = "auto"
  seek_min_gap: float = 10.0  # seconds: with --seek auto, longer gaps to a sample are skipped
  interval_frames: int = 0  # frames scored per sampling interval, evenly spaced; 0 = every frame
  static_fallback: bool = True
  static_threshold: float = 0.02
  motion_floor: float = 1.0  # pixels: the smallest divisor of the |MV| map (no noise blow-up)
  residual_floor: int = 16  # luma levels, same role; an integer keeps the uint8 clip exact
  min_side: int = 16
  max_aspect: float = 10.0
  image_budget: float = 0.0  # 0: images keep the whole grid; (0, 1]: top-K by gradient saliency
  resize_interpolation: str = "AREA"
  max_mv_pixels: int = 64  # motion vectors are clipped to this many pixels when warping
  selector: str = CODEC  # selection rule for videos: one of SELECTORS
  score_on: str = "source"  # one of SCORE_ON
  # Whole sampled frames stored beside the kept patches (records' dense_t/dense_patches) for the
  # dense-frame and collage branches of training: one per each of D equal bins of the T frames,
  # at a seeded offset; 0 = none, T = every frame.
  dense_frames: int = 0

  @property
  def grid_side(self) -> int:
    return self.image_size // self.patch_size

  @property
  def keep_first_frame(self) -> bool:
    """--iframe keep applies when the frame kept whole is at most half of K (K >= 2*H*W), so
    top-K keeps at least as many patches for motion; below that every frame is ranked."""
    return self.iframe == "keep" and self.num_keep() >= 2 * self.grid_side**2

  def num_keep(self, num_frames=None) -> int:
    """K = round(budget * T*H*W), half rounded up; every patch for the dense selector."""
    t = self.num_frames if num_frames is None else num_frames
    if self.selector == DENSE:
      return t * self.grid_side**2
    return int(math.floor(self.budget * t * self.grid_side**2 + 0.5))

  def validate(self) -> "PatchifyConfig":
    _check_sizes(self)
    _check_modes(self)
    _check_scoring(self)
    return self


def _bad(cfg, key, why):
  raise ValueError(f"config {key}={getattr(cfg, key)!r}: {why}")


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer))


def _check_sizes(cfg):
  if not 0 < cfg.budget <= 1:
    _bad(cfg, "budget", "must be in (0, 1]")
  if cfg.num_frames < 1:
    _bad(cfg, "num_frames", "must be >= 1")
  if cfg.patch_size < 1:
    _bad(cfg, "patch_size", "must be >= 1")
  if cfg.image_size < cfg.patch_size or cfg.image_size % cfg.patch_size:
    _bad(cfg, "image_size", f"must be a positive multiple of patch_size={cfg.patch_size}")
  if cfg.num_keep() < 1:
    _bad(cfg, "budget", f"keeps 0 of {cfg.num_frames * cfg.grid_side**2} patches")


def _check_modes(cfg):
  if cfg.iframe not in IFRAME_MODES:
    _bad(cfg, "iframe", f"must be one of {IFRAME_MODES}")
  if cfg.transcode not in TRANSCODE_MODES:
    _bad(cfg, "transcode", f"must be one of {TRANSCODE_MODES}")
  if cfg.seek not in SEEK_MODES:
    _bad(cfg, "seek", f"must be one of {SEEK_MODES}")
  if not cfg.seek_min_gap > 0:
    _bad(cfg, "seek_min_gap", "must be > 0 seconds")
  if not _is_int(cfg.tie_seed) or cfg.tie_seed < 0:
    _bad(cfg, "tie_seed", "must be an int >= 0")
  if not _is_int(cfg.interval_frames) or cfg.interval_frames < 0:
    _bad(cfg, "interval_frames", "must be an int >= 0 (0 = every frame)")
  if cfg.fusion not in FUSIONS:
    _bad(cfg, "fusion", f"must be one of {FUSIONS}")
  if cfg.score_on not in SCORE_ON:
    _bad(cfg, "score_on", f"must be one of {SCORE_ON}")
  if not _is_int(cfg.dense_frames) or cfg.dense_frames < 0 or (
      cfg.dense_frames and cfg.num_frames % cfg.dense_frames):
    _bad(cfg, "dense_frames", f"must be 0 or a divisor of num_frames={cfg.num_frames}")


def _check_scoring(cfg):
  if cfg.motion_weight < 0 or cfg.residual_weight < 0 or (
      cfg.motion_weight + cfg.residual_weight) <= 0:
    _bad(cfg, "motion_weight", "weights must be >= 0 and not both 0")
  if cfg.motion_floor <= 0:
    _bad(cfg, "motion_floor", "must be > 0")
  if not _is_int(cfg.residual_floor) or not 1 <= cfg.residual_floor <= 255:
    _bad(cfg, "residual_floor", "must be an integer in [1, 255]")
  if cfg.static_threshold < 0:
    _bad(cfg, "static_threshold", "must be >= 0")
  if cfg.min_side < 1:
    _bad(cfg, "min_side", "must be >= 1")
  if cfg.max_aspect < 1:
    _bad(cfg, "max_aspect", "must be >= 1")
  if not 0 <= cfg.image_budget <= 1:
    _bad(cfg, "image_budget", "must be in [0, 1] (0 = whole grid)")
  if cfg.image_budget and math.floor(cfg.image_budget * cfg.grid_side**2 + 0.5) < 1:
    _bad(cfg, "image_budget", "keeps 0 patches")
  if cfg.resize_interpolation not in RESIZE_FILTERS:
    _bad(cfg, "resize_interpolation", f"must be one of {RESIZE_FILTERS}")
  if cfg.max_mv_pixels < 1:
    _bad(cfg, "max_mv_pixels", "must be >= 1")
  if cfg.selector not in SELECTORS:
    _bad(cfg, "selector", f"must be one of {SELECTORS}")
