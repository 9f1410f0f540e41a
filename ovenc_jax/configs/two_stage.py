"""The published two-stage schedule: `two_stage.py:stage=1,images=DIR` then `stage=2,images=DIR,videos=DIR,init=STAGE1_WORKDIR`.

Stage 1 trains the image head alone; stage 2 starts from stage 1's last checkpoint (encoder and the
image head's centers, through init_from), adds a fresh video head and trains both, their losses summed
with per-head weights. Other args (variant, recipe, geometry, branches, pod, runlocal) pass to pretrain.py;
recipe=official is the default here. Per-head keys: `--config.loss.heads` (banks.py's _BANK_KEYS).
"""
from ovenc_jax.configs import common
from ovenc_jax.configs import pretrain

# Stage 2 of the published large run: a lower peak lr and a short warmup, as it continues stage 1.
STAGE2_LR, STAGE2_WARMUP_DIVISOR = 5e-5, 1000


def get_config(arg=None):
  a = common.parse_arg(arg, variant="tiny", runlocal=False, recipe="official", pod="", geometry="", branches="",
                       stage=1, images="", videos="", init="", image_classes=0, video_classes=0,
                       image_weight=1.0, video_weight=1.0)
  if a.stage not in (1, 2):
    raise ValueError(f"config arg stage={a.stage} must be 1 or 2")
  if not a.images or (a.stage == 2 and not (a.videos and a.init)):
    raise ValueError("config args: stage 1 needs images=DIR, stage 2 images=DIR, videos=DIR and "
                     "init=STAGE1_WORKDIR")
  passed = ",".join(f"{k}={a[k]}" for k in ("variant", "recipe", "pod", "geometry", "branches") if a[k])
  c = pretrain.get_config(passed + (",runlocal" if a.runlocal else "") + f",data={a.images}")
  for key in ("image_classes",) + (("video_classes",) if a.stage == 2 else ()):
    if not a[key] and not c.loss.num_classes:
      raise ValueError(f"config arg {key}=N is needed: the head's number of centers")
  image = dict(name="image", num_classes=a.image_classes or int(c.loss.num_classes), weight=a.image_weight)
  c.input.sources = [{"path": a.images, "weight": 1.0, "bank": "image"}]
  c.loss.heads = [image]
  if a.stage == 2:
    # Equal per-step shares of images and clips, as the published stage 2's equal batch sizes.
    c.input.sources = c.input.sources + [{"path": a.videos, "weight": 1.0, "bank": "video"}]
    c.loss.heads = [image, dict(name="video", num_classes=a.video_classes or int(c.loss.num_classes),
                                weight=a.video_weight)]
    c.init_from = a.init
    if not a.runlocal and a.variant != "tiny":
      c.optim.lr = STAGE2_LR
      c.optim.warmup_steps = c.get_ref("total_steps") // STAGE2_WARMUP_DIVISOR
  return c
