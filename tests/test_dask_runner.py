"""The Beam job on a real Dask cluster (scheduler and 2 worker processes on TCP loopback), against
the DirectRunner: same records per sample_id, same failures, nothing lost when a worker dies."""
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from data_prep import codec_patchify, patchify_output
from data_prep import make_demo_data as md
from ovenc_format import records

pytestmark = pytest.mark.slow  # multi-process or long end-to-end runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASK = [sys.executable, "-m", "dask"]  # the `dask` command of this environment
FLAGS = ["--image_size", "28", "--patch_size", "14", "--num_frames", "4", "--budget", "0.5",
         "--decode_timeout", "3", "--dask_partition_size=3"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(cmd, env=None, log=None):
  # Own session: everything it starts (nanny, workers, decoder children) dies with its group.
  return subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                          stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)


def _stop(procs):
  for p in procs:
    try:
      os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    p.wait()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """Sorted so that with partitions of 3 the first partition is [clip, clip, hanging FIFO]."""
  d = tmp_path_factory.mktemp("dask_in")
  valid, bad = [], {}
  for i, name in enumerate(["a0.mp4", "a1.mp4", "c0.mp4", "c1.mp4", "c2.mp4"]):
    frames, _ = md.render_clip(np.random.default_rng(i), 48, 6, label=i, num_digits=1)
    md.encode_clip(str(d / name), frames, gop=3)
    valid.append(str(d / name))
  Image.fromarray(md.render_clip(np.random.default_rng(9), 48, 1, 3, 1)[0][0]).save(
      str(d / "d_still.png"))
  valid.append(str(d / "d_still.png"))
  os.mkfifo(d / "b_hang.mp4")  # no writer: the decode blocks until --decode_timeout
  bad[str(d / "b_hang.mp4")] = "decode timeout"
  (d / "c_junk.mp4").write_bytes(b"not a video " * 50)
  bad[str(d / "c_junk.mp4")] = "cannot open as media"
  (d / "d_zero.mp4").write_bytes(b"")
  bad[str(d / "d_zero.mp4")] = "empty file"
  bad[str(d / "e_missing.mp4")] = "does not exist"
  (d / "list.txt").write_text("\n".join(sorted(valid + list(bad))) + "\n")
  return str(d / "list.txt"), valid, bad


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
  """`dask scheduler` + `dask worker --nworkers 2 --nthreads 1`, as a user starts them."""
  from distributed import Client
  port = _free_port()
  address = f"tcp://127.0.0.1:{port}"
  env = dict(os.environ, DASK_DISTRIBUTED__WORKER__DAEMON="False")
  logs = tmp_path_factory.mktemp("dask_logs")
  procs = []
  try:
    procs.append(_start(DASK + ["scheduler", "--host", "127.0.0.1", "--port", str(port),
                         "--no-dashboard"], env, open(logs / "scheduler.log", "w")))
    procs.append(_start(DASK + ["worker", address, "--nworkers", "2", "--nthreads", "1",
                         "--no-dashboard"], env, open(logs / "workers.log", "w")))
    deadline = time.time() + 60
    while True:
      try:
        with Client(address, timeout=5) as client:
          client.wait_for_workers(2, timeout=max(1, deadline - time.time()))
        break
      except OSError:
        if time.time() > deadline:
          raise
        time.sleep(0.5)
    yield address
  finally:
    _stop(procs)


@pytest.fixture(scope="module")
def direct(inputs, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("direct") / "ds")
  codec_patchify.run(["--input", inputs[0], "--output_dir", out] + FLAGS)
  return out


def _by_id(out):
  recs = list(records.read_all(out))
  by_id = {r["sample_id"]: r for r in recs}
  assert len(by_id) == len(recs), "a sample_id appears twice"
  return by_id


def _failures(out):
  return [json.loads(line) for line in open(os.path.join(out, "failures.jsonl"))]


def _assert_same_output(out, direct, inputs):
  _, valid, bad = inputs
  got, want = _by_id(out), _by_id(direct)
  assert collections.Counter(r["source"] for r in got.values()) == collections.Counter(valid)
  assert got.keys() == want.keys()
  for sid, r in want.items():
    for field in records.FIELDS:
      np.testing.assert_array_equal(got[sid][field], r[field], err_msg=f"{r['source']} {field}")
  fails = _failures(out)
  assert fails == _failures(direct)
  assert {f["path"] for f in fails} == set(bad)
  for f in fails:
    assert bad[f["path"]] in f["reason"]
  m, dm = (json.load(open(os.path.join(d, "manifest.json"))) for d in (out, direct))
  for key in ("num_records", "num_videos", "num_images", "num_failures", "num_tokens", "signals",
              "failure_kinds", "num_inputs"):
    assert m[key] == dm[key], key
  assert sum(m["records_per_shard"]) == m["num_records"] == len(valid)
  assert not [n for n in os.listdir(out) if n.startswith(patchify_output.STAGING_PREFIX)]


def test_dask_cluster_matches_direct_runner(inputs, cluster, direct, tmp_path):
  out = str(tmp_path / "ds")
  manifest = codec_patchify.run(["--input", inputs[0], "--output_dir", out, "--runner=dask",
                                 f"--dask_client_address={cluster}"] + FLAGS)
  assert f"--runner={codec_patchify.DASK_RUNNER}" in manifest["beam_args"]
  _assert_same_output(out, direct, inputs)


def test_killing_a_worker_mid_job_loses_nothing(inputs, cluster, direct, tmp_path):
  out = str(tmp_path / "ds")
  log = open(tmp_path / "job.log", "w")
  job = _start([sys.executable, "-m", "data_prep.codec_patchify", "--input", inputs[0],
                "--output_dir", out, "--runner=dask", f"--dask_client_address={cluster}"] + FLAGS,
               log=log)
  killed = None
  try:
    # A worker inside a bundle holds an open .tmp-<pid>-* shard; the first partition then waits
    # on the hanging input, so there is time to kill it there.
    deadline = time.time() + 60
    while killed is None and job.poll() is None and time.time() < deadline:
      for root, _, names in os.walk(out) if os.path.isdir(out) else ():
        tmp = [n for n in names if n.startswith(".tmp-") and n.endswith(".array_record")]
        if tmp:
          killed = int(tmp[0].split("-")[1])
          os.kill(killed, signal.SIGKILL)
          break
      time.sleep(0.05)
    rc = job.wait(timeout=120)
  finally:
    _stop([job])
  text = open(tmp_path / "job.log").read()
  assert killed is not None, f"no worker was seen writing a shard\n{text[-3000:]}"
  if rc == 0:
    _assert_same_output(out, direct, inputs)
  else:  # allowed, but only as a clear error and with nothing that looks finished
    assert "KilledWorker" in text or "codec_patchify: error:" in text, text[-3000:]
    assert not os.path.exists(os.path.join(out, "manifest.json"))


def test_runner_shorthand_and_partition_size():
  from data_prep.codec import config
  cfg = config.PatchifyConfig(image_size=28, patch_size=14, num_frames=4, budget=0.5).validate()
  args, on_dask = codec_patchify._dask_args(["--runner", "dask", "--x=1"], 1000, cfg, 2**30)
  assert on_dask and args == ["--x=1", f"--runner={codec_patchify.DASK_RUNNER}",
                              "--dask_partition_size=16"]  # ceil(1000 / 64)
  record = 8 * 14 * 14 * 3 + 1024  # K = 8 patches: at most one shard's worth per partition
  args, _ = codec_patchify._dask_args(["--runner=DaskRunner"], 1000, cfg, 5 * record)
  assert args[-1] == "--dask_partition_size=5"
  args, _ = codec_patchify._dask_args(["--runner=dask", "--dask_npartitions=3"], 10, cfg, 1)
  assert args == ["--dask_npartitions=3", f"--runner={codec_patchify.DASK_RUNNER}"]
  assert codec_patchify._dask_args(["--runner=DirectRunner"], 10, cfg, 1) == (
      ["--runner=DirectRunner"], False)


def test_local_cluster_is_started_and_stopped_by_the_job(inputs, direct, tmp_path):
  import multiprocessing.resource_tracker
  import psutil
  list_file, valid, _ = inputs
  # multiprocessing's resource tracker belongs to this process (started by its first spawn, it
  # lives until the process exits); start it now so it is not counted as left by the job.
  multiprocessing.resource_tracker.ensure_running()
  before = {p.pid for p in psutil.Process().children(recursive=True)}
  out = str(tmp_path / "ds")
  manifest = codec_patchify.run(["--input", valid[0], "--input", valid[-1], "--output_dir", out,
                                 "--runner=dask", "--dask_workers=1"] + FLAGS)
  assert any(a.startswith("--runner=") for a in manifest["beam_args"])
  got, want = _by_id(out), _by_id(direct)
  assert len(got) == 2
  for sid, r in got.items():
    for field in records.FIELDS:
      np.testing.assert_array_equal(r[field], want[sid][field])
  deadline = time.time() + 30  # the cluster's processes are gone once the job returns
  while (left := [p for p in psutil.Process().children(recursive=True)
                  if p.pid not in before and p.is_running()
                  and p.status() != psutil.STATUS_ZOMBIE]) and time.time() < deadline:
    time.sleep(0.2)
  assert not left, [p.cmdline() for p in left]
