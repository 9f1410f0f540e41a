"""End-to-end runs of the Beam job data_prep.codec_patchify: bad inputs, outputs, runner modes."""
import collections
import dataclasses
import glob
import json
import os

import apache_beam as beam
import av
import numpy as np
import pytest
from PIL import Image

from data_prep import codec_patchify
from data_prep.codec import signals as cs
from data_prep import make_demo_data as md
from ovenc_format import records
from tests.test_bench_interval import _bench as _bench_codec

FLAGS = ["--image_size", "56", "--patch_size", "14", "--num_frames", "8", "--budget", "0.25"]


def _clip(path, seed, n=8, size=64, **kw):
  frames, _ = md.render_clip(np.random.default_rng(seed), size, n, label=seed % 10, num_digits=2)
  md.encode_clip(path, frames, gop=4, **kw)


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
    _clip(p(f"good_{i}.mp4"), i)
    valid[p(f"good_{i}.mp4")] = "video"
  _clip(p("short.mp4"), 5, n=3)  # fewer frames than num_frames: sampled with repetition
  _clip(p("rotated.mp4"), 6, rotation=90)
  _clip(p("vfr.mp4"), 7, pts_ms=[0, 10, 90, 123, 323, 333, 413, 446])
  _clip(p("odd_45x33.mp4"), 8, pix_fmt="yuv444p")  # re-encoded below at an odd size
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
  _clip(p("faststart.mp4"), 11, n=16, container_options={"movflags": "+faststart"})
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
    _clip(str(inputs / f"c{i}.mp4"), 30 + i, n=6, size=48)
  add = codec_patchify.PartWriter.add
  seen = []

  def add_then_crash(self, data, row):
    if len(seen) == 2:
      raise RuntimeError("simulated crash")
    seen.append(row)
    add(self, data, row)
  monkeypatch.setattr(codec_patchify.PartWriter, "add", add_then_crash)
  out = tmp_path / "out"
  with pytest.raises(Exception, match="simulated crash"):
    codec_patchify.run(["--input", str(inputs / "*.mp4"), "--output_dir", str(out),
                        "--decode_timeout", "0", "--shard_mb", "1e-6", "--image_size", "28",
                        "--patch_size", "14", "--num_frames", "4"])
  # Two parts were committed in the staging folder, but nothing final exists.
  staging, = [p for p in out.iterdir()]
  assert staging.name.startswith(codec_patchify.STAGING_PREFIX)
  assert len(list(staging.glob("part-*.array_record"))) == 2
  with pytest.raises(ValueError, match="no data-"):
    records.list_shards(str(out))
  from ovenc_jax.input import pipeline as input_pipeline
  # A driver that died after renaming the shards but before the manifest: complete-looking ...
  os.rename(next(staging.glob("part-*.array_record")), out / "data-00000-of-00001.array_record")
  with pytest.raises(ValueError, match="eval.path: no manifest.json"):
    input_pipeline.shard_paths(str(out), "eval.path")  # ... is refused without the manifest


def _digit_rows(ids):
  from sklearn.datasets import load_digits
  from tests.helpers import digit_shards
  d = load_digits()
  rng = np.random.default_rng(0)
  recs = [digit_shards.digit_record(d.images[i], int(d.target[i]), i, rng) for i in ids]
  return [(records.encode_record(r), [r["sample_id"], r["source"], len(r["positions"]), "image",
                                      "image"]) for r in recs]


def test_finalize_keeps_each_record_once_and_refuses_a_gap(tmp_path):
  rows = _digit_rows(range(5))
  paths = [r[1][1] for r in rows] + ["bad.mp4"]
  staging = tmp_path / "out" / "beam-temp-run"
  staging.mkdir(parents=True)
  (tmp_path / "out" / "beam-temp-stale").mkdir()  # left by a crashed run

  def part(items, failures=(), shard_bytes=10**9):
    w = codec_patchify.PartWriter(str(staging), shard_bytes)
    for data, row in items:
      w.add(data, row)
    for f in failures:
      w.fail(f)
    w.close()

  part(rows[:3])
  part(rows[:3])  # a retried bundle that cut the same shard: same part, overwritten
  part(rows[2:4], [{"path": "bad.mp4", "reason": "decode timeout: x"},
                   {"path": rows[2][1][1], "reason": "decode timeout: y"}])  # overlaps one
  header = {"num_inputs": len(paths)}
  with pytest.raises(codec_patchify.IncompleteOutput, match=r"1 input\(s\) have neither.*00004"):
    codec_patchify.finalize_output(str(tmp_path / "out"), str(staging), paths, header)
  assert sorted(os.listdir(tmp_path / "out")) == ["beam-temp-run", "beam-temp-stale"]
  assert len(list(staging.glob("part-*.json"))) == 2
  part(rows[4:], shard_bytes=1)
  m = codec_patchify.finalize_output(str(tmp_path / "out"), str(staging), paths, header)
  got = [r["sample_id"] for r in records.read_all(str(tmp_path / "out"))]
  assert sorted(got) == sorted(r[1][0] for r in rows)
  assert m["num_records"] == 5 and m["num_shards"] == 3 and sum(m["records_per_shard"]) == 5
  # The record outranks the failed attempt at the same input; the other failure stays.
  assert _failures(tmp_path / "out") == [{"path": "bad.mp4", "reason": "decode timeout: x"}]
  assert sorted(os.listdir(tmp_path / "out")) == m["shards"] + ["failures.jsonl", "manifest.json"]


def _failures(out):
  return [json.loads(line) for line in open(os.path.join(out, "failures.jsonl"))]


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
    _clip(str(inputs / f"c{i}.mp4"), 20 + i, n=6, size=48)
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

  def raw(d):
    from array_record.python import array_record_module
    out = []
    for path in records.list_shards(str(d)):
      reader = array_record_module.ArrayRecordReader(path)
      out.extend(reader.read_all())
      reader.close()
    return sorted(out)

  # No runner flags: a worker thread per core, each with its decoder child.
  monkeypatch.setattr(os, "cpu_count", lambda: 2)
  m = codec_patchify.run(flags + ["--output_dir", str(tmp_path / "c")])
  assert m["beam_args"] == ["--direct_num_workers=2", "--direct_running_mode=multi_threading"]
  assert m["shard_compression"] == "zstd:1"
  a, b, c = raw(tmp_path / "a"), raw(tmp_path / "b"), raw(tmp_path / "c")
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


def test_shard_compression_values():
  w = codec_patchify.writer_options
  assert w("zstd:1") == "group_size:1,zstd:1" and w("uncompressed") == "group_size:1,uncompressed"
  assert w("brotli:11") == "group_size:1,brotli:11" and w("snappy") == "group_size:1,snappy"
  for bad in ("zstd:0", "zstd:23", "brotli:12", "zstd", "zstd:-1", "ZSTD:1", "snappy,zstd:1", ""):
    with pytest.raises(ValueError, match=r"--shard_compression="):
      w(bad)


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


def test_benchmark_smoke(tmp_path):
  bench = _bench_codec()
  path = str(tmp_path / "b.json")
  # The beam section (DirectRunner and Dask jobs, ~40 s here) is left out; test_dask_runner and
  # the tests above run those jobs.
  fig = bench.main(["--clips", "1", "--frames", "8", "--size", "64", "--rounds", "1",
                    "--image_size", "56", "--num_frames", "4", "--sections", "codec,transcode,rss",
                    "--transcode_rounds", "1", "--rss_videos", "1", "--json", path])
  saved = json.load(open(path))
  assert saved["frames"] == 8 and saved["videos"] == 1
  assert saved["rss_ratio_10x"] == pytest.approx(
      saved["rss_peak_gib_10x"] / saved["rss_peak_gib_1x"])
  for key in ("patchify_over_decode", "a_decode_frames_per_s", "b_decode_mvs_videos_per_s",
              "c_patchify_frames_per_s", "rss_ratio_10x", "transcode_over_patchify",
              "every_frame_ceiling_over_decode"):
    assert isinstance(saved[key], float) and saved[key] > 0 and saved[key] == fig[key]
  assert saved["patchify_over_decode"] == pytest.approx(
      saved["c_patchify_videos_per_s"] / saved["a_decode_videos_per_s"])


@pytest.mark.parametrize("options", [{"bf": "0", "g": "12"},
                                     {"bf": "3", "b-pyramid": "none", "refs": "1", "g": "12"}])
def test_benchmark_ceiling_scores_only_the_sampled_frames(tmp_path, options):
  """bench_codec's (c0) counterfactual reads every frame as the default does but scores only the
  sampled ones: its records are --interval_frames 1's, and not the default's."""
  from tests.test_codec_v2 import _encode, _pan_and_square
  bench = _bench_codec()
  path = str(tmp_path / "c.mp4")
  _encode(path, _pan_and_square(n=40, size=128), options=options)
  cfg = cs.PatchifyConfig(image_size=128, patch_size=16, num_frames=4, budget=0.25).validate()
  with bench.between_samples_free():
    free = bench.record(path, cfg)
  assert cs.IntervalScorer._score.__name__ == "_score"  # restored
  assert free == bench.record(path, dataclasses.replace(cfg, interval_frames=1))
  assert free != bench.record(path, cfg)


def test_decode_worker_reports_a_crashed_decoder_and_recovers(tmp_path):
  import signal
  import threading
  fifo = str(tmp_path / "blocks.mp4")
  os.mkfifo(fifo)
  good = str(tmp_path / "good.mp4")
  _clip(good, 3, n=6, size=48)
  cfg = cs.PatchifyConfig(image_size=28, patch_size=14, num_frames=4).validate()
  worker = cs.DecodeWorker(cfg, timeout=60)
  try:
    worker._start()
    # The child blocks opening the FIFO; killing it stands in for a decoder crash.
    threading.Timer(1.0, lambda: os.kill(worker.proc.pid, signal.SIGKILL)).start()
    result = worker.run(fifo, -1)
    assert result == ("fail", f"decoder process died (exit code {-signal.SIGKILL})")
    ok = worker.run(good, 5)  # a fresh child takes over
    assert ok[0] == "ok" and records.decode_record(ok[1])["class_label"] == 5
  finally:
    worker.close()


def test_decode_worker_close_is_safe_in_every_state(tmp_path, monkeypatch):
  import signal
  cfg = cs.PatchifyConfig(image_size=28, patch_size=14, num_frames=4).validate()
  cs.DecodeWorker(cfg, timeout=5).close()  # never started
  worker = cs.DecodeWorker(cfg, timeout=5)
  worker._start()
  os.kill(worker.proc.pid, signal.SIGKILL)  # died
  worker.proc.wait(5)
  worker.close()
  worker.close()  # closed twice

  def refuse(*args, **kwargs):
    raise OSError("cannot start the decoder child")
  monkeypatch.setattr(cs.subprocess, "Popen", refuse)
  worker = cs.DecodeWorker(cfg, timeout=5)
  with pytest.raises(OSError, match="decoder child"):
    worker.run(str(tmp_path / "x.mp4"), -1)  # start failed half-way: a socket pair, no child
  worker.close()
  assert worker.proc is None and worker.conn is None


def _setup_in_daemon(queue):
  cfg = cs.PatchifyConfig(image_size=28, patch_size=14, num_frames=4).validate()
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
