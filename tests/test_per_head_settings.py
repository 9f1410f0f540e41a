"""Per-head settings: 100 labels a sample, weighted head losses, per-head center lr and clipping, decay of every weight, two stages."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ovenc_jax.loss import banks as banks_lib
from ovenc_jax.loss.centers import padded_num_classes
from ovenc_jax.loss.defaults import default_loss_config
from ovenc_jax.train import optim
from ovenc_jax.train.defaults import default_optim_config
from tests.helpers.loss_reference import BATCH_AXES, CLASS_AXES, close_grads, dense_reference, mesh as _mesh

OCR = dict(name="ocr", num_classes=500, labels_per_step=100, weight=0.5, fn_threshold=None, centers_lr_mult=0.1)
IMAGE = dict(name="image", num_classes=203, labels_per_step=10, weight=1.0, fn_threshold=0.4)


def _loss_cfg(heads):
  cfg = default_loss_config()
  cfg.heads = heads
  return cfg


@pytest.mark.slow
def test_hundred_labels_and_weighted_heads_match_dense_reference():
  rng = np.random.default_rng(0)
  b, d = 16, 32
  centers = {}
  for h in (OCR, IMAGE):
    c = np.zeros((padded_num_classes(h["num_classes"], 8), d), np.float32)
    c[:h["num_classes"]] = rng.normal(size=(h["num_classes"], d))
    centers[h["name"]] = c
  # Rows 0..7: OCR samples with 100 labels each (some rows shorter); rows 8..15: images with <= 10,
  # shifted by the image bank's offset (500) as the input pipeline does.
  labels = np.full((b, 100), -1, np.int32)
  for i in range(8):
    labels[i, :100 - 7 * i] = rng.choice(500, 100 - 7 * i, replace=False)
  for i in range(8, 16):
    labels[i, :i - 6] = 500 + rng.choice(203, i - 6, replace=False)
  emb = rng.normal(size=(b, d)).astype(np.float32)
  loss_fn = banks_lib.make_banks_loss_fn(_mesh(), _loss_cfg([OCR, IMAGE]), BATCH_AXES, CLASS_AXES)
  (loss, metrics), (ge, gc) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(
      emb, centers, labels, jax.random.key(0))
  ocr_lab = np.where((labels >= 0) & (labels < 500), labels, -1)
  img_lab = np.where(labels >= 500, labels - 500, -1)
  ref_o, ge_o, gc_o = dense_reference(emb, centers["ocr"], ocr_lab, 500, 64.0, 0.3, None)
  ref_i, ge_i, gc_i = dense_reference(emb, centers["image"], img_lab, 203, 64.0, 0.3, 0.4)
  assert float(metrics["ocr/loss_count"]) == (ocr_lab >= 0).sum() == 604
  np.testing.assert_allclose(float(metrics["ocr/loss"]), ref_o, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["image/loss"]), ref_i, rtol=1e-5)
  np.testing.assert_allclose(float(loss), 0.5 * ref_o + ref_i, rtol=1e-5)
  close_grads(np.asarray(ge), 0.5 * ge_o + ge_i)
  close_grads(np.asarray(gc["ocr"])[:500], 0.5 * gc_o)
  close_grads(np.asarray(gc["image"])[:203], gc_i)


def test_per_head_center_lr_and_decay_of_every_encoder_weight():
  o = default_optim_config()
  o.update(lr=0.01, warmup_steps=0, weight_decay=0.5, clip_norm=None, decay_mask="all")
  lc = _loss_cfg([OCR, IMAGE])
  params = {"encoder": {"norm": {"scale": np.ones(3, np.float32)},
                        "dense": {"kernel": np.full((2, 3), 2.0, np.float32), "bias": np.full(3, -1.0, np.float32)}},
            "centers": {"ocr": np.ones((8, 2), np.float32), "image": np.ones((8, 2), np.float32)}}
  tx = optim.make_optimizer(o, lc, total_steps=10)
  zero = jax.tree.map(np.zeros_like, params)
  up = tx.update(zero, tx.init(params), params)[0]
  for path, p in (("norm", "scale"), ("dense", "kernel"), ("dense", "bias")):  # AdamW at g = 0: -lr*wd*p
    np.testing.assert_allclose(up["encoder"][path][p], -0.01 * 0.5 * params["encoder"][path][p], rtol=1e-6)
  o.decay_mask = "kernels"
  up = optim.make_optimizer(o, lc, 10).update(zero, tx.init(params), params)[0]
  assert np.all(np.asarray(up["encoder"]["dense"]["bias"]) == 0) and np.all(np.asarray(up["encoder"]["norm"]["scale"]) == 0)
  # Adam's first step with no decay moves each entry by lr * mult * g / (|g| + eps): per head.
  lc.centers_weight_decay = 0.0
  g = jax.tree.map(lambda x: np.full_like(x, 0.3), params)
  tx = optim.make_optimizer(o, lc, 10)
  up = tx.update(g, tx.init(params), params)[0]
  np.testing.assert_allclose(up["centers"]["ocr"], -0.01 * 0.1 * 0.3 / (0.3 + 1e-8), rtol=1e-5)
  np.testing.assert_allclose(up["centers"]["image"], -0.01 * 1.0 * 0.3 / (0.3 + 1e-8), rtol=1e-5)
  bad = o.copy_and_resolve_references()
  bad.decay_mask = "some"
  with pytest.raises(ValueError, match="optim.decay_mask='some'"):
    optim.validate(bad, 10)


def _torch_clip(g, max_norm):
  t = torch.tensor(g, requires_grad=True)
  t.grad = torch.tensor(g)
  torch.nn.utils.clip_grad_norm_([t], max_norm=max_norm, norm_type=2)
  return t.grad.numpy()


@pytest.mark.parametrize("how", ["per_head", "per_head_shard"])
def test_center_clipping_per_head_and_shard_matches_torch(how):
  """The published run calls clip_grad_norm_ on each head's local center slice on each GPU."""
  rng = np.random.default_rng(1)
  o = default_optim_config()
  o.update(clip_norm=5.0, clip_per_group=True, clip_centers=how)
  grads = {"encoder": {"w": rng.normal(size=(6,)).astype(np.float32) * 10},
           "centers": {"ocr": rng.normal(size=(16, 4)).astype(np.float32) * [[10.0]] * (np.arange(16)[:, None] < 4),
                       "image": rng.normal(size=(8, 4)).astype(np.float32) * 0.1}}
  shards = 8 if how == "per_head_shard" else 1
  tx = optim.clip_transform(o, class_shards=shards)
  mesh = jax.make_mesh((8,), ("classes",))
  sharded = dict(grads, centers={k: jax.device_put(v, jax.NamedSharding(mesh, jax.sharding.PartitionSpec("classes")))
                                 for k, v in grads["centers"].items()})
  out = jax.jit(lambda g: tx.update(g, tx.init(g))[0])(sharded)
  np.testing.assert_allclose(out["encoder"]["w"], _torch_clip(grads["encoder"]["w"], 5.0), rtol=1e-6)
  for name, g in grads["centers"].items():
    blocks = np.split(g, shards)
    ref = np.concatenate([_torch_clip(blk, 5.0) for blk in blocks])
    np.testing.assert_allclose(np.asarray(out["centers"][name]), ref, rtol=1e-5, atol=1e-7)
  norms = [np.linalg.norm(b) for b in np.split(np.asarray(out["centers"]["ocr"]), shards)]
  assert max(norms) <= 5.0 + 1e-4 and (how == "per_head" or sum(n > 4.9 for n in norms) >= 2)


@pytest.mark.slow
def test_two_stage_config_stage2_starts_from_stage1(tmp_path):
  from ovenc_jax.configs import two_stage
  from ovenc_jax.train import checkpoint as ckpt_lib
  from ovenc_jax.train import compat
  from ovenc_jax.train import trainer as train
  from tests.helpers.digit_shards import write_digit_shards
  from tests.helpers.train_cli import overrides, set_keys

  img = write_digit_shards(str(tmp_path / "img"), 0, 64)
  vid = write_digit_shards(str(tmp_path / "vid"), 1000, 64, seed=1)
  c1 = two_stage.get_config(f"stage=1,images={img},image_classes=10")
  assert [h["name"] for h in c1.loss.heads] == ["image"] and c1.loss.recipe == "official"
  set_keys(c1, overrides(total_steps=2))
  train.Trainer(c1, str(tmp_path / "s1")).run()
  c2 = two_stage.get_config(f"stage=2,images={img},videos={vid},init={tmp_path / 's1'},image_classes=10,"
                            f"video_classes=12,video_weight=0.5")
  assert [h["name"] for h in c2.loss.heads] == ["image", "video"] and c2.loss.heads[1]["weight"] == 0.5
  set_keys(c2, overrides(total_steps=2))
  t2 = train.Trainer(c2, str(tmp_path / "s2"))
  state = t2.state_from_params(compat.load_init_params(c2.init_from, t2.abstract_state["params"], c2.model), 0)
  _, p1 = ckpt_lib.load_params(str(tmp_path / "s1"))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state["params"]["encoder"]), p1["encoder"])
  np.testing.assert_array_equal(np.asarray(state["params"]["centers"]["image"]), p1["centers"]["image"])
  video = np.asarray(state["params"]["centers"]["video"])
  assert video.shape[0] >= 12 and np.abs(video[:12]).sum() > 0  # a fresh head
  assert int(state["step"]) == 0
  with pytest.raises(ValueError, match="video_classes=N is needed"):
    two_stage.get_config(f"stage=2,images={img},videos={vid},init=s1,variant=base,image_classes=5")
  with pytest.raises(ValueError, match="init=STAGE1_WORKDIR"):
    two_stage.get_config(f"stage=2,images={img},videos={vid},image_classes=5")
  assert float(jnp.sum(jnp.abs(state["params"]["centers"]["image"]))) > 0


def _published_lr_loop(peak, warmup, total, power, n):
  """The published scheduler stepped one call at a time: the lr it leaves in the optimizer after
  `last_epoch` = 0, 1, ... (step 0 keeps the base lr; past warmup each call scales the current lr)."""
  out, lr = [], peak
  for e in range(n):
    if 0 < e <= warmup:
      lr = peak * e / warmup
    elif warmup < e <= total:
      d = ((1 - (e - warmup) / (total - warmup)) / (1 - (e - 1 - warmup) / (total - warmup))) ** power
      lr = 0.5 * lr * (1 + d)
    out.append(lr)
  return np.array(out)


def test_polynomial_as_run_schedule_matches_the_stepped_scheduler():
  o = default_optim_config()
  o.update(lr=1e-3, warmup_steps=10, schedule="polynomial_as_run", power=2.0)
  sched = optim.schedule(o, 100, lr_mult=0.5)
  got = np.array([float(sched(i)) for i in range(106)])
  np.testing.assert_allclose(got, _published_lr_loop(0.5e-3, 10, 100, 2.0, 106), rtol=1e-6)
  assert got[0] == pytest.approx(0.5e-3) and got[1] == pytest.approx(0.5e-4)
  o2 = o.copy_and_resolve_references()
  o2.schedule = "polynomial"
  closed = optim.schedule(o2, 100)
  assert float(closed(55)) < 0.5 * float(optim.schedule(o, 100)(55))  # the run decays more slowly
  assert got[100] > 0 and float(closed(100)) == 0.0
