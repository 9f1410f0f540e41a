"""Guard against encoders that leave the calling thread at real-time scheduling priority."""
import contextlib
import os


def policy():
  return os.sched_getscheduler(0), os.sched_getparam(0).sched_priority


@contextlib.contextmanager
def keep_scheduling_policy():
  """Restores this thread's scheduling policy on exit.

  FFmpeg's SVT-AV1 encoder (libsvtav1), run as root, moves the calling thread to SCHED_FIFO 99, and
  every process started from that thread inherits it. Two trainer processes at real-time priority
  spinning in XLA's CPU collectives on a 2-core machine never yield to each other: the 2-process
  tests hung for the rest of the suite (and CI timed out)."""
  before = policy()
  try:
    yield
  finally:
    if policy() != before:
      os.sched_setscheduler(0, before[0], os.sched_param(before[1]))
