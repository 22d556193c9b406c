"""The JSON Schema subset: one valid and one invalid instance per keyword, and the load-time checks."""

from __future__ import annotations

import pytest

from engine.errors import InputError
from engine.rewards.json_schema import check_schema, first_error, is_valid, json_equal

CASES = [  # (schema, valid instances, invalid instances)
    ({"type": "string"}, ["", "a"], [1, None, ["a"]]),
    ({"type": "integer"}, [0, -3, 2.0], [1.5, True, "1"]),          # 2.0 is an integer; booleans are not
    ({"type": "number"}, [1, 1.5], [False, "1.5", None]),
    ({"type": "boolean"}, [True, False], [0, 1, "true"]),
    ({"type": "null"}, [None], [0, "", False]),
    ({"type": "array"}, [[], [1]], [{}, "[]"]),
    ({"type": "object"}, [{}, {"a": 1}], [[], "{}"]),
    ({"type": ["string", "null"]}, ["x", None], [1, []]),
    ({"enum": ["a", 1, None]}, ["a", 1, 1.0, None], ["b", True, 2]),  # true ≠ 1 in JSON
    ({"const": {"a": [1, True]}}, [{"a": [1.0, True]}], [{"a": [1, 1]}, {"a": [1, True], "b": 0}]),
    ({"required": ["a", "b"]}, [{"a": 1, "b": 2, "c": 3}, "not an object"], [{"a": 1}, {}]),
    ({"properties": {"a": {"type": "integer"}}}, [{"a": 1}, {"b": "x"}, {}], [{"a": "1"}, {"a": 1.5}]),
    ({"properties": {"a": {}}, "additionalProperties": False}, [{"a": 1}, {}], [{"a": 1, "b": 2}]),
    ({"properties": {"a": {}}, "additionalProperties": {"type": "string"}}, [{"a": 1, "b": "x"}], [{"b": 2}]),
    ({"items": {"type": "integer"}}, [[], [1, 2]], [[1, "2"], [None]]),
    ({"minItems": 1, "maxItems": 2}, [[1], [1, 2], "strings pass"], [[], [1, 2, 3]]),
    ({"minimum": 0, "maximum": 10}, [0, 10, 5.5, "not a number"], [-0.1, 10.5]),
    ({"exclusiveMinimum": 0, "exclusiveMaximum": 10}, [0.1, 9.9], [0, 10]),
    ({"minLength": 2, "maxLength": 3}, ["ab", "abc", "é€"], ["a", "abcd"]),
    ({"pattern": "^[a-z]+$"}, ["abc", 12], ["abc1", ""]),
    ({"pattern": "b"}, ["abc"], ["xyz"]),                              # unanchored: search
    ({"anyOf": [{"type": "string"}, {"minimum": 5}]}, ["x", 7], [3]),
    ({"oneOf": [{"type": "integer"}, {"minimum": 5}]}, [3, 5.5, "x"], [7, 4.5]),  # 7 both, 4.5 neither
    ({"allOf": [{"type": "integer"}, {"minimum": 5}]}, [5], [4, 5.5]),
    ({"type": "object", "properties": {"xs": {"type": "array", "items": {"enum": [1, 2]}}}},
     [{"xs": [1, 2, 1]}], [{"xs": [1, 3]}]),
    (True, [1, None, {}], []),
    (False, [], [1, None]),
    ({"title": "t", "description": "d", "$schema": "s", "$id": "i", "default": 1, "examples": [1]}, [1, "x"], []),
]


@pytest.mark.parametrize("schema, valid, invalid", CASES, ids=[str(c[0])[:40] for c in CASES])
def test_keywords(schema, valid, invalid):
    check_schema(schema, "schema.json")
    for x in valid:
        assert first_error(x, schema) is None, (x, first_error(x, schema))
    for x in invalid:
        assert not is_valid(x, schema), x


def test_errors_say_where():
    schema = {"properties": {"people": {"items": {"properties": {"age": {"minimum": 18}}}}}}
    assert first_error({"people": [{"age": 20}, {"age": 17}]}, schema) == "$.people[1].age: 17 violates minimum 18"


def test_json_equal():
    assert json_equal(1, 1.0) and not json_equal(True, 1) and not json_equal(0, False)
    assert json_equal({"a": [1, {"b": None}]}, {"a": [1.0, {"b": None}]}) and not json_equal([1], [1, 1])


@pytest.mark.parametrize("schema, message", [
    ({"format": "email"}, r"\$: unsupported keyword 'format'"),
    ({"properties": {"a": {"$ref": "#/x"}}}, r"\$.properties.a: unsupported keyword '\$ref'"),
    ({"anyOf": [{"type": "string"}, {"patternProperties": {}}]}, r"\$.anyOf\[1\]: unsupported keyword"),
    ({"type": "float"}, r"\$: type 'float': expected one of"),
    ({"items": [{"type": "string"}]}, r"\$: items as a list \(tuple validation\) is not supported"),
    ({"required": "a"}, r"\$: required must be a list"),
    ({"minLength": -1}, r"\$: minLength must be a non-negative integer"),
    ({"exclusiveMinimum": True}, r"\$: exclusiveMinimum must be a number"),
    ({"pattern": "("}, r"\$: pattern '\(' is not a valid regular expression"),
    ({"oneOf": []}, r"\$: oneOf must be a non-empty list"),
    ([], r"\$: a schema must be an object or a boolean"),
])
def test_unsupported_or_malformed_schemas(schema, message):
    with pytest.raises(InputError, match=r"^s.json: JSON Schema at " + message):
        check_schema(schema, "s.json")
