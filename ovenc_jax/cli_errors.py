"""One error style for the absl commands: a user error is one line `PROG: error: MESSAGE` and exit status 2."""
import functools
import sys
import traceback

from absl import app, flags

# Errors a user fixes with other flags, config values or files (config validation, a missing folder,
# a checkpoint of another model); anything else keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, KeyError, app.UsageError)
EXIT_USER_ERROR = 2


def _message(e: BaseException) -> str:
  # KeyError's str() is the repr of its key; the message is its argument. One line, however it was built.
  text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  lines = [part.strip() for part in text.splitlines() if part.strip()]
  # A message that carries a traceback (a config file that raised while flags were parsed): its
  # lead-in and the exception line it ends with.
  tb = next((i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")), None)
  if tb is not None:
    lines = lines[:tb] + lines[-1:]
  return " ".join(lines) or type(e).__name__


def fail(prog: str, e: BaseException, verbose: bool = False) -> None:
  """Prints `PROG: error: MESSAGE` (after the traceback when verbose) and exits with status 2."""
  if verbose:
    traceback.print_exception(e)
  print(f"{prog}: error: {_message(e)}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def define_verbose_flag() -> None:
  """Defines --verbose once; a command's module declares it a key flag so that --help lists it."""
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, "on an error, print its traceback too")


def _verbose(argv) -> bool:
  # --verbose is not parsed yet when flag parsing fails: read it from the command line.
  return any(a in ("--verbose", "-verbose", "--verbose=true", "--verbose=True") for a in argv[1:])


def _flag_error(e: BaseException, argv, prog: str) -> None:
  verbose = _verbose(argv)
  if isinstance(e, flags.Error):  # an unknown flag, a value of the wrong type, a config file that raised
    fail(prog, e, verbose)
  if isinstance(e, (AttributeError, KeyError)):
    # ml_collections' config flags report an unknown `--config.a.b` key this way, naming only the key.
    key = _message(e).strip("'\"")
    arg = next((a for a in argv[1:] if a.startswith("--") and key in a.partition("=")[0].split(".")), None)
    if verbose:
      traceback.print_exception(e)
    fail(prog, KeyError(f"{arg or 'a flag'}: the config has no key {key!r}" if key else str(e)))
  fail(prog, e, verbose)


def _parse_flags(argv, prog):
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError) as e:
    _flag_error(e, argv, prog)


def run(main, prog: str, define_flags=None) -> None:
  """app.run(main) with a --verbose flag; user errors (USER_ERRORS, flag parsing) as one line on stderr.

  `define_flags()` defines flags that read the command line as they are defined (ml_collections'
  config file flags apply `--config.*` overrides then): its errors are reported the same way."""
  define_verbose_flag()
  if define_flags is not None:
    try:
      define_flags()
    except (flags.Error, AttributeError, KeyError, ValueError) as e:
      _flag_error(e, sys.argv, prog)

  @functools.wraps(main)
  def guarded(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      fail(prog, e, verbose=flags.FLAGS.verbose)

  app.run(guarded, flags_parser=functools.partial(_parse_flags, prog=prog))
