"""Errors about the user's input, and the CLI wrapper that reports them in one line.

Anything a user can get wrong (a folder without config.json, a truncated safetensors file, a
malformed JSON line, a bad flag) raises `InputError` with a message that names the file (and line
or tensor) and says what was expected. Command-line entry points run through `run_cli`, which
prints ``error: <message>`` to stderr and exits with status 2, without a traceback unless
``ENGINE_DEBUG=1`` is set. A `RunStopped` (a run that stopped early on purpose) prints its reason
and exits with its own code. Bugs (any other exception) keep their traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from models.errors import InputError

__all__ = ["EXIT_DIVERGED", "EXIT_INPUT_ERROR", "EXIT_PREEMPTED", "InputError", "RunStopped", "run_cli"]

EXIT_INPUT_ERROR = 2
EXIT_DIVERGED = 3      # a training run stopped after too many non-finite steps in a row
EXIT_PREEMPTED = 75    # SIGTERM: a checkpoint was saved, `--resume` continues (EX_TEMPFAIL)


class RunStopped(Exception):
    """A run that ended early on purpose, with its exit code (EXIT_DIVERGED, EXIT_PREEMPTED)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Call ``main(argv)`` and exit with its return code; report `InputError` in one line."""
    try:
        code = main(argv)
    except InputError as err:
        if os.environ.get("ENGINE_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_INPUT_ERROR)
    except RunStopped as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
