"""SFT data formats: detect a file's format and turn each parsed record into one `Record`.

Files are parsed first, whole, by `engine.data.reading`. Formats and the fields they need (detected per file, or forced with ``format=``):

    text        {"text": str}
    completion  {"prompt": str, "completion": str}
    alpaca      {"instruction": str, "input": str (optional), "output": str}
    messages    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}
    sharegpt    {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}

Detection: a record matches a format when it has all of that format's fields ("text" only when no
other format matches, because Alpaca dumps often carry a pre-rendered "text" too). A file has one
format: records matching none of them are skipped as missing fields; records of two different
formats in one file, or a file where no record matches, raise `InputError` listing the keys seen.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

SKIP_MISSING = "missing_fields"
SKIP_EMPTY = "empty_completion"


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


def detect_format(records: list[tuple[int, dict]], path: str | Path, forced: str | None = None) -> str:
    """The format of a file: `forced` when given (and valid), else detected from record keys."""
    if forced not in (None, "auto"):
        if forced not in FORMAT_FIELDS:
            raise InputError(f"format={forced!r} is not a known data format; expected one of "
                             f"{', '.join(FORMATS)} (or auto)")
        return forced
    first_line: dict[str, int] = {}
    for line, obj in records:
        matches = _formats_of(obj)
        if len(matches) > 1:
            raise InputError(f"{path}:{line}: ambiguous record, it has the fields of "
                             f"{' and '.join(matches)}; pass the format explicitly "
                             f"(accepted: {_accepted()})")
        if matches:
            first_line.setdefault(matches[0], line)
    if len(first_line) == 1:
        return next(iter(first_line))
    keys = Counter(k for _, obj in records for k in obj)
    seen = ", ".join(f"{k} (x{n})" for k, n in keys.most_common(20))
    if not first_line:
        raise InputError(f"{path}: unknown data format; keys seen: {seen}; accepted formats: "
                         f"{_accepted()}")
    mixed = ", ".join(f"{f} (first at line {n})" for f, n in first_line.items())
    raise InputError(f"{path}: ambiguous data format, records of several formats: {mixed}; "
                     f"keys seen: {seen}; use one format per file or pass it explicitly")


# ----------------------------------------------------------------------------- normalisation


def to_record(obj: dict, line: int, fmt: str, use_chat_template: bool) -> Record | str:
    """Normalise one parsed object of format `fmt` to a `Record`, or return a skip reason.

    Alpaca becomes a chat (user: instruction + blank line + input; assistant: output) when the
    tokenizer has a chat template, and the Stanford Alpaca prompt + response otherwise.
    Reasons: `SKIP_MISSING` (a field missing or of the wrong type), `SKIP_EMPTY` (nothing to learn).
    """
    if fmt == "text":
        text = obj.get("text")
        if not isinstance(text, str):
            return SKIP_MISSING
        return Record(line, "text", text=text) if text.strip() else SKIP_EMPTY
    if fmt == "completion":
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            return SKIP_MISSING
        if not completion.strip():
            return SKIP_EMPTY
        return Record(line, "completion", prompt=prompt, completion=completion)
    if fmt == "alpaca":
        return _alpaca_record(obj, line, use_chat_template)
    turns = obj.get("messages") if fmt == "messages" else obj.get("conversations")
    messages = _messages(turns, fmt)
    if messages is None:
        return SKIP_MISSING
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return SKIP_EMPTY
    return Record(line, "chat", messages=messages)


def _alpaca_record(obj: dict, line: int, use_chat_template: bool) -> Record | str:
    instruction, extra, output = obj.get("instruction"), obj.get("input", ""), obj.get("output")
    extra = "" if extra is None else extra
    if not all(isinstance(v, str) for v in (instruction, extra, output)) or not instruction.strip():
        return SKIP_MISSING
    if not output.strip():
        return SKIP_EMPTY
    if use_chat_template:
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = ({"role": "user", "content": user}, {"role": "assistant", "content": output})
        return Record(line, "chat", messages=messages)
    template = ALPACA_PROMPT if extra.strip() else ALPACA_PROMPT_NO_INPUT
    prompt = template.format(instruction=instruction, input=extra)
    return Record(line, "completion", prompt=prompt, completion=output)


def _messages(turns: Any, fmt: str) -> tuple[dict[str, str], ...] | None:
    """Validated {"role", "content"} turns, or None when the list is missing or malformed."""
    if not isinstance(turns, list) or not turns:
        return None
    role_key, content_key = ("role", "content") if fmt == "messages" else ("from", "value")
    out = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get(content_key), str):
            return None
        role = turn.get(role_key)
        role = role if fmt == "messages" else SHAREGPT_ROLES.get(role)
        if role not in ROLES:
            return None
        out.append({"role": role, "content": turn[content_key]})
    return tuple(out)
