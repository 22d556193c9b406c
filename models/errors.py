"""The error every layer raises for bad user input: `InputError`.

Anything a user can get wrong (a folder without config.json, a truncated safetensors file, a
malformed JSON line, a bad flag) raises `InputError` with a message that names the file (and line
or tensor) and says what was expected. It lives here, at the lowest layer that reads user files,
so that `models/` never imports `engine/`; `engine.errors` re-exports it and turns it into a
one-line message and exit status 2 at the command line.
"""


class InputError(Exception):
    """Bad input from the user; the message alone must tell them what to fix."""
