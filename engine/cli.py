"""The command lines: an argparse parser that fails in one line, the exit codes every command
shares, and ``python -m engine.train``'s flags generated from `engine.config.TrainConfig`.

Help shows each option once with its one default (``--pack / --no-pack`` for booleans, required
options marked); a bad flag prints ``error: <what>`` and exits 2, like every `InputError`.
A TOML file (``--config``) is checked field by field with the same rules as the flags, and a bad
value names the file and line.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

from engine.config import LIST_KINDS, TrainConfig, check_value, field_kind, flag_name
from engine.errors import EXIT_INPUT_ERROR, InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

EXIT_CODES = """exit status:
  0   done
  2   bad input: one line on stderr naming the file (and line) or the flag; nothing half-written
  3   a training run diverged (non-finite steps in a row, or a non-finite adapter): no run_complete.json
  74  an I/O error (disk full, read-only or permission denied), naming the path
  75  stopped by SIGTERM after saving a checkpoint (continue with --resume)
  --debug (or ENGINE_DEBUG=1) shows the traceback of any error."""
# Flags that describe a new adapter: with --init-adapter the adapter's own values are used.
NEW_ADAPTER_FLAGS = ("lora_r", "lora_alpha", "target_modules", "rslora")


class BoolFlag(argparse.Action):
    """``--pack`` / ``--no-pack``, and ``--pack true|false`` for scripts: one option, shown once."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any):
        negatives = [f"--no-{name[2:]}" for name in option_strings]
        super().__init__(option_strings + negatives, dest, nargs="?", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if option_string.startswith("--no-"):
            if values is not None:
                parser.error(f"argument {option_string}: takes no value")
            setattr(namespace, self.dest, False)
        else:
            try:
                setattr(namespace, self.dest, True if values is None else _parse_bool(values))
            except argparse.ArgumentTypeError as err:
                parser.error(f"argument {option_string}: {err}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, BoolFlag):
            return " / ".join(action.option_strings)
        return super()._format_action_invocation(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), the exit codes in the help, and ``--debug``."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("epilog", EXIT_CODES)
        kwargs.setdefault("formatter_class", HelpFormatter)
        if kwargs.get("description") and "\n" not in kwargs["description"]:
            kwargs["description"] = textwrap.fill(kwargs["description"], width=100)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="Show the traceback of any error.")

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_INPUT_ERROR)


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _default_text(f) -> str:
    """`` (default: X)`` for a field with a fixed default; fields defaulting to None say theirs in the help."""
    if f.default is None:
        return ""
    if isinstance(f.default, bool):
        return f" (default: {'on' if f.default else 'off'})"
    return f" (default: {f.default})"


def build_parser(prog: str, description: str) -> ArgumentParser:
    """One flag per `TrainConfig` field, defaults left unset (None) so that a TOML file can fill them."""
    parser = ArgumentParser(prog=prog, description=description,
                            usage=f"{prog} --model MODEL --data FILE [--method sft|dpo|reward|grpo] [options]")
    parser.add_argument("--config", metavar="FILE.toml", help="TOML file of field = value overrides "
                        "(keys as the flags, with - or _); command-line flags win.")
    for f in fields(TrainConfig):
        kind, _ = field_kind(f.name)
        flag = f"--{flag_name(f.name)}"
        help_text = (f.metadata["help"] + _default_text(f)).replace("%", "%%")  # argparse formats help with %
        if kind is bool:  # --pack / --no-pack, plus --pack false for scripts
            parser.add_argument(flag, dest=f.name, action=BoolFlag, default=None, help=help_text)
        elif kind in LIST_KINDS:  # --reward exact --reward number, or --reward exact number
            parser.add_argument(flag, dest=f.name, type=LIST_KINDS[kind], nargs="+", action="extend", default=None,
                                metavar=f.name.upper(), help=help_text)
        else:
            choices = f.metadata["choices"]
            parser.add_argument(flag, dest=f.name, type=kind, default=None, choices=choices,
                                metavar="{" + ",".join(choices) + "}" if choices else f.name.upper(),
                                help=help_text)
    return parser


def toml_lines(text: str) -> dict[str, int]:
    """Line number of each top-level ``key = ...`` of a TOML text (for error messages)."""
    lines = {}
    for number, line in enumerate(text.splitlines(), start=1):
        match = re.match(r"\s*([A-Za-z0-9_-]+|\"[^\"]+\"|'[^']+')\s*=", line)
        if match:
            lines.setdefault(match.group(1).strip("\"'"), number)
    return lines


def load_toml(path: str) -> dict[str, Any]:
    """Read a TOML override file; an unknown key or a bad value is an error naming file and line."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        text = file.read_text(encoding="utf-8")
        raw = tomllib.loads(text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise InputError(f"{path}: not valid TOML ({err})") from None
    known = {f.name for f in fields(TrainConfig)}
    where = toml_lines(text)
    overrides = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        at = f"{path}:{where[key]}" if key in where else path
        if name not in known:
            raise InputError(f"{at}: unknown option {key!r} (options are the flags of --help, with - or _)")
        problem = check_value(name, value)
        if problem is not None:
            raise InputError(f"{at}: {key}: {problem}")
        overrides[name] = value
    return overrides


def parse_config(argv: list[str] | None, prog: str = "engine.train", description: str = "") -> TrainConfig:
    """A validated TrainConfig from defaults, an optional TOML file and the command line."""
    args = build_parser(prog, description).parse_args(argv)
    values = load_toml(args.config) if args.config else {}
    given = {k: v for k, v in vars(args).items() if k not in ("config", "debug") and v is not None}
    values.update(given)
    if values.get("init_adapter"):
        clash = [f"--{flag_name(n)}" for n in NEW_ADAPTER_FLAGS if n in values]
        if clash:
            raise InputError(f"{', '.join(clash)}: {'has' if len(clash) == 1 else 'have'} no effect with "
                             "--init-adapter, whose own r, alpha and targets are used; drop "
                             f"{'it' if len(clash) == 1 else 'them'}")
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg
