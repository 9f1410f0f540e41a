"""loss.recipe='official' vs a float64 NumPy transcription of OneVision-Encoder's published loss."""
import math

import jax
import numpy as np
import pytest

from ovenc_jax.loss import discrimination as loss_lib
from ovenc_jax.loss.centers import init_centers, padded_num_classes
from ovenc_jax.loss.defaults import default_loss_config
from tests.helpers.loss_reference import BATCH_AXES, CLASS_AXES, mesh as _mesh, official_reference
from tests.helpers.loss_reference import official_uniforms as _uniforms


def _problem(num_classes, b=16, d=32, num_labels=10, seed=0):
  """Each embedding near the mean of its first three labels' centers: its other labels then have
  high cosines (the filter and 'other labels stay negatives' both matter); some padded labels."""
  rng = np.random.default_rng(seed)
  c_pad = padded_num_classes(num_classes, 8)
  centers = np.zeros((c_pad, d), np.float32)
  centers[:num_classes] = rng.normal(size=(num_classes, d)) * rng.uniform(0.5, 2.0, (num_classes, 1))
  labels = rng.choice(num_classes, (b, num_labels)).astype(np.int32)
  labels[rng.random((b, num_labels)) < 0.15] = -1
  labels[:, :3] = rng.choice(num_classes, (b, 3))
  labels[2, :] = -1                       # a row with no label (an empty segment slot)
  unit = centers[:num_classes] / np.linalg.norm(centers[:num_classes], axis=1, keepdims=True)
  emb = rng.normal(size=(b, d)).astype(np.float32) * 0.3
  emb += unit[np.maximum(labels[:, :3], 0)].sum(axis=1) * np.sqrt(d) / 3 * (labels[:, :1] >= 0)
  return emb, centers, labels


def _cfg(num_classes, **kw):
  cfg = default_loss_config()
  cfg.num_classes = num_classes
  cfg.recipe = "official"
  cfg.update(kw)
  return cfg


@pytest.mark.parametrize("num_classes,rate,thr,scale,mask", [
    # A small scale keeps the zeroed classes' e^0 terms visible next to e^{s cos} (at s=64 they
    # would be within the tolerance of leaving them out).
    (1003, 1.0, 0.3, 8.0, "auto"),      # dense, filter on, fixed-shift path
    pytest.param(2003, 0.1, 0.3, 8.0, "auto", marks=pytest.mark.slow),  # Partial FC: one selection per slot
    pytest.param(2003, 0.1, None, 64.0, "auto", marks=pytest.mark.slow),  # no filter
    # span s*(1+u) > 130: exact row-max path with the zeroed logits
    pytest.param(1003, 0.1, 0.3, 100.0, "auto", marks=pytest.mark.slow),
    (1003, 1.0, 0.3, 8.0, "compare"),   # TPU's own-label mask (loss.own_label_mask), dense
    (2003, 0.1, 0.3, 8.0, "compare"),   # and per slot's selection
])
def test_official_recipe_matches_numpy_transcription(num_classes, rate, thr, scale, mask):
  mesh = _mesh()
  k = 8
  cfg = _cfg(num_classes, sample_rate=rate, fn_threshold=thr, scale=scale, labels_per_step=k,
             own_label_mask=mask)
  emb, centers, labels = _problem(num_classes)
  rng = jax.random.key(3)
  loss_fn = loss_lib.make_loss_fn(mesh, cfg, BATCH_AXES, CLASS_AXES)
  fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
  (loss, metrics), (ge, gc) = fn(emb, centers, labels, rng)
  c_local = len(centers) // 8
  label_u, slot_u = _uniforms(rng, *labels.shape, k, 8, c_local, rate < 1)
  ref, ref_ge, ref_gc, n_terms = official_reference(
      emb, centers, labels, num_classes=num_classes, scale=scale, margin=0.3, thr=thr, k=k,
      label_u=label_u, slot_u=slot_u, n_shards=8, rate=rate)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  for got, want in ((ge, ref_ge), (gc, ref_gc)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=3e-5 * np.abs(want).max())
  assert float(metrics["loss_count"]) == n_terms == float(metrics["num_valid_labels"])
  assert float(metrics["pfc_overflow"]) == 0
  if thr is not None:
    assert float(metrics["fn_filtered_per_sample"]) > 0  # the zeroing filter is exercised
  if rate < 1:  # each slot's selection: ceil(rate * rows per shard) per shard here
    assert float(metrics["pfc_columns"]) == 8 * math.ceil(rate * c_local)
    # Sampling changes the loss: the dense official loss differs.
    dense_cfg = _cfg(num_classes, fn_threshold=thr, scale=scale)
    dense = jax.jit(loss_lib.make_loss_fn(mesh, dense_cfg, BATCH_AXES, CLASS_AXES))
    assert abs(float(dense(emb, centers, labels, rng)[0]) - float(loss)) > 1e-3


def test_official_differs_from_default_where_documented():
  """Same draws, two recipes: the default drops the sample's other labels and the filtered
  classes from the softmax; the official one keeps both (so its loss is larger here)."""
  mesh = _mesh()
  emb, centers, labels = _problem(1003)
  rng = jax.random.key(1)
  off = jax.jit(loss_lib.make_loss_fn(mesh, _cfg(1003), BATCH_AXES, CLASS_AXES))(emb, centers, labels, rng)
  dft = jax.jit(loss_lib.make_loss_fn(mesh, _cfg(1003, recipe="default"), BATCH_AXES, CLASS_AXES))(
      emb, centers, labels, rng)
  assert float(off[0]) > float(dft[0])
  assert float(off[1]["loss_count"]) == float(dft[1]["loss_count"])


def test_recipe_config_error_names_key():
  mesh = _mesh()
  with pytest.raises(ValueError, match="loss.recipe must be one of"):
    loss_lib.make_loss_fn(mesh, _cfg(10, recipe="published"), BATCH_AXES, CLASS_AXES)
  with pytest.raises(ValueError, match="loss.pfc_positive_slack"):
    loss_lib.make_loss_fn(mesh, _cfg(10, pfc_positive_slack=0.0), BATCH_AXES, CLASS_AXES)


def test_official_preset_config_clipping_and_init():
  from ovenc_jax.configs import pretrain
  from ovenc_jax.train import optim
  c = pretrain.get_config("tiny,recipe=official")
  assert (c.loss.recipe, c.loss.sample_rate, c.loss.centers_init_std, c.loss.centers_weight_decay) == (
      "official", 0.1, 0.01, 0.05)
  assert (c.optim.b2, c.optim.schedule, c.optim.power, c.optim.clip_norm, c.optim.clip_per_group) == (
      0.999, "polynomial", 2.0, 5.0, True)
  assert c.optim.warmup_steps == c.total_steps // 10
  assert pretrain.get_config("tiny").loss.recipe == "default"
  with pytest.raises(ValueError, match="recipe='published' is unknown"):
    pretrain.get_config("tiny,recipe=published")
  # The schedule: linear warmup to lr over 10%, then (1 - t)^2 down to 0.
  sched = optim.schedule(c.optim, c.total_steps)
  w = c.optim.warmup_steps
  np.testing.assert_allclose(float(sched(w // 2)), c.optim.lr * (w // 2) / w, rtol=1e-6)
  t = 0.5 * (c.total_steps - w)
  np.testing.assert_allclose(float(sched(w + t)), c.optim.lr * (1 - t / (c.total_steps - w)) ** 2, rtol=1e-5)

  # Per-group clipping: each group's norm capped at 5 on its own; global clipping scales both.
  grads = {"encoder": {"w": np.full((4,), 5.0, np.float32)},            # norm 10
           "centers": np.full((4, 1), 0.5, np.float32)}                 # norm 1
  def clipped(o):
    tx = optim.clip_transform(o)
    out, _ = tx.update(grads, tx.init(grads))
    return np.linalg.norm(out["encoder"]["w"]), np.linalg.norm(out["centers"])
  np.testing.assert_allclose(clipped(c.optim), (5.0, 1.0), rtol=1e-6)
  glob = pretrain.get_config("tiny").optim
  np.testing.assert_allclose(clipped(glob), (10 * 5 / np.sqrt(101), 5 / np.sqrt(101)), rtol=1e-6)

  # Centers N(0, 0.01): row norms ~ 0.01 * sqrt(D), padding rows zero.
  ctr = np.asarray(init_centers(jax.random.key(0), 1000, 256, 8, std=0.01))
  np.testing.assert_allclose(ctr.std(), 0.01, rtol=0.02)
  assert abs(ctr.mean()) < 1e-4


def _branch_batch(rng, num_image, num_video):
  """12 one-sample rows as the input pipeline forms them: stills of the image head, and clips of
  the video head (ids shifted by its offset) through the codec, frames and collage branches. Each
  half of the rows (the trainer's two microbatches: rows p::2) holds the three branches."""
  from ovenc_jax.input import branches, features, packing
  kinds = ["image", "image", branches.CODEC, branches.FRAMES, branches.COLLAGE, branches.CODEC,
           "image", "image", branches.CODEC, branches.FRAMES, branches.COLLAGE, branches.FRAMES]
  kinds = [kinds[i // 2 + 6 * (i % 2)] for i in range(12)]  # row r in microbatch r % 2
  rows = []
  for r, kind in enumerate(kinds):
    still = kind == "image"
    grid = (1, 8, 8) if still else (8, 4, 4)
    flat = np.sort(rng.choice(int(np.prod(grid)), 64, replace=False))
    rec = dict(patches=rng.integers(0, 256, (64, 14, 14, 3), dtype=np.uint8),
               positions=np.stack(np.unravel_index(flat, grid), -1).astype(np.int32),
               grid=np.array(grid), frame_types="I" * grid[0], source=f"s{r}", sample_id=r,
               labels=(rng.choice(num_image, 3, replace=False) if still
                       else num_image + rng.choice(num_video, 3, replace=False)).astype(np.int32),
               signal="image" if still else "mv", class_label=-1, frame_indices=np.arange(grid[0]),
               scores=np.zeros(64, np.float16), dense_t=np.arange(0 if still else 8, dtype=np.int32),
               dense_patches=rng.integers(0, 256, (0 if still else 128, 14, 14, 3), dtype=np.uint8))
    if not still:
      rec["branch"] = kind
    f = features.sample_features(rec, np.random.default_rng(r), patch_size=14, tokens_per_row=64,
                                 max_labels=3, hflip=False, branch_frames=4)
    rows.append(packing.pad_row(f, 64))
  return {k: np.stack([row[k] for row in rows]) for k in rows[0]}, kinds


@pytest.mark.slow
def test_official_steps_match_the_published_step_transcription(tmp_path):
  """recipe=official with two heads (loss weights, a per-head center lr, Partial FC on one), two
  accumulated passes and per-head per-shard clipping, against published_step in float64: the loss
  at step 0 and after optimizer steps on the same batch, and the centers after each step (AdamW on
  the published lr curve). The embeddings come from this project's encoder at each step's weights,
  computed per branch and placed back by row as the published step does."""
  from ovenc_jax.configs import pretrain
  from ovenc_jax.input import branches
  from ovenc_jax.train.trainer import Trainer
  from tests.helpers import loss_reference as ref

  num_image, num_video, passes, steps = 40, 300, 2, 3
  c = pretrain.get_config("variant=tiny,recipe=official")
  c.input.update(tokens_per_row=64, max_segments=1, pack=False, global_batch_size=12, max_labels=3)
  c.loss.update(scale=8.0, margin=0.3, fn_threshold=0.1, labels_per_step=8)
  c.loss.heads = [dict(name="image", num_classes=num_image, weight=1.0, sample_rate=1.0),
                  dict(name="video", num_classes=num_video, weight=0.5, sample_rate=0.1, centers_lr_mult=2.0)]
  # clip_norm small enough that every head's shards are clipped; eps 1e-5 instead of 1e-8 bounds how
  # far Adam's g / (|g| + eps) can move for an entry whose gradient is near float32 rounding.
  c.optim.update(lr=1e-2, schedule="polynomial_as_run", warmup_steps=1, grad_accum_steps=passes, clip_norm=0.05,
                 eps=1e-5)
  c.total_steps = 6
  trainer = Trainer(c, str(tmp_path), devices=jax.devices()[:2])
  shards = 2  # the centers' rows are split over both devices
  batch, kinds = _branch_batch(np.random.default_rng(0), num_image, num_video)
  state = trainer.init_state(0)
  heads = [dict(weight=1.0, num_classes=num_image, rate=1.0, lr_mult=1.0),
           dict(weight=0.5, num_classes=num_video, rate=0.1, lr_mult=2.0)]
  for h in heads:
    h.update(scale=8.0, margin=0.3, thr=0.1, k=8, n_shards=shards)
  names = ("image", "video")
  centers = [np.asarray(state["params"]["centers"][n], np.float64) for n in names]
  adam = [None, None]
  lrs = ref.published_lr(1e-2, 1, 6, steps)

  def embed(enc, rows):
    # Each call padded to 3 rows (empty rows are their own segments), so it compiles once.
    sub = {k: np.concatenate([batch[k][rows], np.zeros_like(batch[k][:3 - rows.size])])
           for k in ("patches", "positions", "segment_ids")}
    with jax.set_mesh(trainer.mesh):
      return np.asarray(trainer._embed_fn(enc, sub), np.float64)[:rows.size]

  for step in range(steps):
    enc = jax.device_get(state["params"]["encoder"])
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    embs, labels = [], []
    for p in range(passes):
      rows = np.arange(p, 12, passes)
      # The published step: one backbone call for the stills, one for the codec and frames clips, one
      # for the collages; each head's embeddings assembled by row.
      full = np.zeros((rows.size, 128))
      for group in (("image",), (branches.CODEC, branches.FRAMES), (branches.COLLAGE,)):
        mine = np.array([kinds[r] in group for r in rows])
        full[mine] = embed(enc, rows[mine])
      lab = batch["labels"][rows, 0]
      is_image = np.array([kinds[r] == "image" for r in rows])
      embs.append([full[is_image], full[~is_image]])
      labels.append([lab[is_image], lab[~is_image] - num_image])

    def uniforms(p, h, key=key):
      # The trainer's stream (step key, then the microbatch, then the bank) fixes the sampled
      # negatives; with 3 labels and 8 slots a sample's labels are all used, so label_u is unused.
      return ref.official_uniforms(jax.random.fold_in(jax.random.fold_in(key, p), h), 6, 3, 8, shards,
                                   centers[h].shape[0] // shards, heads[h]["rate"] < 1)

    want_loss, grads = ref.published_step(embs, centers, labels, heads, uniforms, passes=passes)
    state, metrics = trainer.train_step(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), want_loss, rtol=2e-5, err_msg=f"step {step}")
    for h, head in enumerate(heads):
      g = ref.clip_shards(grads[h], 0.05, shards)
      centers[h], adam[h] = ref.adamw(centers[h], g, adam[h], lr=lrs[step] * head["lr_mult"], b1=0.9,
                                      b2=0.999, eps=1e-5, weight_decay=0.05)
      got = np.asarray(state["params"]["centers"][names[h]])
      np.testing.assert_allclose(got, centers[h], rtol=0, atol=1e-3 * lrs[step] * head["lr_mult"],
                                 err_msg=f"{names[h]} centers after step {step}")
  assert abs(float(metrics["loss"]) - want_loss) < 1e-3 * want_loss
