"""Pretraining config: `ovenc_jax/configs/pretrain.py:variant=tiny[,runlocal][,data=SOURCES][,recipe=official][,pod=v5e-256][,geometry=official][,branches=official]`.

SOURCES is one shard folder or glob, or a weighted mix `videos/:0.7+images/:0.3` (also as `sources=`).
Built from plain values and the light defaults modules next to the code (none imports jax).
"""
import ml_collections

from ovenc_jax.configs import common
from ovenc_jax.eval.defaults import ATTENTIVE_IN_TRAINING
from ovenc_jax.input.defaults import BRANCH_SPLITS, default_input_config, parse_sources
from ovenc_jax.loss.defaults import default_loss_config
from ovenc_jax.model.defaults import model_config
from ovenc_jax.train.defaults import default_optim_config


def get_config(arg=None):
  a = common.parse_arg(arg, variant="tiny", runlocal=False, data="", sources="", eval_data="",
                       recipe="default", pod="", geometry="", branches="")
  if a.data and a.sources:
    raise ValueError("config args data= and sources= name the same thing; give one")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config(a.variant)
  c.mesh = common.mesh_config(data=-1, fsdp=1, tensor=1)
  c.logical_axis_rules = common.LOGICAL_AXIS_RULES

  c.input = default_input_config()
  c.input.sources = parse_sources(a.data or a.sources) if a.data or a.sources else []
  c.input.global_batch_size = 256
  c.input.tokens_per_row = 1024
  c.input.max_segments = 4

  c.loss = default_loss_config()
  c.loss.num_classes = 0  # 0 = the class count of input.label_table
  c.optim = default_optim_config()

  c.total_steps = 100_000
  c.log_every, c.ckpt_every, c.keep_ckpts, c.async_ckpt = 50, 1000, 3, True
  # Steps with a non-finite loss or gradient norm are skipped; this many in a row stop the run.
  c.max_bad_steps = 5
  # Metrics reach the host once per log window; True fetches them every step (a host sync per step).
  c.fetch_metrics_every_step = False
  c.eval_every = 5000
  # "start,count": a jax.profiler trace of steps start..start+count-1 into workdir/tensorboard.
  c.profile_steps = ""
  # Weights & Biases (the `wandb` extra): off while project is empty.
  c.wandb = ml_collections.ConfigDict(dict(project="", entity="", name=""))
  c.eval = ml_collections.ConfigDict(dict(
      path=a.eval_data, tokens_per_row=1024, batch_size=64, knn_k=10, linear_probe=True,
      attentive=ATTENTIVE_IN_TRAINING))
  c.init_from = ""  # a workdir (e.g. from import_torch) whose params start training
  # None is a documented value of these (and sources a list): make them settable by flags.
  common.allow_none(c, "input.sources", "loss.fn_threshold", "optim.clip_norm")

  if a.variant == "tiny" or a.runlocal:  # laptop / CPU / tests
    c.input.update(global_batch_size=16, tokens_per_row=256, max_segments=2)
    c.loss.num_classes = 64
    # s=64/m=0.3 suit ~1M centers; with tens of centers they stall a tiny model for hundreds of steps.
    c.loss.update(scale=32.0, margin=0.2)
    c.optim.update(lr=2e-3, warmup_steps=20)
    c.total_steps, c.log_every, c.ckpt_every, c.eval_every = 200, 10, 50, 100
    c.eval.update(tokens_per_row=256, batch_size=16)
  if a.recipe not in RECIPE_PRESETS:
    raise ValueError(f"config arg recipe={a.recipe!r} is unknown; known: {sorted(RECIPE_PRESETS)}")
  RECIPE_PRESETS[a.recipe](c)
  if a.geometry:  # frames, token budget, timeline, patch and image sizes (input.defaults.GEOMETRIES)
    common.apply_geometry(c, a.geometry)
  if a.branches:  # the three-branch video batch (input.branches; clips prepped with --dense_frames)
    c.input.branches = common.branch_split(a.branches, BRANCH_SPLITS)
  if a.pod:  # mesh, batch, dtype, remat, attention for a pod shape (common.POD_PRESETS)
    common.apply_pod_preset(c, a.pod)
  return c


def official_recipe(c):
  """OneVision-Encoder's published setup (docs/design.md, 'Training recipes', lists each difference)."""
  c.loss.update(recipe="official", sample_rate=0.1, centers_init_std=0.01, centers_weight_decay=0.05)
  c.optim.update(b2=0.999, schedule="polynomial", power=2.0, end_lr_ratio=0.0, clip_norm=5.0)
  # A tenth of the run, as a reference: it follows total_steps set later (--config.total_steps=N)
  # until optim.warmup_steps is set itself.
  c.optim.warmup_steps = c.get_ref("total_steps") // 10
  c.optim.clip_per_group = True  # encoder and centers each clipped to clip_norm
  # The published run clips each head's slice of centers on each GPU, and decays every backbone weight.
  c.optim.update(clip_centers="per_head_shard", decay_mask="all")
  # Stills: the published random resized crop (area 0.7-1, ratio 0.8-1.25) and flip; clips unchanged.
  c.input.image_augment = dict(scale=[0.7, 1.0], ratio=[0.8, 1.25], hflip=True)


def default_recipe(c):
  """The repository's own setup: the defaults as built above."""


RECIPE_PRESETS = {"default": default_recipe, "official": official_recipe}
