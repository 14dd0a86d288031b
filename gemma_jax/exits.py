"""How every command line ends: its exit statuses, and an error as one line.

Each entry point (the trainers, generate, serve, convert, lora, info, the data converter and
the launchers) runs its main through `run`: an exception becomes one line on stderr,
"<command>: error: <what is wrong and where>", and a non-zero status. The messages name the
file and line, config key or flag at fault where the error knows it. `--traceback` anywhere on
the command line, or GEMMA_JAX_TRACEBACK=1, lets the exception through with its full stack.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Sequence

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2  # flags or a config that cannot make a run (UsageError)
# A trainer stopped by SIGTERM (preemption, `launch.tpu_vm stop`) after saving a checkpoint:
# rerunning the same command resumes. 75 is sysexits' EX_TEMPFAIL ("try again later").
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT

TRACEBACK_FLAG = "--traceback"
TRACEBACK_ENV = "GEMMA_JAX_TRACEBACK"

# Exceptions that mean a bug rather than bad input: their one line also names the type.
_BUG_TYPES = (AssertionError, AttributeError, IndexError, KeyError, NameError, TypeError,
              NotImplementedError, ZeroDivisionError, UnboundLocalError)


class UsageError(ValueError):
  """Flags or a config that cannot make a run; the message names the flag or key (status 2)."""


def describe(error: BaseException) -> str:
  """`error` as one line: its message and notes, whitespace collapsed; a syntax error as
  'FILE, line N: message'."""
  if isinstance(error, SyntaxError) and error.filename:
    text = f"{error.filename}, line {error.lineno}: {error.msg}"
  else:
    text = str(error) or type(error).__name__
  # Notes about the stack (grain's "removed its internal frames") mean nothing on one line.
  notes = [n for n in getattr(error, "__notes__", ()) if "traceback" not in n.lower()]
  text = " ".join(" ".join([text, *notes]).split())
  if isinstance(error, _BUG_TYPES):
    text = f"{type(error).__name__}: {text} ({TRACEBACK_FLAG} shows where)"
  return text


def wants_traceback(argv: Sequence[str]) -> bool:
  return TRACEBACK_FLAG in argv or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def run(name: str, main: Callable[[list[str]], int], argv: Sequence[str],
        traceback: bool = False) -> int:
  """main(argv without --traceback), its errors reported as one line (module docstring)."""
  traceback = traceback or wants_traceback(argv)
  argv = [a for a in argv if a != TRACEBACK_FLAG]
  try:
    return main(argv)
  except KeyboardInterrupt:
    if traceback:
      raise
    print(f"{name}: interrupted", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED
  except Exception as e:  # noqa: BLE001 -- the one place every error ends
    if traceback:
      raise
    print(f"{name}: error: {describe(e)}", file=sys.stderr, flush=True)
    return EXIT_USAGE if isinstance(e, UsageError) else EXIT_ERROR


def command(name: str) -> Callable[[Callable[[list[str]], int]], Callable[..., int]]:
  """Decorate `main(argv) -> status` to run through `run` (argv default: sys.argv[1:])."""

  def decorate(main: Callable[[list[str]], int]) -> Callable[..., int]:
    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> int:
      return run(name, main, sys.argv[1:] if argv is None else argv)

    return wrapped

  return decorate
