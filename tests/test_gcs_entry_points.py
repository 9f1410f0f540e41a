"""The teacher extractor, the evaluation CLI and video_labels with inputs and outputs on gs:// (GCS emulator)."""
import json
import os

import numpy as np
import pytest

from ovenc_format import label_table as label_table_lib
from ovenc_format import paths
from ovenc_format import records
from tests.helpers import codec_clips, tiny_clip


def _upload_tree(local_dir, remote_dir):
  for root, _, names in os.walk(local_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), local_dir)
      paths.upload(os.path.join(root, name), paths.join(remote_dir, *rel.split(os.sep)))
  return remote_dir


def _no_temp_objects(emulator, prefix):
  names = emulator.list_objects("bkt", prefix)
  assert not any(".tmp-" in n or ".write-probe-" in n for n in names), names
  return names


@pytest.mark.slow
def test_teacher_reads_and_writes_a_bucket_and_resumes_there(gcs_emulator, tmp_path, monkeypatch, capsys):
  from data_prep import cluster, teacher
  monkeypatch.setenv("OVENC_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.chdir(tmp_path)
  media = tmp_path / "media"
  media.mkdir()
  for seed, (name, n) in enumerate({"a.mp4": 9, "b.mp4": 6}.items()):
    frames, _ = codec_clips.square_frames(n=n, size=64, seed=seed, step=(1, 2))
    codec_clips.encode(str(media / name), frames, options={"g": "4"})
  from PIL import Image
  Image.fromarray(np.random.default_rng(3).integers(0, 255, (48, 56, 3), dtype=np.uint8)).save(media / "still.png")
  (media / "broken.mp4").write_bytes(b"not a video")
  model = tiny_clip.save_tiny_clip(tmp_path / "clip")
  _upload_tree(media, "gs://bkt/media")
  _upload_tree(model, "gs://bkt/models/clip")

  flags = ["--frames", "3", "--per_frame_dim", "16", "--image_embedding", "frames", "--shard_size", "2",
           "--decode_workers", "0", "--batch_size", "4"]
  bucket_run = ["--input", "gs://bkt/media", "--model", "gs://bkt/models/clip", "--output_dir", "gs://bkt/teach"]
  teacher.main(bucket_run + flags)
  teacher.main(["--input", str(media), "--model", model, "--output_dir", str(tmp_path / "teach")] + flags)
  local = sorted(os.listdir(tmp_path / "teach"))
  names = _no_temp_objects(gcs_emulator, "teach/")
  assert names == [f"teach/{n}" for n in local]
  for i in range(2):  # 4 inputs, 2 per shard; the same order (sorted names) in both runs
    name = f"embeddings-{i:05d}-of-00002.npy"
    assert gcs_emulator.read_object("bkt", f"teach/{name}") == (tmp_path / "teach" / name).read_bytes(), name
  x, ids = cluster.load_embeddings("gs://bkt/teach")
  names_in = ("a.mp4", "b.mp4", "still.png")
  assert sorted(ids.tolist()) == sorted(records.sample_id_for(f"gs://bkt/media/{n}") for n in names_in)
  fails = [json.loads(line) for line in gcs_emulator.read_object("bkt", "teach/failures.jsonl").decode().splitlines()]
  assert [f["path"] for f in fails] == ["gs://bkt/media/broken.mp4"]
  manifest = json.loads(gcs_emulator.read_object("bkt", "teach/teacher_manifest.json"))
  assert manifest["complete"] and manifest["model"] == "gs://bkt/models/clip" and manifest["num_embeddings"] == 3

  # Resume (as a Beam job): only the shard whose embeddings are gone is run again; the other stays.
  kept = {n: gcs_emulator.generation("bkt", n) for n in names if "00000-of" in n}
  redo = gcs_emulator.read_object("bkt", "teach/embeddings-00001-of-00002.npy")
  paths.remove("gs://bkt/teach/embeddings-00001-of-00002.npy")
  capsys.readouterr()
  teacher.main(bucket_run + flags + ["--mode", "beam"])
  assert "(1 of 2 shards run)" in capsys.readouterr().out
  assert {n: gcs_emulator.generation("bkt", n) for n in kept} == kept
  assert gcs_emulator.read_object("bkt", "teach/embeddings-00001-of-00002.npy") == redo

  # data_prep.cluster reads the sharded bucket folder.
  cluster.main(["--embeddings", "gs://bkt/teach", "--output", "gs://bkt/concepts", "--num_clusters", "2",
                "--top_k", "1", "--iters", "2", "--init", "random"])
  table = label_table_lib.load_label_table("gs://bkt/concepts")
  assert sorted(table) == sorted(ids.tolist())
  assert not os.path.exists(tmp_path / "gs:")


def _comparable(rows):
  """Result rows without timings and the model's name (the only fields a bucket run may change)."""
  out = []
  for r in rows:
    r = {k: ("nan" if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()
         if k not in ("seconds", "model")}
    r["feature_stats"] = {s: {k: v for k, v in m.items() if k != "seconds"} for s, m in r["feature_stats"].items()}
    out.append(r)
  return out


@pytest.mark.slow
def test_evaluate_reads_and_writes_a_bucket(gcs_emulator, tmp_path, monkeypatch):
  from ovenc_jax import evaluate
  from tests.helpers import digit_shards
  from tests.test_evaluate_cli import _init_workdir
  monkeypatch.setenv("OVENC_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.chdir(tmp_path)
  train = digit_shards.write_digit_shards(str(tmp_path / "train"), 0, 40, num_shards=2)
  val = digit_shards.write_digit_shards(str(tmp_path / "val"), 1000, 16, num_shards=1, seed=1)
  _upload_tree(train, "gs://bkt/eval/train")
  _upload_tree(val, "gs://bkt/eval/val")
  _init_workdir(str(tmp_path / "wd"))
  _init_workdir("gs://bkt/eval/wd")
  flags = ["--probe", "knn", "--probe", "linear", "--tokens_per_row", "16", "--batch_size", "8", "--knn_k", "3"]
  # The attentive probe only in the bucket run: it reads the same features (checked byte for byte
  # below) and its compile costs more than everything else here.
  remote = evaluate.main(["--model", "gs://bkt/eval/wd", "--train", "gs://bkt/eval/train", "--val", "gs://bkt/eval/val",
                          "--output", "gs://bkt/eval/out", "--probe", "attentive", "--epochs", "1",
                          "--probe_batch_size", "8"] + flags)
  local = evaluate.main(["--model", str(tmp_path / "wd"), "--train", train, "--val", val,
                         "--output", str(tmp_path / "out")] + flags)
  assert [r["probe"] for r in remote] == ["attentive", "knn", "linear"]
  assert _comparable(remote)[1:] == _comparable(local)
  assert 0 <= remote[0]["top1"] <= remote[0]["top5"] <= 1 and remote[0]["epochs"] == 1
  names = _no_temp_objects(gcs_emulator, "eval/out/")
  local_names = sorted(os.path.relpath(os.path.join(r, n), tmp_path / "out")
                       for r, _, ns in os.walk(tmp_path / "out") for n in ns)
  assert names == [f"eval/out/{n}" for n in local_names]
  for n in local_names:
    if n.endswith(".npy") or n == "failures.jsonl":  # the features themselves: the same bytes
      assert gcs_emulator.read_object("bkt", f"eval/out/{n}") == (tmp_path / "out" / n).read_bytes(), n
  assert [r["top1"] for r in json.loads(gcs_emulator.read_object("bkt", "eval/out/results.json"))] == \
      [r["top1"] for r in remote]
  assert b"| attentive |" in gcs_emulator.read_object("bkt", "eval/out/results.md")
  # --reuse_features reads the bucket's feature cache, on a host that has not staged it yet.
  monkeypatch.setenv("OVENC_CACHE_DIR", str(tmp_path / "cache2"))
  generations = {n: gcs_emulator.generation("bkt", n) for n in names if "/features/" in n}
  again = evaluate.main(["--model", "gs://bkt/eval/wd", "--train", "gs://bkt/eval/train", "--val", "gs://bkt/eval/val",
                         "--output", "gs://bkt/eval/out", "--reuse_features"] + flags)
  keys = ("probe", "top1", "top5", "train_clips", "val_clips", "frames", "tokens")
  assert [[r[k] for k in keys] for r in _comparable(again)] == [[r[k] for k in keys] for r in _comparable(local)]
  assert {n: gcs_emulator.generation("bkt", n) for n in generations} == generations
  # An exported model folder in the bucket, against the same export on local disk.
  from ovenc_jax.interop import export_torch
  export_torch.main(["--workdir", str(tmp_path / "wd"), "--output", "gs://bkt/eval/export"])
  export_torch.main(["--workdir", str(tmp_path / "wd"), "--output", str(tmp_path / "export")])
  a = evaluate.main(["--model", "gs://bkt/eval/export", "--train", "gs://bkt/eval/train", "--val", "gs://bkt/eval/val",
                     "--output", str(tmp_path / "out_export_remote")] + flags[:2] + flags[4:])
  b = evaluate.main(["--model", str(tmp_path / "export"), "--train", train, "--val", val,
                     "--output", str(tmp_path / "out_export_local")] + flags[:2] + flags[4:])
  assert a[0]["temporal_positions"] == "timeline64"
  assert [[r[k] for k in keys] for r in _comparable(a)] == [[r[k] for k in keys] for r in _comparable(b)]
  assert not os.path.exists(tmp_path / "gs:")


def test_video_labels_lists_and_writes_a_bucket(gcs_emulator, tmp_path, capsys):
  from data_prep import codec_patchify, video_labels
  for name in ("walk/a.mp4", "walk/deep/b.avi", "run/c.mp4", "run/notes.txt"):
    (tmp_path / "empty").write_bytes(b"")
    paths.upload(str(tmp_path / "empty"), f"gs://bkt/vl/train/{name}")
  video_labels.main(["--folder", "gs://bkt/vl/train", "--output", "gs://bkt/vl/out_train"])
  assert json.loads(gcs_emulator.read_object("bkt", "vl/out_train/classes.json")) == ["run", "walk"]
  want = {"gs://bkt/vl/train/walk/a.mp4": 1, "gs://bkt/vl/train/walk/deep/b.avi": 1, "gs://bkt/vl/train/run/c.mp4": 0}
  assert json.loads(gcs_emulator.read_object("bkt", "vl/out_train/class_labels.json")) == want
  # What the codec job reads back: the list file and the labels, from the bucket.
  assert codec_patchify.expand_inputs(["gs://bkt/vl/out_train/inputs.txt"]) == sorted(want)
  assert codec_patchify.load_class_labels("gs://bkt/vl/out_train/class_labels.json") == want
  # A CSV in the bucket: relative rows are under its folder; another split's classes.json from the bucket.
  (tmp_path / "val.csv").write_text("path,label\nv/x.mp4,walk\ngs://other/y.mp4 run\n")
  paths.upload(str(tmp_path / "val.csv"), "gs://bkt/vl/val.csv")
  video_labels.main(["--csv", "gs://bkt/vl/val.csv", "--output", "gs://bkt/vl/out_val",
                     "--classes", "gs://bkt/vl/out_train/classes.json"])
  assert json.loads(gcs_emulator.read_object("bkt", "vl/out_val/class_labels.json")) == {
      "gs://bkt/vl/v/x.mp4": 1, "gs://other/y.mp4": 0}
  assert gcs_emulator.read_object("bkt", "vl/out_val/inputs.txt") == b"gs://bkt/vl/v/x.mp4\ngs://other/y.mp4\n"
  _no_temp_objects(gcs_emulator, "vl/")
  with pytest.raises(SystemExit):
    video_labels.main(["--csv", "gs://bkt/vl/missing.csv", "--output", "gs://bkt/vl/o"])
  assert "gs://bkt/vl/missing.csv" in capsys.readouterr().err


def test_missing_bucket_fails_at_start_naming_it(gcs_emulator, tmp_path, capsys):
  from data_prep import teacher
  from ovenc_jax import evaluate
  with pytest.raises(SystemExit) as e:  # before the inputs are listed or the model is loaded
    teacher.main(["--input", str(tmp_path / "x.mp4"), "--model", str(tmp_path / "none"),
                  "--output_dir", "gs://nobkt/t"])
  assert e.value.code == 2
  assert "teacher: error: --output_dir gs://nobkt/t: bucket gs://nobkt does not exist" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    evaluate.main(["--model", str(tmp_path / "none"), "--train", "x", "--val", "y", "--output", "gs://nobkt/e"])
  assert e.value.code == 2
  assert "error: --output gs://nobkt/e: bucket gs://nobkt does not exist" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "gs:")
