"""Preemption on 2 processes into a bucket: SIGTERM to one process only; both agree on the stop step, save it, resume bitwise."""
import json
import os
import signal
import time

import pytest

from tests.helpers import digit_shards
from tests.helpers.train_cli import finish, losses, start_processes

pytestmark = pytest.mark.slow  # multi-process or long end-to-end runs

STEPS = 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  return digit_shards.write_digit_shards(str(tmp_path_factory.mktemp("digits") / "train"), 0, 400, num_shards=4)


def _start(workdir, data, cache):
  # The mesh's data axis spans the two processes as its dcn part (create_hybrid_device_mesh).
  kw = {"total_steps": STEPS, "log_every": 2, "ckpt_every": 1000, "input.tokens_per_row": 32,
        "mesh.dcn_data": 2}
  # The three runs compile the same programs: XLA's persistent cache shortens each later start, and
  # the bitwise comparison below also holds a cached executable to the freshly compiled one.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return start_processes(workdir, data, 2, env, **kw)


def test_sigterm_to_one_process_stops_both_at_one_step(shards, tmp_path, gcs_emulator):
  """The preempted run's workdir is a bucket (the GCS emulator), as on a pod: its checkpoints,
  metrics, config and TensorBoard events live there; the reference run writes to a local folder."""
  full, cut, cache = tmp_path / "full", "gs://bkt/preempted", str(tmp_path / "xla_cache")
  finish(_start(full, shards, cache), timeout=300)

  procs = _start(cut, shards, cache)
  deadline = time.time() + 240
  while not any(s >= 3 for s in gcs_emulator.losses("bkt", "preempted")):
    assert time.time() < deadline and all(p.poll() is None for p in procs), "no progress"
    time.sleep(0.1)
  t0 = time.time()
  procs[1].send_signal(signal.SIGTERM)  # the other process gets no signal
  outs = finish(procs, timeout=60)
  assert time.time() - t0 < 60
  summary = json.loads(outs[0].split("SUMMARY ")[-1].splitlines()[0])
  k = summary["preempted_at"]
  assert 3 <= k < STEPS
  # One preemption checkpoint, the agreed step (orbax also keeps its initial save of step 1).
  saved = {n.split("/")[2] for n in gcs_emulator.list_objects("bkt", "preempted/checkpoints/")}
  assert sorted(saved, key=int) == sorted({"1", str(k)}, key=int)

  finish(_start(cut, shards, cache), timeout=300)
  a, b = losses(str(full)), gcs_emulator.losses("bkt", "preempted")
  assert sorted(b) == list(range(1, STEPS + 1))
  for s in range(k + 1, STEPS + 1):
    assert a[s] == b[s], (s, a[s], b[s])
  names = gcs_emulator.list_objects("bkt", "preempted/")
  assert "preempted/config.json" in names
  assert any(n.startswith("preempted/tensorboard/events.out.tfevents") for n in names), names
  assert not any(".tmp-" in n or ".write-probe-" in n for n in names), names
  assert not os.path.exists("gs:") and not (tmp_path / "gs:").exists()
