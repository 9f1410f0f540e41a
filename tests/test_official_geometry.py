"""geometry=official: 64-frame clips at 224 px and 448 px stills, 2,048-token rows on the 64-slot timeline."""
import jax
import numpy as np
import pytest

from ovenc_format import records
from ovenc_jax.configs import pretrain
from ovenc_jax.input import features
from ovenc_jax.input.validation import validate_input_config
from tests.helpers.train_cli import printed_config


def _record(grid, k, frame_indices=None, sid=1):
  rng = np.random.default_rng(sid)
  t, h, w = grid
  flat = np.sort(rng.choice(t * h * w, k, replace=False))
  pos = np.stack(np.unravel_index(flat, grid), -1).astype(np.int32)
  rec = dict(patches=rng.integers(0, 256, (k, 14, 14, 3), dtype=np.uint8), positions=pos,
             grid=np.array(grid, np.int32), frame_types="I" + "P" * (t - 1), source=f"s{sid}",
             sample_id=sid, labels=np.arange(3, dtype=np.int32), signal="mv+residual", class_label=-1,
             frame_indices=np.arange(t) * 3 if frame_indices is None else frame_indices,
             scores=rng.random(k).astype(np.float16))
  return records.decode_record(records.encode_record(rec))


def _features(c, rec):
  i = c.input
  return features.sample_features(
      rec, np.random.default_rng(0), patch_size=i.patch_size, tokens_per_row=i.tokens_per_row,
      max_labels=i.max_labels, hflip=i.hflip, temporal_positions=i.temporal_positions,
      geometry=dict(i.geometry))


def test_geometry_official_composes_with_recipe_and_variant():
  c = pretrain.get_config("variant=base,recipe=official,geometry=official,data=d/")
  assert (c.model.patch_size, c.input.patch_size, c.input.tokens_per_row, c.input.max_segments) == (14, 14, 2048, 2)
  assert c.input.temporal_positions == "timeline64" and c.eval.tokens_per_row == 2048
  assert dict(c.input.geometry) == dict(num_frames=64, video_size=224, image_size=448)
  assert c.loss.recipe == "official" and c.optim.schedule == "polynomial"  # the recipe is untouched
  validate_input_config(c.input)
  assert pretrain.get_config("variant=base").input.geometry is None
  with pytest.raises(ValueError, match="geometry='x' is unknown"):
    pretrain.get_config("geometry=x")
  bad = c.input.copy_and_resolve_references()
  bad.geometry = dict(num_frames=64, video_size=230, image_size=448)
  with pytest.raises(ValueError, match=r"input.geometry.video_size must be"):
    validate_input_config(bad)


def test_geometry_official_records():
  c = pretrain.get_config("variant=tiny,geometry=official")
  # 12.5% of a 64-frame 16x16 clip fills a row exactly; its frames land on t = 0..63.
  clip = _record((64, 16, 16), 2048)
  out = _features(c, clip)
  assert out["patches"].shape == (2048, 14 * 14 * 3)
  t = out["positions"][:, 0]
  assert t.min() >= 0 and t.max() <= 63
  np.testing.assert_array_equal(np.unique(t), np.unique(clip["positions"][:, 0]))  # evenly spaced frames
  still = _record((1, 32, 32), 1024, frame_indices=np.zeros(1, np.int32), sid=2)
  assert _features(c, still)["patches"].shape == (1024, 588)
  with pytest.raises(ValueError, match=r"grid \(16, 16, 16\) is not the clip grid \(64, 16, 16\).*"
                                       r"--num_frames 64 --image_size 224"):
    _features(c, _record((16, 16, 16), 512, sid=3))
  with pytest.raises(ValueError, match=r"sample_id=4 .*still grid \(1, 32, 32\).*--image_size 448"):
    _features(c, _record((1, 16, 16), 256, frame_indices=np.zeros(1, np.int32), sid=4))


def test_print_config_geometry_official():
  cfg = printed_config("variant=base,recipe=official,geometry=official")
  assert cfg["input"]["tokens_per_row"] == 2048 and cfg["input"]["temporal_positions"] == "timeline64"
  assert cfg["input"]["geometry"] == {"image_size": 448, "num_frames": 64, "video_size": 224}
  assert cfg["model"]["patch_size"] == 14 and cfg["loss"]["recipe"] == "official"


@pytest.mark.slow
def test_official_geometry_end_to_end_on_64_frame_demo_clips(tmp_path):
  """make_demo_data (64 frames, 224 px) -> codec_patchify --dense_frames 8 (Beam) -> two steps of the
  tiny model at geometry=official with the three-branch batch (digit classes as labels here; the
  documented command clusters the glyph teacher's embeddings instead)."""
  import json
  from data_prep import codec_patchify, make_demo_data
  from ovenc_format import label_table
  from ovenc_jax.input import pipeline
  from ovenc_jax.train import trainer as train

  make_demo_data.main(["--output_dir", str(tmp_path / "d"), "--num_clips", "4", "--num_images", "0",
                       "--num_frames", "64", "--size", "224"])
  rec_dir = str(tmp_path / "rec")
  codec_patchify.run(["--input", str(tmp_path / "d" / "list.txt"), "--output_dir", rec_dir, "--num_frames",
                      "64", "--image_size", "224", "--dense_frames", "8", "--decode_timeout", "0",
                      "--class_labels", str(tmp_path / "d" / "class_labels.json")])
  recs = list(records.read_all(rec_dir))
  assert [r["grid"].tolist() for r in recs] == [[64, 16, 16]] * 4
  assert all(r["positions"].shape == (2048, 3) and r["dense_t"].size == 8 for r in recs)
  table = label_table.write_label_table(tmp_path / "labels.npz", [r["sample_id"] for r in recs],
                                        [[r["class_label"]] for r in recs], num_classes=10)
  c = pretrain.get_config(f"variant=tiny,recipe=official,geometry=official,branches=0.5/0.25,data={rec_dir}")
  c.input.update(global_batch_size=4, label_table=table, max_labels=1)
  c.loss.update(num_classes=10, labels_per_step=1)
  c.update(total_steps=2, log_every=1, eval_every=0, ckpt_every=2)
  # The rows of a step: 2 codec clips, 1 of 8 whole frames (t in 0..63), 1 collage of 8 x 16 x 16.
  batch = next(pipeline.make_train_iterator(c.input, process_index=0, process_count=1))
  assert (batch["segment_ids"] == 1).all()
  pos = batch["positions"]
  collage = [r for r in range(4) if pos[r, :, 1].max() == 127]
  frames = [r for r in range(4) if r not in collage and len(np.unique(pos[r, :, 0])) == 8
            and (np.bincount(pos[r, :, 0] // 8, minlength=8) == 256).all()]
  assert len(collage) == 1 and (pos[collage[0], :, 0] == 0).all() and len(frames) == 1
  summary = train.Trainer(c, str(tmp_path / "train"), devices=jax.devices()[:1]).run()
  assert summary["final_step"] == 2 and np.isfinite(summary["final_loss"])
  with open(tmp_path / "train" / "metrics.jsonl") as f:
    assert [r["num_valid_labels"] for r in map(json.loads, f) if "num_valid_labels" in r] == [4.0] * 2
