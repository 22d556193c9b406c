"""Built-in graders on crafted completions, text and chat forms."""

from __future__ import annotations

import json

import pytest

from engine.errors import InputError
from engine.rewards.errors import SampleError
from engine.rewards.graders import (
    completion_text,
    exact,
    json_schema_grader,
    last_number,
    number,
    numeric_answer,
    parse_json_completion,
    regex_grader,
)


def chat(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def test_completion_text_forms():
    assert completion_text("hi") == "hi"
    assert completion_text(chat("hello")) == "hello"
    assert completion_text({"role": "assistant", "content": "x"}) == "x"
    with pytest.raises(TypeError, match="expected a string or a list of messages"):
        completion_text(42)


def test_exact_strips_and_compares_strings():
    completions = [" 42\n", "42.0", chat("Paris "), "paris"]
    assert exact([""] * 4, completions, answer=[42, 42, "Paris", "Paris"]) == [1.0, 0.0, 1.0, 0.0]
    assert exact.required_columns == {"answer"}


@pytest.mark.parametrize("text, value", [
    ("The answer is 1,234.", 1234.0),
    ("-3.5", -3.5),
    ("12 apples and 7", 7.0),
    ("no number here", None),
    ("so x = -12,345,678.25!", -12345678.25),
    ("pages 10-20", 20.0),        # a hyphen after a digit is not a minus sign
    ("3,4", 4.0),                 # not a thousands group
    ("1,2345", 2345.0),           # not a thousands group either
    ("costs $0.50.", 0.5),
    ("\\boxed{42}", 42.0),
])
def test_last_number(text, value):
    assert last_number(text) == value


def test_number_grader():
    completions = ["The answer is 1,234.", "-3.5", "12 apples and 7", "nothing", chat("it is 0.1 + 0.2 = 0.3"),
                   "about 1000000.5"]
    answers = [1234, "-3.5", 7.0, 0, "0.3", "1,000,000"]
    assert number([""] * 6, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]  # 1e6+0.5 within 1e-6
    assert number([""], ["1000002"], answer=[1e6]) == [0.0]                                   # 2e-6 off
    assert number.required_columns == {"answer"}


def test_number_names_the_sample_with_a_bad_answer():
    with pytest.raises(SampleError, match="'abc' is not a number") as info:
        number(["", ""], ["1", "2"], answer=[1, "abc"])
    assert info.value.index == 1
    for bad in (True, None, "nan", float("inf")):
        with pytest.raises(ValueError):
            numeric_answer(bad)
    assert numeric_answer(" 1e3 ") == 1000.0 and numeric_answer("-1,234.5") == -1234.5


def test_regex_grader_uses_search_without_flags():
    grade = regex_grader(r"<answer>.*</answer>")
    assert grade.__name__ == "regex"
    texts = ["x <answer>4</answer> y", "<answer>\n4</answer>", chat("<ANSWER>4</answer>")]
    assert grade([""] * 3, texts) == [1.0, 0.0, 0.0]       # '.' does not cross lines, case matters
    assert regex_grader(r"(?si)<answer>.*</answer>")([""] * 3, texts) == [1.0, 1.0, 1.0]
    with pytest.raises(InputError, match=r"--reward regex:\(unclosed: not a valid regular expression"):
        regex_grader("(unclosed")


def test_parse_json_completion():
    assert parse_json_completion(' {"a": 1} ') == (True, {"a": 1})
    assert parse_json_completion('```json\n{"a": [1, 2]}\n```') == (True, {"a": [1, 2]})
    assert parse_json_completion("```\n[true]\n```") == (True, [True])
    assert parse_json_completion('Here: ```json\n{"a": 1}\n```') == (False, None)   # prose around it
    assert parse_json_completion('```json\n{"a": 1}\n```\n```json\n{}\n```') == (False, None)  # two blocks
    assert parse_json_completion("NaN") == (False, None)
    assert parse_json_completion("{'a': 1}") == (False, None)


def test_json_schema_grader(tmp_path):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps({"type": "object", "required": ["name", "age"], "additionalProperties": False,
                                "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}}}))
    grade = json_schema_grader(path)
    assert grade.__name__ == "json_schema"
    completions = ['{"name": "Ann", "age": 31}', '```json\n{"name": "Bo", "age": 4}\n```',
                   '{"name": "Ann", "age": -1}', '{"name": "Ann"}', '{"name": "Ann", "age": 3, "x": 1}',
                   'not json', chat('{"name": "C", "age": 7.0}')]
    assert grade([""] * 7, completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_json_schema_file_errors(tmp_path):
    with pytest.raises(InputError, match=r"--reward json-schema:.*missing.json: no such file"):
        json_schema_grader(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "type": "object",\n  "required": [\n}\n')
    with pytest.raises(InputError, match=r"bad.json:4:1: not valid JSON"):
        json_schema_grader(bad)
    unsupported = tmp_path / "ref.json"
    unsupported.write_text('{"properties": {"a": {"$ref": "#/defs/a"}}}')
    with pytest.raises(InputError, match=r"ref.json: JSON Schema at \$.properties.a: unsupported keyword '\$ref'"):
        json_schema_grader(unsupported)
