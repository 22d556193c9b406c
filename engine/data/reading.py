"""Reading data files: JSONL or one JSON array of objects, parsed whole before any work.

Files are JSONL (one object per line, blank lines ignored) or JSON (one array of objects). The
whole file is parsed before anything else happens, so a malformed line stops a run with
``InputError("file:line: ...")`` before any tokenization or training. Every record keeps the line
it starts on (and, in an array, its index), so later errors can name it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.errors import InputError


def read_records(path: str | Path) -> list[tuple[int, Any]]:
    """Parse a JSONL or JSON-array file into ``[(line_number, value), ...]``; all or nothing.

    A JSON array is read element by element so that every record keeps the line it starts on.
    Raises `InputError` naming the file and line for unreadable files, malformed JSON and values
    that are not objects.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a byte-order mark
    except FileNotFoundError:
        raise InputError(f"{path}: data file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read as UTF-8 text ({err})") from None
    start = len(text) - len(text.lstrip())
    if start < len(text) and text[start] == "[":
        records = _read_json_array(text, start, path)
    else:
        records = _read_jsonl(text, path)
    if not records:
        raise InputError(f"{path}: no records (expected JSONL objects or a JSON array of objects)")
    for line, value in records:
        if not isinstance(value, dict):
            raise InputError(f"{path}:{line}: expected a JSON object, got {type(value).__name__}")
    return records


def _read_jsonl(text: str, path: Path) -> list[tuple[int, Any]]:
    records = []
    # split on "\n" only: str.splitlines would also split at U+2028 inside JSON strings
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            records.append((number, json.loads(raw)))
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno}); "
                             "expected one JSON object per line") from None
    return records


def _read_json_array(text: str, start: int, path: Path) -> list[tuple[int, Any]]:
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
        records.append((line_at(pos), value))
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
        elif pos < len(text) and text[pos] == "]":
            break
        else:
            raise fail(pos, f"expected ',' or ']' after the element on line {records[-1][0]}")
    if skip_ws(pos + 1) != len(text):
        raise fail(skip_ws(pos + 1), "unexpected content after the closing ']'")
    return records
