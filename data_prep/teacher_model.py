"""A Hugging Face vision tower as a teacher: loading, frame embedding, and the published video recipe."""
import functools

import numpy as np

from ovenc_format import paths as pathio

# model_type (of the checkpoint's config.json) -> the vision-only class and the output that is its
# image embedding. A full two-tower checkpoint (clip, siglip) loads only its vision half.
_VISION_CLASSES = {
    "clip": ("CLIPVisionModelWithProjection", "image_embeds"),
    "clip_vision_model": ("CLIPVisionModelWithProjection", "image_embeds"),
    "siglip": ("SiglipVisionModel", "pooler_output"),
    "siglip_vision_model": ("SiglipVisionModel", "pooler_output"),
    "siglip2": ("Siglip2VisionModel", "pooler_output"),
    "siglip2_vision_model": ("Siglip2VisionModel", "pooler_output"),
    "dinov2": ("Dinov2Model", "pooler_output"),
}
# Any other model_type: AutoModel, and the first of these outputs it returns.
_FALLBACK_OUTPUTS = ("image_embeds", "pooler_output")


def local_model(model: str) -> str:
  """A folder from_pretrained can read: a gs:// (or other URL) folder is staged once per host into
  ovenc_format.paths' cache; local folders and hub ids are returned as they are."""
  if not pathio.is_remote(model):
    return model
  try:
    return pathio.stage_dir(model)
  except Exception as e:  # the backends raise many kinds (OSError, HttpError, auth errors)
    raise ValueError(f"--model {model!r}: cannot stage the model folder ({type(e).__name__}: {e})") from e


def model_type(model: str) -> str:
  from transformers import AutoConfig
  try:
    return AutoConfig.from_pretrained(local_model(model)).model_type
  except (OSError, ValueError) as e:
    raise ValueError(f"--model {model!r}: cannot read a transformers config ({e})") from e


def load_processor(model: str):
  """The checkpoint's own image processor (AutoImageProcessor); without torchvision, whose absence
  makes AutoImageProcessor unavailable, the PIL class of the same processor (same arithmetic)."""
  import transformers
  name = model
  model = local_model(model)
  try:
    try:
      return transformers.AutoImageProcessor.from_pretrained(model)
    except ImportError:
      cfg, _ = transformers.ImageProcessingMixin.get_image_processor_dict(model)
      name = str(cfg.get("image_processor_type", "")).removesuffix("Fast").removesuffix("Pil")
      cls = getattr(transformers, name + "Pil", None) or getattr(transformers, name, None)
      if cls is None:
        raise ValueError(f"unknown image_processor_type {name!r}") from None
      return cls.from_pretrained(model)
  except (OSError, ValueError) as e:
    raise ValueError(f"--model {name!r}: no image processor (preprocessor_config.json): {e}") from e


class Teacher:
  """A vision tower + its image processor. embed(frames) -> float32 [N, D] image embeddings."""

  def __init__(self, model: str, device: str = "cpu", dtype: str = "float32"):
    import torch
    import transformers
    self.name = model
    kind = model_type(model)
    cls_name, self.output = _VISION_CLASSES.get(kind, ("AutoModel", None))
    cls = getattr(transformers, cls_name)
    try:
      self.model = cls.from_pretrained(local_model(model), dtype=getattr(torch, dtype))
    except (OSError, ValueError) as e:
      raise ValueError(f"--model {model!r}: cannot load {cls_name} ({e})") from e
    self.model.eval().to(device)
    self.device = device
    self.processor = load_processor(model)
    self.model_type = kind

  def embed_inputs(self, inputs: dict) -> np.ndarray:
    """Image embeddings [N, D] float32 of processor outputs (pixel_inputs)."""
    import torch
    dtype = next(self.model.parameters()).dtype
    with torch.inference_mode():
      feed = {k: torch.from_numpy(v).to(self.device, dtype=dtype if v.dtype.kind == "f" else None)
              for k, v in inputs.items()}
      out = self.model(**feed)
      names = (self.output,) if self.output else _FALLBACK_OUTPUTS
      emb = next((getattr(out, n) for n in names if getattr(out, n, None) is not None), None)
      if emb is None:
        raise ValueError(f"--model {self.name!r} ({self.model_type}) returns none of {names}")
      return emb.float().cpu().numpy()

  @functools.cached_property
  def dim(self) -> int:
    """Width of one image embedding, from the model run once on a grey frame (any model type,
    and a processor that does not fit its model fails here, before the run starts)."""
    grey = np.full((64, 64, 3), 128, np.uint8)
    arrays = self.processor(images=[grey], return_tensors="np")
    return int(self.embed_inputs({k: np.asarray(v) for k, v in arrays.items()}).shape[-1])


def check_recipe(frames: int, per_frame_dim: int, dim: int):
  """ValueError naming the flag when the recipe does not fit a model of width `dim`."""
  if frames < 1:
    raise ValueError(f"--frames must be >= 1, got {frames}")
  if per_frame_dim < 0 or per_frame_dim > dim:
    raise ValueError(f"--per_frame_dim must be in [0, {dim}] (the model's embedding width; "
                     f"0 = all), got {per_frame_dim}")


def _unit(x: np.ndarray) -> np.ndarray:
  n = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.maximum(n, 1e-12)


def video_embedding(per_frame: np.ndarray, per_frame_dim: int) -> np.ndarray:
  """The published video recipe on [T, D] frame embeddings: keep the first per_frame_dim dims
  (0 = all), L2-normalise each frame, concatenate the T frames, L2-normalise -> [T * dim]."""
  kept = per_frame[:, :per_frame_dim] if per_frame_dim else per_frame
  return _unit(_unit(kept.astype(np.float32)).reshape(-1)).astype(np.float32)


def image_embedding(emb: np.ndarray) -> np.ndarray:
  """An image's embedding used directly (L2-normalised, every dim)."""
  return _unit(np.asarray(emb, np.float32)).astype(np.float32)


def frame_indices(n: int, frames: int, rule: str = "linspace") -> np.ndarray:
  """Indices of the `frames` sampled frames of an n-frame video.

  linspace: numpy.linspace(0, n - 1, frames) rounded, first and last frame included.
  segment: the published extractor's rule: step = max(1, n // frames), the middle of each step,
  clipped to the last frame (short videos repeat it)."""
  if n < 1:
    raise ValueError(f"a video of {n} frames has no frame to sample")
  if rule == "linspace":
    return np.rint(np.linspace(0, n - 1, frames)).astype(np.int64)
  if rule == "segment":
    step = max(1, n // frames)
    return np.minimum(np.arange(frames) * step + step // 2, n - 1).astype(np.int64)
  raise ValueError(f"--frame_rule must be 'linspace' or 'segment', got {rule!r}")


FRAME_RULES = ("linspace", "segment")
