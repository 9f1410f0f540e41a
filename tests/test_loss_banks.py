"""ovenc_jax.loss.banks (loss.heads): two banks, two sources, sharded on 8 host devices vs dense per bank."""
import jax
import numpy as np
import pytest

from ovenc_jax.loss import banks as banks_lib
from ovenc_jax.loss.centers import padded_num_classes
from ovenc_jax.loss.defaults import default_loss_config
from tests.helpers.loss_reference import BATCH_AXES, CLASS_AXES, close_grads, dense_reference, mesh as _mesh

IMAGE = dict(name="image", num_classes=1003, margin=0.3, fn_threshold=0.3, scale=64.0, weight=1.0)
VIDEO = dict(name="video", num_classes=403, margin=0.2, fn_threshold=None, scale=16.0, sample_rate=0.25,
             weight=0.5)


def _cfg(heads):
  cfg = default_loss_config()
  cfg.labels_per_step = 4
  cfg.heads = heads
  return cfg


def _bank(rng, head, d):
  c = np.zeros((padded_num_classes(head["num_classes"], 8), d), np.float32)
  c[:head["num_classes"]] = rng.normal(size=(head["num_classes"], d))
  return c


@pytest.mark.slow
def test_two_banks_two_sources_match_dense_reference_per_bank():
  mesh = _mesh()
  rng = np.random.default_rng(0)
  b, d, n_lab = 16, 32, 4
  centers = {"image": _bank(rng, IMAGE, d), "video": _bank(rng, VIDEO, d)}
  # Rows 0..9 come from an image source (bank ids 0..1002), rows 10..15 from a video source whose
  # labels the pipeline shifted by the video bank's offset, 1003.
  local = np.where(np.arange(b)[:, None] < 10, rng.integers(0, 1003, (b, n_lab)), rng.integers(0, 403, (b, n_lab)))
  local[rng.random((b, n_lab)) < 0.25] = -1
  local[:, 0] = np.where(np.arange(b) < 10, rng.integers(0, 1003, b), rng.integers(0, 403, b))
  is_video = np.arange(b)[:, None] >= 10
  labels = np.where((local >= 0) & is_video, local + 1003, local).astype(np.int32)
  labels[3, 1] = 5000  # in no bank: counted, ignored
  emb = rng.normal(size=(b, d)).astype(np.float32)
  emb[:10] += 3 * centers["image"][local[:10, 0]] / np.linalg.norm(centers["image"][local[:10, 0]], axis=1, keepdims=True)

  specs = banks_lib.bank_specs(_cfg([IMAGE, VIDEO]))
  assert [(s.name, s.offset, s.weight) for s in specs] == [("image", 0, 1.0), ("video", 1003, 0.5)]
  loss_fn = banks_lib.make_banks_loss_fn(mesh, _cfg([IMAGE, VIDEO]), BATCH_AXES, CLASS_AXES)
  fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
  (loss, metrics), (ge, gc) = fn(emb, centers, labels, jax.random.key(0))

  img_lab = np.where(~is_video & (labels >= 0) & (labels < 1003), labels, -1)
  vid_lab = np.where(is_video & (labels >= 0), local, -1)
  ref_i, ge_i, gc_i = dense_reference(emb, centers["image"], img_lab, 1003, 64.0, 0.3, 0.3)
  sel = np.abs(np.asarray(gc["video"])).sum(axis=1)[:403] > 0  # the video bank's PFC selection
  assert sel.sum() < 403
  ref_v, ge_v, gc_v = dense_reference(emb, centers["video"], vid_lab, 403, 16.0, 0.2, None, allowed=sel)
  np.testing.assert_allclose(float(metrics["image/loss"]), ref_i, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["video/loss"]), ref_v, rtol=1e-5)
  np.testing.assert_allclose(float(loss), ref_i + 0.5 * ref_v, rtol=1e-5)
  close_grads(np.asarray(ge), ge_i + 0.5 * ge_v)
  close_grads(np.asarray(gc["image"])[:1003], gc_i)
  close_grads(np.asarray(gc["video"])[:403], 0.5 * gc_v)
  assert float(metrics["image/loss_count"]) == (img_lab >= 0).sum()
  assert float(metrics["video/loss_count"]) == (vid_lab >= 0).sum()
  assert float(metrics["loss_count"]) == (img_lab >= 0).sum() + (vid_lab >= 0).sum()
  assert float(metrics["labels_out_of_range"]) == 1
  # Each bank's centers and gradients stay sharded over every device.
  for name in centers:
    assert len(gc[name].sharding.device_set) == 8 and gc[name].addressable_shards[0].data.shape[0] == len(centers[name]) // 8


def test_bank_config_errors_name_the_key():
  with pytest.raises(ValueError, match=r"loss.heads\[1\].name must be a unique"):
    banks_lib.bank_specs(_cfg([IMAGE, dict(IMAGE)]))
  with pytest.raises(ValueError, match=r"loss.heads\[0\] has unknown keys \['margn'\]"):
    banks_lib.bank_specs(_cfg([dict(name="a", num_classes=5, margn=0.1)]))
  with pytest.raises(ValueError, match=r"loss.heads\[0\] \(a\): loss.sample_rate"):
    banks_lib.bank_specs(_cfg([dict(name="a", num_classes=5, sample_rate=2.0)]))
  assert banks_lib.bank_specs(_cfg([])) is None


@pytest.mark.slow
def test_two_banks_two_sources_train_export_import(tmp_path):
  """Each source names its bank: its labels arrive shifted into that bank's id range; the trainer
  keeps {bank: centers}, reports per-bank metrics; --with_centers exports and imports every bank."""
  import json

  from ovenc_format import records
  from ovenc_jax.configs import pretrain
  from ovenc_jax.input import pipeline as input_pipeline
  from ovenc_jax.interop import export_torch
  from ovenc_jax.interop import import_torch
  from ovenc_jax.train import checkpoint as ckpt_lib
  from ovenc_jax.train import trainer as train
  from tests.helpers.digit_shards import write_digit_shards
  from tests.helpers.train_cli import overrides, set_keys

  img = write_digit_shards(str(tmp_path / "img"), 0, 120)
  vid = write_digit_shards(str(tmp_path / "vid"), 1000, 120, seed=1)
  c = pretrain.get_config(f"variant=tiny,data={img}")
  set_keys(c, overrides(total_steps=3))
  c.input.sources = [{"path": img, "weight": 1.0, "bank": "image"}, {"path": vid, "weight": 1.0, "bank": "video"}]
  c.loss.heads = [dict(name="image", num_classes=10), dict(name="video", num_classes=10, margin=0.1, weight=0.5)]

  video_ids = {records.sample_id_for(f"digits/{i:05d}.png") for i in range(1000, 1120)}
  batch = next(input_pipeline.make_train_iterator(c.input, banks=banks_lib.source_banks(c.loss)))
  sid, lab, cls = batch["sample_id"], batch["labels"][..., 0], batch["class_label"]
  real = sid >= 0
  is_vid = np.vectorize(lambda s: int(s) in video_ids)(sid) & real
  assert is_vid.any() and (real & ~is_vid).any()
  np.testing.assert_array_equal(lab[real], np.where(is_vid, cls + 10, cls)[real])
  with pytest.raises(ValueError, match=r"input.sources\[1\].bank='audio'"):
    bad = c.input.copy_and_resolve_references()
    bad.sources = [c.input.sources[0], dict(c.input.sources[1], bank="audio")]
    input_pipeline.make_train_dataset(bad, banks=banks_lib.source_banks(c.loss))
  with pytest.raises(ValueError, match=r"input.sources\[0\].bank is set, but loss.heads names no banks"):
    input_pipeline.make_train_dataset(c.input)

  work = str(tmp_path / "run")
  train.Trainer(c, work).run()
  with open(f"{work}/metrics.jsonl") as f:
    last = [json.loads(line) for line in f][-1]
  for name in ("image", "video"):
    assert np.isfinite(last[f"{name}/loss"]) and last[f"{name}/loss_count"] > 0
  np.testing.assert_allclose(last["loss"], last["image/loss"] + 0.5 * last["video/loss"], rtol=1e-5)

  _, params = ckpt_lib.load_params(work)
  assert set(params["centers"]) == {"image", "video"}
  paths = export_torch.export_workdir(work, str(tmp_path / "pt"), with_centers=True)
  from safetensors.numpy import load_file
  assert set(load_file(paths["centers.safetensors"])) == {"centers.image", "centers.video"}
  _, back = import_torch.read_export(str(tmp_path / "pt"))
  for name in ("image", "video"):
    np.testing.assert_array_equal(back["centers"][name], params["centers"][name])
  # The imported banks seed a new run (init_from's path) on the same layout, sharded per bank.
  state = train.Trainer(c, str(tmp_path / "ft")).state_from_params(back, seed=0)
  for name in ("image", "video"):
    np.testing.assert_array_equal(np.asarray(state["params"]["centers"][name]), back["centers"][name])
    assert len(state["params"]["centers"][name].sharding.device_set) == 8
