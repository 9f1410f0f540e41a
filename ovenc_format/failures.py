"""--max_failure_fraction: how many failed inputs a job tolerates before it exits non-zero."""
import argparse
import json
import os

from ovenc_format import atomic_io

DEFAULT_MAX_FAILURE_FRACTION = 0.5
EXIT_CODE = 1


class TooManyFailures(RuntimeError):
  """The job wrote what it could and its failure report, but failed more than it may."""


def fraction(text: str) -> float:
  """argparse type of --max_failure_fraction: a float in [0, 1]."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not 0.0 <= value <= 1.0:
    raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
  return value


def add_flag(parser: argparse.ArgumentParser, what: str):
  parser.add_argument(
      "--max_failure_fraction", type=fraction, default=DEFAULT_MAX_FAILURE_FRACTION,
      help=f"exit with code {EXIT_CODE} (after writing the failure report) when "
      f"more than this fraction of the {what} failed; 0 = any failure fails. A job that writes "
      f"nothing always fails (default %(default)s)")


def check(num_failed: int, num_total: int, max_fraction: float, report: str, what: str,
          num_written: int | None = None):
  """Raises TooManyFailures (one line: the fraction, the count and the report) when more than
  max_fraction of num_total failed, or when nothing was written (num_written == 0)."""
  frac = num_failed / num_total if num_total else 1.0
  if num_written == 0:
    raise TooManyFailures(
        f"nothing was written: {num_failed} of {num_total} {what} failed (fraction {frac:.3f}, "
        f"--max_failure_fraction {max_fraction:g}); failure report: {report}")
  if frac > max_fraction:
    raise TooManyFailures(
        f"{num_failed} of {num_total} {what} failed: fraction {frac:.3f} > "
        f"--max_failure_fraction {max_fraction:g}; failure report: {report}")


def write_report(path: str, rows) -> str:
  """One JSON object per line, written atomically (an empty file when nothing failed, so a report
  left by an earlier run never lingers)."""
  text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
  return atomic_io.atomic_write(os.fspath(path), lambda f: f.write(text), mode="w")
