"""End-to-end runs of the Beam job data_prep.codec_patchify: bad inputs, outputs, runner modes,
flags, and its workers' decoder children."""
import collections
import json
import os
import subprocess
import sys

import av
import numpy as np
import pytest
from PIL import Image

from data_prep import codec_patchify
from data_prep import make_demo_data as md
from data_prep import patchify_output
from data_prep.codec import config, selection, worker
from ovenc_format import records
from tests.helpers import shards
from tests.helpers.codec_clips import digit_clip

FLAGS = ["--image_size", "56", "--patch_size", "14", "--num_frames", "8", "--budget", "0.25"]


def _audio_only(path):
  with av.open(path, "w") as c:
    s = c.add_stream("aac", rate=16000)
    for i in range(8):
      fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                      layout="mono")
      fr.sample_rate, fr.pts = 16000, i * 1024
      for p in s.encode(fr):
        c.mux(p)
    for p in s.encode():
      c.mux(p)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
  d = tmp_path_factory.mktemp("mixed")
  p = lambda name: str(d / name)  # noqa: E731
  valid, bad = {}, {}
  for i in range(3):
    digit_clip(p(f"good_{i}.mp4"), i)
    valid[p(f"good_{i}.mp4")] = "video"
  digit_clip(p("short.mp4"), 5, n=3)  # fewer frames than num_frames: sampled with repetition
  digit_clip(p("rotated.mp4"), 6, rotation=90)
  digit_clip(p("vfr.mp4"), 7, pts_ms=[0, 10, 90, 123, 323, 333, 413, 446])
  digit_clip(p("odd_45x33.mp4"), 8, pix_fmt="yuv444p")  # re-encoded below at an odd size
  frames, _ = md.render_clip(np.random.default_rng(9), 64, 6, 3, 1)
  md.encode_clip(p("odd_45x33.mp4"), frames[:, :33, :45].copy(), gop=4, pix_fmt="yuv444p")
  Image.fromarray(md.render_clip(np.random.default_rng(10), 64, 1, 4, 1)[0][0]).save(
      p("still.png"))
  for name in ("short.mp4", "rotated.mp4", "vfr.mp4", "odd_45x33.mp4", "still.png"):
    valid[p(name)] = "image" if name.endswith(".png") else "video"

  open(p("zero.mp4"), "wb").close()
  bad[p("zero.mp4")] = "empty file"
  data = open(p("good_0.mp4"), "rb").read()
  open(p("truncated.mp4"), "wb").write(data[: len(data) // 2])
  bad[p("truncated.mp4")] = "cannot open as media"  # the index (moov) at the end is cut off
  digit_clip(p("faststart.mp4"), 11, n=16, container_options={"movflags": "+faststart"})
  data = open(p("faststart.mp4"), "rb").read()
  os.remove(p("faststart.mp4"))
  open(p("truncated_faststart.mp4"), "wb").write(data[: len(data) * 2 // 3])
  bad[p("truncated_faststart.mp4")] = "decode error"  # index intact, frame data cut off
  open(p("junk.mp4"), "wb").write(b"this is not a video, only text. " * 64)
  bad[p("junk.mp4")] = "cannot open as media"
  _audio_only(p("audio.mp4"))
  bad[p("audio.mp4")] = "no video stream"
  for w, h in [(1, 1), (7, 5), (4000, 3)]:
    name = p(f"size_{w}x{h}.mp4")
    md.encode_clip(name, np.full((3, h, w, 3), 99, np.uint8), pix_fmt="yuv444p")
    bad[name] = f"frame size {w}x{h}"
  open(p("bad.png"), "wb").write(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
  bad[p("bad.png")] = "cannot read image"
  os.mkfifo(p("hang.mp4"))  # opening a FIFO with no writer blocks forever: a hung decode
  bad[p("hang.mp4")] = "decode timeout"
  bad[p("missing.mp4")] = "does not exist"

  listing = sorted(valid) + sorted(bad)
  (d / "inputs.txt").write_text("\n".join(os.path.basename(x) for x in listing) + "\n")
  labels = {x: i for i, x in enumerate(sorted(valid))}
  (d / "labels.json").write_text(json.dumps(labels))
  return d, valid, bad, labels


@pytest.fixture(scope="module")
def mixed_run(mixed, tmp_path_factory):
  d, valid, bad, labels = mixed
  out = str(tmp_path_factory.mktemp("out") / "ds")
  manifest = codec_patchify.run(["--input", str(d / "inputs.txt"), "--output_dir", out,
                                 "--class_labels", str(d / "labels.json"),
                                 "--decode_timeout", "6", "--shard_mb", "0.03"] + FLAGS)
  return out, manifest


@pytest.mark.slow
def test_bad_inputs_are_reported_and_valid_ones_written_once(mixed, mixed_run):
  _, valid, bad, labels = mixed
  out, manifest = mixed_run
  rows = [json.loads(line) for line in open(os.path.join(out, "failures.jsonl"))]
  reasons = {r["path"]: r["reason"] for r in rows}
  assert len(rows) == len(reasons) == len(bad)
  assert set(reasons) == set(bad)
  for path, pattern in bad.items():
    assert any(part in reasons[path] for part in pattern.split("|")), (path, reasons[path])
  recs = list(records.read_all(out))
  counts = collections.Counter(r["source"] for r in recs)
  assert counts == collections.Counter(list(valid))  # every valid input once, no bad one
  for r in recs:
    assert r["class_label"] == labels[r["source"]]
    assert r["sample_id"] == records.sample_id_for(r["source"])
    kind = valid[r["source"]]
    assert r["grid"].tolist() == ([1, 4, 4] if kind == "image" else [8, 4, 4])
    assert r["positions"].shape[0] == (16 if kind == "image" else 32)
  assert manifest["num_records"] == len(valid) and manifest["num_failures"] == len(bad)
  assert manifest["num_inputs"] == len(valid) + len(bad)
  assert manifest["num_images"] == 1 and manifest["num_videos"] == len(valid) - 1
  assert manifest["num_tokens"] == sum(r["positions"].shape[0] for r in recs)
  assert manifest["format_version"] == records.FORMAT_VERSION
  assert manifest["options"]["image_size"] == 56


def _raw_shard(path):
  from array_record.python import array_record_module
  reader = array_record_module.ArrayRecordReader(str(path))
  try:
    return reader.read_all()
  finally:
    reader.close()


def test_output_layout_is_final_and_complete(mixed_run):
  out, manifest = mixed_run
  names = sorted(os.listdir(out))
  n = manifest["num_shards"]
  shards = [records.shard_name(i, n) for i in range(n)]
  assert names == shards + ["failures.jsonl", "manifest.json"]  # no staging or temp files left
  assert manifest["shards"] == shards
  assert [os.path.basename(x) for x in records.list_shards(out)] == shards
  # One bundle per DirectRunner worker (a thread per core by default): each shard is cut at the
  # first record that takes it to --shard_mb, except each bundle's last one.
  workers = int(codec_patchify._flag(manifest["beam_args"], "--direct_num_workers") or 1)
  limit = 0.03 * 2**20
  sizes = [[len(r) for r in _raw_shard(os.path.join(out, s))] for s in shards]
  assert [len(s) for s in sizes] == manifest["records_per_shard"] and n >= 3
  assert sum(manifest["records_per_shard"]) == manifest["num_records"]
  assert all(sum(s[:-1]) < limit for s in sizes)
  assert sum(sum(s) < limit for s in sizes) <= workers


def test_refuses_to_mix_with_an_earlier_run(mixed, mixed_run):
  d = mixed[0]
  with pytest.raises(ValueError, match="--output_dir.*--overwrite"):
    codec_patchify.run(["--input", str(d / "good_0.mp4"), "--output_dir", mixed_run[0]] + FLAGS)


def test_crash_mid_job_leaves_no_final_shard_or_manifest(tmp_path, monkeypatch):
  inputs = tmp_path / "in"
  inputs.mkdir()
  for i in range(3):
    digit_clip(str(inputs / f"c{i}.mp4"), 30 + i, n=6, size=48)
  add = patchify_output.PartWriter.add
  seen = []

  def add_then_crash(self, data, row):
    if len(seen) == 2:
      raise RuntimeError("simulated crash")
    seen.append(row)
    add(self, data, row)
  monkeypatch.setattr(patchify_output.PartWriter, "add", add_then_crash)
  out = tmp_path / "out"
  with pytest.raises(Exception, match="simulated crash"):
    codec_patchify.run(["--input", str(inputs / "*.mp4"), "--output_dir", str(out),
                        "--decode_timeout", "0", "--shard_mb", "1e-6", "--image_size", "28",
                        "--patch_size", "14", "--num_frames", "4"])
  # Two parts were committed in the staging folder, but nothing final exists.
  staging, = [p for p in out.iterdir()]
  assert staging.name.startswith(patchify_output.STAGING_PREFIX)
  assert len(list(staging.glob("part-*.array_record"))) == 2
  with pytest.raises(ValueError, match="no data-"):
    records.list_shards(str(out))
  from ovenc_jax.input import pipeline as input_pipeline
  # A driver that died after renaming the shards but before the manifest: complete-looking ...
  os.rename(next(staging.glob("part-*.array_record")), out / "data-00000-of-00001.array_record")
  with pytest.raises(ValueError, match="eval.path: no manifest.json"):
    input_pipeline.shard_paths(str(out), "eval.path")  # ... is refused without the manifest


@pytest.mark.slow
def test_direct_runner_modes_give_the_same_records(tmp_path, monkeypatch):
  # Without --runner the job runs Beam's in-process runner; the DirectRunner would first try to
  # download the Prism runner (network at run time).
  # (The DirectRunner swallows a Prism failure and falls back, so calls are counted.)
  from apache_beam.runners.portability import prism_runner
  prism_calls = []

  def no_prism(*a, **k):
    prism_calls.append(a)
    raise RuntimeError("no Prism here")

  monkeypatch.setattr(prism_runner.PrismRunner, "run_pipeline", no_prism)
  inputs = tmp_path / "in"
  inputs.mkdir()
  for i in range(3):
    digit_clip(str(inputs / f"c{i}.mp4"), 20 + i, n=6, size=48)
  Image.fromarray(md.render_clip(np.random.default_rng(1), 48, 1, 2, 1)[0][0]).save(
      str(inputs / "s.png"))
  os.symlink(inputs / "c0.mp4", inputs / "link_to_c0.mp4")  # the same file: not a second sample
  flags = ["--input", str(inputs / "*"), "--image_size", "28", "--patch_size", "14",
           "--num_frames", "4"]
  codec_patchify.run(flags + ["--output_dir", str(tmp_path / "a"), "--decode_timeout", "0",
                              "--shard_compression", "uncompressed"])
  (tmp_path / "b" / "beam-temp-crashed" / "x").mkdir(parents=True)  # left by a crashed run
  m = codec_patchify.run(flags + ["--output_dir", str(tmp_path / "b"), "--direct_num_workers=2",
                                  "--direct_running_mode=multi_processing", "--shard_compression",
                                  "snappy"])
  assert m["num_inputs"] == 4 and m["num_failures"] == 0
  assert sorted(os.listdir(tmp_path / "b")) == m["shards"] + ["failures.jsonl", "manifest.json"]

  # No runner flags: a worker thread per core, each with its decoder child.
  monkeypatch.setattr(os, "cpu_count", lambda: 2)
  m = codec_patchify.run(flags + ["--output_dir", str(tmp_path / "c")])
  assert m["beam_args"] == ["--direct_num_workers=2", "--direct_running_mode=multi_threading"]
  assert m["shard_compression"] == "zstd:1"
  a, b, c = shards.raw_records(tmp_path / "a"), shards.raw_records(tmp_path / "b"), shards.raw_records(tmp_path / "c")
  assert len(a) == 4 and a == b == c
  assert prism_calls == []
  # The same records, stored raw, with snappy and with zstd level 1 (the shards say which).
  from array_record.python import array_record_module
  for d, codec in (("a", "uncompressed"), ("b", "snappy"), ("c", "zstd:1")):
    for path in records.list_shards(str(tmp_path / d)):
      reader = array_record_module.ArrayRecordReader(path)
      assert codec in reader.writer_options_string().split(","), (d, reader.writer_options_string())
      reader.close()
  with pytest.raises(ValueError, match="--shard_compression='lz4'"):
    codec_patchify.run(flags + ["--output_dir", str(tmp_path / "d"), "--shard_compression", "lz4"])


def test_direct_defaults_leave_given_flags_alone():
  d = codec_patchify._direct_defaults
  n = os.cpu_count()
  assert d([], 600.0, 1000) == [f"--direct_num_workers={n}", "--direct_running_mode=multi_threading"]
  assert d([], 600.0, 1) == ["--direct_num_workers=1", "--direct_running_mode=multi_threading"]
  assert d(["--direct_num_workers=3"], 600.0, 1) == ["--direct_num_workers=3",
                                                     "--direct_running_mode=multi_threading"]
  assert d(["--direct_running_mode", "multi_processing"], 1.0, 1000) == [
      "--direct_running_mode", "multi_processing", f"--direct_num_workers={n}"]
  assert d([], 0.0, 1000) == []  # in-process decoding: Beam's own default (one in-memory worker)
  assert d(["--runner=dask"], 600.0, 1000) == ["--runner=dask"]


def test_expand_inputs(tmp_path):
  for name in ("x.mp4", "y.png", "notes.md"):
    (tmp_path / name).write_bytes(b"1")
  sub = tmp_path / "sub"
  sub.mkdir()
  (sub / "z.webm").write_bytes(b"1")
  (tmp_path / "list.txt").write_text("x.mp4\n# comment\n\n/abs/elsewhere.mp4\nx.mp4\n")
  got = codec_patchify.expand_inputs([str(tmp_path / "*.mp4"), str(tmp_path / "list.txt")])
  assert got == sorted({str(tmp_path / "x.mp4"), "/abs/elsewhere.mp4"})
  os.symlink(tmp_path / "x.mp4", tmp_path / "sub" / "link.mp4")
  assert codec_patchify.expand_inputs([str(tmp_path / "sub" / "link.mp4")]) == [
      str(tmp_path / "x.mp4")]
  got = codec_patchify.expand_inputs([str(tmp_path)])
  assert got == sorted(str(tmp_path / n) for n in ("x.mp4", "y.png", "sub/z.webm"))
  with pytest.raises(ValueError, match="matches no files"):
    codec_patchify.expand_inputs([str(tmp_path / "*.avi")])


def test_class_labels_and_flag_errors(tmp_path):
  (tmp_path / "l.json").write_text(json.dumps({"a.mp4": "three"}))
  with pytest.raises(ValueError, match="--class_labels.*a.mp4"):
    codec_patchify.load_class_labels(str(tmp_path / "l.json"))
  (tmp_path / "l.json").write_text("[1, 2]")
  with pytest.raises(ValueError, match="--class_labels.*JSON object"):
    codec_patchify.load_class_labels(str(tmp_path / "l.json"))
  with pytest.raises(ValueError, match="config budget="):
    codec_patchify.run(["--input", "x.mp4", "--output_dir", str(tmp_path / "o"),
                        "--budget", "0"])


def test_demo_data_runs_end_to_end_with_digit_labels(tmp_path):
  m = md.make_demo_data(str(tmp_path / "demo"), num_clips=6, num_images=3, size=64,
                        num_frames=8, seed=1)
  assert len(m["items"]) == 9
  labels = json.loads((tmp_path / "demo" / "class_labels.json").read_text())
  man = codec_patchify.run(["--input", str(tmp_path / "demo" / "list.txt"), "--output_dir",
                            str(tmp_path / "out"), "--class_labels",
                            str(tmp_path / "demo" / "class_labels.json"), "--decode_timeout",
                            "0"] + FLAGS)
  assert man["num_records"] == 9 and man["num_failures"] == 0
  recs = list(records.read_all(str(tmp_path / "out")))
  assert sorted((r["source"], r["class_label"]) for r in recs) == sorted(labels.items())
  for path, item in m["items"].items():
    assert f"digit{item['label']}" in os.path.basename(path)
  with av.open(next(p for p in labels if p.endswith(".mp4"))) as c:
    types = "".join("?IPB"[f.pict_type] for f in c.decode(video=0))
  assert types == "IPPPPPPP"  # GOP 16, no B-frames


def test_visualize_marks_kept_patches(mixed_run, tmp_path):
  from data_prep import visualize
  out, _ = mixed_run
  recs = list(records.read_all(out))
  i = next(i for i, r in enumerate(recs) if r["source"].endswith("good_1.mp4"))
  rec = visualize.record_at(out, i)
  assert rec["source"] == recs[i]["source"]
  frames = visualize.source_frames(rec)
  assert frames.shape == (8, 56, 56, 3)
  kept = np.zeros((8, 4, 4), bool)
  for (t, h, w), patch in zip(rec["positions"], rec["patches"]):
    # The re-decoded frames line up with what the patchifier stored.
    np.testing.assert_array_equal(frames[t, h * 14:(h + 1) * 14, w * 14:(w + 1) * 14], patch)
    kept[t, h, w] = True
  img = np.asarray(visualize.render(rec, frames, dim=0.25, scale=1, columns=8))
  # Tile t sits at x = 4 + t * 60, y = 4 + 14 (label strip); check one kept and one dropped.
  t, h, w = rec["positions"][0]
  y, x = 18 + h * 14, 4 + t * 60 + w * 14
  np.testing.assert_array_equal(img[y:y + 14, x:x + 14], rec["patches"][0])
  t, h, w = np.argwhere(~kept)[0]
  y, x = 18 + h * 14, 4 + t * 60 + w * 14
  want = (frames[t, h * 14:(h + 1) * 14, w * 14:(w + 1) * 14] * np.float32(0.25)).astype(np.uint8)
  np.testing.assert_array_equal(img[y:y + 14, x:x + 14], want)
  png = str(tmp_path / "v.png")
  visualize.main(["--input", out, "--index", str(i), "--output", png])
  assert Image.open(png).size == (8 * (2 * 56 + 4) + 4, 2 * 56 + 14 + 8)
  with pytest.raises(ValueError, match="out of range"):
    visualize.record_at(out, 10_000)


def test_cli_flags_reach_the_config():
  from data_prep import codec_patchify
  args, rest = codec_patchify.build_parser().parse_known_args(
      ["--input", "x", "--output_dir", "y", "--iframe", "scored", "--transcode", "never",
       "--seek", "never", "--seek_min_gap", "3", "--tie_seed", "5", "--interval_frames", "2",
       "--runner=DirectRunner"])
  cfg = codec_patchify.config_from_args(args)
  assert (cfg.iframe, cfg.transcode, cfg.seek, cfg.seek_min_gap, cfg.tie_seed,
          cfg.interval_frames) == ("scored", "never", "never", 3.0, 5, 2)
  assert rest == ["--runner=DirectRunner"]
  d = codec_patchify.config_from_args(codec_patchify.build_parser().parse_known_args(
      ["--input", "x", "--output_dir", "y"])[0])
  assert (d.iframe, d.transcode, d.seek, d.interval_frames) == ("keep", "auto", "auto", 0)


SELECTOR_FLAGS = ["--image_size", "56", "--patch_size", "14", "--num_frames", "8",
                  "--decode_timeout", "0"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
  d = tmp_path_factory.mktemp("clips")
  md.make_demo_data(str(d), num_clips=3, num_images=0, size=56, num_frames=8)
  return d


def test_cli_selector_flag_reaches_records_and_manifest(clips, tmp_path):
  out = str(tmp_path / "rec")
  m = codec_patchify.run(["--input", str(clips / "list.txt"), "--output_dir", out, "--selector", "random",
                          "--budget", "0.125", *SELECTOR_FLAGS])
  assert m["options"]["selector"] == "random" and m["signals"] == {"random": 3}
  assert m["num_keep_per_video"] == 16
  for rec in records.read_all(out):
    np.testing.assert_array_equal(
        rec["positions"], selection.random_selection((8, 4, 4), 16, rec["sample_id"]))
  m = codec_patchify.run(["--input", str(clips / "list.txt"), "--output_dir", out, "--overwrite",
                          "--selector", "dense", *SELECTOR_FLAGS])
  assert m["signals"] == {"dense": 3} and m["num_tokens"] == 3 * 128
  assert json.load(open(f"{out}/manifest.json"))["num_keep_per_video"] == 128


def test_setup_survives_a_child_that_cannot_start(tmp_path, monkeypatch):
  def refuse(*args, **kwargs):
    raise OSError("no processes left")
  monkeypatch.setattr(worker.subprocess, "Popen", refuse)
  cfg = config.PatchifyConfig(image_size=28, patch_size=14, num_frames=4).validate()
  staging = str(tmp_path / "staging")
  os.makedirs(staging)
  fn = codec_patchify.PatchifyFn(cfg, {}, 30.0, 1e9, staging, 1 << 20)
  fn.setup()  # the failed prestart is logged, not raised
  assert fn.worker.proc is None and fn.worker.conn is None
  fn.start_bundle()
  fn.process(str(tmp_path / "x.mp4"))
  fn.finish_bundle()
  fn.teardown()
  parts = patchify_output.read_parts(staging)
  rows = [r for p in parts for r in p["failures"]]
  assert rows == [{"path": str(tmp_path / "x.mp4"),
                   "reason": "internal error: OSError: no processes left"}]


def test_beam_worker_side_imports_stay_light():
  """A Beam worker only hands videos to its decoder child: importing the job module there pulls in
  neither numba (the child compiles and runs the signal kernel) nor dask's distributed, and asking
  whether it runs in a Dask worker at teardown does not import distributed either."""
  code = ("import sys; from data_prep import codec_patchify as cp; a = cp._in_dask_worker(); "
          "print(a, 'numba' in sys.modules, 'distributed' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True).stdout.split()
  assert out == ["False", "False", "False"]


def _setup_in_daemon(queue):
  cfg = config.PatchifyConfig(image_size=28, patch_size=14, num_frames=4).validate()
  fn = codec_patchify.PatchifyFn(cfg, {}, 5.0, 30.0, "/nonexistent", 1)
  try:
    fn.setup()
    queue.put("started")
  except RuntimeError as e:
    queue.put(str(e))
  finally:
    fn.teardown()


def test_daemonic_worker_gets_a_clear_error():
  import multiprocessing
  ctx = multiprocessing.get_context("fork")
  queue = ctx.Queue()
  p = ctx.Process(target=_setup_in_daemon, args=(queue,), daemon=True)  # as Dask's default worker
  p.start()
  msg = queue.get(timeout=60)
  p.join(10)
  assert "DASK_DISTRIBUTED__WORKER__DAEMON=False" in msg and "--decode_timeout 0" in msg
