"""Errors about the user's input, and the CLI wrapper that reports every failure in one line.

Anything a user can get wrong (a folder without config.json, a truncated safetensors file, a
malformed JSON line, a bad flag) raises `InputError` (defined in `models.errors`, the lowest layer
that reads user files) with a message that names the file (and line or tensor) and says what was
expected. Command-line entry points run through `run_cli`, which prints ``error: <message>`` to
stderr and exits with status 2. An operating-system error on a file (disk full, read-only folder,
permission denied) prints its path and reason and exits with 74. A `RunStopped` (a run that ended
early, on purpose or because it diverged) prints its reason and exits with its own code. With
``--debug`` on the command line or ``ENGINE_DEBUG=1`` each of them also prints its traceback
first; bugs (any other exception) always show theirs.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

from models.errors import InputError

__all__ = ["EXIT_DIVERGED", "EXIT_INPUT_ERROR", "EXIT_IO_ERROR", "EXIT_PREEMPTED", "InputError", "RunStopped",
           "run_cli"]

EXIT_INPUT_ERROR = 2
EXIT_DIVERGED = 3      # a training run with non-finite steps in a row, no successful step, or a non-finite adapter
EXIT_IO_ERROR = 74     # the operating system refused a file operation (EX_IOERR)
EXIT_PREEMPTED = 75    # SIGTERM: a checkpoint was saved, `--resume` continues (EX_TEMPFAIL)


class RunStopped(Exception):
    """A run that ended early, with its exit code (EXIT_DIVERGED, EXIT_PREEMPTED)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def describe_os_error(err: OSError) -> str:
    """``path: reason`` (both paths of a rename), e.g. ``runs/a/adapter: No space left on device``."""
    paths = [p for p in (err.filename, err.filename2) if p is not None]
    reason = err.strerror or str(err)
    return f"{' -> '.join(map(str, paths))}: {reason}" if paths else reason


def _traceback_if(debug: bool) -> None:
    if debug:
        traceback.print_exc()


def rank_prefix() -> str:
    """``"rank R: "`` in a process of a torchrun job of several ranks (its lines say who speaks), else ""."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        return f"rank {os.environ['RANK']}: "
    return ""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Call ``main(argv)`` and exit with its return code; report expected failures in one line
    (under torchrun with the rank that failed: every rank reports its own error)."""
    args = sys.argv[1:] if argv is None else argv
    debug = bool(os.environ.get("ENGINE_DEBUG")) or "--debug" in args
    who = rank_prefix()
    try:
        code = main(argv)
    except InputError as err:
        _traceback_if(debug)
        print(f"{who}error: {err}", file=sys.stderr)
        sys.exit(EXIT_INPUT_ERROR)
    except RunStopped as stop:
        _traceback_if(debug)
        print(f"{who}stopped: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except OSError as err:
        _traceback_if(debug)
        print(f"{who}error: {describe_os_error(err)}", file=sys.stderr)
        sys.exit(EXIT_IO_ERROR)
    except KeyboardInterrupt:
        print(f"{who}interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        if who:  # e.g. a collective that failed because another rank died: say which rank saw it
            print(f"{who}failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                  file=sys.stderr)
        raise
    sys.exit(code or 0)
