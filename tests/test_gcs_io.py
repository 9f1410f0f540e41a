"""gs:// paths against a GCS emulator: the path layer, bad workdirs, and training into a bucket."""
import io
import json
import os
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from ovenc_format import atomic_io
from ovenc_format import label_table as label_table_lib
from ovenc_format import paths
from ovenc_jax.input import shards as shards_lib
from tests.helpers import digit_shards
from tests.helpers.train_cli import cli


def _upload_folder(local_dir, remote_dir):
  for name in sorted(os.listdir(local_dir)):
    paths.upload(os.path.join(local_dir, name), paths.join(remote_dir, name))
  return remote_dir


@pytest.fixture(scope="module")
def bucket_shards(gcs_emulator, tmp_path_factory):
  """Digit shards (with their manifest) in gs://bkt/digits, and the local folder they came from."""
  local = digit_shards.write_digit_shards(str(tmp_path_factory.mktemp("digits") / "train"), 0, 200,
                                          num_shards=2)
  return _upload_folder(local, "gs://bkt/digits"), local


def test_remote_writes_are_atomic_and_round_trip(gcs_emulator, tmp_path):
  arr = np.arange(12, dtype=np.int64).reshape(3, 4)
  atomic_io.save_npy("gs://bkt/io/a.npy", arr)
  atomic_io.save_json("gs://bkt/io/b.json", {"x": [1, 2]})
  # The bytes as the emulator holds them (not read back through the code under test).
  assert json.loads(gcs_emulator.read_object("bkt", "io/b.json")) == {"x": [1, 2]}
  staged = paths.stage("gs://bkt/io/a.npy", str(tmp_path / "cache"))
  assert staged.startswith(str(tmp_path / "cache")) and np.array_equal(np.load(staged), arr)
  assert paths.stage("gs://bkt/io/a.npy", str(tmp_path / "cache")) == staged  # once per host
  assert gcs_emulator.list_objects("bkt", "io/") == ["io/a.npy", "io/b.json"]  # no temp objects left
  assert paths.join("gs://bkt/run", "checkpoints") == "gs://bkt/run/checkpoints"


def test_label_table_and_shards_read_from_bucket(bucket_shards, gcs_emulator, tmp_path, monkeypatch):
  remote, local = bucket_shards
  monkeypatch.setenv("OVENC_CACHE_DIR", str(tmp_path / "cache"))
  got = shards_lib.shard_paths(remote, "input.sources[0].path")
  want = shards_lib.shard_paths(local, "input.sources[0].path")
  assert [os.path.basename(p) for p in got] == [os.path.basename(p) for p in want]
  for g, w in zip(got, want):
    assert g.startswith(str(tmp_path / "cache"))
    with open(g, "rb") as a, open(w, "rb") as b:
      assert a.read() == b.read()
  ids, labels = np.array([5, 1, 9], np.int64), np.array([[0], [2], [1]], np.int32)
  label_table_lib.write_label_table(f"gs://bkt/labels/{label_table_lib.FILE_NAME}", ids, labels, num_classes=3)
  assert gcs_emulator.list_objects("bkt", "labels/") == [f"labels/{label_table_lib.FILE_NAME}"]
  table = label_table_lib.load_label_table("gs://bkt/labels")
  assert {k: v.tolist() for k, v in table.items()} == {1: [2], 5: [0], 9: [1]}


@pytest.mark.parametrize("workdir,env,expect", [
    ("gs://nobkt/run", {}, "bucket gs://nobkt does not exist"),
    ("gs://bkt/run", {"STORAGE_EMULATOR_HOST": "", "GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent.json"},
     "no Google Cloud credentials"),
    ("{tmp}/file.txt/run", {}, "is not a folder"),
])
def test_bad_workdir_fails_at_start_naming_it(gcs_emulator, bucket_shards, tmp_path, workdir, env, expect):
  (tmp_path / "file.txt").write_text("x")
  workdir = workdir.format(tmp=tmp_path)
  t0 = time.time()
  r = subprocess.run(cli(workdir, bucket_shards[0]), capture_output=True, text=True, timeout=120,
                     env=dict(os.environ, **env), cwd=tmp_path)
  assert r.returncode == 2, r.stderr[-2000:]
  line = r.stderr.strip().splitlines()[-1]
  assert line.startswith("ovenc-train: error: --workdir " + workdir) and expect in line, line
  assert time.time() - t0 < 60
  assert not (tmp_path / "gs:").exists()


@pytest.mark.slow
def test_export_and_import_through_bucket(gcs_emulator, bucket_shards, tmp_path, monkeypatch):
  import flax.linen as nn
  import jax
  from ovenc_jax.configs import pretrain
  from ovenc_jax.eval import embed as embed_lib
  from ovenc_jax.interop import export_torch, import_torch
  from ovenc_jax.model import defaults as model_defaults
  from ovenc_jax.model import encoder as model_lib
  from ovenc_jax.train import checkpoint as ckpt_lib
  p = model_defaults.model_config("tiny").patch_size
  enc = model_lib.encoder_from_config(model_defaults.model_config("tiny"))
  params = jax.tree.map(np.asarray, nn.meta.unbox(enc.init(
      jax.random.key(1), np.zeros((1, 4, p * p * 3), np.uint8), np.zeros((1, 4, 3), np.int32),
      np.ones((1, 4), np.int32))["params"]))
  work = "gs://bkt/interop/train"
  embed_lib.save_config(work, pretrain.get_config("variant=tiny"))
  ckpt_lib.write_params_checkpoint(work, {"encoder": params}, step=5)
  export_torch.main(["--workdir", work, "--output", "gs://bkt/interop/pt"])
  export_torch.main(["--workdir", work, "--output", str(tmp_path / "pt")])  # the local export, as reference
  local = sorted(os.listdir(tmp_path / "pt"))
  assert gcs_emulator.list_objects("bkt", "interop/pt/") == [f"interop/pt/{n}" for n in local]
  for name in local:
    assert gcs_emulator.read_object("bkt", f"interop/pt/{name}") == (tmp_path / "pt" / name).read_bytes(), name

  import_torch.main(["--input", "gs://bkt/interop/pt", "--workdir", "gs://bkt/interop/back"])
  step, back = ckpt_lib.load_params("gs://bkt/interop/back")
  assert step == 0
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, strict=True), back["encoder"], params)
  assert embed_lib.load_model_config("gs://bkt/interop/back").variant == "tiny"
  # The imported bucket workdir as the trainer's init_from: shapes and config checked, params read.
  from ovenc_jax.train import compat
  init = compat.load_init_params("gs://bkt/interop/back", {"encoder": params},
                                 model_defaults.model_config("tiny"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, strict=True), init["encoder"], params)
  with pytest.raises(compat.ModelMismatchError, match="init_from=gs://bkt/interop/back"):
    compat.load_init_params("gs://bkt/interop/back", {"encoder": {**params, "extra": np.zeros(3)}},
                            model_defaults.model_config("tiny"))
  # Embeddings of bucket shards by a bucket workdir, into the bucket: the bytes of a local run.
  monkeypatch.setenv("OVENC_CACHE_DIR", str(tmp_path / "cache"))
  embed_lib.main(["--workdir", "gs://bkt/interop/back", "--records", bucket_shards[0], "--output", "gs://bkt/emb",
                  "--tokens_per_row", "32"])
  embed_lib.main(["--workdir", "gs://bkt/interop/back", "--records", bucket_shards[1], "--output",
                  str(tmp_path / "emb"), "--tokens_per_row", "32"])
  for name in ("embeddings.npy", "sample_ids.npy", "failures.jsonl"):
    assert gcs_emulator.read_object("bkt", f"emb/{name}") == (tmp_path / "emb" / name).read_bytes(), name
  with pytest.raises(SystemExit, match="already holds checkpoints"):
    import_torch.main(["--input", "gs://bkt/interop/pt", "--workdir", "gs://bkt/interop/back"])


def _decoded(folder):
  """Records of a shard folder (gs:// ones staged by shard_paths) keyed by their source, which (with
  the sample_id made from it) is what differs between a bucket and a local run."""
  from array_record.python import array_record_module

  from ovenc_format import records
  out = {}
  for path in shards_lib.shard_paths(folder, "prep"):
    reader = array_record_module.ArrayRecordReader(path)
    for raw in reader.read_all():
      r = records.decode_record(raw)
      src = r.pop("source")
      assert r.pop("sample_id") == records.sample_id_for(src)
      out[src] = r
    reader.close()
  return out


@pytest.mark.slow
def test_data_prep_reads_and_writes_a_bucket(gcs_emulator, tmp_path, monkeypatch):
  from data_prep import codec_patchify
  from tests.helpers.codec_clips import digit_clip
  monkeypatch.setenv("OVENC_CACHE_DIR", str(tmp_path / "cache"))
  (tmp_path / "in").mkdir()
  for i in range(2):
    digit_clip(str(tmp_path / "in" / f"c{i}.mp4"), 40 + i, n=6, size=48)
    paths.upload(str(tmp_path / "in" / f"c{i}.mp4"), f"gs://bkt/videos/c{i}.mp4")
  flags = ["--decode_timeout", "0", "--image_size", "28", "--patch_size", "14", "--num_frames", "4"]
  remote = codec_patchify.run(["--input", "gs://bkt/videos/*.mp4", "--output_dir", "gs://bkt/prep"] + flags)
  local = codec_patchify.run(["--input", str(tmp_path / "in" / "*.mp4"), "--output_dir",
                              str(tmp_path / "prep")] + flags)
  names = gcs_emulator.list_objects("bkt", "prep/")
  shards = [f"prep/{s}" for s in remote["shards"]]
  assert names == sorted(shards + ["prep/failures.jsonl", "prep/manifest.json"])  # no staging objects left
  assert json.loads(gcs_emulator.read_object("bkt", "prep/manifest.json"))["num_records"] == 2
  assert remote["num_records"] == local["num_records"] == 2
  a, b = _decoded("gs://bkt/prep"), _decoded(str(tmp_path / "prep"))
  assert sorted(a) == ["gs://bkt/videos/c0.mp4", "gs://bkt/videos/c1.mp4"]
  for name in ("c0.mp4", "c1.mp4"):
    ra, rb = a[f"gs://bkt/videos/{name}"], b[os.path.realpath(tmp_path / "in" / name)]
    assert sorted(ra) == sorted(rb)
    for field in ra:
      np.testing.assert_array_equal(np.asarray(ra[field]), np.asarray(rb[field]), err_msg=field)


@pytest.mark.slow
def test_teacher_and_concepts_through_a_bucket(gcs_emulator, bucket_shards, tmp_path, monkeypatch):
  from data_prep import bootstrap_teacher, cluster
  monkeypatch.setenv("OVENC_CACHE_DIR", str(tmp_path / "cache"))
  remote, local = bucket_shards
  bootstrap_teacher.main(["--records", remote, "--output", "gs://bkt/teacher"])
  bootstrap_teacher.main(["--records", local, "--output", str(tmp_path / "teacher")])
  flags = ["--num_clusters", "4", "--top_k", "2", "--iters", "3"]
  cluster.main(["--embeddings", "gs://bkt/teacher", "--output", "gs://bkt/concepts"] + flags)
  cluster.main(["--embeddings", str(tmp_path / "teacher"), "--output", str(tmp_path / "concepts")] + flags)
  for name in ("embeddings.npy", "sample_ids.npy"):
    assert gcs_emulator.read_object("bkt", f"teacher/{name}") == (tmp_path / "teacher" / name).read_bytes()
  a = label_table_lib.LabelTable("gs://bkt/concepts/labels.npz")
  b = label_table_lib.LabelTable(str(tmp_path / "concepts" / "labels.npz"))
  np.testing.assert_array_equal(a.sample_ids, b.sample_ids)
  np.testing.assert_array_equal(a.labels, b.labels)
  assert gcs_emulator.read_object("bkt", "concepts/centers.npy") == (tmp_path / "concepts" / "centers.npy").read_bytes()
  assert not os.path.exists("gs:")


def test_plot_metrics_reads_and_writes_a_bucket(gcs_emulator, tmp_path):
  from ovenc_jax.train import plot_metrics
  rows = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.25, "eval/knn_top1": 0.5}, {"step": 2, "loss": 2.0}]
  text = "".join(json.dumps(r) + "\n" for r in rows)
  atomic_io.atomic_write("gs://bkt/plot/metrics.jsonl", lambda f: f.write(text), mode="w")
  assert plot_metrics.read_metrics("gs://bkt/plot") == ({1: 2.5, 2: 2.0}, {"eval/knn_top1": {2: 0.5}})
  plot_metrics.main(["--workdir", "gs://bkt/plot", "--output", "gs://bkt/plot/loss.png"])
  png = gcs_emulator.read_object("bkt", "plot/loss.png")
  assert Image.open(io.BytesIO(png)).size == (1000, 350)
