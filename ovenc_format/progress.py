"""Progress reporting shared by the offline jobs: a tqdm bar on a terminal, a line per ~10% elsewhere."""
import os
import sys
import time

# A bar redraws at most this often on a terminal; quiet mode prints one line per QUIET_STEP of
# the total (logs of CI and batch jobs stay short).
TTY_MININTERVAL_S = 0.5
QUIET_STEP = 0.1


def _isatty(stream) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # closed or not a real file
    return False


def is_quiet(stream=None, env=None, stdout=None) -> bool:
  """True under CI (CI=true/1/yes) or when `stream` (default stderr) or stdout is not a terminal
  (output redirected to a log file)."""
  env = os.environ if env is None else env
  if str(env.get("CI", "")).strip().lower() in ("1", "true", "yes"):
    return True
  stream = sys.stderr if stream is None else stream
  stdout = sys.stdout if stdout is None else stdout
  return not (_isatty(stream) and _isatty(stdout))


def tqdm_kwargs(stream=None, env=None, stdout=None) -> dict:
  """tqdm's settings under the policy: a live bar on a terminal, disabled otherwise (Progress then
  prints its own sparse lines)."""
  stream = sys.stderr if stream is None else stream
  quiet = is_quiet(stream, env, stdout)
  return dict(disable=quiet, mininterval=TTY_MININTERVAL_S, file=stream, dynamic_ncols=True)


def _eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rest = divmod(seconds, 3600)
  return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


class Progress:
  """count/total with rate and ETA: tqdm on a terminal; under CI or without a terminal, one line
  per ~10% of `total` (and none when total is 0 or unknown)."""

  def __init__(self, total, desc: str, unit: str = "it", stream=None, env=None, stdout=None):
    self.total, self.desc, self.unit = total, desc, unit
    self.stream = sys.stderr if stream is None else stream
    self.n = 0
    self.start = time.monotonic()
    self._next_step = 1
    kw = tqdm_kwargs(self.stream, env, stdout)
    self.quiet = kw["disable"]
    self.bar = None
    if not self.quiet:
      from tqdm import tqdm
      self.bar = tqdm(total=total, desc=desc, unit=unit, **kw)

  def line(self) -> str:
    elapsed = max(time.monotonic() - self.start, 1e-9)
    rate = self.n / elapsed
    eta = _eta((self.total - self.n) / rate) if rate > 0 and self.total else "?"
    pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
    return (f"{self.desc}: {self.n}/{self.total}{pct}, {rate:.2f} {self.unit}/s, "
            f"ETA {eta}")

  def update(self, n: int = 1):
    """Adds n done."""
    self.set(self.n + n)

  def set(self, n: int):
    """Sets the count done (for counts read back from workers); never goes backwards."""
    n = min(n, self.total) if self.total else n
    if n <= self.n:
      return
    if self.bar is not None:
      self.bar.update(n - self.n)
    self.n = n
    if self.quiet and self.total:
      step = int(self.n / self.total / QUIET_STEP + 1e-9)
      if step >= self._next_step:
        self._next_step = step + 1
        print(self.line(), file=self.stream, flush=True)

  def write(self, msg: str):
    """A message line on stdout that does not break the bar."""
    if self.bar is not None:
      self.bar.write(msg, file=sys.stdout)
    else:
      print(msg, flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()
      self.bar = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
