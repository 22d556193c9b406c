"""Errors about the user's input, and the CLI wrapper that reports them in one line.

Anything a user can get wrong (a folder without config.json, a truncated safetensors file, a
malformed JSON line, a bad flag) raises `InputError` with a message that names the file (and line
or tensor) and says what was expected. Command-line entry points run through `run_cli`, which
prints ``error: <message>`` to stderr and exits with status 2, without a traceback unless
``ENGINE_DEBUG=1`` is set. Bugs (any other exception) keep their traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

EXIT_INPUT_ERROR = 2


class InputError(Exception):
    """Bad input from the user; the message alone must tell them what to fix."""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Call ``main(argv)`` and exit with its return code; report `InputError` in one line."""
    try:
        code = main(argv)
    except InputError as err:
        if os.environ.get("ENGINE_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_INPUT_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
