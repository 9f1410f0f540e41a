"""CLI errors of the offline jobs: unknown flags, --max_failure_fraction, and the progress policy."""
import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from array_record.python import array_record_module

from data_prep import cluster, codec_patchify
from ovenc_format import failures, progress, records
from tests.helpers import shards
from tests.helpers.codec_clips import digit_clip

SMALL = ["--image_size", "28", "--patch_size", "14", "--num_frames", "4", "--decode_timeout", "0"]


def _tree_hashes(d):
  """{name: sha1} of every file under d (empty when d does not exist)."""
  out = {}
  for root, _, names in os.walk(d):
    for n in names:
      p = os.path.join(root, n)
      out[os.path.relpath(p, d)] = hashlib.sha1(open(p, "rb").read()).hexdigest()
  return out


def _exit_code(fn, argv):
  with pytest.raises(SystemExit) as e:
    fn(argv)
  return e.value.code


# ---- unknown flags ------------------------------------------------------------------------------

def test_typo_flag_is_an_error_naming_it_and_the_closest_flag(tmp_path):
  out = tmp_path / "out"
  p = subprocess.run([sys.executable, "-m", "data_prep.codec_patchify", "--input", str(tmp_path / "x.mp4"),
                      "--output_dir", str(out), "--budgte", "0.1"], capture_output=True, text=True)
  assert p.returncode == 2, p.stderr
  lines = [l for l in p.stderr.splitlines() if "error" in l]
  assert lines == ["python -m data_prep.codec_patchify: error: unknown flag --budgte (did you mean --budget?)"]
  assert not out.exists()


def test_beam_option_typos_are_caught_and_beam_options_pass(tmp_path, capsys):
  out = tmp_path / "out"
  base = ["--input", str(tmp_path / "x.mp4"), "--output_dir", str(out)]
  assert _exit_code(codec_patchify.main, base + ["--direct_num_workrs=2"]) == 2
  assert "unknown flag --direct_num_workrs (did you mean --direct_num_workers?)" in capsys.readouterr().err
  assert _exit_code(codec_patchify.main, base + ["--max_failure_fractoin", "0"]) == 2
  assert "(did you mean --max_failure_fraction?)" in capsys.readouterr().err
  assert _exit_code(codec_patchify.main, base + ["--max_failure_fraction", "1.5"]) == 2
  assert "--max_failure_fraction" in capsys.readouterr().err
  assert _exit_code(codec_patchify.main, base + ["--budget", "0.1", "stray"]) == 2
  assert "unexpected argument 'stray'" in capsys.readouterr().err
  assert not out.exists()
  # Options Beam defines pass, the Dask runner's included; after '--' anything passes unchecked.
  beam = [f"--runner={codec_patchify.DASK_RUNNER}", "--dask_client_address=tcp://127.0.0.1:1",
          "--dask_npartitions", "3", "--direct_num_workers", "2",
          "--direct_running_mode=multi_threading", "--runner", "dask"]
  args, beam_args = codec_patchify.parse_args(base + ["--budget", "0.2"] + beam + ["--", "--own_option=1"])
  assert args.budget == 0.2 and args.max_failure_fraction == failures.DEFAULT_MAX_FAILURE_FRACTION
  assert beam_args == beam + ["--own_option=1"]


def test_cluster_and_embed_reject_unknown_and_abbreviated_flags(tmp_path, capsys):
  from ovenc_jax.eval import embed
  base = ["--embeddings", str(tmp_path), "--output", str(tmp_path / "o")]
  assert _exit_code(cluster.main, base + ["--num_clusters", "2", "--itres", "3"]) == 2
  assert "unrecognized arguments: --itres" in capsys.readouterr().err
  assert _exit_code(cluster.main, base + ["--num_clust", "2"]) == 2  # no prefix matching
  assert "--num_clust" in capsys.readouterr().err
  base = ["--workdir", str(tmp_path), "--records", str(tmp_path), "--output", str(tmp_path / "o")]
  assert _exit_code(embed.main, base + ["--tokens_per_rwo", "8"]) == 2
  assert "unrecognized arguments: --tokens_per_rwo" in capsys.readouterr().err
  assert _exit_code(embed.main, base + ["--max_failure_fraction", "-1"]) == 2
  assert os.listdir(tmp_path) == []


# ---- --max_failure_fraction: the prep job -------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  d = tmp_path_factory.mktemp("in")
  for i in range(2):
    digit_clip(str(d / f"good{i}.mp4"), 40 + i, n=6, size=48)
  (d / "bad.mp4").write_bytes(b"not a video at all " * 32)
  return d


def test_all_failing_prep_job_exits_1_after_writing_its_report(tmp_path, capsys):
  for name in ("a.mp4", "b.mp4"):
    (tmp_path / name).write_bytes(b"junk" * 50)
  out = tmp_path / "out"
  code = _exit_code(codec_patchify.main, ["--input", str(tmp_path / "*.mp4"), "--output_dir", str(out),
                                          "--max_failure_fraction", "1"] + SMALL)
  err = capsys.readouterr().err
  assert code == 1
  assert "nothing was written: 2 of 2 inputs failed" in err and str(out / "failures.jsonl") in err
  rows = [json.loads(l) for l in open(out / "failures.jsonl")]
  assert sorted(os.path.basename(r["path"]) for r in rows) == ["a.mp4", "b.mp4"]
  assert json.load(open(out / "manifest.json"))["num_failures"] == 2
  # A glob that matches nothing writes nothing and fails too.
  code = _exit_code(codec_patchify.main, ["--input", str(tmp_path / "*.avi"), "--output_dir",
                                          str(tmp_path / "none")] + SMALL)
  assert code == 2 and "matches no files" in capsys.readouterr().err
  assert not (tmp_path / "none").exists()


def test_one_bad_of_three_fails_only_at_fraction_zero_and_keeps_the_valid(inputs, tmp_path, capsys):
  argv = ["--input", str(inputs / "*.mp4")] + SMALL
  codec_patchify.main(argv + ["--output_dir", str(tmp_path / "default")])  # 1/3 <= 0.5: no exit
  capsys.readouterr()
  code = _exit_code(codec_patchify.main, argv + ["--output_dir", str(tmp_path / "strict"),
                                                 "--max_failure_fraction", "0"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 1
  assert err[-1] == ("codec_patchify: error: 1 of 3 inputs failed: fraction 0.333 > --max_failure_fraction 0; "
                     f"failure report: {tmp_path / 'strict' / 'failures.jsonl'}")
  a, b = shards.raw_records(tmp_path / "default"), shards.raw_records(tmp_path / "strict")
  assert len(a) == 2 and a == b
  assert {r["source"] for r in records.read_all(str(tmp_path / "strict"))} == {
      str(inputs / "good0.mp4"), str(inputs / "good1.mp4")}
  assert [json.loads(l)["path"] for l in open(tmp_path / "strict" / "failures.jsonl")] == [str(inputs / "bad.mp4")]
  assert json.load(open(tmp_path / "strict" / "manifest.json"))["max_failure_fraction"] == 0
  # The earlier run's outputs are untouched by a refused rerun into the same folder.
  before = _tree_hashes(tmp_path / "strict")
  assert _exit_code(codec_patchify.main, argv + ["--output_dir", str(tmp_path / "strict")]) == 2
  assert _tree_hashes(tmp_path / "strict") == before


# ---- --max_failure_fraction: the cluster job's input --------------------------------------------

def _embeddings(d, n=12, bad=()):
  x = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
  ids = np.arange(n, dtype=np.int64) + 100
  for kind, row in bad:
    if kind == "nan":
      x[row, 2] = np.nan
    elif kind == "dup":
      ids[row] = ids[0]
    elif kind == "missing":
      ids[row] = -1
  os.makedirs(d, exist_ok=True)
  np.save(os.path.join(d, "embeddings.npy"), x)
  np.save(os.path.join(d, "sample_ids.npy"), ids)
  return str(d), ids


def test_cluster_counts_rejected_rows_against_the_fraction(tmp_path, capsys):
  emb, ids = _embeddings(tmp_path / "emb", bad=[("nan", 3), ("dup", 5), ("missing", 7)])
  base = ["--embeddings", emb, "--num_clusters", "2", "--top_k", "1", "--iters", "2"]
  # 4 of 12 rejected (both rows of the duplicated id): within the default 0.5.
  cluster.main(base + ["--output", str(tmp_path / "ok")])
  rows = [json.loads(l) for l in open(tmp_path / "ok" / "failures.jsonl")]
  assert sorted((r["row"], r["reason"].split(" ")[0]) for r in rows) == [
      (0, "sample"), (3, "embedding"), (5, "sample"), (7, "sample")]
  table = np.load(tmp_path / "ok" / "labels.npz")
  assert sorted(table["sample_id"].tolist()) == sorted(np.delete(ids, [0, 3, 5, 7]).tolist())
  code = _exit_code(cluster.main, base + ["--output", str(tmp_path / "strict"), "--max_failure_fraction", "0.25"])
  err = capsys.readouterr().err
  assert code == 1
  assert ("4 of 12 embedding rows failed: fraction 0.333 > --max_failure_fraction 0.25; failure report: "
          + str(tmp_path / "strict" / "failures.jsonl")) in err
  assert os.listdir(tmp_path / "strict") == ["failures.jsonl"]
  # All rows bad: nothing to cluster, a failure whatever the fraction.
  emb, _ = _embeddings(tmp_path / "allbad", n=2, bad=[("dup", 1)])
  code = _exit_code(cluster.main, ["--embeddings", emb, "--num_clusters", "1", "--output", str(tmp_path / "x"),
                                   "--max_failure_fraction", "1"])
  assert code == 1 and "nothing was written: 2 of 2 embedding rows failed" in capsys.readouterr().err
  # The library call stays strict.
  with pytest.raises(ValueError, match="duplicate sample id"):
    cluster.load_embeddings(emb)


# ---- --max_failure_fraction: embed --------------------------------------------------------------

@pytest.mark.slow
def test_embed_skips_unreadable_records_within_the_fraction(tmp_path, capsys):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from ovenc_jax.configs import pretrain
  from ovenc_jax.eval import embed
  from ovenc_jax.model import encoder as model_lib
  from ovenc_jax.train import checkpoint as ckpt_lib
  from tests.helpers import digit_shards

  config = pretrain.get_config("variant=tiny")
  work = str(tmp_path / "run")
  embed.save_config(work, config)
  p = config.model.patch_size
  example = dict(patches=jnp.zeros((1, 32, p * p * 3), jnp.uint8), positions=jnp.zeros((1, 32, 3), jnp.int32),
                 segment_ids=jnp.ones((1, 32), jnp.int32))
  params = model_lib.encoder_from_config(config.model).init(jax.random.key(0), **example)["params"]
  ckpt_lib.write_params_checkpoint(work, {"encoder": nn.meta.unbox(params)})
  good = str(tmp_path / "good")
  digit_shards.write_digit_shards(good, 0, 3, num_shards=1)
  mixed = tmp_path / "mixed"
  mixed.mkdir()
  writer = array_record_module.ArrayRecordWriter(str(mixed / records.shard_name(0, 1)), "group_size:1")
  for i, data in enumerate(array_record_module.ArrayRecordReader(records.list_shards(good)[0]).read_all()):
    writer.write(data)
    if i == 1:
      writer.write(b"not a record")
  writer.close()
  (mixed / "manifest.json").write_text(json.dumps({"shards": [records.shard_name(0, 1)]}))
  base = ["--workdir", work, "--records", str(mixed), "--tokens_per_row", "32"]
  embed.main(base + ["--output", str(tmp_path / "ok")])  # 1 of 4 unreadable: within 0.5
  ref, ref_ids = embed.embed_records(work, good, tokens_per_row=32)
  np.testing.assert_array_equal(np.load(tmp_path / "ok" / "embeddings.npy"), ref)
  np.testing.assert_array_equal(np.load(tmp_path / "ok" / "sample_ids.npy"), ref_ids)
  rows = [json.loads(l) for l in open(tmp_path / "ok" / "failures.jsonl")]
  assert [(os.path.basename(r["shard"]), r["record"]) for r in rows] == [(records.shard_name(0, 1), 2)]
  with pytest.raises(ValueError, match="record 2 is unreadable"):
    embed.embed_records(work, str(mixed), tokens_per_row=32)
  capsys.readouterr()
  code = _exit_code(embed.main, base + ["--output", str(tmp_path / "strict"), "--max_failure_fraction", "0"])
  assert code == 1
  assert ("1 of 4 records failed: fraction 0.250 > --max_failure_fraction 0; failure report: "
          + str(tmp_path / "strict" / "failures.jsonl")) in capsys.readouterr().err
  np.testing.assert_array_equal(np.load(tmp_path / "strict" / "embeddings.npy"), ref)  # valid output kept


# ---- progress policy ----------------------------------------------------------------------------

class _Stream(io.StringIO):
  def __init__(self, tty):
    super().__init__()
    self.tty = tty

  def isatty(self):
    return self.tty


def test_progress_policy_follows_tty_and_ci():
  tty, pipe = _Stream(True), _Stream(False)
  assert not progress.is_quiet(tty, env={}, stdout=tty)
  assert progress.is_quiet(tty, env={"CI": "true"}, stdout=tty)
  assert not progress.is_quiet(tty, env={"CI": "false"}, stdout=tty)
  assert progress.is_quiet(pipe, env={}, stdout=tty)
  assert progress.is_quiet(tty, env={}, stdout=pipe)
  kw = progress.tqdm_kwargs(tty, env={}, stdout=tty)
  assert kw["disable"] is False and kw["mininterval"] == progress.TTY_MININTERVAL_S and kw["file"] is tty
  assert progress.tqdm_kwargs(tty, env={"CI": "1"}, stdout=tty)["disable"] is True


def test_quiet_progress_prints_one_line_per_tenth_and_a_bar_on_a_tty():
  pipe = _Stream(False)
  with progress.Progress(200, "job", unit="file", stream=pipe, env={}) as bar:
    for _ in range(200):
      bar.update()
  lines = pipe.getvalue().splitlines()
  assert len(lines) == 10 and lines[-1].startswith("job: 200/200 (100%), ")
  assert "file/s, ETA" in lines[0] and lines[0].startswith("job: 20/200 (10%)")
  tty = _Stream(True)
  with progress.Progress(50, "job", unit="file", stream=tty, env={}, stdout=tty) as bar:
    bar.set(50)
    bar.set(10)  # counts read back never go backwards
    assert bar.n == 50
  assert "50/50" in tty.getvalue()
