"""SFT data formats: detect a file's format and turn each parsed record into one `Record`.

Files are parsed first, whole, by `engine.data.reading`. Formats and the fields they need
(detected per file, or forced with ``format=``):

    text        {"text": str}
    completion  {"prompt": str, "completion": str}
    alpaca      {"instruction": str, "input": str (optional), "output": str}
    messages    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}
    sharegpt    {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}

Detection: a record matches a format when it has all of that format's fields ("text" only when no
other format matches, because Alpaca dumps often carry a pre-rendered "text" too). A file has one
format; records of two different formats in one file, or a file where no record matches, raise
`InputError` listing the keys seen. A record of the file that lacks a field of its format, or has
one of the wrong type, is `Invalid` (an error naming file, line and field, unless the caller skips
such records); one with nothing to learn (an empty completion) is skipped as `SKIP_EMPTY`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.data.reading import keys_seen
from engine.errors import InputError

FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
}
FORMATS = tuple(FORMAT_FIELDS)
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "tool": "tool"}

# The Stanford Alpaca prompt (with and without an "input"); used when the tokenizer has no chat
# template. The response text follows the prompt directly.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

SKIP_EMPTY = "empty_completion"


@dataclass(frozen=True)
class Invalid:
    """A record its file's format cannot read: ``problem`` names the field and what is wrong."""

    problem: str


def _field_problem(obj: dict, name: str, path: str | None = None) -> Invalid:
    where = path or f"field {name!r}"
    if name not in obj:
        return Invalid(f"{where} is missing")
    if obj[name] is None:
        return Invalid(f"{where} is null, expected a string")
    return Invalid(f"{where} must be a string, got {type(obj[name]).__name__}")


@dataclass(frozen=True)
class Record:
    """One training sample, independent of the file format.

    kind "text": train on all of `text`; "completion": `prompt` then `completion`;
    "chat": `messages`, a tuple of {"role", "content"} dicts rendered with the chat template.
    """

    line: int
    kind: str
    text: str = ""
    prompt: str = ""
    completion: str = ""
    messages: tuple[dict[str, str], ...] = ()


# --------------------------------------------------------------------------------- detection


def _formats_of(obj: dict) -> list[str]:
    matches = [f for f, keys in FORMAT_FIELDS.items() if all(k in obj for k in keys)]
    if len(matches) > 1 and "text" in matches:
        matches.remove("text")
    return matches


def _accepted() -> str:
    return "; ".join(f"{f} ({', '.join(keys)})" for f, keys in FORMAT_FIELDS.items())


def detect_format(records: list, path: str | Path, forced: str | None = None) -> str:
    """The format of a file (its records: `engine.data.reading.RawRecord`): `forced` when given (and
    valid), else detected from record keys."""
    if forced not in (None, "auto"):
        if forced not in FORMAT_FIELDS:
            raise InputError(f"format={forced!r} is not a known data format; expected one of "
                             f"{', '.join(FORMATS)} (or auto)")
        return forced
    first_line: dict[str, int] = {}
    for raw in records:
        matches = _formats_of(raw.value)
        if len(matches) > 1:
            raise InputError(f"{path}:{raw.where}: ambiguous record, it has the fields of "
                             f"{' and '.join(matches)}; pass the format explicitly "
                             f"(accepted: {_accepted()})")
        if matches:
            first_line.setdefault(matches[0], raw.line)
    if len(first_line) == 1:
        return next(iter(first_line))
    seen = keys_seen(records)
    if not first_line:
        raise InputError(f"{path}: unknown data format; keys seen: {seen}; accepted formats: "
                         f"{_accepted()}")
    mixed = ", ".join(f"{f} (first at line {n})" for f, n in first_line.items())
    raise InputError(f"{path}: ambiguous data format, records of several formats: {mixed}; "
                     f"keys seen: {seen}; use one format per file or pass it explicitly")


# ----------------------------------------------------------------------------- normalisation


def to_record(obj: dict, line: int, fmt: str, use_chat_template: bool) -> Record | Invalid | str:
    """Normalise one parsed object of format `fmt` to a `Record`; or `Invalid` (a field missing or
    of the wrong type); or `SKIP_EMPTY` (nothing to learn).

    Alpaca becomes a chat (user: instruction + blank line + input; assistant: output) when the
    tokenizer has a chat template, and the Stanford Alpaca prompt + response otherwise.
    """
    if fmt == "text":
        text = obj.get("text")
        if not isinstance(text, str):
            return _field_problem(obj, "text")
        return Record(line, "text", text=text) if text.strip() else SKIP_EMPTY
    if fmt == "completion":
        for name in ("prompt", "completion"):
            if not isinstance(obj.get(name), str):
                return _field_problem(obj, name)
        if not obj["completion"].strip():
            return SKIP_EMPTY
        return Record(line, "completion", prompt=obj["prompt"], completion=obj["completion"])
    if fmt == "alpaca":
        return _alpaca_record(obj, line, use_chat_template)
    key = "messages" if fmt == "messages" else "conversations"
    messages = _messages(obj.get(key), fmt, key)
    if isinstance(messages, Invalid):
        return messages
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return SKIP_EMPTY
    return Record(line, "chat", messages=messages)


def _alpaca_record(obj: dict, line: int, use_chat_template: bool) -> Record | Invalid | str:
    for name in ("instruction", "output"):
        if not isinstance(obj.get(name), str):
            return _field_problem(obj, name)
    instruction, extra, output = obj["instruction"], obj.get("input", ""), obj["output"]
    extra = "" if extra is None else extra
    if not isinstance(extra, str):
        return Invalid(f"field 'input' must be a string or null, got {type(extra).__name__}")
    if not instruction.strip():
        return Invalid("field 'instruction' is empty")
    if not output.strip():
        return SKIP_EMPTY
    if use_chat_template:
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = ({"role": "user", "content": user}, {"role": "assistant", "content": output})
        return Record(line, "chat", messages=messages)
    template = ALPACA_PROMPT if extra.strip() else ALPACA_PROMPT_NO_INPUT
    prompt = template.format(instruction=instruction, input=extra)
    return Record(line, "completion", prompt=prompt, completion=output)


def _messages(turns: Any, fmt: str, key: str) -> tuple[dict[str, str], ...] | Invalid:
    """Validated {"role", "content"} turns, or `Invalid` naming the first malformed one."""
    if not isinstance(turns, list):
        return Invalid(f"field {key!r} is missing" if turns is None else
                       f"field {key!r} must be a list of turns, got {type(turns).__name__}")
    if not turns:
        return Invalid(f"field {key!r} is an empty list")
    role_key, content_key = ("role", "content") if fmt == "messages" else ("from", "value")
    known = ROLES if fmt == "messages" else tuple(SHAREGPT_ROLES)
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return Invalid(f"{key}[{i}] must be an object, got {type(turn).__name__}")
        if not isinstance(turn.get(content_key), str):
            return _field_problem(turn, content_key, f"{key}[{i}].{content_key}")
        role = turn.get(role_key)
        if role not in known:
            return Invalid(f"{key}[{i}].{role_key} is {role!r}, expected one of {', '.join(known)}")
        out.append({"role": role if fmt == "messages" else SHAREGPT_ROLES[role], "content": turn[content_key]})
    return tuple(out)
