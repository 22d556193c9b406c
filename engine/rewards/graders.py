"""Built-in reward functions (``--reward exact``, ``number``, ``regex:PATTERN``, ``json-schema:FILE``).

Each has TRL's reward-function signature ``f(prompts, completions, **columns) -> list[float]``:
``prompts[i]`` a string or a message list, ``completions[i]`` a string (text prompts) or
``[{"role": "assistant", "content": text}]`` (chat prompts), ``columns`` the other fields of the
data records, each a list aligned with the prompts. Every grader scores 1.0 or 0.0 per completion:

    exact               completion text, stripped  ==  str(answer), stripped
    number              the LAST number in the completion equals the numeric answer, within a
                        relative 1e-6 (`math.isclose`); no number scores 0
    regex:PATTERN       ``re.search(PATTERN, text)`` finds a match; no flags (write ``(?s)``,
                        ``(?i)``, ``(?m)`` in the pattern), unanchored (write ``^…$`` to anchor)
    json-schema:FILE    the completion is a JSON value, or one fenced ```json block and nothing
                        else, that validates against the schema in FILE (`engine.rewards.json_schema`)

Numbers in the text: an optional minus sign (not after a letter or digit: ``10-20`` reads as 10
and 20), digits with optional thousands separators (``1,234``) and an optional decimal part
(``3.5``); a trailing ``.`` ends a sentence, not a number. ``.5``, ``1e3`` and ``½`` are not read.

A function that needs a column lists it in its ``required_columns`` attribute (the recipe checks
the data before training); custom functions may set one too.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.errors import InputError
from engine.rewards.errors import SampleError
from engine.rewards.json_schema import check_schema, is_valid

RewardFunction = Callable[..., list[float]]

NUMBER = re.compile(r"(?:(?<![\w-])-)?(?<![\d.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
FENCED_JSON = re.compile(r"```(?:json)?[ \t]*\n(.*?)\n?[ \t]*```", re.DOTALL)


def completion_text(completion: Any) -> str:
    """The text of one completion: the string itself, or the content of the last message of a
    message list (TRL's ``[{"role": "assistant", "content": text}]``), or of a single message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
    raise TypeError(f"completion {str(completion)[:80]!r}: expected a string or a list of messages")


def last_number(text: str) -> float | None:
    """The value of the last number in ``text`` (rules in the module docstring), or None."""
    found = None
    for found in NUMBER.finditer(text):
        pass
    return None if found is None else float(found.group().replace(",", ""))


def numeric_answer(answer: Any) -> float:
    """An answer as a finite float: an int or float, or a string holding one number (``"1,234"``,
    ``"-3.5"``, ``"1e3"``); ValueError otherwise (booleans included)."""
    value = None
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        value = float(answer)
    elif isinstance(answer, str):
        s = answer.strip()
        if NUMBER.fullmatch(s):
            value = float(s.replace(",", ""))
        else:
            try:
                value = float(s)
            except ValueError:
                value = None
    if value is None or not math.isfinite(value):
        raise ValueError(f"answer {answer!r} is not a number")
    return value


def exact(prompts: list, completions: list, *, answer: list, **columns: list) -> list[float]:
    """1.0 where the stripped completion text equals ``str(answer).strip()``, else 0.0."""
    return [float(completion_text(c).strip() == str(a).strip()) for c, a in zip(completions, answer)]


def number(prompts: list, completions: list, *, answer: list, **columns: list) -> list[float]:
    """1.0 where the last number of the completion equals the numeric answer (rel. 1e-6), else 0.0."""
    scores = []
    for i, (c, a) in enumerate(zip(completions, answer)):
        try:
            expected = numeric_answer(a)
        except ValueError as err:
            raise SampleError(i, str(err)) from None
        got = last_number(completion_text(c))
        scores.append(float(got is not None and math.isclose(got, expected, rel_tol=1e-6)))
    return scores


exact.required_columns = frozenset({"answer"})
number.required_columns = frozenset({"answer"})


def regex_grader(pattern: str, flag: str = "--reward") -> RewardFunction:
    """A grader named ``regex``: 1.0 where ``re.search(pattern, text)`` matches. A pattern that
    does not compile is an InputError naming ``flag``."""
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise InputError(f"{flag} regex:{pattern}: not a valid regular expression: {err}") from None

    def regex(prompts: list, completions: list, **columns: list) -> list[float]:
        return [float(compiled.search(completion_text(c)) is not None) for c in completions]

    return regex


def parse_json_completion(text: str) -> tuple[bool, Any]:
    """(True, value) when the stripped text is a JSON value or exactly one fenced ```json block
    (or a bare ``` block) holding one; (False, None) otherwise. NaN and Infinity are not JSON."""
    s = text.strip()
    if fenced := FENCED_JSON.fullmatch(s):
        s = fenced.group(1)
    try:
        return True, json.loads(s, parse_constant=_not_json)
    except (ValueError, RecursionError):
        return False, None


def _not_json(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def load_json_schema(path: str | Path, flag: str = "--reward") -> Any:
    """The checked schema in ``path``; InputError for a missing file, invalid JSON (with its
    line) or a keyword outside the supported subset (naming the file and the keyword)."""
    where = f"{flag} json-schema:{path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{where}: cannot read the schema: {err}") from None
    try:
        schema = json.loads(text, parse_constant=_not_json)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: {path}:{err.lineno}:{err.colno}: not valid JSON: {err.msg}") from None
    except ValueError as err:
        raise InputError(f"{where}: {path}: not valid JSON: {err}") from None
    check_schema(schema, where)
    return schema


def json_schema_grader(path: str | Path, flag: str = "--reward") -> RewardFunction:
    """A grader named ``json_schema``: 1.0 where the completion parses (`parse_json_completion`)
    and validates against the schema in ``path`` (loaded and checked now)."""
    schema = load_json_schema(path, flag)

    def json_schema(prompts: list, completions: list, **columns: list) -> list[float]:
        scores = []
        for c in completions:
            ok, value = parse_json_completion(completion_text(c))
            scores.append(float(ok and is_valid(value, schema)))
        return scores

    return json_schema
