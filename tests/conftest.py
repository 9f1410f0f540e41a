"""Test set-up: 8 host CPU devices for every test, set before jax is imported; a scheduling-policy guard."""
import contextlib
import os
import sys

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# CPU unless the caller names platforms: JAX_PLATFORMS=cuda,cpu runs the GPU-only tests on a GPU machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _policy():
  return os.sched_getscheduler(0), os.sched_getparam(0).sched_priority


@contextlib.contextmanager
def keep_scheduling_policy():
  """Restores this thread's scheduling policy on exit.

  FFmpeg's SVT-AV1 encoder (libsvtav1), run as root, moves the calling thread to SCHED_FIFO 99, and
  every process started from that thread inherits it. Two trainer processes at real-time priority
  spinning in XLA's CPU collectives on a 2-core machine never yield to each other: the 2-process
  tests hung for the rest of the suite (and CI timed out)."""
  before = _policy()
  try:
    yield
  finally:
    if _policy() != before:
      os.sched_setscheduler(0, before[0], os.sched_param(before[1]))


@pytest.fixture(autouse=True)
def _scheduling_policy_is_unchanged(request):
  before = _policy()
  yield
  after = _policy()
  if after != before:
    os.sched_setscheduler(0, before[0], os.sched_param(before[1]))
    pytest.fail(f"{request.node.nodeid} left the test process's scheduling policy at {after} (was {before}); "
                f"wrap the call that changes it in conftest.keep_scheduling_policy()", pytrace=False)
