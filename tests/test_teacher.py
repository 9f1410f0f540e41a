"""data_prep.teacher: a random tiny CLIP tower on real clips and images, checked frame by frame."""
import json
import os

import av
import numpy as np
import pytest
import torch
import transformers

from data_prep import cluster, codec_patchify, teacher
from ovenc_format import label_table, records
from data_prep.codec import clip, config
from tests.helpers import codec_clips, digit_shards, tiny_clip

PROJ = tiny_clip.PROJ
LENGTHS = {"a.mp4": 16, "b.mp4": 11, "c.mp4": 5}


def _clip_frames(n, seed):
  frames, _ = codec_clips.square_frames(n=n, size=96, seed=seed, step=(1, 2))
  return frames


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  return tiny_clip.save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
  """Three real H.264 clips, a PNG, a corrupt .mp4 and a video stream without frames."""
  d = tmp_path_factory.mktemp("media")
  good = d / "good"
  good.mkdir()
  for seed, (name, n) in enumerate(LENGTHS.items()):
    codec_clips.encode(str(good / name), _clip_frames(n, seed), options={"g": "4"})
  from PIL import Image
  rng = np.random.default_rng(7)
  Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(d / "still.png")
  bad = d / "bad"
  bad.mkdir()
  (bad / "corrupt.mp4").write_bytes(rng.integers(0, 255, 4000, dtype=np.uint8).tobytes())
  # A video stream with a header and no frame.
  (bad / "empty.y4m").write_bytes(b"YUV4MPEG2 W64 H64 F25:1 Ip A1:1 C420jpeg\n")
  return d


def _reference_rows(model_dir, frames_of, frames, per_frame_dim, rule="linspace"):
  """The model on the processor's output one frame at a time, the recipe in NumPy."""
  model = transformers.CLIPVisionModelWithProjection.from_pretrained(model_dir).eval()
  proc = transformers.CLIPImageProcessor.from_pretrained(model_dir)
  out = {}
  for key, all_frames in frames_of.items():
    n = len(all_frames)
    if rule == "linspace":
      idx = np.rint(np.linspace(0, n - 1, frames)).astype(int)
    else:
      step = max(1, n // frames)
      idx = np.minimum(np.arange(frames) * step + step // 2, n - 1)
    per = []
    for i in idx:
      px = proc(images=all_frames[i], return_tensors="pt")["pixel_values"]
      with torch.no_grad():
        per.append(model(pixel_values=px).image_embeds[0].numpy())
    per = np.stack(per).astype(np.float64)
    if per_frame_dim:
      per = per[:, :per_frame_dim]
    per /= np.linalg.norm(per, axis=1, keepdims=True)
    row = per.reshape(-1)
    out[key] = row / np.linalg.norm(row)
  return out


def _decoded(path):
  with av.open(str(path)) as c:
    return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def _read(out_dir):
  x, ids = cluster.load_embeddings(out_dir)
  return dict(zip(ids.tolist(), x))


def _sid(path):
  return records.sample_id_for(os.path.realpath(path))


@pytest.fixture(scope="module")
def main_run(tiny_model, media, tmp_path_factory):
  out = tmp_path_factory.mktemp("teacher_out")
  manifest = teacher.run(["--input", str(media / "good"), "--input", str(media / "bad/*"),
                          "--input", str(media / "still.png"), "--model", tiny_model,
                          "--output_dir", str(out), "--per_frame_dim", "32",
                          "--image_embedding", "frames", "--shard_size", "2",
                          "--decode_workers", "1", "--batch_size", "5"])
  return out, manifest


def test_embeddings_match_reference_and_failures_recorded(tiny_model, media, main_run):
  out, manifest = main_run
  got = _read(out)
  frames_of = {_sid(media / "good" / k): _decoded(media / "good" / k) for k in LENGTHS}
  from PIL import Image
  still = np.asarray(Image.open(media / "still.png").convert("RGB"))
  frames_of[_sid(media / "still.png")] = [still] * 8  # --image_embedding frames
  ref = _reference_rows(tiny_model, frames_of, 8, 32)
  assert sorted(got) == sorted(ref)
  for sid, row in ref.items():
    assert got[sid].shape == (8 * 32,)
    np.testing.assert_allclose(got[sid], row, atol=1e-5)
  assert manifest["num_embeddings"] == 4 and manifest["num_failures"] == 2
  assert manifest["num_shards"] == 3
  fails = [json.loads(line) for line in open(out / "failures.jsonl")]
  assert sorted(os.path.basename(f["path"]) for f in fails) == ["corrupt.mp4", "empty.y4m"]
  assert all(f["reason"] for f in fails)


def test_other_recipe_segment_rule_and_beam_mode(tiny_model, media, tmp_path):
  flags = ["--input", str(media / "good"), "--model", tiny_model, "--frames", "3",
           "--per_frame_dim", "0", "--frame_rule", "segment"]
  teacher.run(flags + ["--output_dir", str(tmp_path / "local"), "--decode_workers", "0"])
  got = _read(tmp_path / "local")
  frames_of = {_sid(media / "good" / k): _decoded(media / "good" / k) for k in LENGTHS}
  ref = _reference_rows(tiny_model, frames_of, 3, 0, rule="segment")
  for sid, row in ref.items():
    assert got[sid].shape == (3 * PROJ,)
    np.testing.assert_allclose(got[sid], row, atol=1e-5)
  # The Beam job (in-process DirectRunner) writes the same rows.
  teacher.run(flags + ["--output_dir", str(tmp_path / "beam"), "--mode", "beam",
                       "--shard_size", "2"])
  beam_rows = _read(tmp_path / "beam")
  assert sorted(beam_rows) == sorted(got)
  for sid in got:
    np.testing.assert_allclose(beam_rows[sid], got[sid], atol=1e-6)


def test_images_use_their_embedding_directly(tiny_model, media, tmp_path):
  teacher.run(["--input", str(media / "still.png"), "--model", tiny_model, "--output_dir",
               str(tmp_path), "--decode_workers", "0"])
  model = transformers.CLIPVisionModelWithProjection.from_pretrained(tiny_model).eval()
  proc = transformers.CLIPImageProcessor.from_pretrained(tiny_model)
  from PIL import Image
  px = proc(images=np.asarray(Image.open(media / "still.png").convert("RGB")),
            return_tensors="pt")["pixel_values"]
  with torch.no_grad():
    ref = model(pixel_values=px).image_embeds[0].numpy()
  got = _read(tmp_path)[_sid(media / "still.png")]
  np.testing.assert_allclose(got, ref / np.linalg.norm(ref), atol=1e-5)
  # Videos and images of different widths cannot share one folder.
  with pytest.raises(ValueError, match="--image_embedding frames"):
    teacher.run(["--input", str(media / "still.png"), "--input", str(media / "good"), "--model",
                 tiny_model, "--output_dir", str(tmp_path / "mixed"), "--per_frame_dim", "32",
                 "--decode_workers", "0"])


def test_ids_align_with_codec_records_and_dense_records_input(tiny_model, media, main_run,
                                                               tmp_path):
  # The codec job's own listing and per-file record code (its Beam wrapping costs seconds).
  paths = codec_patchify.expand_inputs([str(media / "good"), str(media / "still.png")])
  cfg = config.PatchifyConfig(selector="dense", num_frames=4, image_size=64, patch_size=16)
  recs = [clip.patchify_file(p, cfg, source=p) for p in paths]
  assert sorted(r["sample_id"] for r in recs) == sorted(_read(main_run[0]))
  shards = digit_shards.write_shards(str(tmp_path / "shards"), recs, num_shards=2)
  # The records' own frames (every patch kept) feed the teacher too, keyed by their sample_id.
  teacher.run(["--records", str(shards), "--model", tiny_model, "--output_dir",
               str(tmp_path / "from_records"), "--frames", "4", "--per_frame_dim", "16",
               "--decode_workers", "0"])
  got = _read(tmp_path / "from_records")
  frames_of = {}
  for r in recs:
    t, h, w = r["grid"]
    video = np.zeros((t, h * 16, w * 16, 3), np.uint8)
    for (ti, hi, wi), patch in zip(r["positions"], r["patches"]):
      video[ti, hi * 16:(hi + 1) * 16, wi * 16:(wi + 1) * 16] = patch
    frames_of[r["sample_id"]] = list(video)
  ref = _reference_rows(tiny_model, frames_of, 4, 16)
  assert sorted(got) == sorted(ref)
  for sid, row in ref.items():
    np.testing.assert_allclose(got[sid], row, atol=1e-5)


def test_resume_skips_done_shards_and_refuses_other_settings(tiny_model, media, main_run):
  out, first = main_run
  flags = ["--input", str(media / "good"), "--input", str(media / "bad/*"),
           "--input", str(media / "still.png"), "--model", tiny_model, "--output_dir", str(out),
           "--per_frame_dim", "32", "--image_embedding", "frames", "--shard_size", "2",
           "--decode_workers", "0"]
  files = sorted(out.glob("embeddings-*.npy"))
  before = {f.name: f.stat().st_mtime_ns for f in files}
  redo = files[1]
  kept = np.load(redo)
  redo.unlink()
  second = teacher.run(flags)
  after = {f.name: f.stat().st_mtime_ns for f in sorted(out.glob("embeddings-*.npy"))}
  assert set(after) == set(before)
  assert all(after[n] == before[n] for n in before if n != redo.name)
  np.testing.assert_allclose(np.load(redo), kept, atol=1e-6)
  assert second["num_embeddings"] == first["num_embeddings"]
  other = list(flags)
  other[other.index("--per_frame_dim") + 1] = "16"
  with pytest.raises(ValueError, match="other settings.*per_frame_dim"):
    teacher.run(other)


def test_output_feeds_cluster(main_run, tmp_path):
  out, _ = main_run
  cluster.main(["--embeddings", str(out), "--num_clusters", "2", "--top_k", "2", "--output",
                str(tmp_path), "--iters", "2", "--init", "random"])
  table = label_table.load_label_table(str(tmp_path / label_table.FILE_NAME))
  assert sorted(table) == sorted(_read(out))
  assert all(len(row) == 2 for row in table.values())


def test_cli_errors(tiny_model, media, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    teacher.main(["--input", str(media / "good"), "--model", tiny_model, "--output_dir",
                  str(tmp_path / "a"), "--decode_workers", "0"])  # --per_frame_dim 512 > 48
  assert e.value.code == 2 and "--per_frame_dim must be in [0, 48]" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    teacher.main(["--input", str(media / "bad"), "--model", tiny_model, "--output_dir",
                  str(tmp_path / "b"), "--per_frame_dim", "8", "--decode_workers", "0"])
  assert e.value.code == 1 and "nothing was written" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    teacher.main(["--input", "x.mp4", "--model", str(tmp_path / "none"), "--output_dir",
                  str(tmp_path / "c"), "--direct_num_workers=2"])
  assert e.value.code == 2 and "--mode beam" in capsys.readouterr().err
