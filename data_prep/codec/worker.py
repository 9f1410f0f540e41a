"""The decoder child process (DecodeWorker): a hung or crashing decoder is cut off, not the job."""
import dataclasses
import socket
import subprocess
import sys
import time

import numpy as np

from data_prep.codec.clip import process_path
from data_prep.codec.config import PatchifyConfig
from data_prep.codec.decode import media_duration
from data_prep.codec.signals import FrameSignals


def _worker_loop(conn):
  """The decoder child's loop: a PatchifyConfig dict first, then (path, label, source) requests."""
  cfg = PatchifyConfig(**conn.recv())
  # Load the compiled signal kernel (numba's cache) now, while the worker starts up, not on the
  # first video.
  FrameSignals(cfg, 16, 16).accumulate(np.zeros((cfg.grid_side, cfg.grid_side)),
                                       np.zeros((16, 16), np.uint8), None, None)
  conn.send(("ready",))  # imports are done: from here on only decoding counts against timeouts
  while True:
    try:
      msg = conn.recv()
    except EOFError:
      return
    if msg is None:
      return
    path, label, source = msg
    conn.send(("duration", media_duration(path)))  # the parent scales its timeout by it
    conn.send(process_path(path, label, cfg, source))


def child_main(fd: int):
  """Entry point of the decoder child (`python -c ... FD`): serves requests on socket FD."""
  from multiprocessing.connection import Connection
  conn = Connection(fd)
  try:
    _worker_loop(conn)
  except (BrokenPipeError, ConnectionResetError):
    pass  # the parent went away; nothing is left to answer
  finally:
    conn.close()


# The child imports only the codec library (av, numpy, records): neither multiprocessing's spawn,
# which re-imports the parent's __main__ (in Beam's SDK workers sdk_worker_main, slow to import),
# nor fork, which is unsafe in threaded Beam workers.
_CHILD_CODE = ("import sys; from data_prep.codec import worker; "
               "worker.child_main(int(sys.argv[1]))")


def scaled_timeout(timeout: float, duration: float) -> float:
  """--decode_timeout covers up to a minute of video; longer videos get proportionally more."""
  return timeout * max(1.0, duration / 60.0)


class DecodeWorker:
  """A child process that runs process_path; killed and replaced when it exceeds the timeout.

  The child is a fresh interpreter (subprocess) talking over a socket pair; `prestart()` launches
  it without waiting, so its imports overlap with the caller's own start-up.
  """

  startup_timeout = 120.0

  def __init__(self, cfg, timeout: float):
    self.cfg_dict = dataclasses.asdict(cfg)
    self.timeout = timeout
    self.proc = None
    self.conn = None
    self.ready = False

  def prestart(self):
    """Launches the child if none is running; returns at once (run() waits for it)."""
    if self.proc is None or self.proc.poll() is not None:
      self.close()
      self._launch()

  def _launch(self):
    from multiprocessing.connection import Connection
    ours, theirs = socket.socketpair()
    try:
      self.proc = subprocess.Popen([sys.executable, "-c", _CHILD_CODE, str(theirs.fileno())],
                                   pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                   close_fds=True)
    except BaseException:
      ours.close()
      raise
    finally:
      theirs.close()
    self.conn = Connection(ours.detach())
    self.ready = False
    self.conn.send(self.cfg_dict)

  def _start(self):
    """Launches the child (unless prestart() did) and waits until its imports are done."""
    self.prestart()
    try:
      ready = self.conn.poll(self.startup_timeout) and self.conn.recv() == ("ready",)
    except (EOFError, OSError):
      ready = False
    if not ready:
      self.close()
      raise RuntimeError(f"decode worker did not start within {self.startup_timeout}s")
    self.ready = True

  def run(self, path: str, label: int, source: str = None) -> tuple:
    if not self.ready or self.proc.poll() is not None:
      self._start()
    try:
      self.conn.send((path, label, source))
    except OSError:  # the child died since the check above: the receive below reports it
      pass
    start = time.monotonic()
    limit = self.timeout
    while self.conn.poll(max(0.0, start + limit - time.monotonic())):
      try:
        msg = self.conn.recv()
      except (EOFError, OSError):
        try:
          code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
          code = None
        self.close()
        return ("fail", f"decoder process died (exit code {code})")
      if msg[0] != "duration":
        return msg
      limit = scaled_timeout(self.timeout, msg[1])
    self.close()
    return ("fail", f"decode timeout: no result after {limit:g}s")

  def close(self):
    """Safe in every state: never started, start failed half-way, child died, already closed."""
    proc, conn = self.proc, self.conn
    self.proc = self.conn = None
    self.ready = False
    if proc is not None:
      if proc.poll() is None:
        proc.kill()
      try:
        proc.wait(5)
      except subprocess.TimeoutExpired:
        pass
    if conn is not None:
      conn.close()
