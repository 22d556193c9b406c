"""Reading data files: JSONL or one JSON array of objects, parsed whole before any work.

Files are JSONL (one object per line, blank lines ignored) or JSON (one array of objects). The
whole file is parsed before anything else happens, so a malformed line stops a run with
``InputError("file:line: ...")`` before any tokenization or training. Every record keeps the line
it starts on (and, in an array, its index), so later errors can name it. Also refused, naming the
line: bytes that are not UTF-8, JSON nested too deeply to parse, and strings holding a lone
surrogate escape (``"\\ud800"``), which no tokenizer can encode.
"""

from __future__ import annotations

from collections import Counter

import json
from pathlib import Path
from typing import Any, NamedTuple

from engine.errors import InputError


class RawRecord(NamedTuple):
    """One parsed record: the line it starts on, its index in a JSON array (None in JSONL), its value."""

    line: int
    index: int | None
    value: Any

    @property
    def where(self) -> str:
        """``12`` or ``3 (array element 7)``: what follows ``file:`` in messages."""
        return str(self.line) if self.index is None else f"{self.line} (array element {self.index})"


def read_records(path: str | Path) -> list[RawRecord]:
    """Parse a JSONL or JSON-array file into its records; all or nothing.

    A JSON array is read element by element so that every record keeps the line it starts on.
    Raises `InputError` naming the file and line for unreadable files, malformed JSON and values
    that are not objects (see the module docstring for the rest).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: data file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected a JSONL or JSON file") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    try:
        text = data.decode("utf-8-sig")  # -sig: tolerate a byte-order mark
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the file as "
                         "UTF-8") from None
    start = len(text) - len(text.lstrip())
    if start < len(text) and text[start] == "[":
        records = _read_json_array(text, start, path)
    else:
        records = _read_jsonl(text, path)
    if not records:
        raise InputError(f"{path}: no records (expected JSONL objects or a JSON array of objects)")
    for record in records:
        if not isinstance(record.value, dict):
            raise InputError(f"{path}:{record.where}: expected a JSON object, got {type(record.value).__name__}")
        if _has_lone_surrogate(record.value):
            raise InputError(f"{path}:{record.where}: a string holds a lone surrogate escape (such as \\ud800), "
                             "which is not valid Unicode text")
    return records


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string in ``value`` (keys included) cannot be encoded as UTF-8."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack += list(item.keys()) + list(item.values())
        elif isinstance(item, list):
            stack += item
    return False


def _loads(raw: str, path: Path, line: int, what: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{line + err.lineno - 1}: malformed JSON ({err.msg} at column {err.colno}); "
                         f"expected {what}") from None
    except RecursionError:
        raise InputError(f"{path}:{line}: JSON nested too deeply to read; expected {what}") from None


def _read_jsonl(text: str, path: Path) -> list[RawRecord]:
    records = []
    # split on "\n" only: str.splitlines would also split at U+2028 inside JSON strings
    for number, raw in enumerate(text.split("\n"), start=1):
        if raw.strip():
            records.append(RawRecord(number, None, _loads(raw, path, number, "one JSON object per line")))
    return records


def _read_json_array(text: str, start: int, path: Path) -> list[RawRecord]:
    decoder = json.JSONDecoder()
    records = []
    line, counted = 1, 0  # line number of position `counted`, advanced incrementally

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    def skip_ws(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    def fail(pos: int, what: str) -> InputError:
        return InputError(f"{path}:{line_at(pos)}: malformed JSON array ({what})")

    pos = skip_ws(start + 1)
    if pos < len(text) and text[pos] == "]":
        return records
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column "
                             f"{err.colno}); expected a JSON array of objects") from None
        except RecursionError:
            raise InputError(f"{path}:{line_at(pos)}: JSON nested too deeply to read; expected a JSON array "
                             "of objects") from None
        records.append(RawRecord(line_at(pos), len(records), value))
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
        elif pos < len(text) and text[pos] == "]":
            break
        else:
            raise fail(pos, f"expected ',' or ']' after the element on line {records[-1].line}")
    if skip_ws(pos + 1) != len(text):
        raise fail(skip_ws(pos + 1), "unexpected content after the closing ']'")
    return records


def keys_seen(records: list[RawRecord]) -> str:
    """The record keys of a file with their counts, most common first (20 at most), for error messages."""
    keys = Counter(k for raw in records for k in raw.value)
    return ", ".join(f"{k} (x{n})" for k, n in keys.most_common(20))
