"""A small JSON Schema validator for the common subset of the standard (no dependency).

Supported keywords (draft 2020-12 meanings):

    type                 "null" | "boolean" | "object" | "array" | "number" | "integer" | "string",
                         or a list of them; booleans are not numbers; "integer" is a number with no
                         fractional part (1.0 is an integer, as the standard says)
    enum, const          equality of JSON values (true ≠ 1, 1 = 1.0)
    properties, required, additionalProperties (a boolean or a schema for the keys not in properties)
    items (one schema for every element), minItems, maxItems
    minimum, maximum, exclusiveMinimum, exclusiveMaximum (numbers, the draft-6+ form)
    minLength, maxLength (code points), pattern (``re.search``: unanchored, as the standard says)
    anyOf, oneOf, allOf
    true / false         schemas that accept everything / nothing

Annotations (title, description, $schema, $id, $comment, default, examples) are ignored; any other
keyword ($ref, format, patternProperties, …) is refused by `check_schema` rather than silently
ignored, so that a schema never accepts what its author meant to reject.

`check_schema(schema, where)` raises InputError (naming ``where`` and the keyword's place in the
schema, e.g. ``$.properties.age``) once at load time; `first_error(instance, schema)` then returns
None for a valid instance or a one-line reason for the first violation found.
"""

from __future__ import annotations

import math
import re
from typing import Any

from engine.errors import InputError

TYPES = ("null", "boolean", "object", "array", "number", "integer", "string")
ANNOTATIONS = frozenset({"title", "description", "$schema", "$id", "$comment", "default", "examples"})
_COUNTS = ("minItems", "maxItems", "minLength", "maxLength")
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_COMBINATORS = ("anyOf", "oneOf", "allOf")
KEYWORDS = frozenset({"type", "enum", "const", "properties", "required", "additionalProperties", "items", "pattern",
                      *_COUNTS, *_BOUNDS, *_COMBINATORS})


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def json_type_matches(x: Any, name: str) -> bool:
    """Whether the (``json.loads``-decoded) value ``x`` is of JSON type ``name``."""
    if name == "null":
        return x is None
    if name == "boolean":
        return isinstance(x, bool)
    if name == "object":
        return isinstance(x, dict)
    if name == "array":
        return isinstance(x, list)
    if name == "string":
        return isinstance(x, str)
    if name == "number":
        return _is_number(x)
    return _is_number(x) and (isinstance(x, int) or math.isfinite(x) and x.is_integer())


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values: numbers by value, booleans only equal booleans."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) and _is_number(b):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def check_schema(schema: Any, where: str, at: str = "$") -> None:
    """Raise InputError(``"{where}: …"``) for a schema outside the supported subset or malformed."""
    def bad(what: str) -> InputError:
        return InputError(f"{where}: JSON Schema at {at}: {what}")

    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise bad(f"a schema must be an object or a boolean, got {type(schema).__name__}")
    for key, value in schema.items():
        if key in ANNOTATIONS:
            continue
        if key not in KEYWORDS:
            raise bad(f"unsupported keyword {key!r}; supported: {', '.join(sorted(KEYWORDS))}")
        if key == "type":
            names = value if isinstance(value, list) else [value]
            if not names or any(n not in TYPES for n in names):
                raise bad(f"type {value!r}: expected one of {', '.join(TYPES)} or a list of them")
        elif key == "enum" and not isinstance(value, list):
            raise bad("enum must be a list")
        elif key == "required" and not (isinstance(value, list) and all(isinstance(n, str) for n in value)):
            raise bad("required must be a list of property names")
        elif key == "properties":
            if not isinstance(value, dict):
                raise bad("properties must be an object of schemas")
            for name, sub in value.items():
                check_schema(sub, where, f"{at}.properties.{name}")
        elif key in ("additionalProperties", "items"):
            if key == "items" and isinstance(value, list):
                raise bad("items as a list (tuple validation) is not supported; give one schema")
            check_schema(value, where, f"{at}.{key}")
        elif key in _COUNTS and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise bad(f"{key} must be a non-negative integer, got {value!r}")
        elif key in _BOUNDS and not _is_number(value):
            raise bad(f"{key} must be a number, got {value!r}")
        elif key == "pattern":
            if not isinstance(value, str):
                raise bad("pattern must be a string")
            try:
                re.compile(value)
            except re.error as err:
                raise bad(f"pattern {value!r} is not a valid regular expression: {err}") from None
        elif key in _COMBINATORS:
            if not (isinstance(value, list) and value):
                raise bad(f"{key} must be a non-empty list of schemas")
            for i, sub in enumerate(value):
                check_schema(sub, where, f"{at}.{key}[{i}]")


def first_error(x: Any, schema: Any, at: str = "$") -> str | None:
    """None when ``x`` validates against the (checked) ``schema``, else why not, e.g.
    ``"$.age: 17 < minimum 18"``."""
    if schema is True:
        return None
    if schema is False:
        return f"{at}: the schema false accepts nothing"
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(json_type_matches(x, n) for n in names):
            return f"{at}: {type(x).__name__} is not of type {' or '.join(names)}"
    if "enum" in schema and not any(json_equal(x, v) for v in schema["enum"]):
        return f"{at}: {x!r} is not one of the enum values"
    if "const" in schema and not json_equal(x, schema["const"]):
        return f"{at}: {x!r} is not the const {schema['const']!r}"
    if _is_number(x):
        for key, fails in (("minimum", lambda b: x < b), ("maximum", lambda b: x > b),
                           ("exclusiveMinimum", lambda b: x <= b), ("exclusiveMaximum", lambda b: x >= b)):
            if key in schema and fails(schema[key]):
                return f"{at}: {x!r} violates {key} {schema[key]!r}"
    if isinstance(x, str):
        if len(x) < schema.get("minLength", 0) or len(x) > schema.get("maxLength", math.inf):
            return f"{at}: string of length {len(x)} outside minLength/maxLength"
        if "pattern" in schema and not re.search(schema["pattern"], x):
            return f"{at}: string does not match pattern {schema['pattern']!r}"
    if isinstance(x, list):
        if len(x) < schema.get("minItems", 0) or len(x) > schema.get("maxItems", math.inf):
            return f"{at}: array of {len(x)} items outside minItems/maxItems"
        if "items" in schema:
            for i, item in enumerate(x):
                if err := first_error(item, schema["items"], f"{at}[{i}]"):
                    return err
    if isinstance(x, dict):
        if missing := [n for n in schema.get("required", []) if n not in x]:
            return f"{at}: missing required {', '.join(missing)}"
        properties = schema.get("properties", {})
        for name, value in x.items():
            sub = properties.get(name, schema.get("additionalProperties", True))
            if sub is False:
                return f"{at}: property {name!r} is not allowed (additionalProperties)"
            if err := first_error(value, sub, f"{at}.{name}"):
                return err
    return _combinator_error(x, schema, at)


def _combinator_error(x: Any, schema: dict, at: str) -> str | None:
    for sub in schema.get("allOf", []):
        if err := first_error(x, sub, at):
            return err
    if "anyOf" in schema and all(first_error(x, sub, at) for sub in schema["anyOf"]):
        return f"{at}: matches none of anyOf"
    if "oneOf" in schema:
        matches = sum(first_error(x, sub, at) is None for sub in schema["oneOf"])
        if matches != 1:
            return f"{at}: matches {matches} of oneOf, expected exactly 1"
    return None


def is_valid(x: Any, schema: Any) -> bool:
    return first_error(x, schema) is None
